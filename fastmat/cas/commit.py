"""Group commit: the blobs of a batch are made durable together, then published together.

A writer first *stages* a blob: its complete bytes in a temp of the instance's temp
dir, checked against its digest, not yet fsync'ed. :meth:`Committer.commit` then
publishes a list of staged blobs, paying the durable-write recipe once per group
instead of once per blob (invariant 14):

1. the group's temps are made durable together (``fm_sync_batch``: an fsync of
   each on the native pool, or one ``syncfs`` of the filesystem, chosen per
   filesystem by :func:`sync_mode_for`; a failed syncfs falls back to the
   fsyncs, so a blob is published only if its own bytes were synced);
2. the ``admit`` hook runs (the bounded CAS accounts for the new bytes and
   evicts when they would not fit: :mod:`fastmat.cas.usage`);
3. every name is published by a rename that never replaces, and each shard
   directory that received a name is fsync'ed once (``fm_publish_batch``).

So after a crash or power loss a published name holds complete, correct bytes or
does not exist: a name appears only by the rename, after its data was synced. A
temp whose sync failed is removed, never published; so is every temp of a group
that fails as a whole (the admission hook raised: a full disk, a lock timeout), so
a failed commit leaves nothing behind in the temp dir. Errors name full paths
(the temp's, the final name's). ``fsync=False`` skips steps 1 and 3's fsyncs (an
explicit opt-out: not crash-safe).

Threads commit together: the first caller to arrive while no group is being
committed becomes the leader and commits everything pending (up to a byte
bound); the callers arriving meanwhile wait and form the next group (leader /
follower, as a database log does). A caller returns once its own blobs are
published, so whoever waits for a blob (a fetch lock, a variant's lock, an
``on_ready`` callback) sees it only then.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastmat import _binding
from fastmat.cas import layout
from fastmat.digest import Digest

__all__ = [
    "SYNCFS_SLACK_BYTES",
    "SYNC_THREADS",
    "CommitResult",
    "Committer",
    "Staged",
    "SyncPolicy",
    "dirty_bytes",
    "sync_mode_for",
]

log = logging.getLogger("fastmat")

SYNC_THREADS = 32  # fsyncs in flight per group: I/O waits, not CPU (benches/bench_cas.py)
MAX_GROUP_BYTES = 64 << 20  # a group larger than this is committed in several

# f_type -> how a group's data is synced, measured by ``benches/bench_cas.py --sync``
# (5 runs, loaded 2-CPU VM): one syncfs made 1,000 fresh 16 KiB temps durable in
# 23 ms on ext4 and 35 ms on a loop XFS, fsyncs on 32-64 pool threads in 37-46 ms
# and 109-149 ms, the old serial fsync + directory fsync in 377 and 606 ms; for 64
# x 1 MiB all were within 1.5x (the disk's bandwidth). But a syncfs also writes
# every other dirty page of the filesystem, so "auto" (ext4, XFS) takes it only
# while the machine holds little dirty data beyond the group (/proc/meminfo), and
# the pool's fsyncs otherwise. tmpfs / ramfs: syncfs, a no-op. Others (btrfs,
# whose syncfs commits a whole transaction; NFS...): fsync on the pool.
_EXT4, _XFS, _TMPFS, _RAMFS = 0xEF53, 0x58465342, 0x01021994, 0x858458F6
SyncPolicy = Literal["fsync", "syncfs", "auto"]
_SYNC_BY_MAGIC: dict[int, SyncPolicy] = {
    _EXT4: "auto",
    _XFS: "auto",
    _TMPFS: "syncfs",
    _RAMFS: "syncfs",
}
_DEFAULT_SYNC: SyncPolicy = "fsync"
SYNCFS_SLACK_BYTES = 32 << 20  # dirty data beyond a group that a syncfs may write too


def sync_mode_for(fd: int) -> SyncPolicy:
    """How a group's temps on ``fd``'s filesystem are made durable."""
    try:
        magic = _binding.fs_magic(fd)
    except OSError:
        return _DEFAULT_SYNC
    return _SYNC_BY_MAGIC.get(magic, _DEFAULT_SYNC)


def dirty_bytes() -> int | None:
    """Dirty + under-writeback page-cache bytes of the whole machine (Linux), or None."""
    try:
        with open("/proc/meminfo", "rb") as f:
            text = f.read()
    except OSError:
        return None
    total = 0
    for line in text.splitlines():
        if line.startswith((b"Dirty:", b"Writeback:")):
            total += int(line.split()[1]) * 1024
    return total


@dataclass
class Staged:
    """A complete, checked temp waiting to be published as ``area``/``digest``."""

    tmp: str  # its name in the instance's temp dir
    digest: Digest
    area: str = layout.BLOBS

    @property
    def final(self) -> str:
        return layout.rel(self.area, self.digest)


@dataclass
class CommitResult:
    """Per staged blob: True if this commit published it, False if the name existed
    (another writer won: same bytes); the errors of those that failed."""

    published: list[bool]
    errors: list[OSError | None]

    def raise_first(self) -> None:
        for e in self.errors:
            if e is not None:
                raise e


@dataclass
class _Ticket:
    items: list[Staged]
    result: CommitResult | None = None
    done: bool = False
    error: BaseException | None = None  # the group failed as a whole (a bug, MemoryError)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(s.digest.size_bytes for s in self.items)


Admit = Callable[[Sequence[Staged]], None]


class Committer:
    """Leader / follower group commit for one ``LocalCAS`` instance (see the module)."""

    def __init__(
        self,
        tmp_fd: int,
        root_fd: int,
        *,
        fsync: bool,
        sync_mode: SyncPolicy,
        threads: int = SYNC_THREADS,
        max_group_bytes: int = MAX_GROUP_BYTES,
        tmp_dir: Path | None = None,
        root: Path | None = None,
    ) -> None:
        self.tmp_fd = tmp_fd  # -1 until the instance's temp dir is made (then set)
        self.tmp_dir = tmp_dir or Path(".")  # for messages
        self.root = root or Path(".")
        self.root_fd = root_fd
        self.fsync = fsync
        self.sync_mode = sync_mode
        self.threads = threads
        self.max_group_bytes = max_group_bytes
        self.admit: Admit | None = None  # set by the bounded CAS
        self._cv = threading.Condition()
        self._pending: list[_Ticket] = []
        self._leading = False
        self.groups = 0  # groups committed (tests, stats)
        self.synced = 0  # temps synced
        self.syncfs_calls = 0  # groups synced by one syncfs

    def commit(self, items: Sequence[Staged]) -> CommitResult:
        """Publishes ``items`` (each temp consumed: published or removed) and returns
        once they are; see the module docstring. Never raises for one blob's failure:
        it is in the result."""
        if not items:
            return CommitResult([], [])
        if self.fsync:  # their writeback runs while this caller waits for a leader
            try:
                _binding.sync_batch(
                    self.tmp_fd, [s.tmp.encode() for s in items], "writeback", threads=1
                )
            except BaseException:
                for s in items:
                    _unlink(self.tmp_fd, s.tmp)
                raise
        ticket = _Ticket(list(items))
        with self._cv:
            self._pending.append(ticket)
            while not ticket.done:
                if self._leading:
                    self._cv.wait()
                    continue
                self._leading = True
                group = self._take()
                self._cv.release()
                try:
                    self._run(group)
                finally:
                    self._cv.acquire()
                    self._leading = False
                    for t in group:
                        t.done = True
                    self._cv.notify_all()
        if ticket.error is not None:
            raise ticket.error
        assert ticket.result is not None
        return ticket.result

    def _take(self) -> list[_Ticket]:
        """The pending tickets of the next group: at least one, then up to the bound."""
        group = [self._pending.pop(0)]
        total = group[0].nbytes
        while self._pending and total + self._pending[0].nbytes <= self.max_group_bytes:
            t = self._pending.pop(0)
            group.append(t)
            total += t.nbytes
        return group

    def _run(self, group: list[_Ticket]) -> None:
        try:
            items = [s for t in group for s in t.items]
            published, errors = self._commit_items(items)
        except BaseException as e:
            for t in group:
                t.error = e
                for s in t.items:  # published ones were renamed: nothing under this name
                    _unlink(self.tmp_fd, s.tmp)
            raise
        k = 0
        for t in group:
            n = len(t.items)
            t.result = CommitResult(published[k : k + n], errors[k : k + n])
            k += n

    def _error(self, rc: int, what: str, s: Staged, published: bool = False) -> OSError:
        """The OSError of one blob's failure, naming the temp (or the published name)
        and the final name in full."""
        err = -rc
        final = str(self.root / s.final)
        path = final if published else str(self.tmp_dir / s.tmp)
        return OSError(
            err, f"{os.strerror(err)} ({what})", path, None, None if published else final
        )

    def _sync(self, tmps: list[bytes], nbytes: int) -> Sequence[int]:
        """The group's data sync: per-file status (0 or -errno)."""
        mode = self.sync_mode
        if mode == "auto":
            dirty = dirty_bytes()
            small = dirty is not None and dirty <= nbytes + SYNCFS_SLACK_BYTES
            mode = "syncfs" if small else "fsync"
        self.synced += len(tmps)
        if mode == "syncfs":
            status = _binding.sync_batch(self.tmp_fd, tmps, "syncfs")
            self.syncfs_calls += 1
            if not any(status):
                return status
            # Some file of the filesystem failed to write back (maybe not ours):
            # each temp's own fsync says which of ours are durable.
        return _binding.sync_batch(self.tmp_fd, tmps, "fsync", threads=self.threads)

    def _commit_items(self, items: list[Staged]) -> tuple[list[bool], list[OSError | None]]:
        n = len(items)
        errors: list[OSError | None] = [None] * n
        published = [False] * n
        tmps = [s.tmp.encode() for s in items]
        ok = list(range(n))
        if self.fsync:
            status = self._sync(tmps, sum(s.digest.size_bytes for s in items))
            ok = []
            for i, rc in enumerate(status):
                if rc < 0:  # never published: its bytes may not be durable
                    errors[i] = self._error(rc, "syncing blob temp", items[i])
                    _unlink(self.tmp_fd, items[i].tmp)
                else:
                    ok.append(i)
        if ok and self.admit is not None:  # may raise: the group fails, _run removes its temps
            self.admit([items[i] for i in ok])
        rc, status = _binding.publish_batch(
            self.tmp_fd,
            [tmps[i] for i in ok],
            self.root_fd,
            [items[i].final.encode() for i in ok],
            fsync=self.fsync,
            threads=self.threads,
        )
        for k, i in enumerate(ok):
            if status[k] == 0:
                published[i] = True
            elif status[k] != -errno.EEXIST:
                errors[i] = self._error(status[k], "publishing blob", items[i])
        if rc < 0 and not any(status[k] < 0 and status[k] != -errno.EEXIST for k in range(len(ok))):
            # a directory fsync failed: the names exist but may not survive a crash
            for k, i in enumerate(ok):
                if status[k] == 0:
                    errors[i] = self._error(rc, "syncing the directory of blob", items[i], True)
        self.groups += 1
        log.debug("group commit: %d blobs, %d published", n, sum(published))
        return published, errors


def _unlink(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
