"""Test helpers shared by every test module (``from tests.helpers import ...``).

- :func:`as_nobody` runs a function in a forked child that dropped root to
  uid/gid 65534, for every "permission denied" assertion (root bypasses DAC).
  The child can only reach paths that "other" may traverse: tmp_path's parents
  are 0700 root-owned, so chmod what the child needs (see :func:`open_to_all`).
- :func:`can_mount` probes whether this process can mount an overlay here.
- For the C core's tests (test_native_*.py): :func:`dirfd`, :func:`raises_errno`,
  :func:`mode_of`, :func:`leftovers`, :func:`open_fds`, :func:`make_plan` /
  :func:`run_plan` (a flat plan, run through ``fm_plan_exec``) and
  :func:`deny_syscall` (a seccomp filter that plays an older kernel).
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import functools
import os
import pickle
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fastmat import _binding as nb

NOBODY = 65534

T = TypeVar("T")


class ChildError(RuntimeError):
    """The child of :func:`as_nobody` failed in a way that could not be pickled."""


def as_nobody(fn: Callable[..., T], *args: object) -> T:
    """Runs ``fn(*args)`` in a forked child as uid/gid 65534 and returns its result.

    An exception raised by fn is re-raised here (same type and message; OSError
    keeps errno and filename). The result must be picklable.
    """
    return in_child(fn, *args, as_uid=NOBODY)


def in_child(fn: Callable[..., T], *args: object, as_uid: int | None = None) -> T:
    """Runs ``fn(*args)`` in a forked child (optionally as uid/gid `as_uid`), like as_nobody.

    For tests that change process-wide state (umask, rlimits) or drop privileges.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(rfd)
            try:
                if as_uid is not None:
                    os.setgroups([])
                    os.setgid(as_uid)
                    os.setuid(as_uid)
                payload = pickle.dumps((True, fn(*args)))
            except BaseException as exc:  # everything goes back to the parent
                try:
                    payload = pickle.dumps((False, exc))
                except Exception:  # an unpicklable exception
                    payload = pickle.dumps((False, ChildError(f"{type(exc).__name__}: {exc}")))
            with os.fdopen(wfd, "wb") as w:
                w.write(payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise ChildError(f"child died without a result (wait status {status})")
    ok, value = pickle.loads(data)  # noqa: S301 - our own child's bytes
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def open_to_all(path: str | os.PathLike[str]) -> None:
    """Makes path and each of its parents traversable by "other" (o+x), for as_nobody."""
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        mode = d.stat().st_mode
        if not mode & 0o001:
            d.chmod((mode & 0o7777) | 0o001)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)


@functools.cache
def mount_problem() -> str | None:
    """None if an overlay can be mounted here (as the tests do), else the reason."""
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN) to mount"
    if shutil.which("mount") is None:
        return "no mount(8) on PATH"
    base = Path(tempfile.mkdtemp(prefix="fastmat-mount-probe-"))
    try:
        for sub in ("lower", "upper", "work", "merged"):
            (base / sub).mkdir()
        (base / "lower" / "f").write_text("x")
        opts = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'}"
        res = _run("mount", "-t", "overlay", "overlay", "-o", opts, str(base / "merged"))
        if res.returncode != 0:
            return f"cannot mount overlay here: {res.stderr.strip() or res.returncode}"
        _run("umount", str(base / "merged"))
        return None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def can_mount() -> bool:
    """Whether this process can mount (an overlay, in the temp directory's filesystem)."""
    return mount_problem() is None


def run_cmd(*cmd: str) -> subprocess.CompletedProcess[str]:
    """Runs a system tool, capturing its output (never raises on failure)."""
    return _run(*cmd)


# ---------------------------------------------------------------- the C core

MiB = 1 << 20


