"""Lock files shared by threads and processes, bounded waits, and the write-lease test.

The lock-file recipe (:func:`lock_file`, :func:`wait_file`): open ``<dir>/<name>``,
``flock`` it, then check that the name still leads to the inode just locked. A holder
may unlink its lock file while still holding it (so lock files never accumulate); a
waiter that locked an unlinked inode notices the mismatch and starts over, so a lock
taken on an unlinked inode is never trusted.

Every wait is bounded (issue 10, item 4): a lock is first tried without blocking (one
system call, as cheap as a blocking ``flock`` that is granted at once); only a
contended one is polled, with backoff from 0.5 ms to 25 ms, until ``timeout_s``, and
then :class:`~fastmat.errors.LockTimeoutError` names the lock file and, when
``/proc`` tells, the process holding it.

``KeyedLock`` combines an in-process ``threading.Lock`` per key (so threads of one
process queue without churning file descriptors) with that recipe (so processes
sharing the directory queue too); the holder unlinks the file on release.

:func:`wait_no_writers` answers "does any process hold this file open for writing?"
with a read lease (ETXTBSY protection for executable variants, invariant 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

from fastmat.control import CancelToken, check_cancel
from fastmat.errors import LockTimeoutError

LOCK_OPEN = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
LOCK_MODE = 0o600  # only the owner may open, and so flock, a lock file (issue 10, item 4)
SHARED_LOCK_MODE = 0o660  # and a shared group's members (fastmat.fs.access)
DEFAULT_LOCK_TIMEOUT_S = 600.0  # longer than any legitimate construction or fetch
_POLL_FIRST_S = 0.0005
_POLL_MAX_S = 0.025


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


def lock_file(dir_fd: int, name: str, how: int, *, mode: int = LOCK_MODE) -> int | None:
    """An fd holding flock ``how`` on ``dir_fd/name`` (created with ``mode`` if
    absent); None if another open file description holds a conflicting lock."""
    while True:
        fd = open_lock(dir_fd, name, mode)
        try:
            if not try_lock(fd, how):
                os.close(fd)
                return None
            if still_linked(dir_fd, name, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # unlinked by its holder meanwhile: lock the new file


def wait_file(
    dir_fd: int,
    name: str,
    how: int,
    *,
    timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    mode: int = LOCK_MODE,
    cancel: CancelToken | None = None,
) -> int:
    """:func:`lock_file`, waiting up to ``timeout_s`` for the lock (LockTimeoutError),
    or until ``cancel`` is set (``Cancelled``)."""
    deadline: float | None = None
    while True:
        fd = open_lock(dir_fd, name, mode)
        try:
            if not try_lock(fd, how):
                if deadline is None:
                    deadline = time.monotonic() + timeout_s
                path = functools.partial(lock_path, dir_fd, name)
                _flock_until(fd, how, deadline, timeout_s, path, cancel=cancel)
            if still_linked(dir_fd, name, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # unlinked by its holder while we waited: lock the new file


def wait_until(
    attempt: Callable[[], bool],
    deadline: float,
    timed_out: Callable[[], BaseException],
    cancel: CancelToken | None = None,
) -> None:
    """Calls ``attempt`` (a non-blocking lock) with growing pauses until it succeeds;
    raises ``timed_out()`` once ``deadline`` (``time.monotonic``) has passed, and
    ``Cancelled`` once ``cancel`` is set."""
    delay_s = _POLL_FIRST_S
    while True:
        check_cancel(cancel, "waiting for a lock")
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out()
        time.sleep(min(delay_s, left))
        delay_s = min(delay_s * 2, _POLL_MAX_S)
        if attempt():
            return


def flock_within(fd: int, how: int, timeout_s: float, path: Callable[[], str]) -> None:
    """flock ``how`` on an open ``fd``, waiting up to ``timeout_s`` (LockTimeoutError
    naming ``path()``). For a conversion (LOCK_EX -> LOCK_SH), which is not atomic."""
    if not try_lock(fd, how):
        _flock_until(fd, how, time.monotonic() + timeout_s, timeout_s, path)


def _flock_until(
    fd: int,
    how: int,
    deadline: float,
    timeout_s: float,
    path: Callable[[], str],
    *,
    cancel: CancelToken | None = None,
) -> None:
    wait_until(
        lambda: try_lock(fd, how),
        deadline,
        lambda: LockTimeoutError(path(), timeout_s, holder_pid(fd, os.getpid())),
        cancel,
    )


def lock_path(dir_fd: int, name: str) -> str:
    """``dir_fd/name`` as a path, for messages (the name alone if /proc cannot tell)."""
    try:
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
    except OSError:
        return name


def holder_pid(fd: int, me: int, byte: int | None = None) -> int | None:
    """A process holding a lock on the file open at ``fd`` (on ``byte`` of it, for a
    byte-range lock), other than ``me``; None if ``/proc`` does not tell.

    ``/proc/locks`` names the locker of an flock or POSIX lock; an OFD lock shows pid
    -1 there, so then the holder is the process whose fdinfo lists the lock."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    anonymous = False
    for line in lines:
        pid = _lock_line_pid(line, want, st.st_ino, byte)
        if pid is None:
            continue
        if pid > 0 and pid != me:
            return pid
        anonymous = anonymous or pid < 0
    return _fdinfo_holder(want, st.st_ino, me, byte) if anonymous else None


