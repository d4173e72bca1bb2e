"""fm_dir_decode (csrc/fm_decode.c) against its reference, and its C contract.

The differential property: for a ``Directory`` message, ``decode_node`` (the C
core) and ``decode_node_py`` (upb, then ``fastmat.tree.node_py.build_node``)
give equal ``Node`` s, or the same ``BadNode`` (message and offending name), or
both find the bytes undecodable. Two documented differences:

- the C core refuses every group (``FM_DIR_E_GROUP``, reported at a group tag),
  where upb skips an unknown one; then the reference may accept;
- the C core refuses a length (wire type 2) written in more than 5 bytes
  (``FM_DIR_E_VARINT``, reported at the length), as upb does from protobuf 7.34
  on; older upb reads up to 10 bytes, and then the reference may accept.

Messages come from three sources, each possibly mutated on the bytes
afterwards (a byte flipped, the end cut, bytes inserted, a slice repeated):

- valid trees built with protobuf's API, then broken by up to three defects
  (bad, duplicate or unsorted names; bad hashes, sizes, modes, mtimes,
  targets), each serialized by upb or re-encoded by hand in an equivalent form
  upb never writes (a singular field split or given twice: the last scalar
  wins, messages merge; unknown fields of every wire type; overlong varints and
  lengths, rarely a length past 5 bytes; a known field number with another
  wire type);
- random field soups built on the wire from the schema (groups included);
- random bytes.

Limits are drawn small (and negative, and past int64) so that every limit
check fires. Run with ``--hypothesis-show-statistics`` for the outcome counts.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastmat import _binding as nb
from fastmat import proto
from fastmat.cas import layout
from fastmat.digest import EMPTY_DIGEST, Digest
from fastmat.tree import TreeLimits
from fastmat.tree.node import BadNode, Node, UndecodableNode, decode_node
from fastmat.tree.node_py import decode_node_py
from tests import protowire as w

DEFAULT = TreeLimits()
HEX_A, HEX_B = "ab" * 32, "0123456789abcdef" * 4
EMPTY_HASH = EMPTY_DIGEST.hash
INT64_MAX = 2**63 - 1

# ---- generation: valid trees, then defects -------------------------------------------

_GOOD_NAMES = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=6),
    st.sampled_from(["a", "B", "é", "e\u0301", "\U0001f600", "\n", "...", "-", "x" * 30]),
).filter(lambda s: s not in (".", ".."))
_BAD_NAMES = st.sampled_from(["", ".", "..", "a/b", "/", "a\0b", "x" * 256, "é" * 128, "x" * 41])
_GOOD_HASHES = st.one_of(
    st.sampled_from([HEX_A, HEX_B]), st.text("0123456789abcdef", min_size=64, max_size=64)
)
_BAD_HASHES = st.sampled_from(
    [
        HEX_A.upper(),
        HEX_A[:63],
        HEX_A + "0",
        "",
        f"{HEX_A}\n{HEX_B}",
        HEX_A + "\n",
        "g" + HEX_A[1:],
        "../../etc/passwd",
        "é" * 32,
    ]
)
_SIZES = st.one_of(
    st.sampled_from([0, -1, INT64_MAX, -(2**63), 2**31, 1]), st.integers(-(2**63), INT64_MAX)
)
_MTIMES = st.one_of(
    st.tuples(st.integers(0, 2**34), st.integers(0, 999_999_999)),
    st.sampled_from(
        [
            (INT64_MAX, 0),
            (9_223_372_036, 854_775_807),
            (9_223_372_036, 854_775_808),
            (-1, 0),
            (0, -1),
            (0, 1_000_000_000),
        ]
    ),
    st.tuples(st.integers(-(2**63), INT64_MAX), st.integers(-(2**31), 2**31 - 1)),
)
_MODES = st.one_of(
    st.integers(0, 0o7777),
    st.sampled_from([0o10000, 0o100644, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
_TARGETS = st.one_of(
    st.sampled_from(["/", "/etc/passwd", "..", "../x", "t"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=10),
)
_BAD_TARGETS = st.sampled_from(["", "a\0b", "x" * 41, "x" * 4096, "é" * 21])
_LISTS = ("files", "directories", "symlinks")
_IDX = st.integers(0, 15)
_DEFECT = st.one_of(
    st.tuples(st.just("name"), st.sampled_from(_LISTS), _IDX, _BAD_NAMES | _GOOD_NAMES),
    st.tuples(st.just("dup"), st.sampled_from(_LISTS), _IDX, st.sampled_from(_LISTS), _IDX),
    st.tuples(st.just("swap"), st.sampled_from(_LISTS), _IDX),
    st.tuples(st.just("hash"), st.sampled_from(_LISTS[:2]), _IDX, _BAD_HASHES | _GOOD_HASHES),
    st.tuples(st.just("size"), st.sampled_from(_LISTS[:2]), _IDX, _SIZES),
    st.tuples(st.just("mtime"), _IDX, _MTIMES),
    st.tuples(st.just("mode"), _IDX, _MODES),
    st.tuples(st.just("props"), _IDX),
    st.tuples(st.just("target"), _IDX, _BAD_TARGETS | _TARGETS),
)


def _add_file(draw: st.DrawFn, msg: Any, name: str) -> None:
    f = msg.files.add(name=name, is_executable=draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:
        f.digest.hash, f.digest.size_bytes = EMPTY_HASH, 0
    else:
        f.digest.hash = draw(_GOOD_HASHES)
        f.digest.size_bytes = draw(st.sampled_from([1, 7, 4096]) | st.integers(1, INT64_MAX))
    if draw(st.integers(0, 3)) == 0:
        np = f.node_properties
        np.SetInParent()
        if draw(st.booleans()):
            np.unix_mode.value = draw(st.integers(0, 0o7777))
        if draw(st.booleans()):
            np.mtime.seconds, np.mtime.nanos = draw(
                st.tuples(st.integers(0, 2**34), st.integers(0, 999_999_999))
            )
        if draw(st.booleans()):
            np.properties.add(name="k", value=draw(st.text(max_size=4)))


def _defect(msg: Any, d: tuple[Any, ...]) -> None:
    kind = d[0]
    if kind in ("mtime", "mode", "props"):
        if not msg.files:
            return
        np = msg.files[d[1] % len(msg.files)].node_properties
        if kind == "mtime":
            np.mtime.seconds, np.mtime.nanos = d[2]
        elif kind == "mode":
            np.unix_mode.value = d[2]
        else:
            np.SetInParent()
        return
    if kind == "target":
        if msg.symlinks:
            msg.symlinks[d[1] % len(msg.symlinks)].target = d[2]
        return
    lst = getattr(msg, d[1])
    if not lst:
        return
    e = lst[d[2] % len(lst)]
    if kind == "name":
        e.name = d[3]
    elif kind == "dup":
        other = getattr(msg, d[3])
        if other:
            e.name = other[d[4] % len(other)].name
    elif kind == "swap" and len(lst) >= 2:
        i = d[2] % (len(lst) - 1)
        a, b = lst[i].SerializeToString(), lst[i + 1].SerializeToString()
        lst[i].Clear()
        lst[i].MergeFromString(b)
        lst[i + 1].Clear()
        lst[i + 1].MergeFromString(a)
    elif kind == "hash":
        e.digest.hash = d[3]
    elif kind == "size":
        e.digest.size_bytes = d[3]


@st.composite
def trees(draw: st.DrawFn) -> Any:
    """A Directory message object: valid, then up to three defects."""
    msg = proto.Directory()
    for name in sorted(draw(st.lists(_GOOD_NAMES, unique=True, max_size=9))):
        kind = draw(st.sampled_from(("file", "file", "dir", "link")))
        if kind == "file":
            _add_file(draw, msg, name)
        elif kind == "dir":
            x = msg.directories.add(name=name)
            empty = draw(st.integers(0, 3)) == 0
            x.digest.hash = EMPTY_HASH if empty else draw(_GOOD_HASHES)
            x.digest.size_bytes = 0 if empty else draw(st.integers(1, 1 << 20))
        else:
            s = msg.symlinks.add(name=name, target=draw(_TARGETS))
            if draw(st.integers(0, 5)) == 0:
                s.node_properties.mtime.seconds = -1  # ignored: symlinks have none
    if draw(st.integers(0, 5)) == 0:
        msg.node_properties.unix_mode.value = 0o7777  # ignored: directories are 0755
    for d in draw(st.just([]) | st.lists(_DEFECT, min_size=1, max_size=3)):
        _defect(msg, d)
    return msg


# ---- re-encoding by hand: the same message in forms upb never writes ---------------


def _scalar_bytes(fd: Any, value: Any) -> bytes:
    if fd.type == fd.TYPE_STRING:
        return bytes(value.encode())
    return w.varint(int(value))


def _decoy(draw: st.DrawFn, fd: Any) -> bytes:
    """A value of fd's type, given before the real one (the last one wins)."""
    if fd.type == fd.TYPE_STRING:
        return w.string(fd.number, draw(st.text(max_size=4)))
    return w.number(fd.number, draw(st.integers(-(2**63), 2**64 - 1)))


