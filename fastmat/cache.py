"""DirectoryCache: whole materialized trees kept by root digest, shared by processes.

Layout under the cache directory (names private, properties not):
``entries/<hash>-<size>/`` a complete tree (dirs 0755, files the CAS inodes / 0555
variants, read-only) with its sidecar ``entries/<hash>-<size>.plan`` (cache_entry);
``tmp/<pid>.<rand>/`` each open instance's scratch (constructions, overlay upper layers),
``trash/`` evicted trees awaiting the background deleter, ``locks/`` one flock file per
digest (see cache_disk for the cross-process protocol).

A miss builds the tree with ``fastmat.materialize`` in the instance's scratch, writes the
sidecar, renames the sidecar then the tree into ``entries/`` (the tree's rename is the
commit point: nothing half-built is ever under a final name) and inserts it pinned. A hit
replays the sidecar's plan into ``dest`` with the C executor, hardlinking from the entry
(no readdir, no stat walk), or clones it whole where ``clonefile(2)`` exists.

Durability (``fsync=True``): the sidecar and the ``entries/`` directory are fsynced
around the commit; the links inside a tree are not (a crash may lose some: the next hit
finds them missing, and the entry is rebuilt, never served short).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fastmat import _binding, workspace
from fastmat.cache_adopt import adopt_all
from fastmat.cache_disk import Trasher, lock_key, make_instance_tmp, sweep
from fastmat.cache_index import CacheIndex, Entry, Limits
from fastmat.cache_ops import Builder, evict
from fastmat.cache_types import CacheResult, CacheStats, Damaged, Flight
from fastmat.digest import Digest
from fastmat.errors import FastmatError
from fastmat.workspace import Workspace

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS
    from fastmat.tree import Fetcher, TreeLimits

__all__ = ["CacheResult", "CacheStats", "DirectoryCache", "Workspace"]

log = logging.getLogger("fastmat")
GiB = 1 << 30
_RETRIES = 3
_DEST_ERRORS = (errno.EEXIST, errno.ENOENT, errno.ENOTDIR)


class DirectoryCache:
    """Whole input trees cached by root digest under ``path``, over the local ``cas``.

    ``max_bytes`` / ``max_entries`` bound the entries this instance knows (bytes are the
    sum of the trees' file digests' sizes); ``max_entries=0`` keeps nothing and
    materializes straight into ``dest``. Eviction is least recently used first
    (``policy``), only of unpinned entries, the deletion on a background thread.
    ``fetcher`` fetches missing Directory messages and blobs on a miss; ``threads`` /
    ``max_inflight`` / ``limits`` are passed to the executor and the tree loader.
    ``fsync`` makes sidecars and entry renames durable. ``overlay``: None probes once
    whether workspaces can mount overlays, False never mounts.

    Thread-safe; several processes may share ``path`` (construction single-flight and
    pins are flock-based). Not fork-safe: open the cache after forking.

    A hit re-checks a sample of the entry's files (``cache_entry.check_samples``: type,
    inode, size, mode, mtime of up to 9 files) and treats a replay failing with ENOENT
    as damage too; a damaged entry is invalidated and rebuilt, never served. A file
    outside the sample rewritten in place keeping size and mtime is not detected.

    Only whole trees are cached (no per-subdirectory entries): on Linux a hit costs one
    link per file whatever entry it links from, and the tree loader's node cache already
    re-validates only the changed path of a tree that differs by one file.
    """

    def __init__(
        self,
        cas: LocalCAS,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 10 * GiB,
        max_entries: int = 10_000,
        fetcher: Fetcher | None = None,
        threads: int = 0,
        max_inflight: int = 64,
        limits: TreeLimits | None = None,
        policy: str = "least-recently-used",
        fsync: bool = True,
        overlay: bool | None = None,
    ) -> None:
        self.cas = cas
        self.path = Path(path).absolute()
        self.limits = Limits(max_bytes, max_entries, policy)
        for d in ("entries", "tmp", "trash", "locks"):
            (self.path / d).mkdir(parents=True, exist_ok=True)
        self._entries = self.path / "entries"
        self._trash_dir = self.path / "trash"
        self._entries_fd = os.open(self._entries, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._locks_fd = os.open(self.path / "locks", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._tmp, self._owner_fd = make_instance_tmp(self.path / "tmp")
        self._mu = threading.Lock()
        self._index = CacheIndex(self.limits)
        self._flights: dict[str, Flight] = {}
        self._n: Counter[str] = Counter()
        self._trasher = Trasher()
        self._builder = Builder(
            cas,
            fetcher=fetcher,
            threads=threads,
            max_inflight=max_inflight,
            limits=limits,
            fsync=fsync,
            entries_fd=self._entries_fd,
            locks_fd=self._locks_fd,
            trash=self._trash_dir,
            trasher=self._trasher,
            tmp=self._tmp,
        )
        self.overlay = overlay  # None: probed at the first workspace; False: never mount
        self._closed = False
        sweep(self.path / "tmp", self._trash_dir, self._tmp, self._trasher)
        for e in adopt_all(self._entries_fd, self._locks_fd, self._trash_dir, self._trasher):
            self._index.insert(e)
        with self._mu:
            self._evict_locked()

    # -- public API ---------------------------------------------------------------

    def __enter__(self) -> DirectoryCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finishes pending background deletions and releases the cache's fds."""
        if self._closed:
            return
        self._closed = True
        self._trasher.drain()
        self._trasher.close()
        with self._mu:
            for e in self._index:
                if e.lock_fd >= 0:
                    os.close(e.lock_fd)
                    e.lock_fd = -1
        with contextlib.suppress(OSError):
            _binding.remove_tree(self._tmp)
        self._builder.close()
        for fd in (self._entries_fd, self._locks_fd, self._owner_fd):
            os.close(fd)

    def stats(self) -> CacheStats:
        with self._mu:
            ix = self._index
            return CacheStats.of(self._n, entries=len(ix), bytes=ix.bytes, pinned=ix.pinned)

    def entry_path(self, root: Digest) -> Path | None:
        """Where ``root``'s entry lives, if this instance knows one (for inspection)."""
        with self._mu:
            return self._entries / root.key if self._index.get(root.key) else None

    def drain(self) -> None:
        """Waits for the background deleter (tests and benchmarks)."""
        self._trasher.drain()

    def materialize(self, root: Digest, dest: str | os.PathLike[str]) -> CacheResult:
        """Makes ``dest`` (which must not exist) a copy of ``root``'s tree via the cache."""
        t0 = time.perf_counter()
        dest = Path(dest)
        if self.limits.max_entries == 0:
            st = self._builder.direct(root, dest)
            self._count("misses")
            dt = time.perf_counter() - t0
            return CacheResult(False, "materialize", st.bytes, st.files, dt, 0.0, dt)
        damaged: tuple[int, int] | None = None
        for _ in range(_RETRIES):
            e, hit = self._acquire(root, damaged)
            if hit:
                self._builder.touch(e.key)
            t1 = time.perf_counter()
            try:
                method, fell_back = self._builder.clone(e, dest)
            except Damaged as d:
                damaged = self._invalidate(e, d)
                continue
            finally:
                self._release(e)
            if hit:
                self._count(method)
            if fell_back:
                self._count("fallbacks", fell_back)
            t2 = time.perf_counter()
            rebuilt = damaged is not None
            return CacheResult(hit, method, e.bytes, e.files, t1 - t0, t2 - t1, t2 - t0, rebuilt)
        raise FastmatError(f"cache entry for {root} keeps failing its checks")

    @contextlib.contextmanager
    def workspace(self, root: Digest, dest: str | os.PathLike[str]) -> Iterator[Workspace]:
        """``dest`` holds ``root``'s tree for the ``with`` body, then is removed.

        An overlay mount of the (pinned) entry where this process can mount, else a
        hardlinked copy; the yielded ``Workspace.method`` says which. Only the overlay
        protects the CAS from an action running as the worker's user that chmods an
        input (a hardlinked input is the CAS inode; read-only, but its owner may chmod).
        """
        dest = Path(dest)
        mounted = None
        if self.limits.max_entries and self.can_overlay():
            mounted = self._mount(root, dest)
        if mounted is None:
            r = self.materialize(root, dest)
            if self.limits.max_entries:
                self._count("fallbacks")
            try:
                yield Workspace(dest, r.method, root, r.hit)
            finally:
                with contextlib.suppress(FileNotFoundError):  # the action removed it
                    _binding.remove_tree(dest)
            return
        e, hit, ws = mounted
        try:
            yield Workspace(dest, "overlay", root, hit, ws / "upper")
        finally:
            try:
                gone = workspace.unmount(dest, ws, self._trash_dir)
                if gone is not None:
                    self._trasher.put(gone)
            finally:
                self._release(e)

    # -- pinning, single-flight, eviction ----------------------------------------

    def _count(self, what: str, n: int = 1) -> None:
        with self._mu:
            self._n[what] += n

    def _acquire(self, root: Digest, damaged: tuple[int, int] | None) -> tuple[Entry, bool]:
        """A pinned entry for ``root`` and whether it was a hit (else constructed)."""
        key = root.key
        while True:
            with self._mu:
                e = self._index.get(key)
                if e is not None and damaged != e.ident:
                    if self._pin_locked(e):
                        self._index.touch(e)
                        self._n["hits"] += 1
                        return e, True
                    self._index.remove(e)  # another process is evicting or rebuilding it
                flight = self._flights.get(key)
                owner = flight is None
                if flight is None:
                    flight = self._flights[key] = Flight()
            if not owner:
                flight.wait()
                continue
            try:
                e, built = self._builder.acquire(root, damaged)
            except BaseException as exc:
                with self._mu:
                    del self._flights[key]
                flight.fail(exc)
                raise
            with self._mu:
                self._index.insert(e)
                self._index.touch(e)
                self._n["constructions" if built else "adopted"] += 1
                self._n["misses" if built else "hits"] += 1
                self._evict_locked()
                del self._flights[key]
            flight.done()
            return e, not built

    def _pin_locked(self, e: Entry) -> bool:
        if e.pins == 0:
            fd = lock_key(self._locks_fd, e.key, fcntl.LOCK_SH, block=False)
            if fd is None:
                return False
            e.lock_fd = fd
        e.pins += 1
        return True

    def _release(self, e: Entry) -> None:
        with self._mu:
            e.pins -= 1
            if e.pins == 0 and e.lock_fd >= 0:
                os.close(e.lock_fd)  # drops this process's LOCK_SH
                e.lock_fd = -1
            self._index.retain_replay(e)
            if self._index.over():
                self._evict_locked()

    def _evict_locked(self) -> None:
        self._n["evictions"] += evict(
            self._index, self._entries_fd, self._locks_fd, self._trash_dir, self._trasher
        )

    def _invalidate(self, e: Entry, d: Damaged) -> tuple[int, int]:
        log.warning("cache entry %s invalid (%s): rebuilding", e.key, d)
        with self._mu:
            self._index.remove(e)
            self._n["stale" if d.stale else "damaged"] += 1
        return e.ident

    def can_overlay(self) -> bool:
        """Whether workspaces mount overlays here (probed once, for real)."""
        if self.overlay is None:
            self.overlay = workspace.probe(self._tmp) and workspace.usable_path(self._entries)
        return self.overlay

    def _mount(self, root: Digest, dest: Path) -> tuple[Entry, bool, Path] | None:
        """The pinned entry, hit, and scratch dir of an overlay now mounted at ``dest``;
        None if the mount itself failed (the caller falls back to a hardlinked copy)."""
        damaged: tuple[int, int] | None = None
        for _ in range(_RETRIES):
            e, hit = self._acquire(root, damaged)
            try:
                os.close(self._builder.open_entry(e))
                ws = workspace.mount(self._entries / e.key, self._tmp, dest)
            except Damaged as d:
                self._release(e)
                damaged = self._invalidate(e, d)
                continue
            except OSError as err:
                self._release(e)
                if err.errno in _DEST_ERRORS and err.filename in (str(dest), dest):
                    raise  # about dest itself: the caller's problem, not the overlay's
                log.warning("overlay workspace at %s failed (%s): hardlinking instead", dest, err)
                return None
            except BaseException:
                self._release(e)
                raise
            if hit:
                self._builder.touch(e.key)
                self._count("overlay")
            return e, hit, ws
        raise FastmatError(f"cache entry for {root} keeps failing its checks")
