"""Lock files shared by threads and processes, and the write-lease test.

The lock-file recipe (:func:`lock_file`): open ``<dir>/<name>``, ``flock`` it, then
check that the name still leads to the inode just locked. A holder may unlink its lock
file while still holding it (so lock files never accumulate); a waiter that locked an
unlinked inode notices the mismatch and starts over, so a lock taken on an unlinked
inode is never trusted.

``KeyedLock`` combines an in-process ``threading.Lock`` per key (so threads of one
process queue without churning file descriptors) with that recipe (so processes
sharing the directory queue too); the holder unlinks the file on release.

:func:`wait_no_writers` answers "does any process hold this file open for writing?"
with a read lease (ETXTBSY protection for executable variants, invariant 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import time
from collections.abc import Iterator

LOCK_OPEN = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
LOCK_MODE = 0o600  # only the owner may open, and so flock, a lock file (issue 10, item 4)
SHARED_LOCK_MODE = 0o660  # and a shared group's members (fastmat.fs.access)


def try_lock(fd: int, how: int) -> bool:
    """flock(fd, how | LOCK_NB): False when another open file description holds it."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def still_linked(dir_fd: int, name: str, fd: int) -> bool:
    """Whether ``dir_fd/name`` is (still) the inode open at ``fd``."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def open_lock(dir_fd: int, name: str, mode: int = LOCK_MODE) -> int:
    """Opens (creating it with ``mode`` if absent) the lock file ``dir_fd/name``."""
    fd = os.open(name, LOCK_OPEN, mode, dir_fd=dir_fd)
    if mode & 0o070:  # shared: the umask may have taken the group bits
        try:
            os.fchmod(fd, mode)
        except PermissionError:
            pass  # another member created it, and set them
        except BaseException:
            os.close(fd)
            raise
    return fd


def lock_file(
    dir_fd: int, name: str, how: int, *, block: bool, mode: int = LOCK_MODE
) -> int | None:
    """An fd holding flock ``how`` on ``dir_fd/name`` (created with ``mode`` if
    absent); None if ``block`` is False and another open file description holds a
    conflicting lock."""
    while True:
        fd = open_lock(dir_fd, name, mode)
        try:
            if block:
                fcntl.flock(fd, how)
            elif not try_lock(fd, how):
                os.close(fd)
                return None
            if still_linked(dir_fd, name, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # unlinked by its holder while we waited: lock the new file


def wait_file(dir_fd: int, name: str, how: int, *, mode: int = LOCK_MODE) -> int:
    """:func:`lock_file`, blocking until the lock is held."""
    fd = lock_file(dir_fd, name, how, block=True, mode=mode)
    if fd is None:  # pragma: no cover - a blocking flock returns only once held
        raise AssertionError("blocking flock returned without the lock")
    return fd


def unlink_file(dir_fd: int, name: str) -> None:
    """Removes a lock file; the caller holds LOCK_EX on it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


class KeyedLock:
    """Mutual exclusion per key, across the threads of this process and across processes.

    ``dir_fd`` is a directory fd (``O_PATH`` is fine) holding the lock files (created
    with ``mode``); it must stay open while this object is used. Keys must be valid
    file names.
    """

    def __init__(self, dir_fd: int, *, mode: int = LOCK_MODE) -> None:
        self._dir_fd = dir_fd
        self._mode = mode
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
                    unlink_file(self._dir_fd, key)
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
        return wait_file(self._dir_fd, key, fcntl.LOCK_EX, mode=self._mode)


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
