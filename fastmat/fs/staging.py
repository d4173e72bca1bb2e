"""Building a directory beside its destination and publishing it by one rename.

A tree under construction lives in ``<parent>/.fastmat-tmp.<pid>.<rand>/``, created
0700 and flock'ed by its builder for as long as it is being built; ``publish()``
renames it to the destination with ``RENAME_NOREPLACE`` (and makes it 0755). So the
destination name is either absent or complete, also when the builder is SIGKILLed
(invariant 11), and no other user can reach into the tree while it is built. The
parent is resolved once: everything after is relative to its fd (invariant 13).

The builder's flock is what tells a sweeper that a staging directory is dead (the
kernel drops it however the builder dies, PID reuse and PID namespaces
notwithstanding). The first staging in a parent directory (per process) sweeps the
dead ones found there.

An unpublished tree (a failure, a cancel) is removed before ``staged`` returns, its
subtrees on several threads: one unlink per entry built is what a cancel costs
(issue 12; ``benches/bench_cancel.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from fastmat import _binding
from fastmat.fs.locks import still_linked, try_lock
from fastmat.fs.owned import pid_alive, unique

log = logging.getLogger("fastmat")

PREFIX = ".fastmat-tmp."
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_PARENT = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_SWEPT_MAX = 4096  # parents remembered as swept (then forgotten and swept again)
_REMOVERS = min(8, os.cpu_count() or 1)  # threads removing an unpublished tree
_SPLIT_DEPTH = 3  # how deep to look for subtrees to remove in parallel
_swept: dict[tuple[int, int], None] = {}
_swept_lock = threading.Lock()


class StagedDir:
    """A directory being built for ``dest``: ``fd`` is open on it (``O_RDONLY``)."""

    def __init__(self, dest: str, parent_fd: int, name: str, tmp: str, fd: int) -> None:
        self.dest = dest
        self.parent_fd = parent_fd
        self.name = name  # dest's last component
        self.tmp = tmp  # the staging directory's name in the parent
        self.fd = fd
        self.published = False

    @property
    def path(self) -> str:
        """Where the tree is now (for error messages)."""
        head = os.path.dirname(self.dest)
        return os.path.join(head, self.name if self.published else self.tmp)

    def publish(self) -> None:
        """Makes the tree 0755 and renames it to the destination (no replacing):
        ``FileExistsError`` naming ``dest`` if the name was taken meanwhile."""
        os.fchmod(self.fd, 0o755)
        try:
            _binding.publish(self.parent_fd, self.tmp, self.parent_fd, self.name, noreplace=True)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST, "materialize destination exists", self.dest
            ) from None
        self.published = True


def sweep(parent_fd: int) -> int:
    """Removes the dead staging directories in the parent; returns how many."""
    try:
        list_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent_fd)
    except PermissionError:
        return 0  # a parent we may search but not list: nothing to sweep from here
    try:
        with os.scandir(list_fd) as it:
            names = [e.name for e in it if e.name.startswith(PREFIX)]
    finally:
        os.close(list_fd)
    n = 0
    for name in names:
        pid = name[len(PREFIX) :].split(".", 1)[0]
        if pid.isdigit() and pid_alive(int(pid)):
            continue  # its builder lives (in our pid namespace): maybe not locked yet
        try:
            fd = os.open(name, _DIR, dir_fd=parent_fd)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        try:
            if try_lock(fd, fcntl.LOCK_EX):  # its builder is dead
                with contextlib.suppress(FileNotFoundError):
                    _binding.remove_tree(name, parent_fd)
                    n += 1
        except OSError as e:
            log.info("cannot sweep the dead staging directory %s: %s", name, e)
        finally:
            os.close(fd)
    return n


def _sweep_once(parent_fd: int) -> None:
    st = os.fstat(parent_fd)
    key = (st.st_dev, st.st_ino)
    with _swept_lock:
        if key in _swept:
            return
        if len(_swept) >= _SWEPT_MAX:
            _swept.clear()
        _swept[key] = None
    n = sweep(parent_fd)
    if n:
        log.info("swept %d dead staging directories beside the destination", n)


def _make(parent_fd: int) -> tuple[str, int]:
    """A new staging directory, flock'ed and checked to be still linked."""
    for _ in range(16):
        tmp = unique(PREFIX)
        os.mkdir(tmp, 0o700, dir_fd=parent_fd)
        try:
            fd = os.open(tmp, _DIR, dir_fd=parent_fd)
        except FileNotFoundError:
            continue  # a sweeper in another pid namespace took it before our flock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if still_linked(parent_fd, tmp, fd):
                return tmp, fd
        except BlockingIOError:
            pass  # a sweeper holds it this instant: it will remove it; take another
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, "could not claim a staging directory")


