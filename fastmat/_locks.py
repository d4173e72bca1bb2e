"""flock helpers: per-key single-flight across threads and processes, owned temp dirs.

``KeyedLock`` combines an in-process ``threading.Lock`` per key (so threads of one
process queue without churning file descriptors) with an ``flock`` on a per-key lock
file (so processes sharing the directory queue too). Lock files are unlinked by their
holder on release; a waiter that locked an unlinked inode notices (its fd no longer
matches the path) and retries, so lock files never accumulate.

``OwnedDir`` is a temp directory claimed by an flock on its ``owner.lock``: the lock
is held for the owner's lifetime and the kernel drops it when the owner dies, however
it dies, so "can I take the flock?" means "is the owner dead?" (PID reuse proof).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from fastmat import _binding

log = logging.getLogger("fastmat")

OWNER_LOCK = "owner.lock"
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_LOCK_OPEN = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


class KeyedLock:
    """Mutual exclusion per key, across the threads of this process and across processes.

    ``dir_fd`` is a directory fd (``O_PATH`` is fine) holding the lock files; it must
    stay open while this object is used. Keys must be valid file names.
    """

    def __init__(self, dir_fd: int) -> None:
        self._dir_fd = dir_fd
        self._mutex = threading.Lock()
        self._held: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Holds the lock for ``key`` for the duration of the ``with`` block."""
        tlock = self._enter(key)
        try:
            with tlock:
                fd = self._flock(key)
                try:
                    yield
                finally:
                    # Unlink while still holding: a process that opened this inode
                    # meanwhile sees the mismatch after locking and retries.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(key, dir_fd=self._dir_fd)
                    os.close(fd)
        finally:
            self._leave(key)

    def _enter(self, key: str) -> threading.Lock:
        with self._mutex:
            tlock, users = self._held.get(key, (threading.Lock(), 0))
            self._held[key] = (tlock, users + 1)
            return tlock

    def _leave(self, key: str) -> None:
        with self._mutex:
            tlock, users = self._held[key]
            if users == 1:
                del self._held[key]
            else:
                self._held[key] = (tlock, users - 1)

    def _flock(self, key: str) -> int:
        while True:
            fd = os.open(key, _LOCK_OPEN, 0o644, dir_fd=self._dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                try:
                    now = os.stat(key, dir_fd=self._dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    now = None  # the previous holder unlinked it: lock a fresh one
                if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)


@dataclass
class OwnedDir:
    """A temp directory under ``parent`` owned by this process through an flock."""

    name: str
    fd: int  # O_RDONLY directory fd (fsync-able)
    lock_fd: int  # flock'ed owner.lock, held until release()

    @classmethod
    def create(cls, parent_fd: int) -> OwnedDir:
        """Creates ``<pid>.<random>/`` with a held ``owner.lock`` inside."""
        for _ in range(16):
            name = f"{os.getpid()}.{secrets.token_hex(6)}"
            os.mkdir(name, 0o755, dir_fd=parent_fd)
            try:
                fd = os.open(name, _DIR_OPEN, dir_fd=parent_fd)
            except FileNotFoundError:
                continue  # swept in the instant before owner.lock existed; take another
            # owner.lock is locked under a temp name and renamed into place, so an
            # owner.lock that a sweeper can see is always locked while we live.
            tmp = f".{OWNER_LOCK}.{secrets.token_hex(4)}"
            lock_fd = os.open(tmp, _LOCK_OPEN | os.O_EXCL, 0o644, dir_fd=fd)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                os.rename(tmp, OWNER_LOCK, src_dir_fd=fd, dst_dir_fd=fd)
                os.stat(name, dir_fd=parent_fd)
            except FileNotFoundError:
                os.close(lock_fd)
                os.close(fd)
                continue
            return cls(name, fd, lock_fd)
        raise OSError(errno.EAGAIN, "could not claim a temp directory", name)

    def release(self, parent_fd: int) -> None:
        """Removes the directory (still holding the lock), then drops the lock."""
        try:
            with contextlib.suppress(FileNotFoundError):
                _binding.remove_tree(self.name, parent_fd)
        finally:
            os.close(self.fd)
            os.close(self.lock_fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead(parent_fd: int, keep: str) -> int:
    """Removes the temp dirs under ``parent_fd`` whose owner is dead; returns how many.

    A dir whose ``owner.lock`` we can flock has a dead owner. A dir without one is
    either being created right now (live pid in its name: keep) or its creator died
    before locking (dead pid: remove). Best effort: a dir that cannot be removed
    (another user's, say) is left for a later opener and logged.
    """
    with os.scandir(parent_fd) as it:
        names = [e.name for e in it if e.name != keep and e.is_dir(follow_symlinks=False)]
    swept = 0
    failed: list[str] = []
    for name in names:
        try:
            swept += _sweep_one(parent_fd, name)
        except OSError as e:
            failed.append(f"{name}: {e}")
    if failed:
        log.info("could not sweep %d dead temp dirs: %s", len(failed), "; ".join(failed))
    return swept


def _sweep_one(parent_fd: int, name: str) -> bool:
    try:
        dfd = os.open(name, _DIR_OPEN, dir_fd=parent_fd)
    except (FileNotFoundError, NotADirectoryError):
        return False
    lfd = -1
    try:
        try:
            lfd = os.open(OWNER_LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dfd)
        except FileNotFoundError:
            pid = name.split(".", 1)[0]
            if pid.isdigit() and _pid_alive(int(pid)):
                return False  # its creator is between mkdir and locking
        if lfd >= 0:
            try:
                fcntl.flock(lfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live owner holds it
        try:
            _binding.remove_tree(name, parent_fd)
        except FileNotFoundError:
            return False  # another sweeper was first
        return True
    finally:
        if lfd >= 0:
            os.close(lfd)
        os.close(dfd)


_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)  # Linux: F_LINUX_SPECIFIC_BASE + 0


def wait_no_writers(fd: int, timeout_s: float = 2.0) -> bool | None:
    """Waits until no process holds the file of ``fd`` (opened O_RDONLY) open for writing.

    Why: a file written by this process is about to be exec'ed, but a child that another
    thread forked while our writable fd was open still holds a copy of that fd until it
    execs itself (O_CLOEXEC only closes it at exec), and exec of a file open for writing
    fails with ETXTBSY. A read lease is refused with EAGAIN exactly while writers exist
    (``inode_is_open_for_write``), so taking and dropping one is the test. Returns True
    when there are no writers, False if some remain after ``timeout_s`` (a child that
    forked without exec'ing may hold them for its whole life), None where leases are
    unavailable (not Linux, NFS, leases-enable=0): then nobody can tell.
    """
    if not sys.platform.startswith("linux"):
        return None
    deadline = time.monotonic() + timeout_s
    delay_s = 0.0002
    while True:
        try:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.005)
            continue
        except OSError:  # EINVAL / ENOLCK / EACCES: no leases here
            return None
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        return True
