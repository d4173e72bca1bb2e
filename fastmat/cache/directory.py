"""DirectoryCache: whole materialized trees kept by root digest, shared by processes.

Layout under the cache directory (names private, properties not):
``entries/<hash>-<size>/`` a complete tree (dirs 0755, files the CAS inodes / 0555
variants, read-only) with its sidecar ``entries/<hash>-<size>.plan`` (:mod:`.entry`);
``tmp/<pid>.<rand>/`` each open instance's scratch (constructions, overlay upper layers),
``trash/`` evicted trees awaiting the background deleter, ``locks/`` one flock file per
digest (:mod:`.protocol`: the cross-process protocol and everything done under it).

A miss builds the tree with ``fastmat.materialize`` in the instance's scratch, writes the
sidecar, renames the sidecar then the tree into ``entries/`` (the tree's rename is the
commit point: nothing half-built is ever under a final name; :mod:`.build`) and inserts
it pinned. A hit replays the sidecar's plan into ``dest`` with the C executor,
hardlinking from the entry (no readdir, no stat walk), or clones it whole where
``clonefile(2)`` exists (:mod:`.replay`). This module holds the in-process side: the
index, pin counts, in-process single-flight and when to evict.

Durability (``fsync=True``): the sidecar and the ``entries/`` directory are fsynced
around the commit; the links inside a tree are not (a crash may lose some: the next hit
finds them missing, and the entry is rebuilt, never served short).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fastmat import _binding
from fastmat.cache import counters, entry, mounts, protocol, replay, verify, workspace
from fastmat.cache.build import EntryBuilder
from fastmat.cache.entry import Damaged
from fastmat.cache.index import CacheIndex, Entry, Limits
from fastmat.cache.protocol import Disk
from fastmat.cache.types import CacheResult, CacheStats
from fastmat.cache.verify import CacheVerifyReport, QuarantineWatch
from fastmat.cache.workspace import Workspace
from fastmat.control import Cancelled, CancelToken, ProgressFn, Reporter, check_cancel, stopping
from fastmat.digest import Digest
from fastmat.errors import FastmatError
from fastmat.fs.access import Access
from fastmat.fs.forks import OpenedHere
from fastmat.fs.locks import DEFAULT_LOCK_TIMEOUT_S
from fastmat.fs.owned import OwnedDir
from fastmat.fs.trash import Trasher

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS
    from fastmat.tree import Fetcher, TreeLimits


log = logging.getLogger("fastmat")
GiB = 1 << 30
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_RETRIES = 3
_DEST_ERRORS = (errno.EEXIST, errno.ENOENT, errno.ENOTDIR)
_WATCH_S = 0.02  # how often a waiter looks at its cancel token


class Flight:
    """One in-process construction others wait for."""

    def __init__(self) -> None:
        self._ev = threading.Event()
        self._error: BaseException | None = None

    def wait(self, cancel: CancelToken | None = None) -> None:
        """Until the construction ends (its exception raised here), or ``cancel``."""
        if cancel is None:
            self._ev.wait()
        else:
            while not self._ev.wait(_WATCH_S):
                check_cancel(cancel, "waiting for a cache construction")
        if self._error is not None:
            raise self._error

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._ev.set()

    def done(self) -> None:
        self._ev.set()


class DirectoryCache:
    """Whole input trees cached by root digest under ``path``, over the local ``cas``.

    ``max_bytes`` / ``max_entries`` bound the entries this instance knows (bytes are the
    sum of the trees' file digests' sizes); ``max_entries=0`` keeps nothing and
    materializes straight into ``dest``. Eviction is least recently used first
    (``policy``), only of unpinned entries, the deletion on a background thread.
    ``fetcher`` fetches missing Directory messages and blobs on a miss; ``threads`` /
    ``max_inflight`` / ``limits`` are passed to the executor and the tree loader.
    ``fsync`` makes sidecars and entry renames durable. ``overlay``: None probes once
    whether workspaces can mount overlays, False never mounts. A new cache directory
    is private (0700, lock files 0600); ``group`` (a name or gid) shares it with that
    group's members (2770, group-owned, lock files 0660; :mod:`fastmat.fs.access`).
    ``lock_timeout_s`` bounds every wait for another process's lock (its construction
    of the same tree, its eviction): then ``LockTimeoutError`` names the lock file and
    the holder's pid.

    Thread-safe; several processes may share ``path`` (construction single-flight and
    pins are flock-based), each opening its own instance. Open it after fork: any use
    of an instance in a forked child (but ``close``) raises ``FastmatError``.

    A hit re-checks a sample of the entry's files (``entry.check_samples``: type,
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
        group: str | int | None = None,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        self.cas = cas
        self.path = Path(path).absolute()
        self._opened = OpenedHere(f"DirectoryCache {self.path}")
        self.limits = Limits(max_bytes, max_entries, policy)
        self.threads, self.max_inflight = threads, max_inflight
        self.access = Access.of(group)
        self.access.make_root(self.path)
        for d in ("entries", "tmp", "trash", "locks", mounts.MOUNTS, counters.DIR):
            self.access.make_dir(self.path / d)
        fds: list[int] = []
        try:
            for d in ("entries", "locks", "tmp", mounts.MOUNTS, counters.DIR):
                fds.append(os.open(self.path / d, _O_DIR))
            self._owned = OwnedDir.create(fds[2], self.access.dir_mode, self.access.lock_mode)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._fds = tuple(fds)
        self._entries_fd, self._locks_fd, self._tmp_parent_fd, self._mounts_fd = fds[:4]
        self._counters_fd = fds[4]
        self._tmp = self.path / "tmp" / self._owned.name
        self._trasher = Trasher()
        self._closed = False
        try:  # from here on, a failure releases the directories and the scratch
            self._disk = Disk(
                entries=self.path / "entries",
                entries_fd=self._entries_fd,
                locks_fd=self._locks_fd,
                trash=self.path / "trash",
                trasher=self._trasher,
                tmp=self._tmp,
                tmp_fd=self._owned.fd,
                mounts_fd=self._mounts_fd,
                lock_mode=self.access.lock_mode,
                lock_timeout_s=lock_timeout_s,
            )
            self._mu = threading.Lock()
            self._watch = QuarantineWatch(cas)
            self._index = CacheIndex(self.limits)
            self._flights: dict[str, Flight] = {}
            self._n = counters.Counters(self._counters_fd, self._owned.name, self.access.lock_mode)
            self._builder = EntryBuilder(
                cas,
                self._disk,
                fetcher=fetcher,
                threads=threads,
                max_inflight=max_inflight,
                limits=limits,
                fsync=fsync,
            )
            self.overlay = overlay  # None: probed at the first workspace; False: never mount
            self._sweeper = mounts.Sweeper(
                self._mounts_fd,
                self.path / "tmp",
                self._tmp_parent_fd,
                self._owned.name,
                self._disk.trash,
                self._trasher,
            )
            # what the sweep at open found: dead owners' workspaces (cleaned or not)
            self.dead_mounts, kept = mounts.sweep(self._sweeper)
            protocol.sweep_dead_instances(
                self._tmp_parent_fd, {self._owned.name, *kept}, self._disk
            )
            try:  # closed or swept instances' counters into the total
                live = set(os.listdir(self._tmp_parent_fd))
                counters.fold_dead(
                    self._counters_fd,
                    live,
                    mode=self.access.lock_mode,
                    timeout_s=lock_timeout_s,
                )
            except OSError as err:  # advisory
                log.warning("cache %s: cannot fold its counters: %s", self.path, err)
            for e in protocol.adopt_all(self._disk):
                self._index.insert(e)
            with self._mu:
                self._evict_locked()
        except BaseException:
            self._close_disk()
            raise

    # -- public API ---------------------------------------------------------------

    def __enter__(self) -> DirectoryCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finishes pending background deletions and releases the cache's fds. In a
        forked child it only closes the child's copies of the fds: the scratch dir,
        pins and deleter belong to the parent."""
        if self._closed:
            return
        self._closed = True
        if not self._opened.here:
            for e in self._index:
                if e.lock_fd >= 0:
                    os.close(e.lock_fd)  # the parent's pin lives on in its own fd
            for fd in (self._owned.fd, self._owned.lock_fd, *self._fds):
                os.close(fd)
            return
        self._trasher.drain()
        self._n.flush()  # before the scratch goes: see counters.fold_dead
        with self._mu:
            for e in self._index:
                if e.lock_fd >= 0:
                    os.close(e.lock_fd)
                    e.lock_fd = -1
        self._close_disk()

    def _close_disk(self) -> None:
        """Stops the deleter, removes the scratch dir, closes the directory fds."""
        self._closed = True
        try:
            self._trasher.close()
            self._owned.release(self._tmp_parent_fd)
        finally:
            for fd in self._fds:
                os.close(fd)

    def stats(self, *, all_instances: bool = False) -> CacheStats:
        """Event counters (hits, misses, evictions...) and the index now (entries, bytes,
        pinned). The counters are this instance's since it was opened, or with
        ``all_instances`` the sum over every instance that ever used this cache
        directory, this one included (others' as last written: every 256 events and at
        close; :mod:`.counters`)."""
        self._opened.check()
        n = self._n.snapshot()
        if all_instances:
            n.update(counters.read_all(self._counters_fd, skip=self._owned.name))
        with self._mu:
            ix = self._index
            return CacheStats.of(n, entries=len(ix), bytes=ix.bytes, pinned=ix.pinned)

    def entry_path(self, root: Digest | str) -> Path | None:
        """Where ``root``'s entry lives, if this instance knows one (for inspection)."""
        self._opened.check()
        root = Digest.coerce(root)
        with self._mu:
            return self._disk.entries / root.key if self._index.get(root.key) else None

    def drain(self) -> None:
        """Waits for the background deleter (tests and benchmarks)."""
        self._opened.check()
        self._trasher.drain()

    def materialize(
        self,
        root: Digest | str,
        dest: str | os.PathLike[str],
        *,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> CacheResult:
        """Makes ``dest`` (which must not exist) a copy of ``root``'s tree (a ``Digest`` or
        ``"hash/size"``) via the cache.

        ``progress`` gets :class:`~fastmat.control.Progress` reports at a bounded rate:
        a miss's construction ("materialize"), then the copy into ``dest`` ("replay").
        ``cancel`` (e.g. a ``threading.Event``) stops the call soon after it is set, also
        while it waits for another thread's or process's construction of the same tree:
        :class:`~fastmat.control.Cancelled`, nothing at ``dest``, no entry half-built.
        """
        self._opened.check()
        root = Digest.coerce(root)
        t0 = time.perf_counter()
        dest = Path(dest)
        check_cancel(cancel, f"cache materialize of {root}")
        if self.limits.max_entries == 0:
            st = self._builder.direct(root, dest, progress=progress, cancel=cancel)
            self._count("misses")
            dt = time.perf_counter() - t0
            return CacheResult(False, "materialize", st.bytes, st.files, dt, 0.0, dt)
        damaged: str | None = None
        rebuilt = False
        for _ in range(_RETRIES):
            e, hit = self._acquire(root, damaged, progress, cancel)
            if hit:
                entry.touch(self._entries_fd, e.key)
            t1 = time.perf_counter()
            try:
                if hit:
                    self._refuse_quarantined(e)
                c = replay.clone(
                    self._disk,
                    e,
                    dest,
                    threads=self.threads,
                    max_inflight=self.max_inflight,
                    fsync=self._builder.fsync,
                    progress=progress,
                    cancel=cancel,
                )
            except Damaged as d:
                damaged = self._invalidate(e, d)
                rebuilt = rebuilt or not d.stale  # a stale one was merely replaced
                continue
            finally:
                self._release(e)
            if hit:
                self._count(c.method)
            if c.fell_back:
                self._count("fallbacks", c.fell_back)
            if c.rotated:
                self._count("rotations", c.rotated)
            t2 = time.perf_counter()
            return CacheResult(hit, c.method, e.bytes, e.files, t1 - t0, t2 - t1, t2 - t0, rebuilt)
        raise FastmatError(f"cache entry for {root} keeps failing its checks")

    @contextlib.contextmanager
    def workspace(
        self,
        root: Digest | str,
        dest: str | os.PathLike[str],
        *,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[Workspace]:
        """``dest`` holds ``root``'s tree for the ``with`` body, then is removed.

        An overlay mount of the (pinned) entry where this process can mount, else a
        hardlinked copy; the yielded ``Workspace.method`` says which. Only the overlay
        protects the CAS from an action running as the worker's user that chmods an
        input (a hardlinked input is the CAS inode; read-only, but its owner may chmod).
        ``progress`` and ``cancel`` apply to making the workspace (see :meth:`materialize`),
        not to the ``with`` body.
        """
        self._opened.check()
        root = Digest.coerce(root)
        dest = Path(dest)
        mounted = None
        if self.limits.max_entries and self.can_overlay():
            mounted = self._mount(root, dest, progress, cancel)
        if mounted is None:
            r = self.materialize(root, dest, progress=progress, cancel=cancel)
            if self.limits.max_entries:
                self._count("fallbacks")
            try:
                yield Workspace(dest, r.method, root, r.hit)
            finally:
                with contextlib.suppress(FileNotFoundError):  # the action removed it
                    _binding.remove_tree(dest)
            return
        e, hit, ws, rec = mounted
        try:
            yield Workspace(dest, "overlay", root, hit, ws / "upper")
        finally:
            try:
                gone = workspace.unmount(dest, ws, self._disk.trash)
                mounts.forget(self._mounts_fd, rec)  # kept if unmounting failed: a later sweep
                if gone is not None:
                    self._trasher.put(gone)
            finally:
                self._release(e)

    # -- pinning, single-flight, eviction ----------------------------------------

    def _count(self, what: str, n: int = 1) -> None:
        self._n.add(what, n)

    def _acquire(
        self,
        root: Digest,
        damaged: str | None,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> tuple[Entry, bool]:
        """A pinned entry for ``root`` and whether it was a hit (else constructed)."""
        key = root.key
        build = functools.partial(self._builder.build, progress=progress, cancel=cancel)
        while True:
            with self._mu:
                e = self._index.get(key)
                if e is not None and damaged != e.ident:
                    if self._pin_locked(e):
                        self._index.touch(e)
                        self._n.add("hits")
                        return e, True
                    self._index.remove(e)  # another process is evicting or rebuilding it
                flight = self._flights.get(key)
                owner = flight is None
                if flight is None:
                    flight = self._flights[key] = Flight()
            if not owner:
                try:
                    flight.wait(cancel)
                except Cancelled:
                    if cancel is not None and cancel.is_set():
                        raise
                    # the constructor was cancelled, not this caller: build it here
                continue
            try:
                e, built = protocol.acquire(self._disk, root, damaged, build, cancel)
            except BaseException as exc:
                with self._mu:
                    del self._flights[key]
                flight.fail(exc)
                raise
            with self._mu:
                self._index.insert(e)
                self._index.touch(e)
                self._n.add("constructions" if built else "adopted")
                self._n.add("misses" if built else "hits")
                self._evict_locked()
                del self._flights[key]
            flight.done()
            return e, not built

    def _pin_locked(self, e: Entry) -> bool:
        if e.pins == 0:
            fd = protocol.try_pin(self._disk, e.key)
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
        self._n.add("evictions", protocol.evict(self._index, self._disk))

    def _invalidate(self, e: Entry, d: Damaged) -> str:
        log.warning("cache entry %s invalid (%s): rebuilding", e.key, d)
        with self._mu:
            self._index.remove(e)
            self._n.add("stale" if d.stale else "damaged")
        return e.ident

    def _refuse_quarantined(self, e: Entry) -> None:
        """Raises ``Damaged`` if the (pinned) entry links an inode that verify moved to
        the CAS's quarantine: one stat per hit, one lstat pass per entry and change of
        the quarantine (:mod:`.verify`)."""
        gen, bad = self._watch.current()
        if not bad or e.quarantine_checked == gen:
            return
        fd = verify.open_dir(self._entries_fd, e.key)
        if fd is None:
            return  # gone: the replay's checks say so
        try:
            if entry.read_ident(self._entries_fd, e.key) != e.ident:
                return  # replaced: likewise
            if e.replay is None:
                try:
                    e.replay = entry.load(self._entries_fd, e.key)
                except entry.SidecarError:
                    return  # likewise
            where = verify.links_quarantined(e.replay, fd, bad)
        finally:
            os.close(fd)
        if where is not None:
            raise Damaged(f"{where}: links a blob verify quarantined")
        e.quarantine_checked = gen

    def verify(
        self, *, progress: ProgressFn | None = None, cancel: CancelToken | None = None
    ) -> CacheVerifyReport:
        """Verifies the CAS (``LocalCAS.verify``: damaged blobs are quarantined), then
        every entry on disk (:func:`.verify.check_entry`: no quarantined inode, CAS
        inodes where the tree links the CAS, private files hashed against their
        digests); a bad entry is invalidated, or reported ``busy`` while another
        process uses it. Slow: reads every private file and stats every entry file.
        ``progress``: the CAS's bytes hashed ("verify"), then the entries checked
        ("verify entries"); ``cancel`` stops it between files (``Cancelled``)."""
        self._opened.check()
        t0 = time.monotonic()
        report = CacheVerifyReport(self.cas.verify(progress=stopping(progress, cancel)))
        bad = frozenset(q.ino for q in self.cas.quarantined())
        keys = protocol.complete_keys(self._disk)
        reporter = Reporter(progress, "verify entries", len(keys), "entries")
        for key in keys:
            check_cancel(cancel, f"verify of the cache {self.path}")
            reporter.set(report.entries_checked)
            fd = verify.open_dir(self._entries_fd, key)
            if fd is None:
                continue  # evicted meanwhile
            try:
                try:
                    r = entry.load(self._entries_fd, key)
                except entry.SidecarError as err:
                    problem: str | None = f"sidecar: {err}"
                else:
                    c = verify.check_entry(self.cas, r, fd, bad, self._builder.limits)
                    report.files_checked += c.files
                    report.files_hashed += c.hashed
                    problem = c.problem
            finally:
                os.close(fd)
            report.entries_checked += 1
            if problem is not None:
                self._invalidate_bad(key, problem, report)
        reporter.set(len(keys))
        reporter.finish()
        report.duration_s = time.monotonic() - t0
        log.info(
            "cache %s verified: %d entries, %d files (%d hashed), %d invalidated, %d busy",
            self.path,
            report.entries_checked,
            report.files_checked,
            report.files_hashed,
            len(report.invalidated),
            len(report.busy),
        )
        return report

    def _invalidate_bad(self, key: str, problem: str, report: CacheVerifyReport) -> None:
        log.warning("cache entry %s failed verification: %s", key, problem)
        with self._mu:
            if not protocol.invalidate(self._disk, key):
                report.busy.append((key, problem))
                return
            e = self._index.get(key)
            if e is not None:
                self._index.remove(e)
            self._n.add("damaged")
        report.invalidated.append((key, problem))

    def gc(
        self,
        max_bytes: int | None = None,
        *,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> CacheStats:
        """Evicts unpinned entries (in policy order) until the entries this instance
        knows hold at most ``max_bytes`` (None: only its own bounds), then waits until
        the background deleter has deleted everything trashed: those entries, and what
        opening found (dead instances' scratch, orphans, dead workspaces' upper layers).
        Returns the statistics after. ``progress``: trashed trees deleted of those queued
        ("gc", "items"); ``cancel`` ends the wait (``Cancelled``): what is not deleted yet
        stays in the trash, and the next opener of the cache deletes it."""
        self._opened.check()
        check_cancel(cancel, f"gc of the cache {self.path}")
        if max_bytes is not None:
            with self._mu:
                own = self._index.limits
                self._index.limits = Limits(
                    min(max_bytes, own.max_bytes), own.max_entries, own.policy
                )
                try:
                    self._evict_locked()
                finally:
                    self._index.limits = own
        reporter = Reporter(progress, "gc", None, "items")

        def report(done: int, total: int) -> None:
            reporter.total = total
            reporter.set(done)

        stop = cancel.is_set if cancel is not None else None
        if not self._trasher.drain(report=report, stop=stop):
            left = self._trasher.abandon()
            raise Cancelled(f"gc of the cache {self.path} cancelled ({left} left in its trash)")
        reporter.finish()
        return self.stats()

    def can_overlay(self) -> bool:
        """Whether workspaces mount overlays here (probed once, for real)."""
        self._opened.check()
        if self.overlay is None:
            self.overlay = workspace.probe(self._tmp) and workspace.usable_path(self._disk.entries)
        return self.overlay

    def _record(self, into: list[str], key: str, dest: Path, ws_name: str) -> None:
        into.append(mounts.record(self._mounts_fd, self._owned.name, key, ws_name, dest))

    def _mount(
        self,
        root: Digest,
        dest: Path,
        progress: ProgressFn | None,
        cancel: CancelToken | None,
    ) -> tuple[Entry, bool, Path, str] | None:
        """The pinned entry, hit, scratch dir and mount record of an overlay now mounted
        at ``dest``; None if the mount itself failed (the caller falls back to a
        hardlinked copy)."""
        damaged: str | None = None
        for _ in range(_RETRIES):
            e, hit = self._acquire(root, damaged, progress, cancel)
            recs: list[str] = []
            rec = functools.partial(self._record, recs, e.key, dest)
            try:
                if hit:
                    self._refuse_quarantined(e)
                os.close(replay.open_entry(self._disk, e))
                ws = workspace.mount(self._disk.entries / e.key, self._tmp, dest, rec)
            except Damaged as d:
                self._release(e)
                damaged = self._invalidate(e, d)
                continue
            except OSError as err:
                for r in recs:
                    mounts.forget(self._mounts_fd, r)
                self._release(e)
                if err.errno in _DEST_ERRORS and err.filename in (str(dest), dest):
                    raise  # about dest itself: the caller's problem, not the overlay's
                log.warning("overlay workspace at %s failed (%s): hardlinking instead", dest, err)
                return None
            except BaseException:
                for r in recs:
                    mounts.forget(self._mounts_fd, r)
                self._release(e)
                raise
            if hit:
                entry.touch(self._entries_fd, e.key)
                self._count("overlay")
            return e, hit, ws, recs[0]
        raise FastmatError(f"cache entry for {root} keeps failing its checks")
