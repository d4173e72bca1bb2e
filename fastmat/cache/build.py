"""Constructing a cache entry: materialize the tree in the instance's scratch, make its
private inodes read-only, write the sidecar, rename both into ``entries/``.

The tree's rename is the commit point: nothing half-built is ever under a final name
(invariant 6). Runs under the digest's LOCK_EX (:func:`fastmat.cache.protocol.acquire`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fastmat import _binding
from fastmat.cache import entry
from fastmat.cache.index import Entry
from fastmat.control import CancelToken, ProgressFn, check_cancel
from fastmat.fs.owned import unique
from fastmat.materialize import MaterializeStats, materialize
from fastmat.tree import load_plan

if TYPE_CHECKING:
    from fastmat.cache.protocol import Disk
    from fastmat.cas import LocalCAS
    from fastmat.digest import Digest
    from fastmat.tree import Fetcher, Plan, TreeLimits

log = logging.getLogger("fastmat")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_O_FILE = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def stage_hook(stage: str) -> None:
    """Tests replace this to stop a construction at ``stage`` ("built", "published")."""


class EntryBuilder:
    """Builds entries (and direct, uncached trees) with the cache's materialize options."""

    def __init__(
        self,
        cas: LocalCAS,
        disk: Disk,
        *,
        fetcher: Fetcher | None,
        threads: int,
        max_inflight: int,
        limits: TreeLimits | None,
        fsync: bool,
    ) -> None:
        self.cas, self.disk, self.fetcher = cas, disk, fetcher
        self.threads, self.max_inflight = threads, max_inflight
        self.limits, self.fsync = limits, fsync

    def direct(
        self,
        root: Digest,
        dest: Path,
        *,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> MaterializeStats:
        """``materialize`` straight into ``dest`` (a cache that keeps nothing)."""
        return materialize(
            self.cas,
            root,
            dest,
            fetcher=self.fetcher,
            threads=self.threads,
            max_inflight=self.max_inflight,
            limits=self.limits,
            progress=progress,
            cancel=cancel,
        )

    def build(
        self,
        root: Digest,
        *,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> Entry:
        """Constructs ``root``'s entry and publishes it; the caller holds LOCK_EX.
        ``progress`` is told how the materialize goes; ``cancel`` stops it (and anything
        up to the commit point: nothing is published, the scratch is removed)."""
        key = root.key
        disk = self.disk
        work = disk.tmp / unique("b-")
        os.mkdir(work, 0o700)
        try:
            tree = work / "t"
            # the materializer itself: any fetcher kind, fetch overlapped with linking
            self.direct(root, tree, progress=progress, cancel=cancel)
            stage_hook("built")
            plan = load_plan(self.cas, root, limits=self.limits)  # local now, nodes cached
            tfd = os.open(tree, _O_DIR)
            try:
                _read_only(plan, tfd)
                replay = entry.from_plan(plan, root, tfd)
            finally:
                os.close(tfd)
            check_cancel(cancel, f"construction of the cache entry {key}")
            side = work / "p"
            with open(side, "xb") as f:
                f.write(entry.encode(replay))
                if self.fsync:
                    os.fsync(f.fileno())
            os.chmod(side, 0o444)
            os.rename(side, entry.sidecar_name(key), dst_dir_fd=disk.entries_fd)
            try:
                os.rename(tree, key, dst_dir_fd=disk.entries_fd)  # the commit point
            except BaseException:
                os.unlink(entry.sidecar_name(key), dir_fd=disk.entries_fd)
                raise
            if self.fsync:
                os.fsync(disk.entries_fd)
            stage_hook("published")
            log.debug("cache entry %s built: %d files, %d bytes", key, replay.files, replay.bytes)
            return Entry(root, replay.bytes, replay.files, replay.ident, replay=replay)
        finally:
            with contextlib.suppress(FileNotFoundError):
                _binding.remove_tree(work)


def _read_only(plan: Plan, tree_fd: int) -> None:
    """NodeProperties may ask for a writable mode. An entry is shared by every later hit,
    so its private inodes (empty files, NodeProperties copies: never CAS inodes) lose
    their write bits; EXDEV copies made at a hit get the masked mode too."""
    a = plan.arrays
    private = (_binding.FM_OP_EMPTY, _binding.FM_OP_COPY)
    writable = [i for i, m in enumerate(a.mode) if m & 0o222 and a.op[i] in private]
    for i, path in zip(writable, plan.paths_of_entries(writable), strict=True):
        fd = os.open(path, _O_FILE, dir_fd=tree_fd)
        try:
            os.fchmod(fd, a.mode[i] & 0o7555)
        finally:
            os.close(fd)
