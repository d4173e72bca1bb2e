"""Fetching what a tree needs from a remote CAS, and the streaming fetch -> link pipeline.

:class:`RemoteFetcher` binds a :class:`~fastmat.remote.RemoteCAS` to a
:class:`~fastmat.cas.LocalCAS` and implements the ``fastmat.tree.Fetcher``
protocol:

- ``fetch_directories(root)``: GetTree when the root is absent (the server's
  answer is hashed message by message; only messages reachable from ``root``
  by digest are kept), then level by level with BatchReadBlobs for whatever is
  still missing. Every message is verified against its digest before it is
  stored.
- ``fetch_blobs(digests, on_ready=...)``: each distinct digest once; small
  blobs packed into BatchReadBlobs requests under the server's batch limit,
  large ones streamed (ByteStream.Read) into a CAS temp while hashed; every
  byte verified before it is published; at most ``max_inflight`` requests in
  flight per fetcher. Before fetching a blob a worker takes its per-digest
  lock (:class:`_FetchLocks`) without waiting; a blob locked by another
  process is waited for by one waiter thread and only fetched if that process
  gave up. So processes sharing a CAS fetch each blob once (DESIGN.md
  invariant 8). ``on_ready`` receives blobs as they land (a streamed blob
  alone, a batch's blobs 32 at a time).

:func:`run_pipelined` is ``materialize.run_plan`` with fetching overlapped:
directories and already-present files are linked first, then each fetched
group is linked (``exec_plan(dirs_exist=True)`` on a sub-plan) while the
other fetches continue.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import queue
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastmat import proto
from fastmat.digest import Digest
from fastmat.errors import BlobNotFoundError, DigestMismatchError, InvalidDigestError
from fastmat.plan import OP_COPY, OP_LINK, Plan, blob_digest

if TYPE_CHECKING:
    from fastmat import _binding
    from fastmat.cas import LocalCAS
    from fastmat.remote import RemoteCAS
    from fastmat.tree import TreeLimits

__all__ = [
    "DEFAULT_MAX_INFLIGHT",
    "FetchStats",
    "RemoteFetcher",
    "bind",
    "materialize_remote",
    "run_pipelined",
]

log = logging.getLogger("fastmat")

DEFAULT_MAX_INFLIGHT = 128
_LOCK_OPEN = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 0)  # Linux >= 3.15; 0: absent
_OFD_SETLKW: int = getattr(fcntl, "F_OFD_SETLKW", 0)
_READY_GROUP = 32  # blobs of a batch handed to the linker together
_MAX_DIRECTORIES = 10_000_000  # a hostile tree cannot make the BFS run forever

OnReady = Callable[[list[Digest]], None]


@dataclass
class FetchStats:
    """What one fetcher did (cumulative). ``waited``: blobs another process was
    fetching, that this one waited for instead. ``first_link_ns`` /
    ``last_fetch_ns``: ``time.monotonic_ns()`` of the first link call that
    linked fetched files and of the last fetch completion of the last
    ``run_pipelined`` (event order, for tests; not a timing)."""

    directories: int = 0
    get_tree: int = 0
    blobs: int = 0
    bytes: int = 0
    batches: int = 0
    streams: int = 0
    waited: int = 0
    peak_inflight: int = 0
    link_calls: int = 0
    first_link_ns: int = 0
    last_fetch_ns: int = 0


class _Cancelled(Exception):
    pass


class _FetchLocks:
    """Exclusive per-digest fetch locks shared by threads and processes.

    Linux: open-file-description byte-range locks on one file,
    ``<cas>/locks/fetch.ofd``, one byte per digest (offset from its hash; a
    collision only serializes two fetches). Each thread locks through its own
    fd, so threads exclude each other too. Two syscalls per blob, no files
    created. Elsewhere: one flock'ed file per digest, unlinked by its holder
    (the ``fastmat._locks.KeyedLock`` recipe).
    """

    def __init__(self, locks_dir: Path) -> None:
        self._dir_fd = os.open(locks_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._ofd = _OFD_SETLK != 0
        self._local = threading.local()
        self._fds: list[int] = []
        self._mutex = threading.Lock()

    def close(self) -> None:
        with self._mutex:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
            if self._dir_fd >= 0:
                os.close(self._dir_fd)
                self._dir_fd = -1

    def _thread_fd(self) -> int:
        fd: int | None = getattr(self._local, "fd", None)
        if fd is None:
            fd = os.open("fetch.ofd", _LOCK_OPEN, 0o644, dir_fd=self._dir_fd)
            with self._mutex:
                self._fds.append(fd)
            self._local.fd = fd
        return fd

    def release_thread(self) -> None:
        """Closes the calling thread's lock fd (it must hold no lock): worker threads
        call it when they end, so a long-lived fetcher does not pile up fds."""
        fd: int | None = getattr(self._local, "fd", None)
        if fd is not None:
            self._local.fd = None
            with self._mutex:
                if fd in self._fds:
                    self._fds.remove(fd)
                    os.close(fd)

    @staticmethod
    def _range(d: Digest, kind: int) -> bytes:
        # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
        return struct.pack("hhqqi4x", kind, os.SEEK_SET, int(d.hash[:15], 16), 1, 0)

    def try_lock(self, d: Digest) -> int | None:
        """A token for ``unlock``, or None when another thread or process holds it."""
        if self._ofd:
            fd = self._thread_fd()
            try:
                fcntl.fcntl(fd, _OFD_SETLK, self._range(d, fcntl.F_WRLCK))
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    return None
                raise
            return fd
        return self._flock(d, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def wait_lock(self, d: Digest) -> int:
        if self._ofd:
            fd = self._thread_fd()
            fcntl.fcntl(fd, _OFD_SETLKW, self._range(d, fcntl.F_WRLCK))
            return fd
        got = self._flock(d, fcntl.LOCK_EX)
        assert got is not None
        return got

    def unlock(self, d: Digest, token: int) -> None:
        if self._ofd:
            fcntl.fcntl(token, _OFD_SETLK, self._range(d, fcntl.F_UNLCK))
            return
        # Unlink while holding: a process that opened this inode meanwhile sees
        # the mismatch after locking and retries, so lock files never pile up.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{d.key}.fetch", dir_fd=self._dir_fd)
        os.close(token)

    def _flock(self, d: Digest, how: int) -> int | None:
        key = f"{d.key}.fetch"
        while True:
            fd = os.open(key, _LOCK_OPEN, 0o644, dir_fd=self._dir_fd)
            try:
                fcntl.flock(fd, how)
                st = os.fstat(fd)
                now = os.stat(key, dir_fd=self._dir_fd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    return fd
            except BlockingIOError:
                os.close(fd)
                return None
            except FileNotFoundError:
                pass  # its holder unlinked it after we opened it: lock a fresh one
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)


class RemoteFetcher:
    """Fetches from ``remote`` into ``cas``; see the module docstring.

    ``max_inflight``: requests in flight at most (default 128). ``batch_bytes``:
    total size of one BatchReadBlobs (0: the server's limit). Blobs above
    ``stream_threshold_bytes`` (0: a quarter of the batch size) are streamed.
    """

    def __init__(
        self,
        remote: RemoteCAS,
        cas: LocalCAS,
        *,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        batch_bytes: int = 0,
        stream_threshold_bytes: int = 0,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.remote = remote
        self.cas = cas
        self.max_inflight = max_inflight
        self._batch_bytes = batch_bytes
        self._stream_threshold = stream_threshold_bytes
        self.stats = FetchStats()
        self._mutex = threading.Lock()
        self._inflight = 0
        # the bound holds per fetcher, however many fetch_blobs calls run at once
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._locks = _FetchLocks(cas.root / "locks")

    def close(self) -> None:
        self._locks.close()

    def __enter__(self) -> RemoteFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def batch_bytes(self) -> int:
        limit = self.remote.max_batch_bytes
        return min(self._batch_bytes, limit) if self._batch_bytes else limit

    @property
    def stream_threshold_bytes(self) -> int:
        return self._stream_threshold or self.batch_bytes // 4

    def _count(self, **deltas: int) -> None:
        with self._mutex:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    # ---- directories ----

    def _verified(self, d: Digest, data: bytes) -> None:
        actual = Digest.of(data)
        if actual != d:
            raise DigestMismatchError(d, actual, f"Directory from {self.remote.target}")
        self.cas.put(data, expected=d)
        self._count(directories=1)

    def fetch_directories(self, root: Digest) -> None:
        """Stores every ``Directory`` of the tree under ``root`` that ``cas`` lacks.

        Absent and undecodable messages and bad child digests are left for
        ``load_plan`` to report, with their path; ``DigestMismatchError`` and
        ``RemoteError`` propagate.
        """
        known: dict[Digest, bytes] = {}
        if root not in self.cas:
            with contextlib.suppress(BlobNotFoundError):  # load_plan names it
                for raw in self.remote.get_tree(root) or ():
                    known[Digest.of(raw)] = raw
            if known:
                self._count(get_tree=1)
        seen = {root}
        level = [root]
        while level:
            data: dict[Digest, bytes] = {}
            absent = []
            for d in level:
                if d in self.cas:
                    data[d] = self.cas.read(d)
                elif d in known:
                    self._verified(d, known[d])  # hashed above: stored under its own hash
                    data[d] = known[d]
                else:
                    absent.append(d)
            for d, blob in self.remote.read_blobs(absent, missing_ok=True):
                self._verified(d, blob)
                data[d] = blob
            nxt: list[Digest] = []
            for d in level:
                try:
                    msg = proto.Directory.FromString(data[d])
                    children = [Digest(c.digest.hash, c.digest.size_bytes) for c in msg.directories]
                except (proto.DecodeError, InvalidDigestError, KeyError):
                    continue  # load_plan reports it, with the path
                for c in children:
                    if c not in seen and len(seen) < _MAX_DIRECTORIES:
                        seen.add(c)
                        nxt.append(c)
            level = nxt

    # ---- file blobs ----

    def _plan_items(self, digests: Iterable[Digest]) -> list[tuple[bool, list[Digest]]]:
        """(streamed?, digests) work items: large blobs alone, small ones in batches."""
        todo = [d for d in dict.fromkeys(digests) if d.size_bytes > 0]
        threshold = self.stream_threshold_bytes
        large = [d for d in todo if d.size_bytes > threshold]
        small = [d for d in todo if d.size_bytes <= threshold]
        items: list[tuple[bool, list[Digest]]] = [(True, [d]) for d in large]
        limit = self.batch_bytes
        batch: list[Digest] = []
        total = 0
        for d in small:
            cost = d.size_bytes + 100
            if batch and total + cost > limit:
                items.append((False, batch))
                batch, total = [], 0
            batch.append(d)
            total += cost
        if batch:
            items.append((False, batch))
        return items

    def _fetch(self, streamed: bool, ds: list[Digest], stored: OnReady | None = None) -> None:
        """One request (its in-flight slot held): stream one blob or read one batch.
        ``stored`` gets the blobs as they land, a few at a time."""
        with self._slots:
            self._fetch_in_slot(streamed, ds, stored or (lambda _: None))

    def _fetch_in_slot(self, streamed: bool, ds: list[Digest], stored: OnReady) -> None:
        with self._mutex:
            self._inflight += 1
            self.stats.peak_inflight = max(self.stats.peak_inflight, self._inflight)
        try:
            if streamed:
                (d,) = ds
                try:
                    self.cas.put_stream(self.remote.read_stream(d), d)
                except DigestMismatchError as e:
                    raise DigestMismatchError(d, e.actual, f"from {self.remote.target}") from e
                self._count(blobs=1, bytes=d.size_bytes, streams=1)
                stored([d])
                return
            first: BaseException | None = None
            group: list[Digest] = []
            for d, data in self.remote.read_batch(ds):
                try:
                    self.cas.put(data, expected=d)  # hashes, stores nothing on mismatch
                except DigestMismatchError as e:
                    first = first or DigestMismatchError(d, e.actual, f"from {self.remote.target}")
                    continue
                group.append(d)
                if len(group) == _READY_GROUP:
                    stored(group)
                    group = []
            self._count(blobs=len(ds), bytes=sum(d.size_bytes for d in ds), batches=1)
            if first is not None:
                raise first
            if group:
                stored(group)
        finally:
            with self._mutex:
                self._inflight -= 1

    def fetch_blobs(
        self,
        digests: Sequence[Digest],
        *,
        on_ready: OnReady | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Stores the given file blobs (see the module docstring).

        Raises the first failure once the requests in flight have ended:
        ``BlobNotFoundError`` (digest only), ``DigestMismatchError`` (nothing
        stored for that blob), ``RemoteError``. Setting ``cancel`` stops it early
        (no new requests).
        """
        items = self._plan_items(digests)
        if items:
            _Job(self, items, on_ready, cancel or threading.Event()).run()


class _Job:
    """One ``fetch_blobs`` call: worker threads (one request each at a time), plus one
    thread waiting on the blobs other processes are fetching."""

    def __init__(
        self,
        fetcher: RemoteFetcher,
        items: list[tuple[bool, list[Digest]]],
        on_ready: OnReady | None,
        cancel: threading.Event,
    ) -> None:
        self.f = fetcher
        self.items = items
        self.on_ready = on_ready
        self.cancel = cancel
        self.work: queue.SimpleQueue[tuple[bool, list[Digest]] | None] = queue.SimpleQueue()
        self.deferred: queue.SimpleQueue[Digest | None] = queue.SimpleQueue()
        self.done = threading.Condition()
        self.pending = len(items)  # items queued or running + digests deferred
        self.errors: list[BaseException] = []

    def add(self, n: int) -> None:
        with self.done:
            self.pending += n
            if self.pending == 0:
                self.done.notify_all()

    def fail(self, e: BaseException) -> None:
        with self.done:
            self.errors.append(e)
        self.cancel.set()

    def run(self) -> None:
        n_threads = min(self.f.max_inflight, len(self.items))
        threads = [
            threading.Thread(target=self.worker, name="fastmat-fetch", daemon=True)
            for _ in range(n_threads)
        ]
        threads.append(threading.Thread(target=self.waiter, name="fastmat-wait", daemon=True))
        for item in self.items:
            self.work.put(item)
        for t in threads:
            t.start()
        with self.done:
            self.done.wait_for(lambda: self.pending == 0)
        for _ in range(n_threads):
            self.work.put(None)
        self.deferred.put(None)
        for t in threads:
            t.join()
        if self.errors:
            raise self.errors[0]
        if self.cancel.is_set():
            raise _Cancelled

    def worker(self) -> None:
        while (item := self.work.get()) is not None:
            try:
                if not self.cancel.is_set():
                    self.fetch(*item)
            except BaseException as e:  # re-raised by run()
                self.fail(e)
            finally:
                self.add(-1)
        self.f._locks.release_thread()

    def fetch(self, streamed: bool, ds: list[Digest]) -> None:
        f = self.f
        held: list[tuple[Digest, int]] = []
        mine: list[Digest] = []
        ready: list[Digest] = []
        try:
            for d in ds:
                fd = f._locks.try_lock(d)
                if fd is None:  # another process is fetching it: wait, do not fetch
                    self.add(1)
                    self.deferred.put(d)
                    continue
                held.append((d, fd))
                (ready if d in f.cas else mine).append(d)
            if ready and self.on_ready is not None:
                self.on_ready(ready)
            if mine:
                f._fetch(streamed, mine, self.on_ready)
        finally:
            for d, fd in held:
                f._locks.unlock(d, fd)

    def waiter(self) -> None:
        f = self.f
        while (d := self.deferred.get()) is not None:
            try:
                if self.cancel.is_set():
                    continue
                fd = f._locks.wait_lock(d)
                present = d in f.cas
                f._locks.unlock(d, fd)
                if present:
                    f._count(waited=1)
                    if self.on_ready is not None:
                        self.on_ready([d])
                else:  # the other process gave up: fetch it here
                    self.add(1)
                    self.work.put((d.size_bytes > f.stream_threshold_bytes, [d]))
            except BaseException as e:  # re-raised by run()
                self.fail(e)
            finally:
                self.add(-1)
        f._locks.release_thread()


class _Linker:
    """Links the entries of a plan group by group as their blobs arrive."""

    def __init__(
        self, cas: LocalCAS, plan: Plan, dest: str, dest_fd: int, *, threads: int, inflight: int
    ) -> None:
        from fastmat import _binding

        self.b = _binding
        self.dest = dest
        self.cas = cas
        self.plan = plan
        self.dest_fd = dest_fd
        self.threads = threads
        self.inflight = inflight
        a = plan.arrays
        n = len(a.op)
        self.names = [x + b"\0" for x in a.names.split(b"\0")[:n]]
        srcs = a.srcs.split(b"\0")[:n]
        self.srcs = [x + b"\0" for x in srcs]
        self.dir_names = [x + b"\0" for x in a.dir_names.split(b"\0")[: len(a.dir_parent)]]
        self.by_digest: dict[Digest, list[int]] = {}
        self.exec_digests = set(plan.exec_digests)
        self.no_blob: list[int] = []
        for i, op in enumerate(a.op):
            if op in (OP_LINK, OP_COPY) and srcs[i]:
                self.by_digest.setdefault(blob_digest(srcs[i]), []).append(i)
            else:
                self.no_blob.append(i)
        self.status = array("i", [-errno.ECANCELED]) * n
        self.how = bytearray(n)
        self.dir_status = array("i", [0]) * len(a.dir_parent)
        self.rc = 0

    def sub_arrays(self, idx: list[int], all_dirs: bool) -> _binding.PlanArrays:
        """Entries ``idx`` (sorted) with the directories they need (all when first)."""
        a = self.plan.arrays
        if all_dirs:
            dirs = list(range(len(a.dir_parent)))
        else:
            need: set[int] = {0}
            for i in idx:
                d = a.entry_dir[i]
                while d not in need:
                    need.add(d)
                    d = a.dir_parent[d]
            dirs = sorted(need)
        remap = {d: k for k, d in enumerate(dirs)}
        return self.b.PlanArrays(
            dir_parent=array("i", [-1] + [remap[a.dir_parent[d]] for d in dirs[1:]]),
            dir_names=b"".join(self.dir_names[d] for d in dirs),
            op=bytes(a.op[i] for i in idx),
            entry_dir=array("i", [remap[a.entry_dir[i]] for i in idx]),
            mode=array("I", [a.mode[i] for i in idx]),
            mtime_ns=None if a.mtime_ns is None else array("q", [a.mtime_ns[i] for i in idx]),
            names=b"".join(self.names[i] for i in idx),
            srcs=b"".join(self.srcs[i] for i in idx),
            dir_mode=a.dir_mode,
        )

    def link(self, idx: list[int], first: bool) -> None:
        idx.sort()
        sub = self.sub_arrays(idx, first)
        res = self.b.exec_plan(
            self.dest_fd,
            self.cas.root_fd,
            sub,
            threads=self.threads,
            max_inflight=self.inflight,
            dirs_exist=not first,
            tmp_dirfd=self.cas.tmp_fd,
        )
        if first:
            self.dir_status = res.dir_status
        for k, i in enumerate(idx):
            self.status[i] = res.status[k]
            self.how[i] = res.how[k]
        if res.rc != 0:
            self.rc = res.rc
            raise self.failure(res, idx, first)

    def failure(self, res: _binding.ExecResult, idx: list[int], first: bool) -> OSError:
        rel = ""
        if first and any(rc < 0 for rc in res.dir_status):
            rel = self.plan.path_of_dir(next(d for d, rc in enumerate(res.dir_status) if rc < 0))
        else:
            for k, i in enumerate(idx):
                if res.status[k] < 0 and res.status[k] != -errno.ECANCELED:
                    rel = self.plan.path_of_entry(i)
                    break
        err = -res.rc
        full = os.path.join(self.dest, rel) if rel else self.dest
        return OSError(err, f"{os.strerror(err)} (materializing {rel or '.'!r})", full)

    def result(self) -> _binding.ExecResult:
        return self.b.ExecResult(
            rc=self.rc, status=self.status, how=bytes(self.how), dir_status=self.dir_status
        )


def run_pipelined(
    cas: LocalCAS,
    plan: Plan,
    dest: str | os.PathLike[str],
    fetcher: RemoteFetcher,
    *,
    threads: int = 0,
    max_inflight: int = 64,
) -> _binding.ExecResult:
    """``materialize.run_plan`` with the missing blobs fetched while linking.

    Creates ``dest`` (0755; it must not exist), links every directory and every
    entry whose blob is already local, then links each group of fetched blobs as
    it lands. On any failure the fetches are cancelled, ``dest`` is removed and
    the error raised: ``BlobNotFoundError`` / ``DigestMismatchError`` naming the
    digest and its path in the tree, ``RemoteError``, or the ``OSError`` of the
    first entry that failed. Returns the merged per-entry result.
    """
    from fastmat import _binding

    path = os.fspath(dest)
    os.mkdir(path, 0o755)
    cancel = threading.Event()
    fetch_thread: threading.Thread | None = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o755)
            linker = _Linker(cas, plan, path, fd, threads=threads, inflight=max_inflight)
            missing = set(cas.missing(linker.by_digest))
            ready_q: queue.SimpleQueue[list[Digest] | None] = queue.SimpleQueue()
            errors: list[BaseException] = []

            def on_ready(ds: list[Digest]) -> None:  # runs on the fetch workers
                fetcher.stats.last_fetch_ns = time.monotonic_ns()
                # executable variants made here, in parallel, not on the linker thread
                cas.ensure_executables(d for d in ds if d in linker.exec_digests)
                ready_q.put(ds)

            def fetch() -> None:
                try:
                    fetcher.fetch_blobs(sorted(missing, key=str), on_ready=on_ready, cancel=cancel)
                except _Cancelled:
                    pass
                except BaseException as e:  # re-raised below
                    errors.append(e)
                finally:
                    ready_q.put(None)

            fetch_thread = threading.Thread(target=fetch, name="fastmat-fetcher", daemon=True)
            fetch_thread.start()
            present = [d for d in linker.by_digest if d not in missing]
            cas.ensure_executables(d for d in present if d in linker.exec_digests)
            idx = list(linker.no_blob)
            for d in present:
                idx.extend(linker.by_digest[d])
            linker.link(idx, first=True)
            first_fetched = True
            while (ds := ready_q.get()) is not None:
                batch = list(ds)
                with contextlib.suppress(queue.Empty):
                    while True:  # coalesce what arrived while the last call ran
                        more = ready_q.get_nowait()
                        if more is None:
                            ready_q.put(None)
                            break
                        batch.extend(more)
                idx = [i for d in batch for i in linker.by_digest[d]]
                linker.link(idx, first=False)
                fetcher.stats.link_calls += 1
                if first_fetched:
                    fetcher.stats.first_link_ns = time.monotonic_ns()
                    first_fetched = False
            fetch_thread.join()
            if errors:
                raise _with_path(errors[0], plan, linker) from errors[0]
            log.debug(
                "pipelined %s: %d blobs fetched, %d link calls",
                plan.root,
                len(missing),
                fetcher.stats.link_calls,
            )
        finally:
            os.close(fd)
    except BaseException:
        cancel.set()
        if fetch_thread is not None:
            fetch_thread.join()
        _binding.remove_tree(path)
        raise
    return linker.result()


