"""Group commit: the blobs of a batch are made durable together, then published together.

A writer first *stages* a blob: its complete bytes in a temp of the instance's temp
dir, checked against its digest, not yet fsync'ed. :meth:`Committer.commit` then
publishes a list of staged blobs, paying the durable-write recipe once per group
instead of once per blob (invariant 14):

1. the group's temps are made durable together (``fm_sync_batch``: an fsync of
   each on the native pool, or one ``syncfs`` of the filesystem, chosen per
   filesystem by :func:`sync_mode_for`);
2. the ``admit`` hook runs (the bounded CAS accounts for the new bytes and
   evicts when they would not fit: :mod:`fastmat.cas.usage`);
3. every name is published by a rename that never replaces, and each shard
   directory that received a name is fsync'ed once (``fm_publish_batch``).

So after a crash or power loss a published name holds complete, correct bytes or
does not exist: a name appears only by the rename, after its data was synced. A
temp whose sync failed is removed, never published. ``fsync=False`` skips steps 1
and 3's fsyncs (an explicit opt-out: not crash-safe).

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

from fastmat import _binding
from fastmat.cas import layout
from fastmat.digest import Digest

__all__ = [
    "SYNC_THREADS",
    "CommitResult",
    "Committer",
    "Staged",
    "sync_mode_for",
]

log = logging.getLogger("fastmat")

SYNC_THREADS = 32  # fsyncs in flight per group: I/O waits, not CPU (benches/bench_cas.py)
MAX_GROUP_BYTES = 64 << 20  # a group larger than this is committed in several

# f_type -> how a group's data is synced; measured by benches/bench_cas.py --sync:
# one syncfs is 2-30x faster than the same fsyncs on a filesystem that holds
# little else that is dirty, but it flushes everything dirty there; on the
# filesystems a worker shares with other writers the fsyncs bound the wait.
_TMPFS, _RAMFS = 0x01021994, 0x858458F6
_SYNC_BY_MAGIC: dict[int, _binding.SyncMode] = {_TMPFS: "syncfs", _RAMFS: "syncfs"}
_DEFAULT_SYNC: _binding.SyncMode = "fsync"


def sync_mode_for(fd: int) -> _binding.SyncMode:
    """How a group's temps on ``fd``'s filesystem are made durable."""
    try:
        magic = _binding.fs_magic(fd)
    except OSError:
        return _DEFAULT_SYNC
    return _SYNC_BY_MAGIC.get(magic, _DEFAULT_SYNC)


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
        sync_mode: _binding.SyncMode,
        threads: int = SYNC_THREADS,
        max_group_bytes: int = MAX_GROUP_BYTES,
    ) -> None:
        self.tmp_fd = tmp_fd
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

    def commit(self, items: Sequence[Staged]) -> CommitResult:
        """Publishes ``items`` (each temp consumed: published or removed) and returns
        once they are; see the module docstring. Never raises for one blob's failure:
        it is in the result."""
        if not items:
            return CommitResult([], [])
        if self.fsync:  # their writeback runs while this caller waits for a leader
            _binding.sync_batch(
                self.tmp_fd, [s.tmp.encode() for s in items], "writeback", threads=1
            )
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
            raise
        k = 0
        for t in group:
            n = len(t.items)
            t.result = CommitResult(published[k : k + n], errors[k : k + n])
            k += n

    def _commit_items(self, items: list[Staged]) -> tuple[list[bool], list[OSError | None]]:
        n = len(items)
        errors: list[OSError | None] = [None] * n
        published = [False] * n
        tmps = [s.tmp.encode() for s in items]
        ok = list(range(n))
        if self.fsync:
            status = _binding.sync_batch(self.tmp_fd, tmps, self.sync_mode, threads=self.threads)
            self.synced += n
            ok = []
            for i, rc in enumerate(status):
                if rc < 0:  # never published: its bytes may not be durable
                    errors[i] = _error(rc, items[i].tmp, items[i].final)
                    _unlink(self.tmp_fd, items[i].tmp)
                else:
                    ok.append(i)
        if ok and self.admit is not None:
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
                errors[i] = _error(status[k], items[i].tmp, items[i].final)
        if rc < 0 and not any(status[k] < 0 and status[k] != -errno.EEXIST for k in range(len(ok))):
            # a directory fsync failed: the names exist but may not survive a crash
            for k, i in enumerate(ok):
                if status[k] == 0:
                    errors[i] = _error(rc, items[i].final, None)
        self.groups += 1
        log.debug("group commit: %d blobs, %d published", n, sum(published))
        return published, errors


def _error(rc: int, path: str, path2: str | None) -> OSError:
    err = -rc
    return OSError(err, os.strerror(err), path, None, path2)


def _unlink(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