def _padded(n: int, pad: int) -> bytes:
    """``n`` as a varint ``pad`` bytes longer than needed, within the 10-byte bound."""
    return w.varint(n, min(pad, 10 - len(w.varint(n))))


def _unknown(draw: st.DrawFn, known: set[int]) -> bytes:
    num = draw(st.sampled_from([7, 8, 15, 16, 100, 2**29 - 1]) | st.integers(1, 20))
    wt = draw(st.sampled_from([w.VARINT, w.I64, w.LEN, w.I32]))
    if num in known and wt == w.LEN:
        wt = w.I32  # a known number with a LEN payload would be decoded, not skipped
    payload = {
        w.VARINT: _padded(draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 9))),
        w.I64: draw(st.binary(min_size=8, max_size=8)),
        w.I32: draw(st.binary(min_size=4, max_size=4)),
        w.LEN: draw(st.binary(max_size=6)),
    }[wt]
    return w.field(num, wt, payload)


def _length_pad(draw: st.DrawFn, payload: bytes) -> int:
    """Extra bytes for the length of ``payload``: mostly none, sometimes overlong
    within upb's 5-byte bound, rarely past it (where the C core refuses)."""
    used = len(w.varint(len(payload)))
    roll = draw(st.integers(0, 63))
    if roll < 8 and used < 5:
        return draw(st.integers(1, 5 - used))
    if roll == 8:
        return draw(st.integers(6 - used, 10 - used))
    return 0


