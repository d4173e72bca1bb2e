"""A corpus of hostile trees: each is refused with its own error, before anything exists.

Every case asserts the exception type, its message, the offending path where
there is one, that ``dest`` does not exist, that nothing appeared beside it,
and that the CAS's blob store is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastmat import proto
from fastmat.cas import LocalCAS
from fastmat.digest import BlobNotFoundError, Digest, DigestMismatchError
from fastmat.errors import InvalidTreeError
from fastmat.materialize import materialize
from fastmat.tree import TreeLimits, load_plan
from fastmat.tree.nodecache import node_cache

HEX = "ab" * 32


@pytest.fixture(autouse=True)
def _cold_node_cache() -> None:
    """Validated nodes are cached by digest; every case here starts cold."""
    node_cache.clear()


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", fsync=False) as c:
        yield c


def node(
    cas: LocalCAS,
    files: Sequence[tuple[str, Digest, bool]] = (),
    dirs: Sequence[tuple[str, Digest]] = (),
    links: Sequence[tuple[str, str]] = (),
    edit: Callable[[Any], None] | None = None,
) -> Digest:
    """Stores a Directory exactly as given (no sorting, no checks)."""
    msg = proto.Directory()
    for name, d, exe in files:
        f = msg.files.add(name=name, is_executable=exe)
        f.digest.hash, f.digest.size_bytes = d.hash, d.size_bytes
    for name, d in dirs:
        x = msg.directories.add(name=name)
        x.digest.hash, x.digest.size_bytes = d.hash, d.size_bytes
    for name, target in links:
        msg.symlinks.add(name=name, target=target)
    if edit is not None:
        edit(msg)
    return cas.put(msg.SerializeToString())


@dataclass
class Case:
    root: Digest
    error: type[Exception]
    match: str
    path: str | None = None  # InvalidTreeError.path / BlobNotFoundError.path
    limits: TreeLimits | None = None


def _file(cas: LocalCAS, data: bytes = b"data\n") -> Digest:
    return cas.put(data)


def _in_sub(cas: LocalCAS, sub: Digest) -> Digest:
    return node(cas, files=[("ok.txt", _file(cas), False)], dirs=[("sub", sub)])


def _props(
    mode: int | None = None, sec: int | None = None, nanos: int = 0
) -> Callable[[Any], None]:
    def edit(msg: Any) -> None:
        np = msg.files[0].node_properties
        if mode is not None:
            np.unix_mode.value = mode
        if sec is not None:
            np.mtime.seconds, np.mtime.nanos = sec, nanos

    return edit


def _two_hashes(field: str, i: int) -> Callable[[Any], None]:
    """Makes entry i's hash two valid hashes joined by a newline (the rest of the list
    valid: all of them joined by newlines still look like a list of hashes)."""

    def edit(msg: Any) -> None:
        d = getattr(msg, field)[i].digest
        d.hash = f"{d.hash}\n{HEX}"

    return edit


def _chain(cas: LocalCAS, depth: int) -> Digest:
    d = node(cas, files=[("leaf", _file(cas), False)])
    for _ in range(depth):
        d = node(cas, dirs=[("d", d)])
    return d


def _deep_by_reuse(cas: LocalCAS) -> Digest:
    """A 5-deep chain reused at depth 1 (fine) and at depth 4 (too deep for 8): the
    breadth-first load sees it first at depth 1; only the expanded shape is too deep."""
    x = _chain(cas, 5)
    y = node(cas, dirs=[("d", node(cas, dirs=[("d", node(cas, dirs=[("x", x)]))]))])
    return node(cas, dirs=[("a", x), ("b", y)])


def _long_path(cas: LocalCAS, path_bytes: int) -> tuple[Digest, str]:
    """16 directories of 250-byte names, then a file: its path is ``path_bytes`` long."""
    leaf = "f" * (path_bytes - 16 * 251)
    d = node(cas, files=[(leaf, _file(cas), False)])
    for i in range(16):
        d = node(cas, dirs=[(chr(ord("a") + i) * 250, d)])
    return d, "/".join(chr(ord("a") + i) * 250 for i in reversed(range(16))) + "/" + leaf


def _long_only_through_reuse(cas: LocalCAS, deep: bool) -> Digest:
    """One Directory (a 14-byte file name) reused as "a" (path 16 bytes) and at a place whose
    path is 66 bytes (deep) or 64 (not deep: as deep, a longer name). The breadth-first
    load sees it first as "a"; only the other place is too long for a tighter limit."""
    x = node(cas, files=[("leaf" + "e" * 10, _file(cas), False)])
    if not deep:  # the long place is as deep as the short one, its name longer
        return node(cas, dirs=[("a", x), ("b" * 49, x)])
    return node(cas, dirs=[("a", x), ("b" * 30, node(cas, dirs=[("c" * 20, x)]))])


def _width_bomb(cas: LocalCAS, levels: int) -> Digest:
    d = node(cas, files=[("f", _file(cas), False)])
    for _ in range(levels):
        d = node(cas, dirs=[("a", d), ("b", d)])
    return d


def _corrupt_dir(cas: LocalCAS) -> Digest:
    """A Directory blob whose stored bytes were damaged on disk after insertion."""
    d = node(cas, files=[("a", _file(cas), False)])
    p = cas.root / cas.relpath(d)
    os.chmod(p, 0o644)
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    os.chmod(p, 0o444)
    return _in_sub(cas, d)


def _lying_dir_size(cas: LocalCAS) -> Digest:
    d = node(cas, files=[("a", _file(cas), False)])
    return _in_sub(cas, Digest(d.hash, d.size_bytes + 1))


def _bad_utf8(cas: LocalCAS) -> Digest:
    return cas.put(b"\x0a\x03" + b"\x0a\x01\xff")  # files { name: "\xff" }


def _bad_mode_type(cas: LocalCAS) -> Digest:
    return node(cas, files=[("f", _file(cas), False)], edit=_props(0o100644))


CASES: dict[str, Callable[[LocalCAS], Case]] = {
    "empty name": lambda c: Case(
        node(c, files=[("", _file(c), False)]), InvalidTreeError, "not a path component", ""
    ),
    "dot name": lambda c: Case(
        _in_sub(c, node(c, files=[(".", _file(c), False)])),
        InvalidTreeError,
        "not a path component",
        "sub/.",
    ),
    "dotdot dir": lambda c: Case(
        node(c, dirs=[("..", node(c))]), InvalidTreeError, "not a path component", ".."
    ),
    "slash in name": lambda c: Case(
        node(c, files=[("a/b", _file(c), False)]), InvalidTreeError, "contains '/'", "a/b"
    ),
    "NUL in name": lambda c: Case(
        node(c, links=[("a\0b", "t")]), InvalidTreeError, "contains '/' or NUL", "a\0b"
    ),
    "name too long": lambda c: Case(
        node(c, files=[("x" * 256, _file(c), False)]), InvalidTreeError, "max_name_bytes"
    ),
    "name too long in UTF-8 bytes": lambda c: Case(
        node(c, files=[("é" * 128, _file(c), False)]), InvalidTreeError, "max_name_bytes"
    ),
    "duplicate files": lambda c: Case(
        node(c, files=[("a", _file(c), False), ("a", _file(c, b"other"), False)]),
        InvalidTreeError,
        "duplicate name 'a'",
        "a",
    ),
    "file/dir collision": lambda c: Case(
        node(c, files=[("x", _file(c), False)], dirs=[("x", node(c))]),
        InvalidTreeError,
        "duplicate name 'x'",
        "x",
    ),
    "dir/symlink collision": lambda c: Case(
        _in_sub(c, node(c, dirs=[("x", node(c))], links=[("x", "/etc")])),
        InvalidTreeError,
        "duplicate name 'x'",
        "sub/x",
    ),
    "unsorted files": lambda c: Case(
        node(c, files=[("b", _file(c), False), ("a", _file(c), False)]),
        InvalidTreeError,
        "files not sorted",
    ),
    "unsorted directories": lambda c: Case(
        node(c, dirs=[("z", node(c)), ("y", node(c))]), InvalidTreeError, "directories not sorted"
    ),
    "missing file blob": lambda c: Case(
        _in_sub(c, node(c, files=[("gone.o", Digest.of(b"never stored"), False)])),
        BlobNotFoundError,
        "blob not found",
        "sub/gone.o",
    ),
    "missing executable blob": lambda c: Case(
        _in_sub(c, node(c, files=[("tool", Digest.of(b"no such tool"), True)])),
        BlobNotFoundError,
        "blob not found",
        "sub/tool",
    ),
    "missing directory": lambda c: Case(
        _in_sub(c, Digest.of(b"no such Directory")), BlobNotFoundError, "blob not found", "sub"
    ),
    "missing root": lambda c: Case(Digest.of(b"no root"), BlobNotFoundError, "blob not found", "."),
    "lying file size": lambda c: Case(
        node(c, files=[("f", Digest(_file(c).hash, 6), False)]),
        BlobNotFoundError,
        "blob not found",
        "f",
    ),
    "lying directory size": lambda c: Case(
        _lying_dir_size(c), BlobNotFoundError, "blob not found", "sub"
    ),
    "corrupted directory bytes": lambda c: Case(
        _corrupt_dir(c), DigestMismatchError, "Directory at 'sub'"
    ),
    "hash not hex": lambda c: Case(
        node(c, edit=lambda m: setattr(m.files.add(name="f").digest, "hash", "../../etc/passwd")),
        InvalidTreeError,
        "not 64 lowercase hex",
        "f",
    ),
    "uppercase hash": lambda c: Case(
        node(
            c,
            files=[("f", _file(c), False)],
            edit=lambda m: setattr(m.files[0].digest, "hash", m.files[0].digest.hash.upper()),
        ),
        InvalidTreeError,
        "not 64 lowercase hex",
        "f",
    ),
    "file hash: two digests joined by a newline": lambda c: Case(
        node(c, files=[("f", _file(c), False)], edit=_two_hashes("files", 0)),
        InvalidTreeError,
        "not 64 lowercase hex",
        "f",
    ),
    "directory hash: two digests joined by a newline": lambda c: Case(
        _in_sub(
            c, node(c, dirs=[("a", node(c)), ("d", node(c))], edit=_two_hashes("directories", 1))
        ),
        InvalidTreeError,
        "not 64 lowercase hex",
        "sub/d",
    ),
    "negative size": lambda c: Case(
        node(
            c,
            edit=lambda m: m.files.add(name="f").digest.MergeFrom(
                proto.Digest(hash=HEX, size_bytes=-1)
            ),
        ),
        InvalidTreeError,
        "impossible",
        "f",
    ),
    "size 0 with a non-empty hash": lambda c: Case(
        node(c, files=[("f", Digest(HEX, 0), False)]), InvalidTreeError, "impossible", "f"
    ),
    "directory size 0 with a non-empty hash": lambda c: Case(
        _in_sub(c, node(c, dirs=[("d", Digest(HEX, 0))])),
        InvalidTreeError,
        "directory digest .* is impossible",
        "sub/d",
    ),
    "negative directory size": lambda c: Case(
        node(
            c,
            edit=lambda m: m.directories.add(name="d").digest.MergeFrom(
                proto.Digest(hash=HEX, size_bytes=-(2**63))
            ),
        ),
        InvalidTreeError,
        "directory digest .* is impossible",
        "d",
    ),
    "bad directory digest": lambda c: Case(
        node(
            c,
            edit=lambda m: m.directories.add(name="d").digest.MergeFrom(
                proto.Digest(hash="zz", size_bytes=3)
            ),
        ),
        InvalidTreeError,
        "directory digest",
        "d",
    ),
    "undecodable message": lambda c: Case(
        _in_sub(c, c.put(b"\xff\xff\xff\xff")), InvalidTreeError, "undecodable", "sub"
    ),
    "name not UTF-8": lambda c: Case(_bad_utf8(c), InvalidTreeError, "undecodable"),
    "5,000-deep chain": lambda c: Case(_chain(c, 5000), InvalidTreeError, "max_depth"),
    "depth limit exactly exceeded": lambda c: Case(
        _chain(c, 9), InvalidTreeError, "max_depth", "d/d/d/d/d/d/d/d/d", TreeLimits(max_depth=8)
    ),
    "too deep only through a reused digest": lambda c: Case(
        _deep_by_reuse(c), InvalidTreeError, "max_depth", None, TreeLimits(max_depth=8)
    ),
    "width bomb (2**64 via reused digests)": lambda c: Case(
        _width_bomb(c, 64), InvalidTreeError, "max_total_entries"
    ),
    "path one byte too long": lambda c: Case(
        _long_path(c, 4096)[0], InvalidTreeError, "max_path_bytes", _long_path(c, 4096)[1]
    ),
    "path too long only at a deeper place of a reused digest": lambda c: Case(
        _long_only_through_reuse(c, deep=True),
        InvalidTreeError,
        r"path of 66 bytes .*max_path_bytes \(64\)",
        "b" * 30 + "/" + "c" * 20 + "/" + "leaf" + "e" * 10,
        TreeLimits(max_path_bytes=64),
    ),
    "path too long only at a longer-named place of a reused digest": lambda c: Case(
        _long_only_through_reuse(c, deep=False),
        InvalidTreeError,
        "max_path_bytes",
        "b" * 49 + "/leaf" + "e" * 10,
        TreeLimits(max_path_bytes=63),
    ),
    "path too long through an empty directory's name": lambda c: Case(
        node(c, dirs=[("d" * 40, node(c, dirs=[("e" * 30, node(c))]))]),
        InvalidTreeError,
        "max_path_bytes",
        "d" * 40 + "/" + "e" * 30,
        TreeLimits(max_path_bytes=70),
    ),
    "too many entries in one directory": lambda c: Case(
        node(c, files=[(f"f{i:02d}", _file(c), False) for i in range(11)]),
        InvalidTreeError,
        "max_entries_per_dir",
        None,
        TreeLimits(max_entries_per_dir=10),
    ),
    "oversized Directory message": lambda c: Case(
        _in_sub(c, node(c, files=[(f"f{i:03d}", _file(c), False) for i in range(100)])),
        InvalidTreeError,
        "max_directory_bytes",
        "sub",
        TreeLimits(max_directory_bytes=1000),
    ),
    "empty symlink target": lambda c: Case(
        node(c, links=[("l", "")]), InvalidTreeError, "symlink target", "l"
    ),
    "NUL in symlink target": lambda c: Case(
        node(c, links=[("l", "a\0b")]), InvalidTreeError, "symlink target", "l"
    ),
    "symlink target too long": lambda c: Case(
        node(c, links=[("l", "a/" * 2048)]), InvalidTreeError, "symlink target", "l"
    ),
    "unix_mode with file-type bits": lambda c: Case(
        _bad_mode_type(c), InvalidTreeError, "bits outside 0o7777", "f"
    ),
    "negative mtime": lambda c: Case(
        node(c, files=[("f", _file(c), False)], edit=_props(sec=-5)),
        InvalidTreeError,
        "mtime",
        "f",
    ),
    "mtime nanos out of range": lambda c: Case(
        node(c, files=[("f", _file(c), False)], edit=_props(sec=5, nanos=2_000_000_000)),
        InvalidTreeError,
        "mtime",
        "f",
    ),
    "mtime of 2**63 ns": lambda c: Case(
        _in_sub(
            c,
            node(
                c, files=[("f", _file(c), False)], edit=_props(sec=9_223_372_036, nanos=854_775_808)
            ),
        ),
        InvalidTreeError,
        "mtime",
        "sub/f",
    ),
    "mtime seconds at the int64 maximum": lambda c: Case(
        node(c, files=[("f", _file(c), False)], edit=_props(sec=2**63 - 1)),
        InvalidTreeError,
        "mtime",
        "f",
    ),
}


def _cas_listing(cas: LocalCAS) -> set[str]:
    out: set[str] = set()
    for area in ("blobs", "exec"):
        for dirpath, _, files in os.walk(cas.root / area):
            out.update(os.path.join(dirpath, f) for f in files)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_tree_is_refused(name: str, cas: LocalCAS, tmp_path: Path) -> None:
    case = CASES[name](cas)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "dest"
    before = _cas_listing(cas)
    with pytest.raises(case.error, match=case.match) as info:
        materialize(cas, case.root, dest, limits=case.limits)
    if case.path is not None:
        assert getattr(info.value, "path", None) == case.path
    assert not os.path.lexists(dest)
    assert os.listdir(out) == []
    assert _cas_listing(cas) == before


def test_cached_nodes_are_revalidated_under_other_limits(cas: LocalCAS, tmp_path: Path) -> None:
    root = node(cas, files=[(f"f{i:02d}", _file(cas), False) for i in range(11)])
    materialize(cas, root, tmp_path / "ok")  # validated and cached under the defaults
    with pytest.raises(InvalidTreeError, match="max_entries_per_dir"):
        materialize(cas, root, tmp_path / "dest", limits=TreeLimits(max_entries_per_dir=10))
    assert not os.path.lexists(tmp_path / "dest")


@pytest.mark.parametrize(
    "name", ["missing file blob", "missing executable blob", "lying file size"]
)
def test_missing_blobs_without_the_precheck(name: str, cas: LocalCAS, tmp_path: Path) -> None:
    """check_blobs_first=False: the link fails instead, with the same error, and no dest."""
    case = CASES[name](cas)
    root = node(cas, files=[("first", _file(cas, b"present"), False)], dirs=[("z", case.root)])
    dest = tmp_path / "out" / "dest"
    dest.parent.mkdir()
    with pytest.raises(BlobNotFoundError) as info:
        materialize(cas, root, dest, check_blobs_first=False, threads=1)
    assert info.value.path == f"z/{case.path}"
    assert os.listdir(dest.parent) == []


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25


def test_setuid_request_is_dropped_not_honoured(cas: LocalCAS, tmp_path: Path) -> None:
    blob = _file(cas, b"#!/bin/sh\n")
    root = node(cas, files=[("tool", blob, True)], edit=_props(0o6755))
    materialize(cas, root, tmp_path / "dest")
    st = os.lstat(tmp_path / "dest" / "tool")
    assert st.st_mode & 0o7777 == 0o755
    assert st.st_ino not in {
        os.stat(cas.path(blob)).st_ino,
        os.stat(cas.executable_path(blob)).st_ino,
    }


def test_symlinks_out_of_dest_are_created_never_followed(cas: LocalCAS, tmp_path: Path) -> None:
    """An absolute and a '..' link next to a same-named file elsewhere: nothing outside dest."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = node(
        cas,
        dirs=[("d", node(cas, files=[("f", _file(cas), False)]))],
        links=[("abs", str(outside)), ("up", "../../outside")],
    )
    materialize(cas, root, tmp_path / "dest")
    assert os.readlink(tmp_path / "dest" / "abs") == str(outside)
    assert os.readlink(tmp_path / "dest" / "up") == "../../outside"
    assert os.listdir(outside) == []


