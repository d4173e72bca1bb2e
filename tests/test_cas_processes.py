"""LocalCAS shared by several real processes (multiprocessing "spawn" and subprocess)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import TypeVar

from fastmat import Digest
from fastmat.cas import LocalCAS
from tests.helpers import as_nobody

T = TypeVar("T")
SPAWN = mp.get_context("spawn")
REPO = str(Path(__file__).resolve().parent.parent)


def _run(
    queue: Queue[tuple[int, object]],
    index: int,
    fn: Callable[..., object],
    args: tuple[object, ...],
) -> None:
    try:
        queue.put((index, fn(*args)))
    except BaseException as e:
        queue.put((index, e))
        raise


def in_processes(n: int, fn: Callable[..., T], *args: object) -> list[T]:
    """Runs fn(*args, barrier) in n spawned processes at once; returns their results."""
    barrier = SPAWN.Barrier(n)
    queue: Queue[tuple[int, object]] = SPAWN.Queue()
    procs = [SPAWN.Process(target=_run, args=(queue, i, fn, (*args, barrier))) for i in range(n)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join()
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    assert errors == []
    assert [p.exitcode for p in procs] == [0] * n
    return [results[i] for i in range(n)]  # type: ignore[misc]


def blob_data(i: int) -> bytes:
    """Deterministic blob i: every process computes the same 1,000 blobs."""
    return random.Random(i).randbytes(100 + (i * 37) % 4000)


def _put_all(cas_dir: str, n: int, barrier: Barrier) -> tuple[int, int]:
    order = list(range(n))
    random.Random(os.getpid()).shuffle(order)
    with LocalCAS(cas_dir) as cas:
        barrier.wait()
        for i in order:
            assert cas.put(blob_data(i)) == Digest.of(blob_data(i))
        c = cas.counters
        return c.blobs_written, c.blobs_present


def test_eight_processes_put_the_same_thousand_blobs(tmp_path: Path) -> None:
    cas_dir = str(tmp_path / "cas")
    LocalCAS(cas_dir, fsync=False).close()
    results = in_processes(8, _put_all, cas_dir, 1000)
    assert sum(w for w, _ in results) == 1000  # each blob written exactly once
    assert all(w + p == 1000 for w, p in results)  # and every other put found it
    blobs = [p for p in (tmp_path / "cas" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1000
    with LocalCAS(cas_dir) as cas:
        for i in range(1000):
            assert cas.read(Digest.of(blob_data(i))) == blob_data(i)
        report = cas.verify()
        assert report.ok
        assert report.blobs_checked == 1000
        assert cas.counters.temp_dirs_swept == 0  # every worker cleaned up after itself
        assert os.listdir(cas.tmp_dir.parent) == [cas.tmp_dir.name]
        assert os.listdir(cas.tmp_dir) == ["owner.lock"]
    assert os.listdir(tmp_path / "cas" / "tmp") == []
    assert os.listdir(tmp_path / "cas" / "locks") == []


def _race_variants(
    cas_dir: str, digests: list[str], barrier: Barrier
) -> tuple[int, dict[str, int]]:
    with LocalCAS(cas_dir) as cas:
        ds = [Digest.parse(s) for s in digests]
        barrier.wait()
        inodes = {str(d): cas.executable_path(d).stat().st_ino for d in ds}
        # every later call returns the same inode
        assert all(cas.executable_path(d).stat().st_ino == inodes[str(d)] for d in ds)
        return cas.counters.exec_variants_built, inodes


def test_six_processes_race_for_the_same_variants(tmp_path: Path) -> None:
    cas_dir = str(tmp_path / "cas")
    with LocalCAS(cas_dir) as cas:
        # big enough that a copy takes a while, so the racers really overlap
        ds = [cas.put(f"#!/bin/sh\necho {i}\n".encode() + os.urandom(256 << 10)) for i in range(12)]
        blob_inodes = {str(d): cas.path(d).stat().st_ino for d in ds}
    results = in_processes(6, _race_variants, cas_dir, [str(d) for d in ds])
    assert sum(created for created, _ in results) == len(ds)  # one construction per digest
    for d in ds:
        inodes = {got[str(d)] for _, got in results}
        assert len(inodes) == 1  # one inode per digest
        assert inodes != {blob_inodes[str(d)]}
    with LocalCAS(cas_dir) as cas:
        for d in ds:
            assert (cas.root / cas.exec_relpath(d)).stat().st_mode & 0o7777 == 0o555
            assert cas.path(d).stat().st_mode & 0o7777 == 0o444
        assert cas.verify().ok
    assert os.listdir(tmp_path / "cas" / "locks") == []


_PUT_FOREVER = """
import os, sys
from fastmat.cas import LocalCAS
cas = LocalCAS(sys.argv[1])
print(cas.tmp_dir.name, flush=True)
tail = os.urandom((1 << 20) - 8)
i = 0
while True:  # nearly all the time inside put (1 MiB, fsync'ed): a kill lands mid-put
    cas.put(i.to_bytes(8, "big") + tail)
    i += 1
    if i == 5:
        print("going", flush=True)