def reencode(draw: st.DrawFn, msg: Any) -> bytes:
    """``msg`` on the wire, equivalent for any conforming decoder: fields in any order
    (a repeated field's elements kept in order), a singular message field sometimes
    split in two occurrences (they merge), a scalar sometimes preceded by a decoy
    (the last one wins), unknown fields between them, varints and lengths sometimes
    overlong (see :func:`_length_pad`)."""
    known = {fd.number for fd in msg.DESCRIPTOR.fields}
    chunks: list[bytes] = []
    for fd, value in msg.ListFields():
        items = list(value) if fd.is_repeated else [value]
        for item in items:
            if fd.type == fd.TYPE_MESSAGE:
                body = reencode(draw, item)
                if not fd.is_repeated and len(body) > 1 and draw(st.integers(0, 3)) == 0:
                    chunks.append(w.field(fd.number, w.LEN, b""))  # presence, then the rest
                chunks.append(w.field(fd.number, w.LEN, body, _length_pad(draw, body)))
                continue
            decoy = _decoy(draw, fd) if draw(st.integers(0, 4)) == 0 else b""
            data = _scalar_bytes(fd, item)
            if fd.type == fd.TYPE_STRING:
                chunks.append(decoy + w.field(fd.number, w.LEN, data, _length_pad(draw, data)))
            else:
                pad = draw(st.integers(0, 9)) if draw(st.booleans()) else 0
                chunks.append(decoy + w.field(fd.number, w.VARINT, _padded(int(item), pad)))
    if msg.DESCRIPTOR.name != "Directory":  # the order of singular fields is free
        chunks = draw(st.permutations(chunks))
    out = []
    for c in chunks:
        if draw(st.integers(0, 6)) == 0:
            out.append(_unknown(draw, known))
        out.append(c)
    return b"".join(out)


# ---- field soups on the wire ----------------------------------------------------------

