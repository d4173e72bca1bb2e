"""Temp directories owned by a live process, and the sweep of dead owners' ones.

``OwnedDir`` is a temp directory claimed by an flock on its ``owner.lock``: the lock
is held for the owner's lifetime and the kernel drops it when the owner dies, however
it dies, so "can I take the flock?" means "is the owner dead?" (PID reuse proof).
The lock file is locked under a temp name and renamed into place, so an
``owner.lock`` a sweeper can see is always locked while its owner lives. The CAS and
the directory cache each keep one per open instance (invariants 6 and 11).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass

from fastmat import _binding
from fastmat.fs.locks import LOCK_MODE, open_lock

log = logging.getLogger("fastmat")

OWNER_LOCK = "owner.lock"
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW

Remover = Callable[[int, str], None]


def unique(prefix: str) -> str:
    """``<prefix><pid>.<random>``: a name no other process or call will pick."""
    return f"{prefix}{os.getpid()}.{secrets.token_hex(6)}"


@dataclass
class OwnedDir:
    """A temp directory under ``parent`` owned by this process through an flock."""

    name: str
    fd: int  # O_RDONLY directory fd (fsync-able)
    lock_fd: int  # flock'ed owner.lock, held until release()

    @classmethod
    def create(cls, parent_fd: int, mode: int = 0o700, lock_mode: int = LOCK_MODE) -> OwnedDir:
        """Creates ``<pid>.<random>/`` (``mode``, group bits kept whatever the umask)
        with a held ``owner.lock`` (``lock_mode``) inside. On failure nothing is left:
        no fd open, no directory."""
        for _ in range(16):
            name = unique("")
            os.mkdir(name, mode, dir_fd=parent_fd)
            try:
                fd = os.open(name, _DIR_OPEN, dir_fd=parent_fd)
            except FileNotFoundError:
                continue  # swept in the instant before owner.lock existed; take another
            except BaseException:
                _rmdir_quietly(parent_fd, name)
                raise
            try:
                if mode & 0o070:  # shared: the umask may have taken the group bits
                    os.fchmod(fd, mode)
                got = cls._claim(parent_fd, name, fd, lock_mode)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    _binding.remove_tree(name, parent_fd)
                raise
            if got is not None:
                return got
            os.close(fd)
        raise OSError(errno.EAGAIN, "could not claim a temp directory", name)

    @classmethod
    def _claim(cls, parent_fd: int, name: str, fd: int, lock_mode: int) -> OwnedDir | None:
        """Locks owner.lock in the new directory (open at ``fd``); None if a sweeper
        removed the directory meanwhile. The caller closes ``fd`` on None or raise."""
        # owner.lock is locked under a temp name and renamed into place, so an
        # owner.lock that a sweeper can see is always locked while we live.
        tmp = f".{OWNER_LOCK}.{secrets.token_hex(4)}"
        lock_fd = -1
        try:
            lock_fd = open_lock(fd, tmp, lock_mode)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, OWNER_LOCK, src_dir_fd=fd, dst_dir_fd=fd)
            os.stat(name, dir_fd=parent_fd)
        except BaseException as e:
            if lock_fd >= 0:
                os.close(lock_fd)
            if isinstance(e, FileNotFoundError):
                return None
            raise
        return cls(name, fd, lock_fd)

    def release(self, parent_fd: int) -> None:
        """Removes the directory (still holding the lock), then drops the lock."""
        try:
            with contextlib.suppress(FileNotFoundError):
                _binding.remove_tree(self.name, parent_fd)
        finally:
            os.close(self.fd)
            os.close(self.lock_fd)


def _rmdir_quietly(parent_fd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=parent_fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (in our pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead(parent_fd: int, keep: str | Collection[str], remove: Remover | None = None) -> int:
    """Removes the temp dirs under ``parent_fd`` whose owner is dead, but ``keep`` (one
    name or several); returns how many.

    ``remove(parent_fd, name)`` does the removal (default: ``remove_tree`` right here;
    the directory cache moves them to its trash instead); it raises
    ``FileNotFoundError`` when another sweeper was first.

    A dir whose ``owner.lock`` we can flock has a dead owner. A dir without one is
    either being created right now (live pid in its name: keep) or its creator died
    before locking (dead pid: remove). Best effort: a dir that cannot be removed
    (another user's, say) is left for a later opener and logged.
    """
    with os.scandir(parent_fd) as it:
        kept = {keep} if isinstance(keep, str) else set(keep)
        names = [e.name for e in it if e.name not in kept and e.is_dir(follow_symlinks=False)]
    swept = 0
    failed: list[str] = []
    for name in names:
        try:
            swept += _sweep_one(parent_fd, name, remove or _remove_now)
        except OSError as e:
            failed.append(f"{name}: {e}")
    if failed:
        log.info("could not sweep %d dead temp dirs: %s", len(failed), "; ".join(failed))
    return swept


def _remove_now(parent_fd: int, name: str) -> None:
    _binding.remove_tree(name, parent_fd)


def _sweep_one(parent_fd: int, name: str, remove: Remover) -> bool:
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
            if pid.isdigit() and pid_alive(int(pid)):
                return False  # its creator is between mkdir and locking
        if lfd >= 0:
            try:
                fcntl.flock(lfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live owner holds it
        try:
            remove(parent_fd, name)
        except FileNotFoundError:
            return False  # another sweeper was first
        return True
    finally:
        if lfd >= 0:
            os.close(lfd)
        os.close(dfd)
