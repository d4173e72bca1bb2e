"""The disk work of a DirectoryCache: constructing, adopting and replaying entries.

Nothing here takes the cache's in-memory lock; every function runs on the caller's thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from fastmat import _binding, cache_entry
from fastmat.cache_disk import (
    Trasher,
    lock_key,
    still_linked,
    to_trash,
    unique,
    unlink_lock,
    wait_key,
)
from fastmat.cache_index import CacheIndex, Entry
from fastmat.cache_types import Damaged
from fastmat.digest import Digest
from fastmat.errors import FastmatError
from fastmat.materialize import MaterializeStats, materialize
from fastmat.tree import load_plan

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS
    from fastmat.plan import Plan
    from fastmat.tree import Fetcher, TreeLimits

log = logging.getLogger("fastmat")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_O_FILE = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_XDEV = bytes(b for b in range(256) if b & _binding.FM_HOW_XDEV)  # translate(): count flags


def _hook(stage: str) -> None:
    """Tests replace this to stop a construction at ``stage`` ("built", "published")."""


def file_ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def stat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def load_replay(entries_fd: int, key: str) -> cache_entry.Replay:
    try:
        fd = os.open(f"{key}.plan", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=entries_fd)
    except FileNotFoundError:
        raise cache_entry.SidecarError("missing") from None
    with os.fdopen(fd, "rb") as f:
        return cache_entry.decode(f.read())


def discard(entries_fd: int, key: str, trash: Path, trasher: Trasher) -> None:
    """Moves an entry to the trash and drops its sidecar; caller holds LOCK_EX on key."""
    gone = to_trash(entries_fd, key, trash)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{key}.plan", dir_fd=entries_fd)
    if gone is not None:
        trasher.put(gone)


class Builder:
    """Constructs or adopts entries under the per-digest file lock."""

    def __init__(
        self,
        cas: LocalCAS,
        *,
        fetcher: Fetcher | None,
        threads: int,
        max_inflight: int,
        limits: TreeLimits | None,
        fsync: bool,
        entries_fd: int,
        locks_fd: int,
        trash: Path,
        trasher: Trasher,
        tmp: Path,
    ) -> None:
        self.cas, self.fetcher, self.limits, self.fsync = cas, fetcher, limits, fsync
        self.threads, self.max_inflight = threads, max_inflight
        self.entries_fd, self.locks_fd = entries_fd, locks_fd
        self.trash, self.trasher, self.tmp = trash, trasher, tmp
        self.tmp_fd = os.open(tmp, _O_DIR)

    def close(self) -> None:
        os.close(self.tmp_fd)

    def touch(self, key: str) -> None:
        """Marks the sidecar used now: a reopened cache orders its LRU by these times."""
        with contextlib.suppress(OSError):
            os.utime(f"{key}.plan", dir_fd=self.entries_fd, follow_symlinks=False)

    def direct(self, root: Digest, dest: Path) -> MaterializeStats:
        return materialize(
            self.cas,
            root,
            dest,
            fetcher=self.fetcher,
            threads=self.threads,
            max_inflight=self.max_inflight,
            limits=self.limits,
        )

    def acquire(self, root: Digest, damaged: tuple[int, int] | None) -> tuple[Entry, bool]:
        """A pinned (LOCK_SH held) entry: adopted if complete on disk, else built.

        Waits (LOCK_SH, blocking) while another process holds LOCK_EX building it.
        """
        key = root.key
        for _ in range(3):
            fd = wait_key(self.locks_fd, key, fcntl.LOCK_SH)
            try:
                e = self._from_disk(root, damaged, exclusive=False)
            except BaseException:
                os.close(fd)
                raise
            if e is not None:
                e.pins, e.lock_fd = 1, fd
                return e, False
            os.close(fd)
            fd = wait_key(self.locks_fd, key, fcntl.LOCK_EX)
            try:
                e = self._from_disk(root, damaged, exclusive=True)
                built = e is None
                if e is None:
                    e = self._build(root)
                fcntl.flock(fd, fcntl.LOCK_SH)  # a downgrade is not atomic: look again
                st = stat_at(self.entries_fd, key)
                if (
                    still_linked(self.locks_fd, f"{key}.lock", fd)
                    and st
                    and file_ident(st) == e.ident
                ):
                    e.pins, e.lock_fd = 1, fd
                    return e, built
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise FastmatError(f"cache entry for {root} vanished three times while adopting")

    def _from_disk(
        self, root: Digest, damaged: tuple[int, int] | None, *, exclusive: bool
    ) -> Entry | None:
        key = root.key
        st = stat_at(self.entries_fd, key)
        if st is not None and stat.S_ISDIR(st.st_mode) and file_ident(st) != damaged:
            try:
                r = load_replay(self.entries_fd, key)
                if r.root == root:
                    return Entry(root, r.bytes, r.files, file_ident(st), replay=r)
            except cache_entry.SidecarError:
                pass
        if exclusive:
            discard(self.entries_fd, key, self.trash, self.trasher)
        return None

    def _build(self, root: Digest) -> Entry:
        key = root.key
        work = self.tmp / unique("b-")
        os.mkdir(work, 0o700)
        try:
            tree = work / "t"
            # the materializer itself: any fetcher kind, fetch overlapped with linking
            materialize(
                self.cas,
                root,
                tree,
                fetcher=self.fetcher,
                threads=self.threads,
                max_inflight=self.max_inflight,
                limits=self.limits,
            )
            _hook("built")
            plan = load_plan(self.cas, root, limits=self.limits)  # local now, nodes cached
            tfd = os.open(tree, _O_DIR)
            try:
                _read_only(plan, tfd)
                replay = cache_entry.from_plan(plan, root, tfd)
                ident = file_ident(os.fstat(tfd))
            finally:
                os.close(tfd)
            side = work / "p"
            with open(side, "xb") as f:
                f.write(cache_entry.encode(replay))
                if self.fsync:
                    os.fsync(f.fileno())
            os.chmod(side, 0o444)
            os.rename(side, f"{key}.plan", dst_dir_fd=self.entries_fd)
            try:
                os.rename(tree, key, dst_dir_fd=self.entries_fd)  # the commit point
            except BaseException:
                os.unlink(f"{key}.plan", dir_fd=self.entries_fd)
                raise
            if self.fsync:
                os.fsync(self.entries_fd)
            _hook("published")
            log.debug("cache entry %s built: %d files, %d bytes", key, replay.files, replay.bytes)
            return Entry(root, replay.bytes, replay.files, ident, replay=replay)
        finally:
            with contextlib.suppress(FileNotFoundError):
                _binding.remove_tree(work)

    def open_entry(self, e: Entry) -> int:
        """An fd on ``e``'s directory once it passed the hit-time checks (the same
        directory as indexed, an intact sidecar, the sampled files as built); else
        raises ``Damaged``."""
        try:
            fd = os.open(e.key, _O_DIR, dir_fd=self.entries_fd)
        except OSError as err:
            raise Damaged(f"entry directory: {err}", stale=True) from None
        try:
            if file_ident(os.fstat(fd)) != e.ident:
                raise Damaged("entry directory replaced", stale=True)
            if e.replay is None:
                try:
                    e.replay = load_replay(self.entries_fd, e.key)
                except cache_entry.SidecarError as err:
                    raise Damaged(f"sidecar: {err}") from None
            why = cache_entry.check_samples(e.replay, fd)
            if why is not None:
                raise Damaged(why)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def clone(self, e: Entry, dest: Path) -> tuple[str, int]:
        """Copies entry ``e`` to ``dest``: (method, fallbacks: clonefile refused, files
        copied across filesystems)."""
        efd = self.open_entry(e)
        fell_back = 0
        try:
            if _binding.HAS_CLONEFILE:
                try:
                    _binding.clone_tree(self.entries_fd, e.key, _binding.AT_FDCWD, str(dest))
                    return "clonefile", 0
                except OSError as err:
                    if err.errno not in (errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
                        raise
                    fell_back = 1  # another filesystem: the per-file replay below
            if e.replay is None:  # pragma: no cover - open_entry loaded it
                raise Damaged("no replay")
            fell_back += self.replay(e.replay, efd, dest)
            return "hardlink", fell_back
        finally:
            os.close(efd)

    def replay(self, replay: cache_entry.Replay, entry_fd: int, dest: Path) -> int:
        """Hardlinks the entry into ``dest`` (created here) with the C executor; returns
        how many files were copied instead (``dest`` on another filesystem)."""
        os.mkdir(dest, 0o755)
        try:
            os.chmod(dest, 0o755)  # noqa: S103 - input dirs are 0755 whatever the umask
            dfd = os.open(dest, _O_DIR)
            try:
                res = _binding.exec_plan(
                    dfd,
                    entry_fd,
                    replay.arrays,
                    threads=self.threads,
                    max_inflight=self.max_inflight,
                    tmp_dirfd=self.tmp_fd,  # an EMLINK rotation never builds inside an entry
                )
            finally:
                os.close(dfd)
            if res.rc != 0:
                bad = [i for i, s in enumerate(res.status) if s == -errno.ENOENT]
                if bad:
                    raise Damaged(f"entry file missing: {_src(replay, bad[0])}")
                raise OSError(-res.rc, os.strerror(-res.rc), str(dest))
        except BaseException:
            with contextlib.suppress(OSError):
                _binding.remove_tree(dest)
            raise
        return len(res.how) - len(res.how.translate(None, _XDEV))


def _read_only(plan: Plan, tree_fd: int) -> None:
    """NodeProperties may ask for a writable mode. An entry is shared by every later hit,
    so its private inodes (empty files, NodeProperties copies: never CAS inodes) lose
    their write bits; EXDEV copies made at a hit get the masked mode too."""
    a = plan.arrays
    writable = [i for i, m in enumerate(a.mode) if m & 0o222]
    for i in writable:
        if a.op[i] in (_binding.FM_OP_EMPTY, _binding.FM_OP_COPY):
            fd = os.open(plan.path_of_entry(i), _O_FILE, dir_fd=tree_fd)
            try:
                os.fchmod(fd, a.mode[i] & 0o7555)
            finally:
                os.close(fd)


def _src(replay: cache_entry.Replay, i: int) -> str:
    return os.fsdecode(replay.arrays.srcs.split(b"\0")[i])


def evict(index: CacheIndex, entries_fd: int, locks_fd: int, trash: Path, trasher: Trasher) -> int:
    """Takes unpinned victims out of the index while it is over its limits and renames
    them to the trash (cheap; the caller holds the cache lock), leaving the deletion to
    the background ``trasher``. Returns how many were evicted."""
    n = 0
    for v in index.victims():
        fd = lock_key(locks_fd, v.key, fcntl.LOCK_EX, block=False)
        if fd is None:
            continue  # pinned or being rebuilt by another process: keep it
        try:
            index.remove(v)
            discard(entries_fd, v.key, trash, trasher)
            unlink_lock(locks_fd, v.key)
            n += 1
        finally:
            os.close(fd)
    if n:
        log.debug("cache: evicted %d entries (%d left, %d bytes)", n, len(index), index.bytes)
    return n