_KNOWN: dict[str, dict[int, str]] = {  # number -> "str", "int" or a submessage
    "Directory": {1: "FileNode", 2: "DirectoryNode", 3: "SymlinkNode", 5: "NodeProperties"},
    "FileNode": {1: "str", 2: "Digest", 4: "int", 6: "NodeProperties"},
    "DirectoryNode": {1: "str", 2: "Digest"},
    "SymlinkNode": {1: "str", 2: "str", 4: "NodeProperties"},
    "NodeProperties": {1: "NodeProperty", 2: "Timestamp", 3: "UInt32Value"},
    "NodeProperty": {1: "str", 2: "str"},
    "Digest": {1: "str", 2: "int"},
    "Timestamp": {1: "int", 2: "int"},
    "UInt32Value": {1: "int"},
}
_SOUP_STRINGS = st.one_of(
    st.sampled_from(
        [b"a", b"b", b"", b".", HEX_A.encode(), EMPTY_HASH.encode(), b"\xff", b"\xc0\x80"]
    ),
    st.text(max_size=4).map(str.encode),
)


@st.composite
def soups(draw: st.DrawFn, message: str = "Directory", depth: int = 0) -> bytes:
    out = []
    for _ in range(draw(st.integers(0, 5 if depth else 8))):
        choice = draw(st.integers(0, 9))
        known = _KNOWN[message]
        if choice <= 6 and known:
            num = draw(st.sampled_from(sorted(known)))
            kind = known[num]
            if kind == "str":
                out.append(w.field(num, w.LEN, draw(_SOUP_STRINGS)))
            elif kind == "int":
                out.append(w.number(num, draw(st.integers(-(2**63), 2**64 - 1))))
            else:
                out.append(w.field(num, w.LEN, draw(soups(kind, depth + 1))))
        elif choice <= 8:
            out.append(_unknown(draw, set()))
        else:  # a group, or a wire type no decoder knows
            num = draw(st.integers(1, 9))
            body = draw(st.sampled_from([b"", w.number(1, 5)]))
            out.append(draw(st.sampled_from([w.tag(num, 3) + body + w.tag(num, 4), w.tag(num, 6)])))
    return b"".join(out)


# ---- byte mutations -------------------------------------------------------------------

_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("repeat"), st.integers(0, 1 << 16), st.integers(1, 40)),
)


def mutate(data: bytes, m: tuple[Any, ...]) -> bytes:
    at = m[1] % (len(data) + 1)
    if m[0] == "flip" and data:
        buf = bytearray(data)
        buf[at % len(data)] ^= m[2]
        return bytes(buf)
    if m[0] == "cut":
        return data[:at]
    if m[0] == "insert":
        extra: bytes = m[2]
        return data[:at] + extra + data[at:]
    if m[0] == "repeat":
        return data[:at] + data[at : at + m[2]] + data[at:]
    return data


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """(where the bytes come from, the bytes)."""
    source = draw(st.sampled_from(["upb", "upb", "reencoded", "reencoded", "soup", "bytes"]))
    if source == "bytes":
        data = draw(st.binary(max_size=64))
    elif source == "soup":
        data = draw(soups())
    else:
        msg = draw(trees())
        data = msg.SerializeToString() if source == "upb" else reencode(draw, msg)
    mutations = draw(st.lists(_MUTATION, min_size=1, max_size=2) | st.just([]))
    for m in mutations:
        data = mutate(data, m)
    return source + (", mutated" if mutations else ""), data


_LIMIT = st.one_of(st.integers(0, 12), st.sampled_from([-1, -(2**70), 2**70]))
LIMITS = st.one_of(
    st.just(DEFAULT),
    st.builds(
        TreeLimits,
        max_entries_per_dir=_LIMIT | st.just(1_000_000),
        max_name_bytes=st.integers(0, 40) | _LIMIT | st.just(255),
        max_symlink_target_bytes=st.integers(0, 50) | _LIMIT | st.just(4095),
    ),
)

# ---- the property ---------------------------------------------------------------------

Outcome = Node | tuple[str, ...]


def outcome(fn: Callable[[bytes, TreeLimits], Node], data: bytes, limits: TreeLimits) -> Outcome:
    try:
        return fn(data, limits)
    except UndecodableNode:
        return ("undecodable",)
    except BadNode as e:
        return ("bad", e.message, e.name)


_CODE_NAMES = {
    getattr(nb, k): k[6:] for k in dir(nb) if k.startswith("DIR_E_") and k != "DIR_E_WIRE_MAX"
}