"""

_HOLD_OPEN = """
import sys
from fastmat.cas import LocalCAS
from tests.helpers import as_nobody
cas = LocalCAS(sys.argv[1])
print(cas.tmp_dir.name, flush=True)
sys.stdin.read()
cas.close()
"""


def _python(code: str, cas_dir: Path) -> subprocess.Popen[str]:
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(cas_dir)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sigkill_mid_put_leaves_no_partial_blob_and_is_swept(tmp_path: Path) -> None:
    cas_dir = tmp_path / "cas"
    tmp = cas_dir / "tmp"
    kills = partial = 0
    while partial < 2 and kills < 12:  # a kill lands mid-put ~70% of the time
        proc = _python(_PUT_FOREVER, cas_dir)
        assert proc.stdout is not None
        assert proc.stdin is not None
        name = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "going"
        time.sleep(random.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        proc.stdout.close()
        proc.stdin.close()
        kills += 1
        # its temp dir survives it (this child's opening swept the previous one)
        assert os.listdir(tmp) == [name]
        partial += len(os.listdir(tmp / name)) > 1  # owner.lock + a half-done temp
    assert partial == 2
    with LocalCAS(cas_dir) as cas:
        assert cas.counters.temp_dirs_swept == 1
        assert os.listdir(tmp) == []  # the dead one swept; opening makes none
        report = cas.verify()  # every blob under a final name is complete and correct
        assert report.ok
        assert report.blobs_checked >= 5 * kills
        blobs = [p for p in (cas_dir / "blobs").rglob("*") if p.is_file()]
        assert len(blobs) == report.blobs_checked
        assert all(p.stat().st_size == 1 << 20 for p in blobs)
        assert list((cas_dir / "quarantine").iterdir()) == []


def test_live_owner_temp_dir_is_not_swept(tmp_path: Path) -> None:
    cas_dir = tmp_path / "cas"
    holder = _python(_HOLD_OPEN, cas_dir)
    assert holder.stdout is not None
    assert holder.stdin is not None
    name = holder.stdout.readline().strip()
    try:
        for _ in range(3):
            with LocalCAS(cas_dir) as cas:
                assert cas.counters.temp_dirs_swept == 0
                assert (cas_dir / "tmp" / name / "owner.lock").is_file()
    finally:
        holder.stdin.close()
        assert holder.wait() == 0
        holder.stdout.close()
    assert os.listdir(cas_dir / "tmp") == []  # the holder removed its own dir at close


def test_dir_without_lock_of_a_dead_pid_is_swept(tmp_path: Path) -> None:
    cas_dir = tmp_path / "cas"
    LocalCAS(cas_dir).close()
    dead_pid = 4_000_000  # above pid_max: never a live process
    (cas_dir / "tmp" / f"{dead_pid}.abc").mkdir()
    (cas_dir / "tmp" / f"{os.getpid()}.creating").mkdir()  # a live creator, pre-lock
    with LocalCAS(cas_dir) as cas:
        assert cas.counters.temp_dirs_swept == 1
        assert os.listdir(cas_dir / "tmp") == [f"{os.getpid()}.creating"]


def _open_and_count_swept(cas_dir: str) -> int:
    with LocalCAS(cas_dir) as cas:
        return cas.counters.temp_dirs_swept


def test_a_dead_dir_that_cannot_be_removed_does_not_break_open() -> None:
    top = Path(tempfile.mkdtemp(prefix="fastmat-sweep-"))  # pytest's tmp_path is 0700
    try:
        top.chmod(0o755)
        cas_dir = top / "cas"
        LocalCAS(cas_dir).close()
        for p in [cas_dir, *cas_dir.rglob("*")]:
            os.chown(p, 65534, 65534)
        dead = cas_dir / "tmp" / "1.rootowned"  # root's, unlocked: its owner is dead
        (dead / "sub").mkdir(parents=True)
        (dead / "owner.lock").touch()
        (dead / "sub" / "f").touch()
        assert as_nobody(_open_and_count_swept, str(cas_dir)) == 0  # EACCES: left, logged
        assert (dead / "sub" / "f").exists()
        assert _open_and_count_swept(str(cas_dir)) == 1  # root can
        assert os.listdir(cas_dir / "tmp") == []
    finally:
        shutil.rmtree(top)