def _lock_line_pid(line: str, want: str, ino: int, byte: int | None) -> int | None:
    """The pid of a granted lock on the wanted inode in a /proc/locks line, else None
    ("1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have a "->")."""
    parts = line.split()
    if len(parts) < 8 or parts[1] == "->":
        return None
    dev_ino = parts[5]
    # btrfs and friends report another device number in stat: the inode must match
    if dev_ino != want and dev_ino.rsplit(":", 1)[-1] != str(ino):
        return None
    if byte is not None:
        end = parts[7]
        if int(parts[6]) > byte or (end != "EOF" and int(end) < byte):
            return None
    try:
        return int(parts[4])
    except ValueError:
        return None


def _fdinfo_holder(want: str, ino: int, me: int, byte: int | None) -> int | None:
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                if (
                    line.startswith("lock:")
                    and _lock_line_pid(line[5:], want, ino, byte) is not None
                ):
                    return pid
    return None


def unlink_file(dir_fd: int, name: str) -> None:
    """Removes a lock file; the caller holds LOCK_EX on it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


class KeyedLock:
    """Mutual exclusion per key, across the threads of this process and across processes.

    ``dir_fd`` is a directory fd (``O_PATH`` is fine) holding the lock files (created
    with ``mode``); it must stay open while this object is used. Keys must be valid
    file names. A wait longer than ``timeout_s`` (threads and processes together)
    raises LockTimeoutError.
    """

    def __init__(
        self, dir_fd: int, *, mode: int = LOCK_MODE, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
    ) -> None:
        self._dir_fd = dir_fd
        self._mode = mode
        self._timeout_s = timeout_s
        self._mutex = threading.Lock()
        self._held: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Holds the lock for ``key`` for the duration of the ``with`` block."""
        t0 = time.monotonic()
        tlock = self._enter(key)
        try:
            if not tlock.acquire(timeout=self._timeout_s):
                path = lock_path(self._dir_fd, key)
                raise LockTimeoutError(f"{path} (in-process)", self._timeout_s, os.getpid())
            try:
                left = max(0.0, self._timeout_s - (time.monotonic() - t0))
                fd = wait_file(self._dir_fd, key, fcntl.LOCK_EX, timeout_s=left, mode=self._mode)
                try:
                    yield
                finally:
                    # Unlink while still holding: a process that opened this inode
                    # meanwhile sees the mismatch after locking and retries.
                    unlink_file(self._dir_fd, key)
                    os.close(fd)
            finally:
                tlock.release()
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
