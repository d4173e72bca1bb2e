"""Lock files shared by threads and processes (fastmat.fs.locks) and the fetch locks
(fastmat.remote.flight): portability, permissions and bounded waits."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.errors import LockTimeoutError
from fastmat.fs import locks as fs_locks
from fastmat.remote.flight import FetchLocks
from tests.cache_helpers import BASIC, ingest
from tests.helpers import lock_held_by_a_thread

# A fresh interpreter without os.O_PATH (as on macOS) imports every module and uses
# the fetch locks and a CAS.
_NO_O_PATH = """
import os, sys
del os.O_PATH
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.remote.flight import FetchLocks
with LocalCAS(sys.argv[1]) as cas:
    d = cas.put(b"portable")
    locks = FetchLocks(cas.root / "locks")
    token = locks.try_lock(d)
    assert token is not None
    locks.unlock(d, token)
    locks.close()
print("ok")
"""


def test_nothing_needs_o_path(tmp_path: Path) -> None:
    """macOS has no os.O_PATH: the fetch locks used it unguarded (issue 10, item 10)."""
    res = subprocess.run(
        [sys.executable, "-c", _NO_O_PATH, str(tmp_path / "cas")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert (res.returncode, res.stdout.strip()) == (0, "ok"), res.stderr


# argv: kind path [hash]: "flock" takes LOCK_EX on path, "ofd" the fetch lock of the
# digest with that hash in the locks dir at path; prints "held", holds until stdin closes
_HOLD = """
import fcntl, os, sys
from fastmat.digest import Digest
from fastmat.remote.flight import FetchLocks
kind, path = sys.argv[1:3]
if kind == "flock":
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    locks = FetchLocks(path)
    assert locks.try_lock(Digest(sys.argv[3], 1)) is not None
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def holder(*args: str) -> Iterator[int]:
    """A process holding a lock until the block ends; yields its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        proc.stdout.close()


def in_thread(fn: Callable[[], object], timeout_s: float = 30) -> object:
    """fn's result or exception; a call still blocked after timeout_s fails the test
    (it is left to finish once the holder is gone) instead of hanging the suite."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # returned as a value
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert out, f"still waiting for the lock after {timeout_s} s: the wait is unbounded"
    return out[0]


def test_a_held_cache_lock_fails_the_waiter_naming_lock_and_holder(tmp_path: Path) -> None:
    """Issue 10, item 4: a process that never lets go of a digest's lock (hung, or
    hostile) blocked every cache.materialize of that tree forever."""
    with LocalCAS(tmp_path / "cas") as cas:
        root = ingest(cas, tmp_path / "src", BASIC)
        cache = DirectoryCache(cas, tmp_path / "cache", lock_timeout_s=0.3)
        lock = tmp_path / "cache" / "locks" / f"{root.key}.lock"
        try:
            with holder("flock", str(lock)) as pid:
                got = in_thread(lambda: cache.materialize(root, tmp_path / "d"))
            assert isinstance(got, LockTimeoutError), got
            assert (got.path, got.holder_pid, got.timeout_s) == (str(lock), pid, 0.3)
            assert f"{lock}" in str(got)
            assert f"held by pid {pid}" in str(got)
            assert not (tmp_path / "d").exists()
            assert cache.stats().pinned == 0
            assert not cache.materialize(root, tmp_path / "d").hit  # free again: built
        finally:
            cache.close()


def test_a_held_variant_lock_fails_the_waiter_naming_lock_and_holder(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas", lock_timeout_s=0.3) as cas:
        d = cas.put(b"#!/bin/sh\necho held\n")
        lock = cas.root / "locks" / f"{d.key}.exec"
        with holder("flock", str(lock)) as pid:
            got = in_thread(lambda: cas.executable_path(d))
        assert isinstance(got, LockTimeoutError), got
        assert (got.path, got.holder_pid) == (str(lock), pid)
        assert cas.executable_path(d).read_bytes() == b"#!/bin/sh\necho held\n"


def test_a_variant_lock_held_by_another_thread_times_out_too(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas", lock_timeout_s=0.2) as cas:
        d = cas.put(b"#!/bin/sh\necho busy\n")
        with lock_held_by_a_thread(cas._locks, f"{d.key}.exec"):
            got = in_thread(lambda: cas.executable_path(d))
        assert isinstance(got, LockTimeoutError), got
        assert got.holder_pid == os.getpid()
        assert "(in-process)" in got.path


@pytest.mark.parametrize("kind", ["ofd", "flock"])
def test_a_held_fetch_lock_fails_the_waiter_naming_lock_and_holder(
    tmp_path: Path, kind: str
) -> None:
    d = Digest("ab" * 32, 1)
    locks = FetchLocks(tmp_path, timeout_s=0.3)
    args: tuple[str, ...]
    try:
        if kind == "flock":  # the recipe used where OFD locks do not exist
            locks._ofd = False
            args = ("flock", str(tmp_path / f"{d.key}.fetch"))
        else:
            assert locks._ofd, "this kernel has no OFD locks"
            args = ("ofd", str(tmp_path), d.hash)
        with holder(*args) as pid:
            assert locks.try_lock(d) is None
            got = in_thread(lambda: locks.wait_lock(d))
        assert isinstance(got, LockTimeoutError), got
        assert got.holder_pid == pid
        assert str(tmp_path) in got.path
        token = locks.wait_lock(d)  # the holder is gone
        locks.unlock(d, token)
    finally:
        locks.close()


def test_an_uncontended_wait_never_sleeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a contended lock is polled: granted at once, a wait costs one flock."""

    def no_sleep(s: float) -> None:
        raise AssertionError("slept waiting for a free lock")

    monkeypatch.setattr(time, "sleep", no_sleep)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = fs_locks.wait_file(dir_fd, "k.lock", fcntl.LOCK_EX, timeout_s=0.1)
        os.close(fd)
        with fs_locks.KeyedLock(dir_fd, timeout_s=0.1).hold("k2"):
            pass
    finally:
        os.close(dir_fd)