def wait_for_path(path: Path, proc: subprocess.Popen[str], timeout_s: float = 60) -> None:
    """Until ``path`` exists; fails at once if ``proc`` exited first, naming its output."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def lock_held_by_a_thread(locks: Any, name: str) -> Iterator[None]:
    """Another thread holds the in-process lock ``name`` of ``locks`` (a CAS's
    single-flight locks) for the ``with`` body."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with locks.hold(name):
            held.set()
            release.wait()

    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    try:
        yield
    finally:
        release.set()
        t.join()


@contextmanager
def dirfd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def raises_errno(*errs: int) -> Iterator[pytest.ExceptionInfo[OSError]]:
    """pytest.raises(OSError) for exactly these errno values."""
    with pytest.raises(OSError, match=r"^\[Errno \d+\]") as info:
        yield info
    assert info.value.errno in errs, f"{info.value!r}: expected errno {errs}"


def mode_of(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def leftovers(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(".fm-tmp"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


Entry = tuple[int, int, str, str, int]  # op, dir, name, src, mode


def make_plan(
    dirs: list[tuple[int, str]], entries: list[Entry], mtimes: list[int] | None = None
) -> nb.PlanArrays:
    """dirs: (parent, name) of directories 1..n; entries: (op, dir, name, src, mode)."""
    return nb.PlanArrays(
        dir_parent=array.array("i", [-1] + [p for p, _ in dirs]),
        dir_names=b"\0" + b"".join(n.encode() + b"\0" for _, n in dirs),
        op=bytes(e[0] for e in entries),
        entry_dir=array.array("i", [e[1] for e in entries]),
        mode=array.array("I", [e[4] for e in entries]),
        mtime_ns=None if mtimes is None else array.array("q", mtimes),
        names=b"".join(e[2].encode() + b"\0" for e in entries),
        srcs=b"".join(e[3].encode() + b"\0" for e in entries),
    )


def run_plan(dest: Path, src: Path, plan: nb.PlanArrays, **kw: object) -> nb.ExecResult:
    with dirfd(dest) as d, dirfd(src) as s:
        return nb.exec_plan(d, s, plan, **kw)  # type: ignore[arg-type]


# Syscall numbers for the seccomp filters below, by machine.
_SYSCALLS = {
    "x86_64": {"openat2": 437, "renameat2": 316, "copy_file_range": 326},
    "aarch64": {"openat2": 437, "renameat2": 276, "copy_file_range": 285},
}


def deny_syscall(name: str) -> None:
    """Installs a seccomp filter: syscall `name` fails with ENOSYS (an older kernel)."""
    import ctypes
    import platform

    nr = _SYSCALLS.get(platform.machine(), {}).get(name)
    if nr is None:
        raise NotImplementedError(f"no syscall number for {name} on {platform.machine()}")

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [
            ("len", ctypes.c_uint16),
            ("filter", ctypes.POINTER(SockFilter)),
        ]

    prog = (SockFilter * 4)(
        SockFilter(0x20, 0, 0, 0),  # BPF_LD|BPF_W|BPF_ABS: A = seccomp_data.nr
        SockFilter(0x15, 0, 1, nr),  # BPF_JMP|BPF_JEQ|BPF_K
        SockFilter(0x06, 0, 0, 0x00050000 | errno.ENOSYS),  # SECCOMP_RET_ERRNO
        SockFilter(0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    )
    fprog = SockFprog(4, prog)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """renameat2(a, b, RENAME_EXCHANGE); False if either is missing right now."""
    rc = _libc.renameat2(_AT_FDCWD, bytes(a), _AT_FDCWD, bytes(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOENT, errno.EINVAL):
        return False
    if err == errno.ENOSYS:  # pragma: no cover - pre-3.15 kernel
        pytest.skip("renameat2 RENAME_EXCHANGE unavailable")
    raise OSError(err, os.strerror(err), str(a))


@contextmanager
def attacker(step: Callable[[], object]) -> Iterator[None]:
    """Runs ``step`` in a loop on another thread for the duration of the block."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            step()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
