"""Property test (issue 10, "Tests"): materialize over generated and mutated trees.

A valid tree is generated -- unicode names, empty files, executables,
NodeProperties mode and mtime, symlinks (absolute, dangling, ``..``, into a
sibling "outside" directory), Directory digests reused in several places --
then up to three mutations are applied: bad names, duplicates, unsorted
lists, bad digest hashes and sizes, missing blobs, a Directory stored under a
hash that is not its own, huge fields, bytes flipped, cut or appended in a
serialized message, long paths, a width bomb. An independent reference reading
of the stored messages (:func:`reference`) says what the tree is, or which
errors a correct loader may raise for it.

The property, for ``materialize`` and for ``DirectoryCache.materialize`` (a
miss, then a hit): a valid tree is produced exactly (the set of paths; each
entry's type, mode, bytes, symlink target, mtime); an invalid one raises a
``FastmatError`` of a type the reference allows, with nothing at the
destination and no cache entry; never another exception. Either way nothing
appears or changes beside the destination (its parent, the "outside"
directory symlinks point into), and the CAS blobs the tree names keep their
bytes and mode.

400 derandomized examples by default (the same ones on every run); ``pytest -m
stress`` runs 20,000 with a random seed (``FASTMAT_FUZZ_EXAMPLES`` to change it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from fastmat import proto
from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.digest import EMPTY_DIGEST, BlobNotFoundError, Digest, DigestMismatchError
from fastmat.errors import FastmatError, InvalidTreeError
from fastmat.materialize import materialize
from fastmat.tree import TreeLimits

# Hypothesis keeps caches (unicode tables, constants) under ./.hypothesis by default;
# with database=None below, nothing else: keep them out of the worktree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "fastmat-hypothesis")

DEFAULT = TreeLimits()
SMALL = TreeLimits(
    max_depth=3,
    max_entries_per_dir=5,
    max_total_entries=30,
    max_name_bytes=24,
    max_symlink_target_bytes=40,
    max_path_bytes=48,
    max_directory_bytes=700,
)
OTHER_HEX = "cd" * 32
SHARED_BYTES = b"shared\n"  # generated often, and stored by the fixture
SHARED = Digest.of(SHARED_BYTES)
BUDGET = 40  # expanded entries of a generated (unmutated) tree, so each example stays cheap
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_HEX64 = re.compile(r"[0-9a-f]{64}")
_INT64_MAX = 2**63 - 1

# ---- generation -------------------------------------------------------------------

_NAMES = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=8),
    st.sampled_from(["a", "B", "é", "e\u0301", "\U0001f600", "\n", " ", "...", "-", "\x7f"]),
    st.integers(20, 255).map(lambda n: "L" * n),
).filter(lambda s: s not in (".", ".."))
_TARGETS = st.one_of(
    st.sampled_from(
        [
            "/",
            "/etc/passwd",
            ".",
            "..",
            "../..",
            "../outside",
            "../outside/victim",
            "../../outside/victim",
            "sub/../../outside",
            "dangling/nowhere",
            "@OUTSIDE@",
            "@OUTSIDE@/victim",
        ]
    ),
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12),
)
_DATA = st.one_of(
    st.just(b""), st.sampled_from([SHARED_BYTES, b"#!/bin/sh\n"]), st.binary(max_size=40)
)
_KINDS = st.sampled_from(("file", "file", "link", "dir"))
_MTIME = st.tuples(st.integers(0, 2**34), st.integers(0, 999_999_999))
_PROPS = st.one_of(
    st.none(),
    st.tuples(st.none() | st.integers(0, 0o7777), st.none() | _MTIME, st.booleans()),
)

_HASH_EDITS = (
    "upper",
    "newline",
    "trailing-newline",
    "short",
    "long",
    "nonhex",
    "empty",
    "path",
    "missing",
    "empty-blob",
    "file-blob",
)
_SIZE_EDITS = ("+1", "-1", "=0", "=-1", f"=-{2**63}", f"={_INT64_MAX}", "=2147483648")
_BAD_NAMES = ("", ".", "..", "a/b", "/", "a\0b", "x" * 256, "\u00e9" * 128, "x" * 25)
_MTIMES = st.one_of(
    st.sampled_from(
        [
            (_INT64_MAX, 0),
            (9_223_372_036, 854_775_807),
            (9_223_372_036, 854_775_808),
            (-1, 0),
            (-(2**63), 0),
            (0, -1),
            (0, 1_000_000_000),
            (0, 2**31 - 1),
        ]
    ),
    st.tuples(st.integers(-(2**63), _INT64_MAX), st.integers(-(2**31), 2**31 - 1)),
)
_IDX = st.integers(0, 63)
_MUTATION = st.one_of(
    st.tuples(st.just("name"), _IDX, _IDX, st.sampled_from(_BAD_NAMES) | _NAMES),
    st.tuples(st.just("dup"), _IDX, _IDX, _IDX),
    st.tuples(st.just("swap"), _IDX, st.sampled_from(("files", "directories", "symlinks")), _IDX),
    st.tuples(st.just("hash"), _IDX, _IDX, st.sampled_from(_HASH_EDITS)),
    st.tuples(st.just("size"), _IDX, _IDX, st.sampled_from(_SIZE_EDITS)),
    st.tuples(st.just("mtime"), _IDX, _IDX, _MTIMES),
    st.tuples(
        st.just("mode"),
        _IDX,
        _IDX,
        st.sampled_from([0, 0o7777, 0o10000, 0o100644, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    ),
    st.tuples(
        st.just("target"),
        _IDX,
        _IDX,
        st.sampled_from(["", "a\0b", "x" * 40, "x" * 41, "x" * 4095, "x" * 4096, "é" * 2048]),
    ),
    st.tuples(st.just("props"), _IDX),
    st.tuples(st.just("flip"), _IDX, st.integers(0, 4095), st.integers(1, 255)),
    st.tuples(st.just("cut"), _IDX, st.integers(0, 4095)),
    st.tuples(st.just("junk"), _IDX, st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("wrongdir"), _IDX),
    st.tuples(st.just("deep"), st.integers(1, 20), st.integers(1, 255)),
    st.tuples(st.just("bomb"), st.integers(24, 64)),
)


def _ref(j: int, hash_edit: str = "", size_edit: str = "") -> str:
    """A DirectoryNode hash standing for "Directory number j's digest, edited"."""
    return f"@ref:{j}:{hash_edit}:{size_edit}"


def _edit_digest(h: str, size: int, h_edit: str, s_edit: str) -> tuple[str, int]:
    """A digest (hash, size) edited as a mutation asks; "" edits nothing."""
    if h_edit == "file-blob":  # a stored blob that is no Directory message
        h, size = SHARED.hash, SHARED.size_bytes
    else:
        h = {
            "": h,
            "upper": h.upper(),
            "newline": f"{h}\n{OTHER_HEX}",
            "trailing-newline": h + "\n",
            "short": h[:63],
            "long": h + "0",
            "nonhex": "g" + h[1:],
            "empty": "",
            "path": "../../../etc/passwd",
            "missing": hashlib.sha256(b"never stored: " + h.encode()).hexdigest(),
            "empty-blob": EMPTY_DIGEST.hash,
        }[h_edit]
    if s_edit[:1] == "=":
        size = int(s_edit[1:])
    elif s_edit:
        size = max(-(2**63), min(_INT64_MAX, size + int(s_edit)))
    return h, size


@dataclass
class Tree:
    """Directory messages, children before parents, the root last. A DirectoryNode's
    digest is ``_ref(j, ...)`` until :meth:`store` resolves it."""

    msgs: list[Any]
    blobs: list[bytes]
    mutations: list[tuple[Any, ...]] = field(default_factory=list)
    post: dict[int, list[tuple[Any, ...]]] = field(default_factory=dict)  # byte edits
    stored: list[bytes] = field(default_factory=list)  # each message's bytes, for a report

    def apply(self, m: tuple[Any, ...]) -> None:
        kind, rest = m[0], m[1:]
        self.mutations.append(m)
        if kind == "deep":
            count, length = rest
            for _ in range(count):
                msg = proto.Directory()
                msg.directories.add(name="d" * length).digest.hash = _ref(len(self.msgs) - 1)
                self.msgs.append(msg)
            return
        if kind == "bomb":
            for _ in range(rest[0]):
                msg = proto.Directory()
                j = len(self.msgs) - 1
                msg.directories.add(name="a").digest.hash = _ref(j)
                msg.directories.add(name="b").digest.hash = _ref(j)
                self.msgs.append(msg)
            return
        i = rest[0] % len(self.msgs)
        msg = self.msgs[i]
        if kind in ("flip", "cut", "junk", "wrongdir"):
            self.post.setdefault(i, []).append(m)
            return
        if kind == "props":
            msg.node_properties.unix_mode.value = 0o7777
            for s in msg.symlinks:
                s.node_properties.mtime.seconds = 2**62
            return
        if kind == "swap":
            lst = getattr(msg, rest[1])
            if len(lst) >= 2:
                k = rest[2] % (len(lst) - 1)
                _reorder(lst, [*range(k), k + 1, k, *range(k + 2, len(lst))])
            return
        entries = [*msg.files, *msg.directories, *msg.symlinks]
        if not entries:
            return
        e = entries[rest[1] % len(entries)]
        if kind == "name":
            e.name = rest[2]
        elif kind == "dup":
            e.name = entries[rest[2] % len(entries)].name
        elif kind in ("hash", "size"):
            if e.DESCRIPTOR.name == "SymlinkNode":
                return
            d = e.digest
            if d.hash.startswith("@ref:"):
                j, h_edit, s_edit = d.hash[5:].split(":")
                h_edit, s_edit = (rest[2], s_edit) if kind == "hash" else (h_edit, rest[2])
                d.hash = _ref(int(j), h_edit, s_edit)
            else:
                edits = (rest[2], "") if kind == "hash" else ("", rest[2])
                d.hash, d.size_bytes = _edit_digest(d.hash, d.size_bytes, *edits)
        elif kind in ("mtime", "mode"):
            if e.DESCRIPTOR.name != "FileNode":
                return  # only files' NodeProperties count
            if kind == "mtime":
                e.node_properties.mtime.seconds, e.node_properties.mtime.nanos = rest[2]
            else:
                e.node_properties.unix_mode.value = rest[2]
        elif kind == "target" and e.DESCRIPTOR.name == "SymlinkNode":
            e.target = rest[2]

    def store(self, cas: LocalCAS, outside: Path) -> Digest:
        """Puts the blobs and messages into ``cas`` (applying the byte edits); the root."""
        for b in self.blobs:
            cas.put(b)
        digests: list[Digest] = []
        for i, msg in enumerate(self.msgs):
            for s in msg.symlinks:
                s.target = s.target.replace("@OUTSIDE@", str(outside))
            for x in msg.directories:
                if x.digest.hash.startswith("@ref:"):
                    j, h_edit, s_edit = x.digest.hash[5:].split(":")
                    ref = digests[int(j)]
                    edited = _edit_digest(ref.hash, ref.size_bytes, h_edit, s_edit)
                    x.digest.hash, x.digest.size_bytes = edited
            data = msg.SerializeToString()
            wrong = False
            for edit in self.post.get(i, []):
                if edit[0] == "flip" and data:
                    buf = bytearray(data)
                    buf[edit[2] % len(buf)] ^= edit[3]
                    data = bytes(buf)
                elif edit[0] == "cut":
                    data = data[: edit[2] % (len(data) + 1)]
                elif edit[0] == "junk":
                    data += edit[2]
                elif edit[0] == "wrongdir":
                    wrong = True
            self.stored.append(data)
            digests.append(_store_wrong(cas, data) if wrong else cas.put(data))
        return digests[-1]


def _reorder(lst: Any, order: list[int]) -> None:
    copies = [type(x).FromString(x.SerializeToString()) for x in lst]
    del lst[:]
    for k in order:
        lst.add().CopyFrom(copies[k])


def _store_wrong(cas: LocalCAS, data: bytes) -> Digest:
    """Stores ``data`` under a digest that is not its hash (a deterministic one, so that
    the same name always holds the same bytes across examples)."""
    fake = Digest(hashlib.sha256(b"wrong: " + data).hexdigest(), len(data))
    path = cas.root / cas.relpath(fake)
    if fake.size_bytes and not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o444)
        tmp.rename(path)
    return fake


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    """A valid tree (reused subtrees included), then up to three mutations."""
    msgs: list[Any] = []
    weight: list[int] = []  # expanded entries below each message
    blobs: list[bytes] = []
    for i in range(draw(st.integers(1, 6))):
        msg = proto.Directory()
        w = 0
        links: list[tuple[str, str]] = []
        for name in sorted(draw(st.lists(_NAMES, max_size=6, unique=True))):
            kind = draw(_KINDS)
            if kind == "dir" and i:
                j = draw(st.integers(0, i - 1))
                if w + 1 + weight[j] <= BUDGET:
                    msg.directories.add(name=name).digest.hash = _ref(j)
                    w += 1 + weight[j]
                    continue
                kind = "file"
            w += 1
            if kind == "link":
                links.append((name, draw(_TARGETS)))
                continue
            data, exe, props = draw(_DATA), draw(st.booleans()), draw(_PROPS)
            d = Digest.of(data)
            blobs.append(data)
            f = msg.files.add(name=name, is_executable=exe)
            f.digest.hash, f.digest.size_bytes = d.hash, d.size_bytes
            if props is not None:
                mode, mtime, extra = props
                np = f.node_properties
                if mode is not None:
                    np.unix_mode.value = mode
                if mtime is not None:
                    np.mtime.seconds, np.mtime.nanos = mtime
                if extra:
                    np.properties.add(name="fuzz", value="ignored")
        for name, target in links:
            msg.symlinks.add(name=name, target=target)
        msgs.append(msg)
        weight.append(w)
    tree = Tree(msgs, blobs)
    for m in draw(st.lists(_MUTATION, max_size=3)):
        tree.apply(m)
    return tree


# ---- the reference reading -----------------------------------------------------------


@dataclass
class Verdict:
    """What the tree is: ``entries`` (path -> expected state) when ``errors`` is empty,
    else the error types a correct loader may raise (one per problem found)."""

    errors: set[type[FastmatError]] = field(default_factory=set)
    entries: dict[str, tuple[object, ...]] = field(default_factory=dict)


@dataclass
class _Dir:
    files: list[tuple[str, tuple[object, ...]]]
    links: list[tuple[str, str]]
    children: list[tuple[str, tuple[str, int]]]
    n: int  # entries


def _digest_ok(h: str, size: int) -> bool:
    return _HEX64.fullmatch(h) is not None and size >= 0 and (size > 0 or h == EMPTY_DIGEST.hash)


def _read_dir(cas: LocalCAS, key: tuple[str, int], limits: TreeLimits, v: Verdict) -> Any:
    h, size = key
    if size > limits.max_directory_bytes:
        v.errors.add(InvalidTreeError)
        return None
    data = b""
    if size:
        path = cas.root / cas.relpath(Digest(h, size))
        if not path.is_file() or path.is_symlink():
            v.errors.add(BlobNotFoundError)
            return None
        data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != h or len(data) != size:
        v.errors.add(DigestMismatchError)
        return None
    try:
        return proto.Directory.FromString(data)
    except proto.DecodeError:
        v.errors.add(InvalidTreeError)
        return None


def _check_dir(cas: LocalCAS, msg: Any, limits: TreeLimits, v: Verdict) -> _Dir:
    """The REAPI rules for one Directory, written out plainly; problems go to ``v``."""
    bad = False
    names: list[str] = []
    for lst in (msg.files, msg.directories, msg.symlinks):
        keys = [x.name.encode() for x in lst]
        bad |= keys != sorted(keys)
        names += [x.name for x in lst]
    for name in names:
        bad |= name in ("", ".", "..") or "/" in name or "\0" in name
        bad |= len(name.encode()) > limits.max_name_bytes
    bad |= len(set(names)) != len(names) or len(names) > limits.max_entries_per_dir
    files: list[tuple[str, tuple[object, ...]]] = []
    for f in msg.files:
        h, size = f.digest.hash, f.digest.size_bytes
        mode, mtime = (0o555 if f.is_executable else 0o444), None
        np = f.node_properties
        if np.HasField("unix_mode"):
            bad |= np.unix_mode.value > 0o7777
            mode = np.unix_mode.value & 0o777
        if np.HasField("mtime"):
            sec, nanos = np.mtime.seconds, np.mtime.nanos
            bad |= sec < 0 or not 0 <= nanos < 10**9 or sec * 10**9 + nanos > _INT64_MAX
            mtime = sec * 10**9 + nanos
        if not _digest_ok(h, size):
            bad = True
        elif size and not cas.root.joinpath(cas.relpath(Digest(h, size))).is_file():
            v.errors.add(BlobNotFoundError)
        else:
            data = cas.read(Digest(h, size)) if size else b""
            files.append((f.name, ("file", mode, data, mtime)))
    links = []
    for s in msg.symlinks:
        t = s.target
        bad |= not t or "\0" in t or len(t.encode()) > limits.max_symlink_target_bytes
        links.append((s.name, t))
    children = []
    for x in msg.directories:
        h, size = x.digest.hash, x.digest.size_bytes
        if _digest_ok(h, size):
            children.append((x.name, (h, size)))
        else:
            bad = True
    if bad:
        v.errors.add(InvalidTreeError)
    return _Dir(files, links, children, len(names))


def reference(cas: LocalCAS, root: Digest, limits: TreeLimits) -> Verdict:
    """Reads every distinct Directory once, checks each, then the expanded shape
    (memoised per digest: a width bomb is never expanded), then expands a valid tree."""
    v = Verdict()
    dirs: dict[tuple[str, int], _Dir | None] = {}
    todo = [(root.hash, root.size_bytes)]
    while todo:
        key = todo.pop()
        if key in dirs:
            continue
        msg = _read_dir(cas, key, limits, v)
        dirs[key] = None if msg is None else _check_dir(cas, msg, limits, v)
        if dirs[key] is not None:
            todo += [c for _, c in dirs[key].children]  # type: ignore[union-attr]
    # (height, expanded entries, longest path) of what could be read
    shape: dict[tuple[str, int], tuple[int, int, int]] = {}

    def measure(key: tuple[str, int]) -> tuple[int, int, int]:
        if key not in shape:
            d = dirs[key]
            if d is None:
                return (0, 0, 0)
            names = [n for n, _ in d.files] + [n for n, _ in d.links] + [n for n, _ in d.children]
            height, total = 0, d.n
            longest = max((len(n.encode()) for n in names), default=0)
            for name, child in d.children:
                ch, ct, cl = measure(child)
                height, total = max(height, ch + 1), total + ct
                if cl:
                    longest = max(longest, len(name.encode()) + 1 + cl)
            shape[key] = (height, total, longest)
        return shape[key]

    height, total, longest = measure((root.hash, root.size_bytes))
    if (
        height > limits.max_depth
        or total > limits.max_total_entries
        or longest > limits.max_path_bytes
    ):
        v.errors.add(InvalidTreeError)
    if v.errors:
        return v

    def expand(key: tuple[str, int], prefix: str) -> None:
        d = dirs[key]
        assert d is not None
        for name, state in d.files:
            v.entries[prefix + name] = state
        for name, target in d.links:
            v.entries[prefix + name] = ("link", target)
        for name, child in d.children:
            v.entries[prefix + name] = ("dir", 0o755)
            expand(child, prefix + name + "/")

    expand((root.hash, root.size_bytes), "")
    return v


# ---- what is on disk ---------------------------------------------------------------


def _read_all(name: str, dir_fd: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def walk(top: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below ``top``: ("dir", mode) / ("file", mode, bytes, mtime_ns) /
    ("link", target). Relative to directory fds: paths may be longer than PATH_MAX."""
    out: dict[str, tuple[object, ...]] = {}

    def rec(fd: int, prefix: str) -> None:
        for name in sorted(os.listdir(fd)):
            st_ = os.stat(name, dir_fd=fd, follow_symlinks=False)
            rel, mode = prefix + name, stat.S_IMODE(st_.st_mode)
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", mode)
                sub = os.open(name, _O_DIR, dir_fd=fd)
                try:
                    rec(sub, rel + "/")
                finally:
                    os.close(sub)
            elif stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(name, dir_fd=fd))
            elif stat.S_ISREG(st_.st_mode):
                if os.geteuid() != 0 and not mode & 0o400:  # a private inode (NodeProperties)
                    os.chmod(name, mode | 0o400, dir_fd=fd)
                out[rel] = ("file", mode, _read_all(name, fd), st_.st_mtime_ns)
            else:
                out[rel] = ("other", st_.st_mode)

    fd = os.open(top, _O_DIR)
    try:
        rec(fd, "")
    finally:
        os.close(fd)
    return out


