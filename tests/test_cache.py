"""DirectoryCache in one process: hits, sizes, modes, eviction, single-flight, damage."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat import _binding, proto
from fastmat.cache import DirectoryCache
from fastmat.cache import build as cache_build
from fastmat.cache import index as cache_index
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.errors import RemoteError
from tests.cache_helpers import (
    BASIC,
    ingest,
    leftovers,
    modes_problems,
    shape,
    snapshot,
    write_tree,
)


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas") as c:
        yield c


@pytest.fixture
def basic(cas: LocalCAS, tmp_path: Path) -> tuple[Digest, Path]:
    src = tmp_path / "src"
    return ingest(cas, src, BASIC), src


def test_miss_then_hit_byte_identical(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path
) -> None:
    root, src = basic
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        first = cache.materialize(root, tmp_path / "d1")
        second = cache.materialize(root, tmp_path / "d2")
        st = cache.stats()
    assert (first.hit, first.method) == (False, "hardlink")
    assert (second.hit, second.method) == (True, "hardlink")
    want = snapshot(src)
    assert snapshot(tmp_path / "d1") == want
    assert snapshot(tmp_path / "d2") == want
    assert (st.hits, st.misses, st.constructions, st.hardlink_hits) == (1, 1, 1, 1)
    assert (st.entries, st.pinned) == (1, 0)
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize(
    "spec", [{}, {"a/b/c": None, "link": ("l", "a/b")}], ids=["empty-root", "dirs-and-link"]
)
def test_trees_without_files(cas: LocalCAS, tmp_path: Path, spec: dict[str, object]) -> None:
    root = ingest(cas, tmp_path / "src", spec)  # type: ignore[arg-type]
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        results = [cache.materialize(root, tmp_path / f"d{i}") for i in range(2)]
        assert [r.hit for r in results] == [False, True]
        assert (results[0].bytes, results[0].files) == (0, 0)
    for i in range(2):
        assert snapshot(tmp_path / f"d{i}") == snapshot(tmp_path / "src")


def test_zero_byte_file_is_read_only_and_present(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path
) -> None:
    root, _ = basic
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        for d in ("d1", "d2"):
            cache.materialize(root, tmp_path / d)
    for d in ("d1", "d2"):
        st = (tmp_path / d / "empty").lstat()
        assert st.st_size == 0
        assert st.st_mode & 0o222 == 0
    # never the CAS's own (lazily made) empty blob inode
    assert (tmp_path / "d1" / "empty").stat().st_ino != os.stat(cas.path(cas.put(b""))).st_ino


def test_dirs_writable_files_read_only_on_miss_and_hit(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path
) -> None:
    root, _ = basic
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
        cache.materialize(root, tmp_path / "d2")
        entry = cache.entry_path(root)
    assert entry is not None
    for tree in (tmp_path / "d1", tmp_path / "d2", entry):
        assert modes_problems(tree) == []
    # an action creates outputs inside an input directory: no chmod walk needed
    (tmp_path / "d2" / "src" / "lib" / "deep" / "out.o").write_bytes(b"obj")
    assert (tmp_path / "d2" / "bin" / "tool").stat().st_mode & 0o777 == 0o555


def test_hit_into_another_filesystem_copies_read_only(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path, tmpfs_dir: Path
) -> None:
    root, src = basic
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "warm")
        res = cache.materialize(root, tmpfs_dir / "d")
        st = cache.stats()
    assert (res.hit, res.method) == (True, "hardlink")
    assert st.fallbacks == 5  # every regular file copied across devices, counted
    assert snapshot(tmpfs_dir / "d") == snapshot(src)
    assert modes_problems(tmpfs_dir / "d") == []


def test_node_properties_writable_modes_are_dropped_in_entries(
    cas: LocalCAS, tmp_path: Path
) -> None:
    blob = cas.put(b"props\n")
    msg = proto.Directory()
    for name, d in (("e", Digest.of(b"")), ("p.txt", blob), ("q.txt", blob)):
        f = msg.files.add(name=name)
        f.digest.hash, f.digest.size_bytes = d.hash, d.size_bytes
        if name != "q.txt":
            f.node_properties.unix_mode.value = 0o666
        else:
            f.node_properties.mtime.seconds = 1_000_000
    root = cas.put(msg.SerializeToString(deterministic=True))
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
        assert cache.materialize(root, tmp_path / "d2").hit
        entry = cache.entry_path(root)
    assert entry is not None
    for tree in (entry, tmp_path / "d1", tmp_path / "d2"):
        assert modes_problems(tree) == []
        assert (tree / "p.txt").read_bytes() == b"props\n"
        assert (tree / "q.txt").stat().st_mtime_ns == 1_000_000 * 10**9
        assert (tree / "e").stat().st_size == 0
    # private inodes: the CAS blob keeps its own mode and mtime
    assert (entry / "p.txt").stat().st_ino != cas.path(blob).stat().st_ino
    assert cas.path(blob).stat().st_mode & 0o777 == 0o444


def test_entry_plain_file_is_the_cas_inode(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path
) -> None:
    root, _ = basic
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
        entry = cache.entry_path(root)
    assert entry is not None
    blob = cas.path(Digest.of(b"int x;\n"))
    assert (entry / "src/lib/deep/x.c").stat().st_ino == blob.stat().st_ino
    assert (tmp_path / "d1/src/lib/deep/x.c").stat().st_ino == blob.stat().st_ino
    assert blob.stat().st_mode & 0o777 == 0o444
    exe = (entry / "bin/tool").stat()
    assert exe.st_ino == cas.executable_path(Digest.of(b"#!/bin/sh\necho tool\n")).stat().st_ino


def test_size_from_digests_including_nested(cas: LocalCAS, tmp_path: Path) -> None:
    spec = {f"a/b/c/f{i}": bytes([i]) * (i * 100 + 1) for i in range(5)}
    spec["top"] = b"x" * 12345
    root = ingest(cas, tmp_path / "src", spec)
    want = sum(len(v) for v in spec.values() if isinstance(v, bytes))
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        res = cache.materialize(root, tmp_path / "d")
        assert res.bytes == want
        assert cache.stats().bytes == want
    # the replay accounted the same way after a restart (from the sidecar, no walk)
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        assert (cache.stats().entries, cache.stats().bytes) == (1, want)


def test_max_entries_zero_keeps_nothing(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path
) -> None:
    root, src = basic
    with DirectoryCache(cas, tmp_path / "cache", max_entries=0) as cache:
        r1 = cache.materialize(root, tmp_path / "d1")
        r2 = cache.materialize(root, tmp_path / "d2")
        st = cache.stats()
    assert (r1.hit, r1.method, r2.hit, r2.method) == (False, "materialize", False, "materialize")
    assert (st.entries, st.constructions, st.misses) == (0, 0, 2)
    assert os.listdir(tmp_path / "cache" / "entries") == []
    assert snapshot(tmp_path / "d2") == snapshot(src)


def test_max_entries_one_keeps_the_latest(cas: LocalCAS, tmp_path: Path) -> None:
    a = ingest(cas, tmp_path / "a", shape(30, 1))
    b = ingest(cas, tmp_path / "b", shape(30, 2))
    with DirectoryCache(cas, tmp_path / "cache", max_entries=1) as cache:
        cache.materialize(a, tmp_path / "da")
        cache.materialize(b, tmp_path / "db")
        cache.drain()
        st = cache.stats()
        assert (st.entries, st.evictions) == (1, 1)
        assert cache.entry_path(a) is None
        assert sorted(os.listdir(tmp_path / "cache" / "entries")) == [b.key, f"{b.key}.plan"]
        assert cache.materialize(b, tmp_path / "db2").hit
        assert not cache.materialize(a, tmp_path / "da2").hit
    # eviction unlinked the entry, never touched the modes of what others still link
    assert snapshot(tmp_path / "da") == snapshot(tmp_path / "a")
    assert modes_problems(tmp_path / "da") == []
    assert leftovers(tmp_path / "cache") == []


def test_close_finishes_pending_deletions(cas: LocalCAS, tmp_path: Path) -> None:
    roots = [ingest(cas, tmp_path / f"s{i}", shape(200, 40 + i)) for i in range(3)]
    with DirectoryCache(cas, tmp_path / "cache", max_entries=1) as cache:
        for i, root in enumerate(roots):
            cache.materialize(root, tmp_path / f"d{i}")
        assert cache.stats().evictions == 2
    assert os.listdir(tmp_path / "cache" / "trash") == []
    assert os.listdir(tmp_path / "cache" / "tmp") == []
    assert sorted(os.listdir(tmp_path / "cache" / "entries")) == [
        roots[2].key,
        f"{roots[2].key}.plan",
    ]


@pytest.mark.parametrize("policy", ["least-recently-used", "least-recently-stored"])
def test_max_bytes_evicts_by_policy(cas: LocalCAS, tmp_path: Path, policy: str) -> None:
    roots = [ingest(cas, tmp_path / f"s{i}", {"f": bytes([i]) * 1000}) for i in range(3)]
    with DirectoryCache(cas, tmp_path / "cache", max_bytes=2500, policy=policy) as cache:
        cache.materialize(roots[0], tmp_path / "d0")
        cache.materialize(roots[1], tmp_path / "d1")
        assert cache.materialize(roots[0], tmp_path / "d0b").hit  # used again
        cache.materialize(roots[2], tmp_path / "d2")
        gone = 1 if policy == "least-recently-used" else 0
        assert cache.entry_path(roots[gone]) is None
        assert cache.entry_path(roots[1 - gone]) is not None
        assert cache.stats().bytes == 2000


def test_replay_plans_beyond_the_memory_budget_reload(
    cas: LocalCAS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_index, "REPLAY_BUDGET_FILES", 50)
    roots = [ingest(cas, tmp_path / f"s{i}", shape(30, 20 + i)) for i in range(3)]
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        for k in range(2):
            for i, root in enumerate(roots):
                res = cache.materialize(root, tmp_path / f"d{i}-{k}")
                assert res.hit == (k == 1)
                assert snapshot(tmp_path / f"d{i}-{k}") == snapshot(tmp_path / f"s{i}")
        loaded = [e for e in cache._index if e.replay is not None]
        assert len(loaded) == 1  # 30 files each: only the latest fits in 50


def _run_threads(n: int, fn: object) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            fn(i)  # type: ignore[operator]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_single_flight_16_threads_one_construction(cas: LocalCAS, tmp_path: Path) -> None:
    root = ingest(cas, tmp_path / "src", shape(200, 3))
    results = []
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        errors = _run_threads(
            16, lambda i: results.append(cache.materialize(root, tmp_path / f"d{i}"))
        )
        st = cache.stats()
    assert errors == []
    assert (st.constructions, st.misses, st.hits) == (1, 1, 15)
    assert sorted(r.hit for r in results) == [False] + [True] * 15
    want = snapshot(tmp_path / "src")
    for i in range(16):
        assert snapshot(tmp_path / f"d{i}") == want


def test_four_trees_concurrently_below_capacity(cas: LocalCAS, tmp_path: Path) -> None:
    roots = [ingest(cas, tmp_path / f"s{i}", shape(60, 10 + i)) for i in range(4)]
    wants = [snapshot(tmp_path / f"s{i}") for i in range(4)]
    with DirectoryCache(cas, tmp_path / "cache", max_entries=1) as cache:

        def one(i: int) -> None:
            for k in range(3):
                dest = tmp_path / f"d{i}-{k}"
                cache.materialize(roots[(i + k) % 4], dest)
                assert snapshot(dest) == wants[(i + k) % 4]

        errors = _run_threads(8, one)
        cache.drain()
        st = cache.stats()
    assert errors == []
    assert (st.entries, st.pinned) == (1, 0)
    assert st.hits + st.misses == 24
    assert leftovers(tmp_path / "cache") == []


def test_exception_mid_construction_leaves_no_temp_and_no_pin(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, src = basic

    def boom(stage: str) -> None:
        if stage == "built":
            raise RuntimeError("injected failure after the tree was built")

    with DirectoryCache(cas, tmp_path / "cache") as cache:
        monkeypatch.setattr(cache_build, "stage_hook", boom)
        with pytest.raises(RuntimeError, match="injected"):
            cache.materialize(root, tmp_path / "d1")
        monkeypatch.undo()
        # a native failure in the middle of the construction's links, too
        with (
            _binding.injected("link", -errno.EIO, count=3),
            pytest.raises(OSError, match="Input/output") as info,
        ):
            cache.materialize(root, tmp_path / "d2")
        assert info.value.errno == errno.EIO
        st = cache.stats()
        assert (st.entries, st.pinned, st.constructions) == (0, 0, 0)
        assert os.listdir(tmp_path / "cache" / "entries") == []
        assert leftovers(tmp_path / "cache") == []
        assert not (tmp_path / "d1").exists()
        assert not (tmp_path / "d2").exists()
        # and the cache still works
        assert not cache.materialize(root, tmp_path / "d3").hit
    assert snapshot(tmp_path / "d3") == snapshot(src)


def test_waiters_see_the_constructors_exception(
    cas: LocalCAS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = ingest(cas, tmp_path / "src", shape(20, 4))
    gate = threading.Event()

    def slow_fail(stage: str) -> None:
        if stage == "built":
            gate.wait(5)
            raise RuntimeError("construction failed")

    monkeypatch.setattr(cache_build, "stage_hook", slow_fail)
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        timer = threading.Timer(0.3, gate.set)
        timer.start()
        errors = _run_threads(4, lambda i: cache.materialize(root, tmp_path / f"d{i}"))
        timer.join()
        assert len(errors) == 4
        assert all(isinstance(e, RuntimeError) for e in errors)
        assert cache.stats().pinned == 0


class _BlobsUnavailable:
    """Serves Directory messages from another CAS; every blob fetch fails (slowly)."""

    def __init__(self, src: LocalCAS, dst: LocalCAS) -> None:
        self.src, self.dst, self.blob_calls = src, dst, 0

    def fetch_directories(self, root: Digest) -> None:
        stack = [root]
        while stack:
            data = self.src.read(stack.pop())
            self.dst.put(data)
            msg = proto.Directory.FromString(data)
            stack += [Digest(c.digest.hash, c.digest.size_bytes) for c in msg.directories]

    def fetch_blobs(self, digests: object) -> None:
        self.blob_calls += 1
        time.sleep(1.0)  # long enough for the other threads to be waiting on this flight
        raise RemoteError("remote CAS unavailable")


def test_fetcher_failure_is_single_flight_and_leaves_nothing(cas: LocalCAS, tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "remote") as remote:
        root = ingest(remote, tmp_path / "src", shape(20, 5))
        fetcher = _BlobsUnavailable(remote, cas)
        with DirectoryCache(cas, tmp_path / "cache", fetcher=fetcher) as cache:
            errors = _run_threads(4, lambda i: cache.materialize(root, tmp_path / f"d{i}"))
            st = cache.stats()
            assert len(errors) == 4
            assert all(isinstance(e, RemoteError) for e in errors)
            assert fetcher.blob_calls == 1  # the waiters shared the one failed construction
            assert (st.entries, st.pinned, st.constructions) == (0, 0, 0)
            assert os.listdir(tmp_path / "cache" / "entries") == []
            assert leftovers(tmp_path / "cache") == []
            assert not any((tmp_path / f"d{i}").exists() for i in range(4))


@pytest.mark.parametrize("damage", ["missing", "replaced", "chmod"])
def test_damaged_entry_is_rebuilt_never_served(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path, damage: str
) -> None:
    root, src = basic
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
        entry = cache.entry_path(root)
        assert entry is not None
        victim = entry / "src/lib/y.h"
        if damage == "missing":
            victim.unlink()
        elif damage == "replaced":  # same size, other bytes, a new inode
            victim.unlink()
            victim.write_bytes(b"#define Z 2\n" * 100)
            victim.chmod(0o444)
        elif damage == "chmod":  # what the seeds' bug did to a shared inode
            shutil.copyfile(src / "src/lib/y.h", tmp_path / "private")
            victim.unlink()
            os.link(tmp_path / "private", victim)
            victim.chmod(0o644)
        res = cache.materialize(root, tmp_path / "d2")
        assert (res.hit, res.rebuilt) == (False, True)
        assert snapshot(tmp_path / "d2") == snapshot(src)
        assert cache.stats().damaged == 1
        assert cache.materialize(root, tmp_path / "d3").hit
        cache.drain()
    assert snapshot(tmp_path / "d3") == snapshot(src)
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("damage", ["payload", "header"])
def test_damaged_sidecar_is_noticed_after_reopen(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path, damage: str
) -> None:
    root, src = basic
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
    side = tmp_path / "cache" / "entries" / f"{root.key}.plan"
    data = bytearray(side.read_bytes())
    if damage == "payload":
        data[-3] ^= 0xFF  # the header still reads: adopted, then refused at the hit
    else:
        data[:8] = b"garbage!"
    side.chmod(0o644)
    side.write_bytes(bytes(data))
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        assert cache.stats().entries == (1 if damage == "payload" else 0)
        res = cache.materialize(root, tmp_path / "d2")
        assert not res.hit
        assert res.rebuilt == (damage == "payload")
        assert cache.materialize(root, tmp_path / "d3").hit
    assert snapshot(tmp_path / "d2") == snapshot(src)
    assert snapshot(tmp_path / "d3") == snapshot(src)


def test_reopen_adopts_complete_entries(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path
) -> None:
    root, src = basic
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
    (tmp_path / "cache" / "trash" / "stale").mkdir()
    (tmp_path / "cache" / "trash" / "stale" / "f").write_bytes(b"x")
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        assert cache.stats().entries == 1
        res = cache.materialize(root, tmp_path / "d2")
        st = cache.stats()
    assert res.hit
    assert (st.constructions, st.hits) == (0, 1)
    assert snapshot(tmp_path / "d2") == snapshot(src)
    assert leftovers(tmp_path / "cache") == []


def test_reopen_keeps_the_lru_order(cas: LocalCAS, tmp_path: Path) -> None:
    a = ingest(cas, tmp_path / "a", shape(10, 50))
    b = ingest(cas, tmp_path / "b", shape(10, 51))
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(a, tmp_path / "da")
        cache.materialize(b, tmp_path / "db")
        time.sleep(0.05)  # sidecar mtimes are the LRU clock across restarts
        assert cache.materialize(a, tmp_path / "da2").hit  # a is now the most recent
    with DirectoryCache(cas, tmp_path / "cache", max_entries=1) as cache:
        assert cache.entry_path(a) is not None
        assert cache.entry_path(b) is None
        assert cache.stats().evictions == 1


def test_orphans_are_discarded_at_open(
    cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path
) -> None:
    root, _ = basic
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
    entries = tmp_path / "cache" / "entries"
    (entries / f"{root.key}.plan").unlink()  # a tree without its sidecar
    other = Digest.of(b"other")
    (entries / f"{other.key}.plan").write_bytes(b"x")  # a sidecar without its tree
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        assert cache.stats().entries == 0
        assert not cache.materialize(root, tmp_path / "d2").hit
    assert sorted(os.listdir(entries)) == [root.key, f"{root.key}.plan"]


def test_lock_files_follow_the_entries(cas: LocalCAS, tmp_path: Path) -> None:
    roots = [ingest(cas, tmp_path / f"s{i}", shape(10, 30 + i)) for i in range(4)]
    locks = tmp_path / "cache" / "locks"
    with DirectoryCache(cas, tmp_path / "cache", max_entries=2) as cache:
        for i, root in enumerate(roots):
            cache.materialize(root, tmp_path / f"d{i}")
        assert sorted(os.listdir(locks)) == sorted(f"{r.key}.lock" for r in roots[2:])
    (locks / f"{Digest.of(b'never built').key}.lock").write_bytes(b"")
    with DirectoryCache(cas, tmp_path / "cache", max_entries=2) as cache:
        assert sorted(os.listdir(locks)) == sorted(f"{r.key}.lock" for r in roots[2:])
        assert cache.materialize(roots[3], tmp_path / "again").hit


def test_dest_must_not_exist(cas: LocalCAS, basic: tuple[Digest, Path], tmp_path: Path) -> None:
    root, _ = basic
    write_tree(tmp_path / "taken", {"keep": b"mine"})
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
        with pytest.raises(FileExistsError):
            cache.materialize(root, tmp_path / "taken")
        assert cache.stats().pinned == 0
    assert (tmp_path / "taken" / "keep").read_bytes() == b"mine"