def bind(fetcher: Any, cas: LocalCAS) -> Any:
    """What ``materialize`` / ``DirectoryCache`` should use for ``fetcher``: a
    ``RemoteCAS`` becomes a ``RemoteFetcher`` into ``cas``; anything else is
    returned unchanged (a ``RemoteFetcher``, another ``Fetcher``, None)."""
    from fastmat.remote import RemoteCAS

    return RemoteFetcher(fetcher, cas) if isinstance(fetcher, RemoteCAS) else fetcher


def materialize_remote(
    cas: LocalCAS,
    root: Digest,
    dest: str | os.PathLike[str],
    fetcher: RemoteFetcher,
    *,
    threads: int = 0,
    max_inflight: int = 64,
    limits: TreeLimits | None = None,
) -> _binding.ExecResult:
    """Loads the tree (fetching missing directories), then :func:`run_pipelined`.
    ``dest`` must not exist; it is never left behind on failure."""
    from fastmat.tree import load_plan

    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, "materialize destination exists", os.fspath(dest))
    plan = load_plan(cas, root, fetcher=fetcher, limits=limits)
    return run_pipelined(cas, plan, dest, fetcher, threads=threads, max_inflight=max_inflight)


def _with_path(e: BaseException, plan: Plan, linker: _Linker) -> BaseException:
    """The error with the tree path of its digest, when it names one."""
    if isinstance(e, BlobNotFoundError) and e.path is None and e.digest in linker.by_digest:
        where = plan.path_of_entry(linker.by_digest[e.digest][0])
        return BlobNotFoundError(e.digest, where)
    if isinstance(e, DigestMismatchError) and e.expected in linker.by_digest:
        where = plan.path_of_entry(linker.by_digest[e.expected][0])
        return DigestMismatchError(e.expected, e.actual, f"{e.where}, needed at {where!r}")
    return e