def test_dag_reuse_within_limits_materializes(cas: LocalCAS, tmp_path: Path) -> None:
    root = _width_bomb(cas, 6)  # 2**6 leaf directories from 7 distinct messages
    stats = materialize(cas, root, tmp_path / "dest")
    assert stats.files == 64
    assert stats.directories == 127
    assert (tmp_path / "dest" / "a/b/a/b/a/b/f").read_bytes() == b"data\n"


def test_depth_limit_is_inclusive(cas: LocalCAS, tmp_path: Path) -> None:
    """max_depth directories below the root are fine, with and without reuse."""
    stats = materialize(cas, _deep_by_reuse(cas), tmp_path / "a", limits=TreeLimits(max_depth=9))
    assert (tmp_path / "a" / "b/d/d/x/d/d/d/d/d/leaf").read_bytes() == b"data\n"
    assert stats.directories == 1 + 1 + 5 + 1 + 3 + 5
    materialize(cas, _chain(cas, 8), tmp_path / "b", limits=TreeLimits(max_depth=8))


def test_path_limit_is_inclusive(cas: LocalCAS, tmp_path: Path) -> None:
    """A path of exactly max_path_bytes is made, with and without a reused digest."""
    root, path = _long_path(cas, 4095)
    materialize(cas, root, tmp_path / "a")
    fd = os.open(tmp_path / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.stat(path, dir_fd=fd).st_size == 5
    finally:
        os.close(fd)
    limits = TreeLimits(max_path_bytes=66)
    materialize(cas, _long_only_through_reuse(cas, deep=True), tmp_path / "b", limits=limits)
    materialize(cas, _long_only_through_reuse(cas, deep=False), tmp_path / "c", limits=limits)
    assert (tmp_path / "c" / ("b" * 49) / "leafeeeeeeeeee").read_bytes() == b"data\n"
    empty = node(cas, dirs=[("d" * 40, node(cas, dirs=[("e" * 30, node(cas))]))])
    materialize(cas, empty, tmp_path / "d", limits=TreeLimits(max_path_bytes=71))
    assert os.listdir(tmp_path / "d" / ("d" * 40) / ("e" * 30)) == []


def test_latest_mtime_is_kept_to_the_nanosecond(cas: LocalCAS) -> None:
    """2**63 - 1 ns (in 2262) is the last mtime the executor's int64 carries."""
    root = node(
        cas,
        files=[("f", _file(cas), False)],
        edit=_props(sec=9_223_372_036, nanos=854_775_807),
    )
    plan = load_plan(cas, root)
    assert plan.arrays.mtime_ns is not None
    assert list(plan.arrays.mtime_ns) == [2**63 - 1]


def _within(seconds: float, fn: Callable[[], object]) -> BaseException | None:
    """Runs fn on a thread; the exception it raised (None: it returned). Fails the test
    if fn is still running after ``seconds`` (blocked)."""
    import threading

    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the caller
            out.append(e)
        else:
            out.append(None)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    return out[0]


def test_a_fifo_under_a_cas_name_is_refused_not_waited_on(cas: LocalCAS, tmp_path: Path) -> None:
    """Whoever may write the CAS puts a FIFO where a Directory message (or a blob
    ``read``) is: the open does not wait for a writer; the load is refused
    (``DigestMismatchError``: no bytes) and ``read`` names a non-regular file."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"fifo test\n")
    from fastmat.tree import ingest_tree

    root = ingest_tree(cas, src)
    sub = proto.Directory.FromString(cas.read(root)).directories[0]
    sub_digest = Digest(sub.digest.hash, sub.digest.size_bytes)
    for d in (sub_digest, Digest.of(b"fifo test\n")):
        name = cas.path(d)
        os.unlink(name)
        os.mkfifo(name)
    node_cache.clear()
    dest = tmp_path / "dest"
    err = _within(10, lambda: materialize(cas, root, dest))
    assert isinstance(err, DigestMismatchError), err
    assert not os.path.lexists(dest)
    err = _within(10, lambda: cas.read(Digest.of(b"fifo test\n")))
    assert isinstance(err, OSError), err
    assert "not a regular file" in str(err)
