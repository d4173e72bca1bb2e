"""Disk-side helpers of a DirectoryCache: per-digest file locks, the per-instance temp
directory, the trash and its background deleter.

Cross-process protocol, one lock file ``locks/<hash>-<size>.lock`` per digest (flock):
- LOCK_EX (blocking) around a construction or adoption: one process builds, the others
  wait and then adopt the entry it renamed into place (single-flight across processes);
- LOCK_SH, taken non-blocking, for as long as a process has the entry pinned;
- LOCK_EX | LOCK_NB before an eviction or invalidation renames the entry to the trash:
  it fails while any other process pins or builds that digest, so nobody's clone source
  or mounted lower layer is ever taken away.
A lock file is unlinked when its entry is evicted or discarded, by the holder of
LOCK_EX. That is safe because every acquirer (``lock_key``) checks, once it holds the
flock, that the name still leads to the inode it locked, and starts over otherwise: a
lock taken on an unlinked inode is never trusted. So ``locks/`` holds about one empty
file per entry, not one per digest ever seen.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import secrets
import threading
from pathlib import Path

from fastmat import _binding

log = logging.getLogger("fastmat")

OWNER = "owner.lock"


def open_lock(locks_fd: int, key: str) -> int:
    return os.open(f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644, dir_fd=locks_fd)


def lock_key(locks_fd: int, key: str, how: int, *, block: bool) -> int | None:
    """An fd holding flock ``how`` on ``locks/<key>.lock``; None if ``block`` is False
    and another process holds a conflicting lock."""
    name = f"{key}.lock"
    while True:
        fd = open_lock(locks_fd, key)
        if block:
            fcntl.flock(fd, how)
        elif not try_lock(fd, how):
            os.close(fd)
            return None
        if still_linked(locks_fd, name, fd):
            return fd
        os.close(fd)  # unlinked by an evictor while we waited: lock the new file


def wait_key(locks_fd: int, key: str, how: int) -> int:
    """``lock_key`` blocking until the lock is held."""
    fd = lock_key(locks_fd, key, how, block=True)
    if fd is None:  # pragma: no cover - a blocking flock returns only once held
        raise AssertionError("blocking flock returned without the lock")
    return fd


def still_linked(dirfd: int, name: str, fd: int) -> bool:
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def unlink_lock(locks_fd: int, key: str) -> None:
    """Removes ``locks/<key>.lock``; the caller holds LOCK_EX on it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{key}.lock", dir_fd=locks_fd)


def try_lock(fd: int, how: int) -> bool:
    """flock(fd, how | LOCK_NB): False when another open file description holds it."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}.{secrets.token_hex(6)}"


def make_instance_tmp(tmp: Path) -> tuple[Path, int]:
    """``tmp/<pid>.<rand>/`` with an flock'ed owner file; returns (path, owner fd).

    Other instances sweep it only once they can take that flock, i.e. after we died.
    """
    path = tmp / unique("")
    path.mkdir(mode=0o700)
    fd = os.open(path / OWNER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return path, fd


def to_trash(src_dirfd: int, name: str, trash: Path) -> Path | None:
    """Renames ``name`` into the trash under a unique name; None if it is gone."""
    dst = trash / unique(f"{name[:80]}.")
    try:
        os.rename(name, dst, src_dir_fd=src_dirfd)
    except FileNotFoundError:
        return None
    return dst


class Trasher:
    """A background thread deleting trashed trees with ``remove_tree``, off every lock.

    ``remove_tree`` never chmods a file (only directories it has to empty), so deleting an
    evicted entry can never change the mode of a CAS inode another tree still links.
    """

    def __init__(self) -> None:
        self._q: queue.Queue[Path | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._mu = threading.Lock()
        self.deleted = 0

    def put(self, path: Path) -> None:
        with self._mu:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fastmat-cache-trash", daemon=True
                )
                self._thread.start()
        self._q.put(path)

    def _run(self) -> None:
        while (path := self._q.get()) is not None:
            try:
                _binding.remove_tree(path)
                self.deleted += 1
            except FileNotFoundError:
                pass  # another process sweeping the same trash got there first
            except OSError as e:
                log.warning("cache trash: cannot remove %s: %s", path, e)
            finally:
                self._q.task_done()

    def drain(self) -> None:
        """Waits until everything queued so far is deleted."""
        self._q.join()

    def close(self) -> None:
        with self._mu:
            t, self._thread = self._thread, None
        if t is not None:
            self._q.put(None)
            t.join()


def sweep(tmp: Path, trash: Path, mine: Path, trasher: Trasher) -> int:
    """Moves dead instances' temp dirs to the trash and queues the whole trash.

    A temp dir is dead when its owner flock can be taken. Returns how many were queued.
    """
    n = 0
    for d in tmp.iterdir():
        if d == mine:
            continue
        try:
            fd = os.open(d / OWNER, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # not an instance dir, or one still being created
        try:
            if try_lock(fd, fcntl.LOCK_EX):  # its owner is dead
                with contextlib.suppress(FileNotFoundError):
                    os.rename(d, trash / unique(f"tmp-{d.name[:40]}."))
        finally:
            os.close(fd)
    for t in trash.iterdir():
        trasher.put(t)
        n += 1
    return n
