"""``progress=`` and ``cancel=`` across the long operations (issue 12, items 3 and 6):
the directory cache (a miss, a hit, a workspace, waits for another constructor), the
CAS and cache verify, the cache gc and ingest. Reports come at a bounded rate and end
at the total; a cancelled call leaves nothing at its destination and no entry
half-built. ``materialize`` itself: tests/test_materialize.py."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat import Cancelled, DirectoryCache, LocalCAS, Progress
from fastmat.cache import build as cache_build
from fastmat.control import ProgressFn, stopping
from fastmat.tree import ingest_tree
from tests.cache_helpers import BASIC, ingest, leftovers, snapshot, wide

N_WIDE = 20_000


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", fsync=False) as c:
        yield c


def bounded(reports: list[Progress], what: str) -> list[Progress]:
    """The reports of phase ``what``, checked: non-decreasing, ending at the total."""
    mine = [r for r in reports if r.what == what]
    assert mine, f"no {what!r} report"
    assert [r.done for r in mine] == sorted(r.done for r in mine)
    assert mine[-1].total is not None
    assert mine[-1].done == mine[-1].total
    return mine


def cancel_once_started(stop: threading.Event, what: str) -> tuple[list[int], ProgressFn]:
    seen: list[int] = []

    def on(p: Progress) -> None:
        if p.what == what:
            seen.append(p.done)
            if p.done > 0:
                stop.set()

    return seen, on


def test_cache_miss_then_hit_report_their_phases(cas: LocalCAS, tmp_path: Path) -> None:
    root = wide(cas, 3000)
    reports: list[Progress] = []
    with DirectoryCache(cas, tmp_path / "cache", fsync=False) as cache:
        r = cache.materialize(root, tmp_path / "d1", progress=reports.append)
        assert not r.hit
        assert bounded(reports, "materialize")[-1].total == 3000  # the construction
        assert bounded(reports, "replay")[-1].total == 3000  # the copy into dest
        reports.clear()
        assert cache.materialize(root, tmp_path / "d2", progress=reports.append).hit
        assert {r.what for r in reports} == {"replay"}
        assert len(reports) <= 2 + r.duration_s / 0.1  # never per file
        reports.clear()
        with cache.workspace(root, tmp_path / "ws", progress=reports.append) as ws:
            assert (ws.path / "f000000").exists()
    assert all(r.what in ("replay", "materialize") for r in reports)


def test_cancelling_a_cache_miss_leaves_no_entry_and_no_dest(cas: LocalCAS, tmp_path: Path) -> None:
    root = wide(cas, N_WIDE)
    stop = threading.Event()
    seen, on = cancel_once_started(stop, "materialize")
    path = tmp_path / "cache"
    with DirectoryCache(cas, path, fsync=False, threads=1) as cache:
        with pytest.raises(Cancelled):
            cache.materialize(root, tmp_path / "d1", progress=on, cancel=stop)
        assert seen
        assert seen[-1] < N_WIDE
        assert sorted(os.listdir(tmp_path)) == ["cache", "cas"]  # no dest, no staging
        assert os.listdir(path / "entries") == []
        assert leftovers(path) == []
        assert cache.stats().entries == 0
        assert not cache.materialize(root, tmp_path / "d2").hit  # not poisoned
    assert len(os.listdir(tmp_path / "d2")) == N_WIDE


def test_cancelling_a_hit_leaves_the_entry_intact(cas: LocalCAS, tmp_path: Path) -> None:
    root = wide(cas, N_WIDE)
    stop = threading.Event()
    seen, on = cancel_once_started(stop, "replay")
    with DirectoryCache(cas, tmp_path / "cache", fsync=False, threads=1) as cache:
        cache.materialize(root, tmp_path / "d1")
        with pytest.raises(Cancelled):
            cache.materialize(root, tmp_path / "d2", progress=on, cancel=stop)
        assert seen
        assert seen[-1] < N_WIDE
        assert not (tmp_path / "d2").exists()
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".fastmat-tmp")]
        r = cache.materialize(root, tmp_path / "d3")
        assert (r.hit, r.rebuilt) == (True, False)
        assert cache.stats().damaged == 0


def test_a_constructor_cancelled_does_not_fail_its_waiters(
    cas: LocalCAS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread A builds with a token it then sets; thread B, waiting for A's construction
    of the same tree with no token of its own, builds it itself instead of failing."""
    root = ingest(cas, tmp_path / "src", BASIC)
    a_stop = threading.Event()
    b_waiting = threading.Event()
    results: dict[str, object] = {}

    def hook(stage: str) -> None:
        if stage == "built" and not a_stop.is_set():
            b_waiting.wait(10)
            a_stop.set()  # A is cancelled after its tree was built, before publishing

    monkeypatch.setattr(cache_build, "stage_hook", hook)
    with DirectoryCache(cas, tmp_path / "cache", fsync=False) as cache:

        def run(name: str, cancel: threading.Event | None) -> None:
            try:
                results[name] = cache.materialize(root, tmp_path / name, cancel=cancel)
            except BaseException as e:
                results[name] = e

        a = threading.Thread(target=run, args=("a", a_stop))
        a.start()
        b = threading.Thread(target=run, args=("b", None))
        b.start()
        b_waiting.set()
        a.join()
        b.join()
    assert isinstance(results["a"], Cancelled)
    assert not isinstance(results["b"], BaseException), results["b"]
    assert snapshot(tmp_path / "b") == snapshot(tmp_path / "src")
    assert not (tmp_path / "a").exists()