def _upb_bounds_lengths() -> bool:
    """Whether the installed upb refuses a length over 5 bytes (protobuf >= 7.34)."""
    try:
        proto.Directory.FromString(w.field(5, w.LEN, b"", pad=5))
    except Exception:  # protobuf's DecodeError; its import path moved between versions
        return True
    return False


UPB_BOUNDS_LENGTHS = _upb_bounds_lengths()


def c_code(data: bytes, limits: TreeLimits) -> int:
    """The C core's refusal code for data (0: accepted), its offset checked: a group
    tag, or a varint over 10 bytes or a length over 5."""
    dec = nb.DirectoryDecoder(
        max_entries=limits.max_entries_per_dir,
        max_name_bytes=limits.max_name_bytes,
        max_target_bytes=limits.max_symlink_target_bytes,
        blob_prefix=layout.BLOBS_PREFIX,
        exec_prefix=layout.EXEC_PREFIX,
    )
    try:
        dec.decode(data)
    except nb.DirectoryRefused as e:
        refusal = e
    else:
        return 0
    if refusal.code == nb.DIR_E_GROUP:  # reported at a group tag
        key, _ = w.read_varint(data, refusal.offset)
        assert key & 7 in (w.SGROUP, w.EGROUP), (data, refusal.offset)
    if refusal.code == nb.DIR_E_VARINT and not _over_ten_bytes(data, refusal.offset):
        assert w.varint_bytes(data, refusal.offset) > 5, (data, refusal.offset)
    return refusal.code


def _over_ten_bytes(data: bytes, pos: int) -> bool:
    try:
        w.read_varint(data, pos)
    except ValueError:
        return True
    return False


def check(source: str, data: bytes, limits: TreeLimits) -> None:
    c = outcome(decode_node, data, limits)
    py = outcome(decode_node_py, data, limits)
    code = c_code(data, limits)
    assert (code == 0) == isinstance(c, Node)
    if code == nb.DIR_E_GROUP:
        if py != c:  # the documented difference: upb skipped an unknown group
            assert w.find_group(data) is not None, data
            event(f"{source}: GROUP, refused by C only")
        else:
            event(f"{source}: GROUP, refused by both")
        return
    if code == nb.DIR_E_VARINT and py != c and not UPB_BOUNDS_LENGTHS:
        event(f"{source}: a length over 5 bytes, refused by C only (protobuf < 7.34)")
        return
    assert c == py, f"{data!r}\nC:  {c!r}\npy: {py!r}"
    event(f"{source}: {'accepted' if code == 0 else _CODE_NAMES[code]}")


_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@settings(max_examples=2000, derandomize=True, **_SETTINGS)
@given(message=messages(), limits=LIMITS)
def test_c_decoder_agrees_with_the_reference(
    message: tuple[str, bytes], limits: TreeLimits
) -> None:
    check(*message, limits)


@pytest.mark.stress
# ~10 ms an example on an idle 2-CPU machine: 15,000 fit well inside the 600 s test
# timeout also on a loaded CI machine (100,000 did not); FASTMAT_DECODE_EXAMPLES for more
@settings(max_examples=int(os.environ.get("FASTMAT_DECODE_EXAMPLES", "15000")), **_SETTINGS)
@given(message=messages(), limits=LIMITS)
def test_c_decoder_agrees_with_the_reference_stress(
    message: tuple[str, bytes], limits: TreeLimits
) -> None:
    check(*message, limits)


# ---- hand-made cases: merging, the last scalar, mistyped fields ---------------------


def _digest_msg(h: str, size: int) -> bytes:
    return w.string(1, h) + w.number(2, size)


def test_a_singular_field_twice_last_scalar_wins_messages_merge() -> None:
    f = (
        w.string(1, "decoy")
        + w.string(1, "tool")  # the last name wins
        + w.field(2, w.LEN, w.string(1, HEX_A))  # digest: the hash ...
        + w.field(2, w.LEN, w.number(2, 5))  # ... merged with the size
        + w.number(4, 1)
        + w.number(4, 0)
        + w.number(4, 2)  # is_executable: the last one, nonzero
    )
    data = w.field(1, w.LEN, f)
    node = decode_node(data, DEFAULT)
    assert node == decode_node_py(data, DEFAULT)
    assert node.names == b"tool\0"
    assert node.srcs == f"{layout.exec_rel(HEX_A, 5)}\0".encode()
    assert node.exec_digests == [Digest(HEX_A, 5)]


