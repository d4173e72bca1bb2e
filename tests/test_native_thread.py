"""fm_thread.c: pool threads and fm__isolated threads take a private fd table.

A child forked meanwhile by another thread never inherits a writable fd to a file
that may be executed (exec would fail with ETXTBSY), and a pool thread holds no
copy of the process's other fds (a copy would keep them open after their close)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fastmat import _binding as nb
from tests.helpers import MiB, make_plan, run_plan


def _child_holds_writable_fd_under(prefix: str) -> bool:
    """In a just-forked child: does any inherited fd open for writing point under prefix?"""
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            with open(f"/proc/self/fdinfo/{name}") as f:
                flags = int(next(ln for ln in f if ln.startswith("flags:")).split()[1], 8)
        except (OSError, StopIteration):
            continue
        if target.startswith(prefix) and flags & os.O_ACCMODE != os.O_RDONLY:
            return True
    return False


def test_children_forked_meanwhile_never_inherit_writable_fds(cas: Path, dest: Path) -> None:
    """Executables are written by threads with a private fd table: a child forked by
    another thread at any moment holds no writable fd to them (exec would be ETXTBSY)."""
    import threading

    big = cas / "big"
    big.write_bytes(os.urandom(4 * MiB))
    stop = threading.Event()
    leaks: list[int] = []
    forks = [0]

    def forker() -> None:
        while not stop.is_set():
            pid = os.fork()
            if pid == 0:
                os._exit(1 if _child_holds_writable_fd_under(str(dest)) else 0)
            _, status = os.waitpid(pid, 0)
            forks[0] += 1
            if os.waitstatus_to_exitcode(status) != 0:
                leaks.append(status)

    t = threading.Thread(target=forker)
    t.start()
    try:
        for i in range(15):
            with nb.injected("copy", -errno.ENOSYS):  # the slow read/write loop
                nb.private_copy(nb.AT_FDCWD, big, nb.AT_FDCWD, dest / f"x{i}", 0o555)
            nb.durable_write(nb.AT_FDCWD, dest / f"w{i}", b"#!/bin/sh\n" * 100_000, 0o755)
            plan = make_plan([], [(nb.FM_OP_COPY, 0, f"c{i}", "big", 0o555)])
            with nb.injected("copy", -errno.ENOSYS):
                assert run_plan(dest, cas, plan).rc == 0
    finally:
        stop.set()
        t.join()
    assert forks[0] > 0
    assert leaks == []


def _threads_blocked_opening_a_fifo(before: set[str]) -> bool:
    for tid in set(os.listdir("/proc/self/task")) - before:
        try:
            wchan = Path(f"/proc/self/task/{tid}/wchan").read_text()
        except OSError:
            continue
        if "partner" in wchan or "fifo" in wchan:
            return True
    return False


def test_pool_threads_hold_no_copies_of_other_fds(tmp_path: Path) -> None:
    """A pool thread keeps only the plan's dirfds: a pipe this thread closes while a
    plan runs is really closed (a copy would keep it, and a writable file, open)."""
    import select
    import threading

    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    os.mkfifo(tmp_path / "src" / "fifo")  # opening it blocks the worker until we write
    plan = make_plan([], [(nb.FM_OP_COPY, 0, "c", "fifo", 0o444)])
    r, w = os.pipe()
    before = set(os.listdir("/proc/self/task"))
    results: list[nb.ExecResult] = []
    t = threading.Thread(
        target=lambda: results.append(run_plan(tmp_path / "dst", tmp_path / "src", plan))
    )
    t.start()
    try:
        for _ in range(500):
            if _threads_blocked_opening_a_fifo(before):
                break
            t.join(0.01)
        else:
            pytest.skip("cannot see the worker block (no /proc/*/wchan)")
        os.close(w)
        readable, _, _ = select.select([r], [], [], 5.0)
        assert readable == [r], "a pool thread still holds the pipe's write end"
        assert os.read(r, 1) == b""
    finally:
        os.close(os.open(tmp_path / "src" / "fifo", os.O_WRONLY))  # release the worker
        t.join()
        os.close(r)
    assert list(results[0].status) == [-errno.EINVAL]  # a FIFO is not a regular file
