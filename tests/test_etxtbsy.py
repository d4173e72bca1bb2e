"""ETXTBSY: freshly built executable variants are exec'ed while other threads fork.

The hazard: a thread writes a variant through a writable fd while another thread forks;
the child holds a copy of that fd until it execs (O_CLOEXEC only closes it then), and
exec of a file that any process holds open for writing fails with ETXTBSY. LocalCAS
publishes a variant only once no process holds it open for writing.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fastmat import _binding
from fastmat.cas import LocalCAS
from fastmat.fs import locks
from tests.helpers import as_nobody

CREATORS = 4
VARIANTS_PER_CREATOR = 60
EXECS_PER_VARIANT = 5
FORKERS = 3
MIN_FORKS_PER_FORKER = 300


def _slow_child() -> None:
    # Runs in the forked child before exec: keeps the inherited fds open a while,
    # like any child that does work between fork and exec.
    time.sleep(0.002)


def test_exec_fresh_variants_while_other_threads_fork(tmp_path: Path) -> None:
    true_path = shutil.which("true")
    assert true_path is not None
    true_elf = Path(true_path).read_bytes()
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(argv: list[str], slow: bool) -> None:
        try:
            subprocess.run(argv, check=True, preexec_fn=_slow_child if slow else None)
        except OSError as e:
            with lock:
                counts["etxtbsy" if e.errno == errno.ETXTBSY else f"errno {e.errno}"] += 1
        else:
            with lock:
                counts["execs"] += 1

    with LocalCAS(tmp_path / "cas") as cas:

        def creator(k: int) -> None:
            try:
                for i in range(VARIANTS_PER_CREATOR):
                    # /bin/true with trailing bytes: still runnable, another digest each
                    d = cas.put(true_elf + f"\0variant {k}.{i}".encode())
                    path = str(cas.executable_path(d))
                    for _ in range(EXECS_PER_VARIANT):
                        run([path], slow=False)
            except BaseException as e:  # surfaced below
                errors.append(e)

        def forker(k: int) -> None:
            n = 0
            while not stop.is_set() or n < MIN_FORKS_PER_FORKER:
                run([true_path], slow=n % 2 == k % 2)
                n += 1

        forkers = [threading.Thread(target=forker, args=(k,)) for k in range(FORKERS)]
        creators = [threading.Thread(target=creator, args=(k,)) for k in range(CREATORS)]
        for t in forkers + creators:
            t.start()
        for t in creators:
            t.join()
        stop.set()
        for t in forkers:
            t.join()
        built = cas.counters.exec_variants_built
    assert errors == []
    assert built == CREATORS * VARIANTS_PER_CREATOR
    assert counts["etxtbsy"] == 0, counts
    assert set(counts) == {"execs"}, counts
    assert counts["execs"] >= 2000


def test_wait_no_writers_sees_a_forked_childs_copy_of_the_fd(tmp_path: Path) -> None:
    path = tmp_path / "tool"
    w = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o755)
    r = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: holds its copy of w until told to exit
        os.read(go_r, 1)
        os._exit(0)
    try:
        assert locks.wait_no_writers(r, timeout_s=0.05) is False
        os.close(w)
        assert locks.wait_no_writers(r, timeout_s=0.05) is False  # the child still has it
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        assert locks.wait_no_writers(r) is True
    finally:
        os.close(r)
        os.close(go_r)
        os.close(go_w)


def _lease_check_as_creator(path: str) -> bool | None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o755)
    os.write(fd, b"#!/bin/sh\n")
    os.close(fd)
    r = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return locks.wait_no_writers(r, timeout_s=1.0)
    finally:
        os.close(r)


def test_wait_no_writers_works_unprivileged() -> None:
    # leases need the file's owner or CAP_LEASE: the creator of a variant is its owner
    top = Path(tempfile.mkdtemp(prefix="fastmat-lease-"))  # pytest's tmp_path is 0700
    try:
        top.chmod(0o777)
        assert as_nobody(_lease_check_as_creator, str(top / "tool")) is True
    finally:
        shutil.rmtree(top)


def test_variant_rebuilt_when_a_child_keeps_the_writable_fd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worst case of the race, made deterministic: a child that inherited the
    # variant's writable fd and does not exec for a long time (here: ever).
    holders: list[subprocess.Popen[bytes]] = []
    real_private_copy = _binding.private_copy

    def private_copy_then_leak(
        src_dirfd: int, src: str, dst_dirfd: int, dst: str, mode: int, **kw: Any
    ) -> str:
        how = real_private_copy(src_dirfd, src, dst_dirfd, dst, mode, **kw)
        if not holders:
            wfd = os.open(dst, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dst_dirfd)
            holders.append(subprocess.Popen(["sleep", "120"], pass_fds=[wfd]))
            os.close(wfd)
        return how

    monkeypatch.setattr(_binding, "private_copy", private_copy_then_leak)
    true_path = shutil.which("true")
    assert true_path is not None
    try:
        with LocalCAS(tmp_path / "cas") as cas:
            cas.exec_writers_timeout_s = 0.2
            d = cas.put(Path(true_path).read_bytes() + b"\0held")
            variant = cas.executable_path(d)
            subprocess.run([str(variant)], check=True)  # no ETXTBSY
            assert holders[0].poll() is None  # still holding the first inode open
            c = cas.counters
            assert (c.exec_variants_built, c.exec_variants_rebuilt) == (1, 1)
            assert cas.executable_path(d).stat().st_ino == variant.stat().st_ino
    finally:
        for h in holders:
            h.kill()
            h.wait()