def test_node_properties_merge_and_empty_ones_are_present() -> None:
    props = (
        w.field(3, w.LEN, w.number(1, 0o640))  # unix_mode
        + w.field(2, w.LEN, w.number(1, 7))  # mtime.seconds
        + w.field(2, w.LEN, w.number(2, 9))  # mtime.nanos, merged
        + w.field(3, w.LEN, b"")  # unix_mode again, empty: the value stays
    )
    f = w.string(1, "f") + w.field(2, w.LEN, _digest_msg(HEX_A, 3)) + w.field(6, w.LEN, props)
    empty_props = w.string(1, "g") + w.field(2, w.LEN, _digest_msg(HEX_B, 4)) + w.field(6, w.LEN)
    data = w.field(1, w.LEN, f) + w.field(1, w.LEN, empty_props)
    node = decode_node(data, DEFAULT)
    assert node == decode_node_py(data, DEFAULT)
    assert node.ops == bytes([nb.FM_OP_COPY, nb.FM_OP_LINK])  # empty NodeProperties: a link
    assert list(node.modes) == [0o640, 0o444]
    assert node.mtimes is not None
    assert list(node.mtimes) == [7_000_000_009, -1]


def test_a_known_field_with_another_wire_type_is_skipped() -> None:
    f = (
        w.field(1, w.VARINT, w.varint(5))  # name as a varint: unknown
        + w.string(1, "f")
        + w.field(2, w.I32, b"\0\0\0\0")  # digest as fixed32: unknown
        + w.field(2, w.LEN, _digest_msg(HEX_A, 1))
        + w.field(4, w.LEN, b"\x01")  # is_executable as bytes: unknown
    )
    data = w.field(1, w.LEN, f) + w.field(3, w.I64, bytes(8))
    node = decode_node(data, DEFAULT)
    assert node == decode_node_py(data, DEFAULT)
    assert (node.names, node.ops, node.n_files) == (b"f\0", bytes([nb.FM_OP_LINK]), 1)


def test_a_group_is_refused_where_upb_skips_it() -> None:
    f = w.string(1, "f") + w.field(2, w.LEN, _digest_msg(HEX_A, 1))
    data = w.field(1, w.LEN, f + w.tag(9, w.SGROUP) + w.number(1, 1) + w.tag(9, w.EGROUP))
    assert isinstance(decode_node_py(data, DEFAULT), Node)
    with pytest.raises(UndecodableNode, match="group"):
        decode_node(data, DEFAULT)


@pytest.mark.parametrize("extra", range(10))
@pytest.mark.parametrize("number", [1, 5, 9])  # files, node_properties, unknown
def test_a_length_is_read_in_at_most_5_bytes(number: int, extra: int) -> None:
    data = w.field(number, w.LEN, b"", pad=extra)  # 1 + extra bytes of length
    c, py = outcome(decode_node, data, DEFAULT), outcome(decode_node_py, data, DEFAULT)
    if extra >= 5:
        assert c == ("undecodable",)
        assert c_code(data, DEFAULT) == nb.DIR_E_VARINT
        if UPB_BOUNDS_LENGTHS:
            assert py == c
    else:
        assert c == py
        assert c_code(data, DEFAULT) != nb.DIR_E_VARINT


# ---- the C contract -------------------------------------------------------------------


def _opts(
    max_entries: int = 1_000_000,
    max_name: int = 255,
    max_target: int = 4095,
    prefixes: tuple[bytes, bytes] = (b"blobs/", b"exec/"),
) -> tuple[Any, list[Any]]:
    keep = [nb.ffi.new("char[]", p) for p in prefixes]
    o = nb.ffi.new("struct fm_dir_opts *")
    o.max_entries, o.max_name_bytes, o.max_target_bytes = max_entries, max_name, max_target
    o.blob_prefix, o.exec_prefix = keep
    return o, keep