def test_waiting_for_another_process_is_cancellable(cas: LocalCAS, tmp_path: Path) -> None:
    """Another process builds the same tree (it holds the digest's LOCK_EX): the wait
    ends with ``Cancelled`` when the token is set, not after the lock timeout."""
    root = ingest(cas, tmp_path / "src", BASIC)
    path = tmp_path / "cache"
    with DirectoryCache(cas, path, fsync=False, lock_timeout_s=600) as cache:
        fd = os.open(path / "locks" / f"{root.key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: "another process"
            stop = threading.Event()
            timer = threading.Timer(0.2, stop.set)
            timer.start()
            with pytest.raises(Cancelled):
                cache.materialize(root, tmp_path / "d", cancel=stop)
            timer.join()
        finally:
            os.close(fd)
        assert not (tmp_path / "d").exists()
        assert not cache.materialize(root, tmp_path / "d").hit  # the lock is free now


def test_cas_and_cache_verify_report_progress(cas: LocalCAS, tmp_path: Path) -> None:
    root = ingest(cas, tmp_path / "src", BASIC)
    reports: list[Progress] = []
    report = cas.verify(progress=reports.append)
    assert report.ok
    last = bounded(reports, "verify")[-1]
    assert last.unit == "bytes"
    assert last.total == report.bytes_checked
    reports.clear()
    with DirectoryCache(cas, tmp_path / "cache", fsync=False) as cache:
        cache.materialize(root, tmp_path / "d")
        assert cache.verify(progress=reports.append).ok
    assert bounded(reports, "verify")
    assert bounded(reports, "verify entries")[-1].total == 1


def test_verify_stops_through_its_progress(cas: LocalCAS, tmp_path: Path) -> None:
    ingest(cas, tmp_path / "src", BASIC)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        cas.verify(progress=stopping(None, stop))
    with DirectoryCache(cas, tmp_path / "cache", fsync=False) as cache, pytest.raises(Cancelled):
        cache.verify(cancel=stop)


def test_gc_evicts_down_to_a_bound_and_reports_deletions(cas: LocalCAS, tmp_path: Path) -> None:
    roots = [ingest(cas, tmp_path / f"src{i}", {**BASIC, "n": f"{i}\n".encode()}) for i in range(3)]
    reports: list[Progress] = []
    with DirectoryCache(cas, tmp_path / "cache", fsync=False) as cache:
        for i, r in enumerate(roots):
            cache.materialize(r, tmp_path / f"d{i}")
        after = cache.gc(0, progress=reports.append)
        assert (after.entries, after.bytes, after.evictions) == (0, 0, 3)
        assert cache.materialize(roots[0], tmp_path / "again").hit is False  # own bound kept
    assert bounded(reports, "gc")[-1].done >= 3
    assert leftovers(tmp_path / "cache") == []


def test_a_cancelled_gc_leaves_the_rest_for_the_next_opener(cas: LocalCAS, tmp_path: Path) -> None:
    roots = [ingest(cas, tmp_path / f"src{i}", {**BASIC, "n": f"{i}\n".encode()}) for i in range(3)]
    path = tmp_path / "cache"
    stop = threading.Event()
    with DirectoryCache(cas, path, fsync=False) as cache:
        for i, r in enumerate(roots):
            cache.materialize(r, tmp_path / f"d{i}")

        def on(p: Progress) -> None:
            stop.set()

        with contextlib.suppress(Cancelled):  # the deleter may beat the first report
            cache.gc(0, progress=on, cancel=stop)
        assert cache.stats().entries == 0
    with DirectoryCache(cas, path, fsync=False):
        pass  # opening queues what is left in the trash; closing waits for it
    assert leftovers(path) == []


def test_ingest_reports_files_and_stops_through_its_progress(cas: LocalCAS, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_bytes(f"{i}\n".encode())
    reports: list[Progress] = []
    ingest_tree(cas, src, progress=reports.append)
    assert reports[-1] == Progress("ingest", 50, None, "files")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        ingest_tree(cas, src, progress=stopping(None, stop))
