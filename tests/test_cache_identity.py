"""A cache entry's identity and its damage checks (issue 12, item 7): an intact entry
must never look damaged. Its identity is an id stored in its sidecar, not the inode of
its directory (which ext4 reuses for the next directory made); an EMLINK rotation at a
hit refreshes the sample it changed; making an entry's private inodes read-only is
linear in their number."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat import _binding, proto
from fastmat.cache import DirectoryCache
from fastmat.cache import build as cache_build
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.materialize import materialize
from fastmat.tree import load_plan
from tests.cache_helpers import BASIC, ingest, snapshot


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", fsync=False) as c:
        yield c


def test_an_entry_rebuilt_on_a_reused_inode_is_adopted_not_damaged(
    cas: LocalCAS, tmp_path: Path
) -> None:
    """Instance A knows an entry; another instance evicts it and a third (a long-lived
    worker) rebuilds it, on ext4 often on the very inode the old directory had (10 of
    30 rounds here). A's next hit must adopt the new entry: neither counted as damaged
    nor rebuilt."""
    root = ingest(cas, tmp_path / "src", BASIC)  # its empty file is a private inode
    path = tmp_path / "cache"
    rounds, reused = 40, 0
    with DirectoryCache(cas, path, fsync=False) as a, DirectoryCache(cas, path) as c:
        a.materialize(root, tmp_path / "a")
        for i in range(rounds):
            entry = a.entry_path(root)
            assert entry is not None
            before = os.stat(entry).st_ino
            with DirectoryCache(cas, path, max_bytes=0, fsync=False):
                pass  # opened over its bound: evicts the entry; close deletes it
            assert not c.materialize(root, tmp_path / f"c{i}").hit  # rebuilt there
            reused += os.stat(entry).st_ino == before
            r = a.materialize(root, tmp_path / f"a{i}")
            assert a.stats().damaged == 0, f"round {i}: the intact entry looked damaged"
            assert (r.hit, r.rebuilt) == (True, False), f"round {i}"
            assert snapshot(tmp_path / f"a{i}") == snapshot(tmp_path / "src")
        st = a.stats()
    assert st.damaged == 0
    assert st.constructions == 1  # A built only the first one
    print(f"inode reused in {reused} of {rounds} rounds")


def test_an_emlink_rotation_at_a_hit_does_not_make_the_entry_look_damaged(
    cas: LocalCAS, tmp_path: Path
) -> None:
    """A hit whose links meet EMLINK rotates the entry's file (a new inode renamed over
    its name): the sampled identity is refreshed, in this instance and on disk, so
    the next hit (here or in another instance) serves the entry instead of rebuilding."""
    root = ingest(cas, tmp_path / "src", BASIC)
    path = tmp_path / "cache"
    with DirectoryCache(cas, path, fsync=False) as a:
        a.materialize(root, tmp_path / "d0")
        entry = a.entry_path(root)
        assert entry is not None
        before = os.stat(entry / "a.txt").st_ino
        with _binding.injected("link", -errno.EMLINK):
            r = a.materialize(root, tmp_path / "d1")
        assert r.hit
        assert os.stat(entry / "a.txt").st_ino != before  # rotated
        for i in (2, 3):
            r = a.materialize(root, tmp_path / f"d{i}")
            assert (r.hit, r.rebuilt) == (True, False)
        assert a.stats().damaged == 0
    with DirectoryCache(cas, path, fsync=False) as b:  # reads the refreshed sidecar
        r = b.materialize(root, tmp_path / "d4")
        assert (r.hit, r.rebuilt) == (True, False)
        assert b.stats().damaged == 0
    assert snapshot(tmp_path / "d4") == snapshot(tmp_path / "src")


def _node_properties_tree(cas: LocalCAS, n: int) -> Digest:
    blob = cas.put(b"np\n")
    d = proto.Directory()
    for i in range(n):
        f = d.files.add(name=f"f{i:06d}")
        f.digest.hash, f.digest.size_bytes = blob.hash, blob.size_bytes
        f.node_properties.unix_mode.value = 0o644  # writable: a private copy made 0444
    return cas.put(d.SerializeToString())


class _CountingBytes(bytes):
    """Bytes that count their ``split`` calls (each one is a pass over all names)."""

    splits = 0

    def split(self, sep: bytes | None = None, maxsplit: int = -1) -> list[bytes]:  # type: ignore[override]
        _CountingBytes.splits += 1
        return super().split(sep, maxsplit)


def test_making_private_inodes_read_only_is_linear(cas: LocalCAS, tmp_path: Path) -> None:
    """``_read_only`` rebuilt each file's path from the whole names array (one split
    of every name per NodeProperties file): 20,000 files took 8.8 s. Now the arrays
    are read a bounded number of times, whatever the file count."""
    n = 2_000
    root = _node_properties_tree(cas, n)
    plan = load_plan(cas, root)
    tree = tmp_path / "t"
    materialize(cas, root, tree)
    a = plan.arrays
    a.names, a.dir_names = _CountingBytes(a.names), _CountingBytes(a.dir_names)
    _CountingBytes.splits = 0
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        cache_build._read_only(plan, fd)
    finally:
        os.close(fd)
    assert _CountingBytes.splits <= 4
    assert all(os.stat(tree / f"f{i:06d}").st_mode & 0o777 == 0o444 for i in range(n))


def test_paths_of_entries_agree_with_path_of_entry(cas: LocalCAS, tmp_path: Path) -> None:
    plan = load_plan(cas, ingest(cas, tmp_path / "src", BASIC))
    every = range(plan.arrays.n_entries)
    assert plan.paths_of_entries(every) == [plan.path_of_entry(i) for i in every]
    assert plan.paths_of_entries([]) == []