def _subtrees(fd: int, want: int) -> tuple[list[tuple[int, str]], list[int]]:
    """Subdirectories (parent fd, name) of the tree open at ``fd``, from the shallowest
    level with at least ``want`` of them (at most :data:`_SPLIT_DEPTH` down); and the
    fds opened to reach them (the caller closes them). Nothing is followed."""
    opened: list[int] = []
    level = [fd]
    found: list[tuple[int, str]] = []
    try:
        for _ in range(_SPLIT_DEPTH):
            found = []
            for dfd in level:
                with os.scandir(dfd) as it:
                    found += [(dfd, e.name) for e in it if e.is_dir(follow_symlinks=False)]
            if len(found) >= want or not found:
                break
            level = []
            for dfd, name in found:
                with contextlib.suppress(OSError):
                    level.append(os.open(name, _DIR, dir_fd=dfd))
                    opened.append(level[-1])
    except BaseException:
        for o in opened:
            os.close(o)
        raise
    return found, opened


def _discard(parent_fd: int, tmp: str, fd: int) -> None:
    """Removes the unpublished tree ``tmp`` (open at ``fd``): its subtrees on up to
    :data:`_REMOVERS` threads, then what is left."""
    if _REMOVERS > 1:
        try:
            subs, opened = _subtrees(fd, _REMOVERS)
        except OSError as e:
            log.debug("no parallel removal of %s: %s", tmp, e)
            subs, opened = [], []
        try:
            if len(subs) > 1:
                with ThreadPoolExecutor(_REMOVERS, thread_name_prefix="fastmat-rm") as pool:
                    for f in [pool.submit(_binding.remove_tree, n, d) for d, n in subs]:
                        with contextlib.suppress(OSError):  # the last pass says why
                            f.result()
        finally:
            for o in opened:
                os.close(o)
    with contextlib.suppress(FileNotFoundError):
        _binding.remove_tree(tmp, parent_fd)


@contextlib.contextmanager
def staged(dest: str | os.PathLike[str]) -> Iterator[StagedDir]:
    """A :class:`StagedDir` for ``dest`` (which must not exist; its parent must).

    The body builds the tree through ``fd`` and calls ``publish()``; whatever
    happens otherwise, the staging directory is removed and ``dest`` never appears.
    ``FileExistsError`` / ``FileNotFoundError`` / ``NotADirectoryError`` name ``dest``
    or its parent.
    """
    path = os.path.abspath(os.fspath(dest))
    head, name = os.path.split(path)
    if not name:
        raise FileExistsError(errno.EEXIST, "materialize destination exists", path)
    try:
        parent_fd = os.open(head, _PARENT)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, "parent of the destination is missing", head
        ) from None
    try:
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            raise FileExistsError(errno.EEXIST, "materialize destination exists", path)
        _sweep_once(parent_fd)
        tmp, fd = _make(parent_fd)
        staged_dir = StagedDir(path, parent_fd, name, tmp, fd)
        try:
            yield staged_dir
        finally:
            try:
                if not staged_dir.published:
                    _discard(parent_fd, tmp, fd)
            finally:
                os.close(fd)
    finally:
        os.close(parent_fd)