def _raw(data: bytes, opts: Any, length: int | None = None) -> tuple[int, Any, Any]:
    out = nb.ffi.new("struct fm_dir **")
    sentinel = nb.ffi.cast("struct fm_dir *", 0x5EED)
    out[0] = sentinel
    err = nb.ffi.new("struct fm_dir_error *")
    err.code, err.index = 0xAAAA, 0xBBBB
    n = len(data) if length is None else length
    rc = nb.lib.fm_dir_decode(nb.ffi.from_buffer("uint8_t[]", data), n, opts, out, err)
    if rc == 0:
        assert out[0] != sentinel
        assert (err.code, err.index) == (0xAAAA, 0xBBBB)  # *err untouched on success
        nb.lib.fm_dir_free(out[0])
    else:
        assert out[0] == sentinel  # *out untouched on failure
    return int(rc), err, out


def _file(name: str, h: str = HEX_A, size: int = 1, extra: bytes = b"") -> bytes:
    return w.field(1, w.LEN, w.string(1, name) + w.field(2, w.LEN, _digest_msg(h, size)) + extra)


def _dir(name: str, h: str = HEX_A, size: int = 1) -> bytes:
    return w.field(2, w.LEN, w.string(1, name) + w.field(2, w.LEN, _digest_msg(h, size)))


def _link(name: str, target: str) -> bytes:
    return w.field(3, w.LEN, w.string(1, name) + w.string(2, target))


def _mtime(sec: int, nanos: int) -> bytes:
    return w.field(6, w.LEN, w.field(2, w.LEN, w.number(1, sec) + w.number(2, nanos)))


F, D, S = nb.DIR_FILES, nb.DIR_DIRS, nb.DIR_SYMLINKS
_MODE_10000 = w.field(6, w.LEN, w.field(3, w.LEN, w.number(1, 0o10000)))


@dataclass
class Refusal:
    data: bytes
    code: int
    which: int = 0
    index: int = 0
    name: str = ""
    text: str = ""
    nums: tuple[int, int] = (0, 0)
    offset: int = 0  # wire-format refusals
    limits: tuple[int, int, int] = (1_000_000, 255, 4095)  # entries, name, target


CODES: dict[str, Refusal] = {
    "truncated": Refusal(b"\x0a\x05\x0a\x01", nb.DIR_E_TRUNCATED, offset=1),
    "varint": Refusal(b"\x08" + b"\xff" * 10 + b"\x01", nb.DIR_E_VARINT, offset=1),
    "length over 5 bytes": Refusal(b"\x0a" + b"\x80" * 5 + b"\x00", nb.DIR_E_VARINT, offset=1),
    "tag 0": Refusal(_file("a") + b"\x00\x01", nb.DIR_E_TAG, offset=len(_file("a"))),
    "tag over 5 bytes": Refusal(b"\x88\x80\x80\x80\x80\x00\x01", nb.DIR_E_TAG),
    "wire type 7": Refusal(b"\x0f", nb.DIR_E_WIRETYPE),
    "group": Refusal(b"\x0a\x02\x3b\x3c", nb.DIR_E_GROUP, offset=2),
    "utf8": Refusal(b"\x0a\x03\x0a\x01\xff", nb.DIR_E_UTF8, offset=4),
    "unsorted": Refusal(
        _link("a", "t") + _link("c", "t") + _link("b", "t"), nb.DIR_E_UNSORTED, S, 1, "c", "b"
    ),
    "too many": Refusal(_file("a") + _dir("b"), nb.DIR_E_TOO_MANY, limits=(1, 255, 9)),
    "too many (negative)": Refusal(b"", nb.DIR_E_TOO_MANY, limits=(-1, 255, 9)),
    "reserved": Refusal(_file("a") + _dir(".."), nb.DIR_E_RESERVED, D, 0, ".."),
    "slash": Refusal(_link("a/b", "t"), nb.DIR_E_SLASH, S, 0, "a/b"),
    "nul": Refusal(_file("a\0b"), nb.DIR_E_SLASH, F, 0, "a\0b"),
    "long": Refusal(_file("a") + _file("éé"), nb.DIR_E_LONG, F, 1, "éé", limits=(9, 3, 9)),
    "duplicate": Refusal(_file("a") + _file("x") + _link("x", "t"), nb.DIR_E_DUPLICATE, S, 0, "x"),
    "hash": Refusal(
        _file("a") + _file("b", HEX_A.upper()), nb.DIR_E_HASH, F, 1, "b", HEX_A.upper()
    ),
    "dir hash": Refusal(_dir("d", "zz"), nb.DIR_E_HASH, D, 0, "d", "zz"),
    "digest": Refusal(_file("a", HEX_A, -7), nb.DIR_E_DIGEST, F, 0, "a", HEX_A, (-7, 0)),
    "dir digest": Refusal(_dir("d", HEX_B, 0), nb.DIR_E_DIGEST, D, 0, "d", HEX_B),
    "mode": Refusal(_file("a", extra=_MODE_10000), nb.DIR_E_MODE, F, 0, "a", nums=(0o10000, 0)),
    "mtime": Refusal(
        _file("a", extra=_mtime(9_223_372_036, 854_775_808)),
        nb.DIR_E_MTIME,
        F,
        0,
        "a",
        nums=(9_223_372_036, 854_775_808),
    ),
    "mtime nanos": Refusal(
        _file("a", extra=_mtime(1, -1)), nb.DIR_E_MTIME, F, 0, "a", nums=(1, -1)
    ),
    "target": Refusal(_link("l", "x" * 10), nb.DIR_E_TARGET, S, 0, "l", "x" * 10, limits=(9, 9, 9)),
}