def _same(
    actual: dict[str, tuple[object, ...]], expected: dict[str, tuple[object, ...]], cached: bool
) -> bool:
    """Equal, an expected mtime of None meaning "any". ``cached``: through the directory
    cache, whose entries are shared by later hits, files have no write bits
    (invariant 4: a NodeProperties mode keeps them only in a plain materialize)."""
    if actual.keys() != expected.keys():
        return False
    for rel, want in expected.items():
        got = actual[rel]
        if want[0] == "file":
            kind, mode, data, mtime = want
            assert isinstance(mode, int)
            mode &= 0o555 if cached else 0o777
            if got != (kind, mode, data, got[3] if mtime is None else mtime):
                return False
        elif got != want:
            return False
    return True


def _state(path: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about the entries below ``path`` and ``path`` itself."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in ["", *dirnames, *filenames]:
            p = os.path.join(dirpath, name) if name else dirpath
            s = os.lstat(p)
            data = Path(p).read_bytes() if stat.S_ISREG(s.st_mode) else None
            out[p] = (s.st_mode, s.st_ino, s.st_nlink, s.st_size, s.st_mtime_ns, data)
    return out


# ---- the property ---------------------------------------------------------------------


@dataclass
class Env:
    work: Path
    cas: LocalCAS
    caches: dict[bool, DirectoryCache]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One CAS (making one costs 512 shard directories) and a small-bounded cache per
    limits profile, shared by every example of the module."""
    base = tmp_path_factory.mktemp("fuzz")
    (base / "work").mkdir()
    kw: dict[str, Any] = {"max_entries": 8, "fsync": False, "overlay": False}
    with (
        LocalCAS(base / "cas", fsync=False) as cas,
        DirectoryCache(cas, base / "cache", **kw) as big,
        DirectoryCache(cas, base / "cache-small", limits=SMALL, **kw) as small,
    ):
        cas.put(SHARED_BYTES)
        yield Env(base / "work", cas, {False: big, True: small})


def check(env: Env, tree: Tree, small: bool, threads: int, precheck: bool) -> None:
    """``threads`` / ``precheck``: the plain materialize's executor threads and
    ``check_blobs_first`` (False: a missing blob fails its link, after the rest was made)."""
    limits = SMALL if small else DEFAULT
    ex = Path(tempfile.mkdtemp(dir=env.work))
    try:
        outside = ex / "outside"
        (outside / "sub").mkdir(parents=True)
        (outside / "victim").write_bytes(b"keep me\n")
        (outside / "victim").chmod(0o600)
        root = tree.store(env.cas, outside)
        verdict = reference(env.cas, root, limits)
        event(" ".join(sorted(t.__name__ for t in verdict.errors)) or "valid")
        for m in tree.mutations:
            event(f"mutation {m[0]}")
        blobs = {d: (env.cas.path(d).stat(), env.cas.read(d)) for d in map(Digest.of, tree.blobs)}
        before = _state(outside)
        made = ["outside"]
        cache = env.caches[small]
        runs: list[tuple[str, Callable[[Path], object]]] = [
            (
                "plain",
                lambda dest: materialize(
                    env.cas, root, dest, limits=limits, threads=threads, check_blobs_first=precheck
                ),
            ),
            ("cache-miss", lambda dest: cache.materialize(root, dest)),
            ("cache-hit", lambda dest: cache.materialize(root, dest)),  # if the miss built it
        ]
        for how, run in runs:
            dest = ex / how
            error: FastmatError | None = None
            try:
                run(dest)
            except FastmatError as e:
                error = e
            if error is not None:
                assert verdict.errors, f"{how}: a valid tree was refused: {error!r}"
                assert isinstance(error, tuple(verdict.errors)), f"{how}: {error!r}"
                assert not os.path.lexists(dest), f"{how}: {error!r} left the destination"
                assert how == "plain" or cache.entry_path(root) is None
            else:
                assert not verdict.errors, f"{how}: materialized, reference says {verdict.errors}"
                assert os.stat(dest).st_mode & 0o7777 == 0o755
                assert _same(walk(dest), verdict.entries, how != "plain"), f"{how}: not the tree"
                made.append(how)
            assert sorted(os.listdir(ex)) == sorted(made), f"{how}: something beside dest"
            assert _state(outside) == before, f"{how}: something changed outside"
        for d, (st_, data) in blobs.items():
            now = env.cas.path(d).stat()
            assert (now.st_ino, now.st_mode) == (st_.st_ino, st_.st_mode)
            assert env.cas.read(d) == data
    finally:
        shutil.rmtree(ex)


_THREADS = st.sampled_from([0, 1, 3])
_COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@settings(max_examples=400, derandomize=True, **_COMMON)
@given(tree=trees(), small=st.booleans(), threads=_THREADS, precheck=st.booleans())
def test_materialize_is_exact_or_refuses_cleanly(
    env: Env, tree: Tree, small: bool, threads: int, precheck: bool
) -> None:
    check(env, tree, small, threads, precheck)


@pytest.mark.stress
@pytest.mark.timeout(1800)  # ~7 minutes here; room for a loaded CI machine
@settings(max_examples=int(os.environ.get("FASTMAT_FUZZ_EXAMPLES", "20000")), **_COMMON)
@given(tree=trees(), small=st.booleans(), threads=_THREADS, precheck=st.booleans())
def test_materialize_is_exact_or_refuses_cleanly_stress(
    env: Env, tree: Tree, small: bool, threads: int, precheck: bool
) -> None:
    check(env, tree, small, threads, precheck)


def test_the_reference_refuses_what_fastmat_refuses(env: Env) -> None:
    """The oracle has teeth: a few hand-made trees it must call invalid, and valid."""
    cases: list[tuple[list[tuple[Any, ...]], set[type[FastmatError]]]] = [
        ([("name", 0, 0, "..")], {InvalidTreeError}),
        ([("hash", 0, 0, "newline")], {InvalidTreeError}),
        ([("mtime", 0, 0, (_INT64_MAX, 0))], {InvalidTreeError}),
        ([("hash", 0, 0, "missing")], {BlobNotFoundError}),
        ([("wrongdir", 0)], {DigestMismatchError}),
        ([("deep", 17, 250)], {InvalidTreeError}),
        ([("bomb", 30)], {InvalidTreeError}),
        ([], set()),
    ]
    for muts, errors in cases:
        msg = proto.Directory()
        f = msg.files.add(name="f")
        d = Digest.of(b"x")
        f.digest.hash, f.digest.size_bytes = d.hash, d.size_bytes
        tree = Tree([msg], [b"x"])
        for m in muts:
            tree.apply(m)
        root = tree.store(env.cas, env.work)
        assert reference(env.cas, root, DEFAULT).errors == errors, muts
