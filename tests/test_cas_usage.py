"""The bounded CAS: use record (fastmat.cas.usage), pins, eviction (fastmat.cas.evict)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from fastmat import BlobNotFoundError, Digest, materialize
from fastmat.cas import LocalCAS, usage
from fastmat.cas.evict import Budget
from fastmat.cas.usage import Index
from fastmat.errors import LockTimeoutError
from fastmat.tree import ingest_tree

SPAWN = mp.get_context("spawn")
KB = 1000


def blob(i: int, size: int = 100 * KB) -> bytes:
    seed = hashlib.sha256(b"%d" % i).digest()
    return (seed * (size // 32 + 1))[:size]


def names_on_disk(cas: LocalCAS) -> int:
    return sum(len(os.listdir(d)) for a in ("blobs", "exec") for d in (cas.root / a).iterdir())


def bytes_on_disk(cas: LocalCAS) -> int:
    total = 0
    for area in ("blobs", "exec"):
        for p in (cas.root / area).rglob("*-*"):
            total += int(p.name.rsplit("-", 1)[1])
    return total


def admission_only(cas: LocalCAS) -> LocalCAS:
    """No background eviction (its watermarks at 100 %): only admission evicts, so a
    test knows exactly what is left."""
    assert cas._evictor is not None
    cas._evictor.budget = Budget(cas.budget.max_bytes, cas.budget.max_blobs, high=1.0, low=1.0)
    return cas


@pytest.fixture
def bounded(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", max_bytes=1000 * KB) as c:
        yield admission_only(c)


# ---------------------------------------------------------------- the budget


def test_never_above_max_bytes(bounded: LocalCAS) -> None:
    for i in range(40):
        bounded.put(blob(i))
        assert bytes_on_disk(bounded) <= 1000 * KB  # admission evicts before publishing
    u = bounded.usage()
    assert u.bytes == bytes_on_disk(bounded) == u.recorded_bytes
    assert u.counters.evictions >= 30
    assert bounded.counters.blobs_written == 40


def test_max_blobs_counts_names(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas", max_blobs=10) as cas:
        admission_only(cas)
        ds = [cas.put(blob(i, 100)) for i in range(10)]
        cas.executable_path(ds[-1])  # a variant is a name: 11 would not fit
        assert names_on_disk(cas) <= 10
        assert (cas.root / cas.exec_relpath(ds[-1])).exists()
        assert ds[-1] in cas  # the variant's own blob: the most recently used


def test_least_recently_used_goes_first(bounded: LocalCAS) -> None:
    ds = [bounded.put(blob(i)) for i in range(8)]
    with bounded.pinned(ds[:2]):  # a use of the two oldest
        pass
    for i in range(8, 11):  # 1,100 KB: 1 to 3 of the other six must go
        bounded.put(blob(i))
    assert ds[0] in bounded
    assert ds[1] in bounded
    assert ds[2] not in bounded
    assert ds[7] in bounded


def test_use_record_survives_a_restart(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas") as cas:  # unbounded: records all the same
        ds = [cas.put(blob(i)) for i in range(8)]
        time.sleep(0.01)
        with cas.pinned(ds[:2]):
            pass
    with LocalCAS(tmp_path / "cas", max_bytes=700 * KB) as cas:
        admission_only(cas)
        cas.put(blob(99))  # admission: 800 KB must become 600 KB, the oldest unused go
        assert [d in cas for d in ds] == [True, True, False, False, True, True, True, True]


def test_executable_variants_share_the_budget(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas", max_bytes=1000 * KB) as cas:
        admission_only(cas)
        ds = [cas.put(blob(i)) for i in range(5)]
        for d in ds:  # one by one: storing a variant is a use of its key, in this order
            cas.executable_path(d)  # 10 names, 1,000 KB
        assert cas.index.total_bytes == 1000 * KB
        cas.put(blob(50))
        assert bytes_on_disk(cas) <= 1000 * KB
        old = ds[0]  # the least recently used key lost its variant and its blob
        assert old not in cas
        assert not (cas.root / cas.exec_relpath(old)).exists()


def test_background_eviction_to_the_low_watermark(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas", max_bytes=1000 * KB) as cas:
        for i in range(10):
            cas.put(blob(i))
        deadline = time.monotonic() + 30
        while bytes_on_disk(cas) > 800 * KB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bytes_on_disk(cas) <= 800 * KB  # 90 % reached: evicted down to 80 %


def test_gc_and_usage(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas") as cas:
        src = tmp_path / "src"
        src.mkdir()
        for i in range(6):
            (src / f"f{i}").write_bytes(blob(i))
        root = ingest_tree(cas, src)
        materialize(cas, root, tmp_path / "tree")
        for i in range(6, 9):
            cas.put(blob(i))
        u = cas.usage()
        assert (u.blobs, u.exec_variants) == (10, 0)
        assert u.bytes_shared == 600 * KB  # linked into the tree too
        assert u.bytes_cas_only == u.bytes - 600 * KB
        rep = cas.gc(max_bytes=0)
        assert (rep.names_after, rep.bytes_after) == (0, 0)
        assert rep.evicted == 10
        # a name removed from the CAS never changes a tree linked to it
        for i in range(6):
            assert (tmp_path / "tree" / f"f{i}").read_bytes() == blob(i)
        assert cas.usage().counters.evictions == 10


def test_refetches_are_counted(bounded: LocalCAS) -> None:
    d = bounded.put(blob(0))
    bounded.gc(max_bytes=0)
    assert d not in bounded
    bounded.put(blob(0))
    c = bounded.usage().counters
    assert (c.evictions, c.refetches) == (1, 1)


# ---------------------------------------------------------------- pins


def test_pinned_blobs_are_never_evicted(bounded: LocalCAS) -> None:
    ds = [bounded.put(blob(i)) for i in range(5)]
    with bounded.pinned(ds) as pin:
        extra = bounded.put(blob(100))
        pin.add(bounded.relpath(extra).encode())
        rep = bounded.gc(max_bytes=0)
        assert rep.pinned == 6
        assert all(d in bounded for d in [*ds, extra])
    rep = bounded.gc(max_bytes=0)
    assert not any(d in bounded for d in [*ds, extra])


def test_pins_over_the_budget_are_kept(bounded: LocalCAS) -> None:
    ds = [bounded.put(blob(i)) for i in range(10)]
    with bounded.pinned(ds) as pin:
        pin.add(bounded.relpath(Digest.of(blob(10))).encode())
        bounded.put(blob(10))  # nothing may go: published over the budget
        assert all(d in bounded for d in ds)
        assert bytes_on_disk(bounded) == 1100 * KB


def _pin_and_wait(cas_dir: str, ready: Event, done: Event) -> None:
    with LocalCAS(cas_dir) as cas:
        ds = [Digest.of(blob(i)) for i in range(3)]
        with cas.pinned(ds):
            ready.set()
            done.wait(60)


def test_another_process_pins(tmp_path: Path) -> None:
    cas_dir = str(tmp_path / "cas")
    with LocalCAS(cas_dir) as cas:
        ds = [cas.put(blob(i)) for i in range(6)]
        ready, done = SPAWN.Event(), SPAWN.Event()
        p = SPAWN.Process(target=_pin_and_wait, args=(cas_dir, ready, done))
        p.start()
        assert ready.wait(60)
        cas.gc(max_bytes=0)
        assert [d in cas for d in ds] == [True] * 3 + [False] * 3
        done.set()
        p.join(60)
        assert p.exitcode == 0
        cas.gc(max_bytes=0)
        assert not any(d in cas for d in ds)


def test_a_killed_processs_pins_go_with_its_temp_dir(tmp_path: Path) -> None:
    cas_dir = str(tmp_path / "cas")
    with LocalCAS(cas_dir) as cas:
        ds = [cas.put(blob(i)) for i in range(3)]
        ready, done = SPAWN.Event(), SPAWN.Event()
        p = SPAWN.Process(target=_pin_and_wait, args=(cas_dir, ready, done))
        p.start()
        assert ready.wait(60)
        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)
        p.join(60)
        cas.gc(max_bytes=0)
        assert all(d in cas for d in ds)  # its pin file is still there: honoured
    with LocalCAS(cas_dir) as cas:  # opening sweeps the dead temp dir, pins included
        cas.gc(max_bytes=0)
        assert not any(d in cas for d in ds)


def test_materialize_after_eviction_finds_the_blob_missing(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas") as cas:
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_bytes(blob(1))
        root = ingest_tree(cas, src)
        with cas.pinned([root]):  # a use: the Directory is now more recent than the file
            pass
        cas.gc(max_bytes=200)
        with pytest.raises(BlobNotFoundError) as ei:
            materialize(cas, root, tmp_path / "dest")
        assert ei.value.digest == Digest.of(blob(1))
        assert not (tmp_path / "dest").exists()


# ---------------------------------------------------------------- the logs


def test_another_instance_replays_the_same_index(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas", max_bytes=500 * KB) as a, LocalCAS(tmp_path / "cas") as b:
        for i in range(9):
            (a if i % 2 else b).put(blob(i))
        # down to the low watermark (400 KB) now, so that a's background eviction has
        # nothing left to do while the two indexes are read
        a.gc(max_bytes=400 * KB)
        ia, ib = a.index, b.index
        assert ia.counters.evictions > 0
        assert (ia.total_bytes, ia.total_names) == (ib.total_bytes, ib.total_names)
        assert ia.entries == ib.entries
        assert ia.total_bytes == bytes_on_disk(a)


def test_compaction_and_torn_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalCAS(tmp_path / "cas") as cas, LocalCAS(tmp_path / "cas") as other:
        ds = [cas.put(blob(i, 1000)) for i in range(20)]
        with cas.pinned(ds[:5]):
            pass
        before = dict(other.index.entries)
        with open(tmp_path / "cas" / "usage" / "uses", "ab") as f:
            f.write(b"\n@U 12\nblobs/zz/not-a-key\0garbage")  # a torn chunk: no newline
        with open(tmp_path / "cas" / "usage" / "store", "ab") as f:
            f.write(b"\n@S 99\nblobs/00/short-1\0exec/xx/" + b"0" * 64 + b"-x\n@E\n")
        assert other.index.entries == before  # skipped
        ino = (tmp_path / "cas" / "usage" / "store").stat().st_ino
        idx = cas._usage.compact()
        assert (tmp_path / "cas" / "usage" / "store").stat().st_ino != ino
        assert (tmp_path / "cas" / "usage" / "uses").stat().st_size == 0
        assert idx.entries == before
        assert other.index.entries == before  # the other instance noticed and reloaded
        cas.put(blob(100, 1000))
        assert len(other.index.entries) == 21


def test_a_cas_without_a_use_record_is_rescanned(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas") as cas:
        ds = []
        for i in range(5):
            ds.append(cas.put(blob(i, 1000)))
            time.sleep(0.03)  # distinct mtimes (the kernel's clock for them is coarse)
    for name in ("store", "uses"):
        (tmp_path / "cas" / "usage" / name).unlink()
    with LocalCAS(tmp_path / "cas", max_bytes=3 * KB) as cas:
        admission_only(cas)
        idx = cas.index
        assert idx.total_names == 5  # found by the rescan (last use: their mtime)
        cas.put(blob(9, 1000))
        assert [d in cas for d in ds] == [False, False, False, True, True]


def test_automatic_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage, "COMPACT_MIN_BYTES", 20_000)
    with LocalCAS(tmp_path / "cas") as cas:
        ds = [cas.put(blob(i, 100)) for i in range(30)]
        for _ in range(40):
            with cas.pinned(ds):
                pass
        deadline = time.monotonic() + 30
        while (tmp_path / "cas" / "usage" / "uses").stat().st_size > 20_000:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert cas.index.total_names == 30


def test_index_ignores_uses_of_unknown_names() -> None:
    idx = Index()
    idx.apply(b"U", 5, b"blobs/ab/" + b"a" * 64 + b"-3")
    assert idx.entries == {}
    idx.apply(b"S", 1, b"blobs/ab/" + b"a" * 64 + b"-3\0exec/ab/" + b"a" * 64 + b"-3")
    idx.apply(b"U", 5, b"blobs/ab/" + b"a" * 64 + b"-3")
    assert idx.entries == {b"a" * 64 + b"-3": [5, 3, 3]}
    assert (idx.total_bytes, idx.total_names) == (6, 2)


def test_a_held_use_record_lock_is_a_bounded_wait(tmp_path: Path) -> None:
    """Another process holding usage/lock exclusively (an evictor that hangs): a pin
    waits at most lock_timeout_s, then LockTimeoutError names the lock and holder."""
    LocalCAS(tmp_path / "cas").close()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path / "cas" / "usage" / "lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with LocalCAS(tmp_path / "cas", lock_timeout_s=0.3) as cas:
            t0 = time.monotonic()
            with pytest.raises(LockTimeoutError) as ei, cas.pinned([Digest.of(b"x")]):
                pass
            assert time.monotonic() - t0 < 30
            assert ei.value.path.endswith("usage/lock")
            assert ei.value.holder_pid == holder.pid
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


_HOLD = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)