@pytest.mark.parametrize("case", sorted(CODES))
def test_each_refusal_names_its_entry(case: str) -> None:
    want = CODES[case]
    opts, _keep = _opts(*want.limits)
    rc, err, _ = _raw(want.data, opts)
    data = want.data
    assert rc == -errno.EINVAL
    assert (err.code, err.list, err.index) == (want.code, want.which, want.index)
    assert data[err.name_off : err.name_off + err.name_len] == want.name.encode()
    assert data[err.str_off : err.str_off + err.str_len] == want.text.encode()
    assert (err.num[0], err.num[1]) == want.nums
    assert err.offset == want.offset


def test_every_code_is_covered() -> None:
    codes = {c.code for c in CODES.values()} | {nb.DIR_E_SIZE}
    assert codes == set(range(1, nb.DIR_E_TARGET + 1))


def test_two_gib_is_refused_unread() -> None:
    opts, _keep = _opts()
    rc, err, _ = _raw(b"\x0a", opts, length=2**31)  # nothing past the length is read
    assert (rc, err.code, err.offset) == (-errno.EINVAL, nb.DIR_E_SIZE, 0)


def test_empty_message_and_free_null() -> None:
    nb.lib.fm_dir_free(nb.ffi.NULL)
    node = decode_node(b"", DEFAULT)
    assert node == decode_node_py(b"", DEFAULT)
    assert (node.n, node.names, node.srcs, node.children, node.longest_name) == (0, b"", b"", [], 0)


def test_the_prefixes_are_the_callers() -> None:
    dec = nb.DirectoryDecoder(
        max_entries=9, max_name_bytes=9, max_target_bytes=9, blob_prefix="B/", exec_prefix="Xx/"
    )
    exe = w.field(
        1, w.LEN, w.string(1, "b") + w.field(2, w.LEN, _digest_msg(HEX_B, 2)) + w.number(4, 1)
    )
    got = dec.decode(_file("a", HEX_A, 10) + exe)
    assert got.srcs == f"B/ab/{HEX_A}-10\0Xx/01/{HEX_B}-2\0".encode()
    assert got.blobs == [f"B/ab/{HEX_A}-10".encode(), f"B/01/{HEX_B}-2".encode()]
    assert got.exec_keys == [f"{HEX_B}-2"]


def test_paths_are_layouts() -> None:
    data = _file("a", HEX_A, INT64_MAX) + _file("b", HEX_B, 1, w.number(4, 1)) + _dir("d", HEX_B, 9)
    node = decode_node(data, DEFAULT)
    want = [layout.blob_rel(HEX_A, INT64_MAX), layout.exec_rel(HEX_B, 1), ""]
    assert node.srcs.split(b"\0") == [p.encode() for p in want]
    assert node.children == [(b"d", Digest(HEX_B, 9).key)]


def test_n_bytes_past_two_to_the_64() -> None:
    data = b"".join(_file(c, HEX_A, INT64_MAX) for c in "abcde")
    node = decode_node(data, DEFAULT)
    assert node.n_bytes == 5 * INT64_MAX
    assert node == decode_node_py(data, DEFAULT)
