"""The reference implementation of :func:`fastmat.tree.node.decode_node`, in Python.

:func:`build_node` validates a upb-decoded ``Directory`` and packs it into a
:class:`~fastmat.tree.node.Node`; :func:`decode_node_py` decodes the bytes
first. This is the rule book written out plainly (it was the production path
until the C core's ``fm_dir_decode`` took over): ``tests/test_native_decode.py``
checks that both give the same ``Node``, or the same ``BadNode`` message and
name, for generated and mutated messages. Nothing loads a tree with it;
``benches/bench_materialize.py`` times it beside the C path.

One documented difference: the C core refuses every group (wire types 3 and
4; proto3 has none), where upb skips an unknown one.
"""

from __future__ import annotations

import re
from array import array
from typing import TYPE_CHECKING, Any

from fastmat import proto
from fastmat.cas.layout import blob_rel, blob_rels, exec_rel
from fastmat.digest import EMPTY_DIGEST, Digest
from fastmat.tree.node import (
    OP_COPY,
    OP_EMPTY,
    OP_LINK,
    BadNode,
    Node,
    UndecodableNode,
)

if TYPE_CHECKING:
    from fastmat.tree.limits import TreeLimits

__all__ = ["build_node", "decode_node_py"]

_HASHES = re.compile(r"(?:[0-9a-f]{64}\n)*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_EMPTY_HASH = EMPTY_DIGEST.hash
_RESERVED = ("", ".", "..")
_MODE_444, _MODE_777, _NO_MTIME = (0o444,), (0o777,), (-1,)
_MAX_MTIME_NS = 2**63 - 1  # the executor's int64 (-1: none)


def _name_problem(name: str, limits: TreeLimits) -> str | None:
    if name in _RESERVED:
        return f"name {name!r} is not a path component"
    if "/" in name or "\0" in name:
        return f"name {name!r} contains '/' or NUL"
    if len(name.encode()) > limits.max_name_bytes:
        return f"name longer than max_name_bytes ({limits.max_name_bytes})"
    return None


def _check_names(lists: tuple[list[str], list[str], list[str]], limits: TreeLimits) -> int:
    """Raises :class:`BadNode` for a bad, unsorted or duplicate name; returns the UTF-8
    byte length of the longest name (0 for none)."""
    for kind, lst in zip(("files", "directories", "symlinks"), lists, strict=True):
        if lst != sorted(lst):
            i = next(i for i in range(len(lst) - 1) if lst[i] > lst[i + 1])
            raise BadNode(f"{kind} not sorted by name ({lst[i]!r} before {lst[i + 1]!r})", lst[i])
    names = lists[0] + lists[1] + lists[2]
    n = len(names)
    if n > limits.max_entries_per_dir:
        raise BadNode(f"more than max_entries_per_dir ({limits.max_entries_per_dir}) entries")
    if not n:
        return 0
    joined = "/".join(names)
    unique = set(names)
    longest = max(map(len, names))
    if not joined.isascii():  # O(1): CPython knows whether a str is ASCII
        longest = max(map(len, map(str.encode, names)))
    if (
        "\0" in joined
        or joined.count("/") != n - 1
        or not unique.isdisjoint(_RESERVED)
        or longest > limits.max_name_bytes
    ):
        for x in names:
            problem = _name_problem(x, limits)
            if problem:
                raise BadNode(problem, x)
    if len(unique) != n:
        seen: set[str] = set()
        for x in names:
            if x in seen:
                raise BadNode(f"duplicate name {x!r} (files, directories, symlinks)", x)
            seen.add(x)
    return longest


def _file_props(node: Any, executable: bool) -> tuple[int, int] | None:
    """(mode, mtime_ns or -1) when NodeProperties ask for a private inode, else None."""
    has_mode = node.HasField("unix_mode")
    has_mtime = node.HasField("mtime")
    if not (has_mode or has_mtime):
        return None
    mode = node.unix_mode.value if has_mode else (0o555 if executable else 0o444)
    if mode > 0o7777:
        raise BadNode(f"unix_mode {mode:#o} has bits outside 0o7777")
    mtime = -1
    if has_mtime:
        sec, nanos = node.mtime.seconds, node.mtime.nanos
        mtime = sec * 1_000_000_000 + nanos
        if sec < 0 or not 0 <= nanos < 1_000_000_000 or mtime > _MAX_MTIME_NS:
            raise BadNode(f"mtime {sec}s {nanos}ns out of range (0 to 2**63 - 1 ns)")
    return mode & 0o777, mtime  # setuid / setgid / sticky dropped (see fastmat.tree.load)


def _check_hashes(hashes: list[str], names: list[str], what: str) -> None:
    """One regex over all hashes joined; the length check makes sure no hash holds a
    newline (two hashes in one would otherwise pass as two items of the list)."""
    joined = "\n".join(hashes) + "\n"
    if hashes and (len(joined) != 65 * len(hashes) or _HASHES.fullmatch(joined) is None):
        i = next(i for i, h in enumerate(hashes) if _HEX64.fullmatch(h) is None)
        raise BadNode(f"{what} digest hash {hashes[i]!r} is not 64 lowercase hex digits", names[i])


def build_node(msg: Any, limits: TreeLimits) -> Node:
    """Validates one decoded ``Directory`` and packs it; raises :class:`BadNode`.

    A few list comprehensions over the upb message, one join and one encode per
    directory, no per-file objects kept (it was the hot path).
    """
    files, syms, dirs = list(msg.files), msg.symlinks, list(msg.directories)
    fnames = [f.name for f in files]
    snames = [s.name for s in syms]
    dnames = [x.name for x in dirs]
    longest = _check_names((fnames, dnames, snames), limits)
    digests = [f.digest for f in files]
    hashes = [x.hash for x in digests]
    sizes = [x.size_bytes for x in digests]
    _check_hashes(hashes, fnames, "file")
    execs = [f.is_executable for f in files]
    props = [f.HasField("node_properties") for f in files]
    nf = len(fnames)
    exec_digests: list[Digest] = []
    blobs: list[bytes] = []
    mtimes: array[int] | None = None
    if nf and (min(sizes) <= 0 or True in execs or True in props):
        ops, modes, srcs, mt = bytearray(), array("I"), [], array("q")
        for i, (h, size) in enumerate(zip(hashes, sizes, strict=True)):
            if size < 0 or (size == 0 and h != _EMPTY_HASH):
                raise BadNode(f"file digest {h}/{size} is impossible", fnames[i])
            try:
                p = _file_props(files[i].node_properties, execs[i]) if props[i] else None
            except BadNode as e:
                raise BadNode(e.message, fnames[i]) from None
            if p is not None:
                ops.append(OP_COPY if size else OP_EMPTY)
                modes.append(p[0])
                mt.append(p[1])
                srcs.append(blob_rel(h, size) if size else "")
                if size:
                    blobs.append(srcs[-1].encode())
                continue
            mt.append(-1)
            if size == 0:
                ops.append(OP_EMPTY)
                modes.append(0o555 if execs[i] else 0o444)
                srcs.append("")
            elif execs[i]:
                ops.append(OP_LINK)
                modes.append(0o555)
                srcs.append(exec_rel(h, size))
                exec_digests.append(Digest(h, size))
                blobs.append(blob_rel(h, size).encode())
            else:
                ops.append(OP_LINK)
                modes.append(0o444)
                srcs.append(blob_rel(h, size))
                blobs.append(srcs[-1].encode())
        fops = bytes(ops)
        if max(mt) >= 0:
            mtimes = mt
    else:
        fops = b"\x01" * nf
        modes = array("I", _MODE_444) * nf
        srcs = blob_rels(hashes, sizes)
    ns = len(snames)
    if ns:
        targets = [s.target for s in syms]
        for name, t in zip(snames, targets, strict=True):
            if not t or "\0" in t or len(t.encode()) > limits.max_symlink_target_bytes:
                raise BadNode(f"symlink target {t[:80]!r} is empty, has NUL or is too long", name)
        srcs += targets
        modes.extend(array("I", _MODE_777) * ns)
        if mtimes is not None:
            mtimes.extend(array("q", _NO_MTIME) * ns)
    children: list[tuple[bytes, str]] = []
    if dirs:
        ddigests = [x.digest for x in dirs]
        dhashes = [x.hash for x in ddigests]
        dsizes = [x.size_bytes for x in ddigests]
        _check_hashes(dhashes, dnames, "directory")
        if min(dsizes) <= 0:  # size 0 is only the empty Directory's
            for name, h, size in zip(dnames, dhashes, dsizes, strict=True):
                if size < 0 or (size == 0 and h != _EMPTY_HASH):
                    raise BadNode(f"directory digest {h}/{size} is impossible", name)
        children = [
            (name.encode(), f"{h}-{size}")
            for name, h, size in zip(dnames, dhashes, dsizes, strict=True)
        ]
    n = nf + ns
    packed_srcs = ("\0".join(srcs) + "\0").encode() if n else b""
    if nf and not blobs and fops[0] == OP_LINK:  # the fast path: every file a plain link
        blobs = packed_srcs.split(b"\0", nf)[:nf]
    return Node(
        n=n,
        ops=fops + b"\x02" * ns if ns else fops,
        names=("\0".join(fnames + snames) + "\0").encode() if n else b"",
        srcs=packed_srcs,
        modes=modes,
        mtimes=mtimes,
        children=children,
        n_files=nf,
        n_bytes=sum(sizes),
        exec_digests=exec_digests,
        blobs=blobs,
        longest_name=longest,
    )


def decode_node_py(data: bytes, limits: TreeLimits) -> Node:
    """:func:`build_node` of the bytes decoded by upb; :class:`UndecodableNode` when
    upb refuses them (``fastmat.tree.node.decode_node``'s contract)."""
    try:
        msg = proto.Directory.FromString(data)
    except proto.DecodeError as e:
        raise UndecodableNode(str(e)) from e
    return build_node(msg, limits)
