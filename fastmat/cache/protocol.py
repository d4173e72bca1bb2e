"""The directory cache's cross-process protocol, and everything done under its locks.

Several processes may share one cache directory. One lock file
``locks/<hash>-<size>.lock`` per digest (flock, the recipe of
:func:`fastmat.fs.locks.lock_file`) carries the protocol:

- LOCK_EX (waited for) around a construction or adoption (:func:`acquire`): one
  process builds, the others wait and then adopt the entry it renamed into place
  (single-flight across processes, invariant 8);
- LOCK_SH, taken non-blocking (:func:`try_pin`), for as long as a process has the entry
  pinned (cloning from it, or it is a mounted workspace's lower layer);
- LOCK_EX | LOCK_NB before an eviction or invalidation renames the entry to the trash
  (:func:`evict`, :func:`adopt_all`): it fails while any other process pins or builds
  that digest, so nobody's clone source or mounted lower layer is ever taken away
  (invariant 7).

Every wait is bounded by ``Disk.lock_timeout_s`` (tried without blocking first, then
polled; :func:`fastmat.fs.locks.wait_file`): a holder that never lets go makes the
waiter fail with LockTimeoutError naming the lock file and the holder's pid.

A lock file is unlinked when its entry is evicted or discarded, by the holder of
LOCK_EX. That is safe because every acquirer checks, once it holds the flock, that the
name still leads to the inode it locked, and starts over otherwise. So ``locks/`` holds
about one empty file per entry, not one per digest ever seen.

Each open instance also owns ``tmp/<pid>.<rand>/`` (:class:`fastmat.fs.owned.OwnedDir`)
for its constructions and workspaces; a later opener moves a dead owner's one to the
trash. Nothing here takes the cache's in-memory lock: callers hold it where needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastmat.cache import entry, mounts
from fastmat.cache.index import CacheIndex, Entry
from fastmat.control import CancelToken
from fastmat.digest import Digest, InvalidDigestError
from fastmat.errors import FastmatError
from fastmat.fs import locks
from fastmat.fs.owned import sweep_dead
from fastmat.fs.trash import Trasher, to_trash

log = logging.getLogger("fastmat")

_ADOPT_ATTEMPTS = 3


@dataclass
class Disk:
    """The open directories of one cache instance (paths and fds, owned by the cache)."""

    entries: Path
    entries_fd: int
    locks_fd: int
    trash: Path
    trasher: Trasher
    tmp: Path  # this instance's own scratch (constructions, workspace upper layers)
    tmp_fd: int
    mounts_fd: int  # mounts/: a record per overlay workspace (fastmat.cache.mounts)
    lock_mode: int = locks.LOCK_MODE  # of the lock files it creates (fastmat.fs.access)
    lock_timeout_s: float = locks.DEFAULT_LOCK_TIMEOUT_S  # bound of every lock wait


def lock_name(key: str) -> str:
    return f"{key}.lock"


def lock_key(disk: Disk, key: str, how: int) -> int | None:
    """An fd holding flock ``how`` on ``locks/<key>.lock``, taken without waiting; None
    if another process holds a conflicting lock."""
    return locks.lock_file(disk.locks_fd, lock_name(key), how, mode=disk.lock_mode)


def wait_key(disk: Disk, key: str, how: int, cancel: CancelToken | None = None) -> int:
    """An fd holding flock ``how`` on ``locks/<key>.lock``, waiting up to the cache's
    lock timeout for it (LockTimeoutError), or until ``cancel`` is set (Cancelled)."""
    return locks.wait_file(
        disk.locks_fd,
        lock_name(key),
        how,
        timeout_s=disk.lock_timeout_s,
        mode=disk.lock_mode,
        cancel=cancel,
    )


def try_pin(disk: Disk, key: str) -> int | None:
    """LOCK_SH on ``key`` without waiting (None: another process is evicting or
    rebuilding it); the returned fd holds the pin until closed."""
    return lock_key(disk, key, fcntl.LOCK_SH)


def parse_key(key: str) -> Digest | None:
    """The digest of an entry name ``<hash>-<size>``; None for anything else."""
    h, _, size = key.partition("-")
    try:
        return Digest(h, int(size)) if size.isdigit() else None
    except InvalidDigestError:
        return None


def discard(disk: Disk, key: str) -> None:
    """Moves an entry to the trash and drops its sidecar; caller holds LOCK_EX on key.

    An entry under a mount record (a dead owner's workspace not yet swept: a live one
    pins it) is renamed all the same, which the mount does not notice, but not
    deleted: its files are the lower layer of that overlay. The next opener's sweep
    detaches the mount first, then deletes the trash (:func:`sweep_dead_instances`)."""
    gone = to_trash(disk.entries_fd, key, disk.trash)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(entry.sidecar_name(key), dir_fd=disk.entries_fd)
    if gone is not None:
        if key in mounts.keys(disk.mounts_fd):
            log.warning("cache entry %s is under a dead workspace's mount: kept in %s", key, gone)
        else:
            disk.trasher.put(gone)


def _from_disk(disk: Disk, root: Digest, damaged: str | None, *, exclusive: bool) -> Entry | None:
    """The complete entry for ``root`` on disk (not the one with id ``damaged``), or
    None; holding LOCK_EX (``exclusive``), a torn or damaged one is discarded."""
    key = root.key
    st = entry.stat_at(disk.entries_fd, key)
    if st is not None and stat.S_ISDIR(st.st_mode):
        try:
            r = entry.load(disk.entries_fd, key)
            if r.root == root and r.ident != damaged:
                return Entry(root, r.bytes, r.files, r.ident, replay=r)
        except entry.SidecarError:
            pass
    if exclusive:
        discard(disk, key)
    return None


def acquire(
    disk: Disk,
    root: Digest,
    damaged: str | None,
    build: Callable[[Digest], Entry],
    cancel: CancelToken | None = None,
) -> tuple[Entry, bool]:
    """A pinned (LOCK_SH held) entry for ``root`` and whether this call built it: adopted
    if complete on disk, else ``build(root)`` under LOCK_EX. Waits (LOCK_SH, up to the
    lock timeout, or until ``cancel`` is set) while another process holds LOCK_EX
    building it."""
    key = root.key
    for _ in range(_ADOPT_ATTEMPTS):
        fd = wait_key(disk, key, fcntl.LOCK_SH, cancel)
        try:
            e = _from_disk(disk, root, damaged, exclusive=False)
        except BaseException:
            os.close(fd)
            raise
        if e is not None:
            e.pins, e.lock_fd = 1, fd
            return e, False
        os.close(fd)
        fd = wait_key(disk, key, fcntl.LOCK_EX, cancel)
        try:
            e = _from_disk(disk, root, damaged, exclusive=True)
            built = e is None
            if e is None:
                e = build(root)
            # a downgrade is not atomic (another process may slip in): look again after
            locks.flock_within(
                fd,
                fcntl.LOCK_SH,
                disk.lock_timeout_s,
                lambda: locks.lock_path(disk.locks_fd, lock_name(key)),
            )
            st = entry.stat_at(disk.entries_fd, key)
            if (
                locks.still_linked(disk.locks_fd, lock_name(key), fd)
                and st
                and stat.S_ISDIR(st.st_mode)
                and entry.read_ident(disk.entries_fd, key) == e.ident
            ):
                e.pins, e.lock_fd = 1, fd
                return e, built
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise FastmatError(f"cache entry for {root} vanished three times while adopting")


def invalidate(disk: Disk, key: str) -> bool:
    """Discards entry ``key`` (``verify`` found it bad) unless another process (or
    another pin of this one) holds its lock; returns whether it did."""
    fd = lock_key(disk, key, fcntl.LOCK_EX)
    if fd is None:
        return False
    try:
        discard(disk, key)
        locks.unlink_file(disk.locks_fd, lock_name(key))
    finally:
        os.close(fd)
    return True


def complete_keys(disk: Disk) -> list[str]:
    """The entries on disk with both their tree and their sidecar, sorted."""
    names = set(os.listdir(disk.entries_fd))
    return sorted(n for n in names if entry.sidecar_name(n) in names and parse_key(n) is not None)


def evict(index: CacheIndex, disk: Disk) -> int:
    """Takes unpinned victims out of the index while it is over its limits and renames
    them to the trash (cheap; the caller holds the cache lock), leaving the deletion to
    the background trasher. Returns how many were evicted."""
    n = 0
    mounted: set[str] | None = None
    for v in index.victims():
        if mounted is None:
            mounted = mounts.keys(disk.mounts_fd)  # listed once per call, only when over the limits
        if v.key in mounted:
            continue  # a workspace's lower layer (its owner may be dead: no pin left)
        fd = lock_key(disk, v.key, fcntl.LOCK_EX)
        if fd is None:
            continue  # pinned or being rebuilt by another process: keep it
        try:
            index.remove(v)
            discard(disk, v.key)
            locks.unlink_file(disk.locks_fd, lock_name(v.key))
            n += 1
        finally:
            os.close(fd)
    if n:
        log.debug("cache: evicted %d entries (%d left, %d bytes)", n, len(index), index.bytes)
    return n


def adopt_all(disk: Disk) -> list[Entry]:
    """Complete entries found on disk at open, least recently used first (sidecar
    mtimes: set at construction, touched at every hit); orphans (a tree
    without sidecar or the reverse) are discarded when nobody holds their lock."""
    names = os.listdir(disk.entries_fd)
    suffix = entry.sidecar_name("")
    plans = {n[: -len(suffix)] for n in names if n.endswith(suffix)}
    dirs = {n for n in names if not n.endswith(suffix)}
    found: list[tuple[int, Entry]] = []
    orphans = {k for k in plans ^ dirs if parse_key(k) is not None}
    bad: set[str] = set()
    for key in sorted(plans & dirs):
        root = parse_key(key)
        st = entry.stat_at(disk.entries_fd, key)
        if root is None or st is None or not stat.S_ISDIR(st.st_mode):
            continue
        try:
            head, mtime = entry.read_head(disk.entries_fd, key)
            got, size, files, ident = entry.read_totals(head)
        except (OSError, entry.SidecarError):
            got = None
        if got != root:
            bad.add(key)
            continue
        found.append((mtime, Entry(root, size, files, ident)))
    mounted = mounts.keys(disk.mounts_fd)
    for key in (orphans | bad) - mounted:
        lfd = lock_key(disk, key, fcntl.LOCK_EX)
        if lfd is None:
            continue  # somebody builds, adopts or pins it right now
        try:
            complete = entry.stat_at(disk.entries_fd, key) and entry.stat_at(
                disk.entries_fd, entry.sidecar_name(key)
            )
            if key in bad or not complete:  # else finished since we listed: keep it
                discard(disk, key)
                locks.unlink_file(disk.locks_fd, lock_name(key))
        finally:
            os.close(lfd)
    _sweep_locks(disk, plans | dirs)
    found.sort(key=lambda t: t[0])
    return [e for _, e in found]


def _sweep_locks(disk: Disk, keys: set[str]) -> None:
    """Unlinks the lock files of digests without an entry (a failed construction's),
    each under its own LOCK_EX so nobody waiting on one is left holding a ghost."""
    for name in os.listdir(disk.locks_fd):
        key = name[: -len(lock_name(""))]
        if not name.endswith(lock_name("")) or key in keys or parse_key(key) is None:
            continue
        fd = lock_key(disk, key, fcntl.LOCK_EX)
        if fd is None:
            continue
        try:
            absent = entry.stat_at(disk.entries_fd, key) is None
            if absent and entry.stat_at(disk.entries_fd, entry.sidecar_name(key)) is None:
                locks.unlink_file(disk.locks_fd, name)
        finally:
            os.close(fd)


def sweep_dead_instances(tmp_fd: int, keep: set[str], disk: Disk) -> int:
    """Moves dead instances' temp dirs (but those in ``keep``: this instance's, and
    dead owners' whose mounts could not be cleaned) to the trash and queues the trash
    for the background deleter, but entries still under a mount record; returns how
    many trash items were queued. Run after :func:`fastmat.cache.mounts.sweep`."""

    def to_bin(parent_fd: int, name: str) -> None:
        if to_trash(parent_fd, name, disk.trash) is None:
            raise FileNotFoundError(name)

    sweep_dead(tmp_fd, keep=keep, remove=to_bin)
    mounted = mounts.keys(disk.mounts_fd)
    n = 0
    for t in disk.trash.iterdir():
        if t.name.split(".", 1)[0] not in mounted:
            disk.trasher.put(t)
            n += 1
    return n
