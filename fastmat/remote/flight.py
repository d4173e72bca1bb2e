"""Single-flight fetching of blobs: per-digest locks shared by threads and
processes (:class:`FetchLocks`) and the worker threads of one
``RemoteFetcher.fetch_blobs`` call (:class:`FetchJob`).

Before fetching a blob a worker takes its per-digest lock without waiting; a
blob locked by another process is waited for by one waiter thread and only
fetched if that process gave up. So processes sharing a CAS fetch each blob
once (invariant 8).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from fastmat.control import Cancelled
from fastmat.digest import Digest
from fastmat.errors import LockTimeoutError
from fastmat.fs import locks
from fastmat.fs.locks import DEFAULT_LOCK_TIMEOUT_S, LOCK_MODE, open_lock

__all__ = ["FetchHost", "FetchJob", "FetchLocks", "OnReady"]

_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 0)  # Linux >= 3.15; 0: absent
_DIR_PATH = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC  # macOS: no O_PATH

OnReady = Callable[[list[Digest]], None]


class FetchLocks:
    """Exclusive per-digest fetch locks shared by threads and processes.

    Linux: open-file-description byte-range locks on one file,
    ``<cas>/locks/fetch.ofd``, one byte per digest (offset from its hash; a
    collision only serializes two fetches). Each thread locks through its own
    fd, so threads exclude each other too. Two syscalls per blob, no files
    created. Elsewhere: one flock'ed file per digest, unlinked by its holder
    (the ``fastmat.fs.locks.KeyedLock`` recipe). Lock files are created with
    ``mode`` (the CAS's: 0600, or 0660 for a shared group), and ``fetch.ofd``, which
    outlives its creator, is brought to that mode when this process owns it.
    :meth:`wait_lock` waits up to ``timeout_s`` (LockTimeoutError).
    """

    def __init__(
        self,
        locks_dir: Path,
        *,
        mode: int = LOCK_MODE,
        timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        self._mode = mode
        self._timeout_s = timeout_s
        self._dir_fd = os.open(locks_dir, _DIR_PATH)
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

    @property
    def open_fds(self) -> int:
        """Lock fds currently open (one per thread that locked and has not released)."""
        with self._mutex:
            return len(self._fds)

    def _thread_fd(self) -> int:
        fd: int | None = getattr(self._local, "fd", None)
        if fd is None:
            fd = open_lock(self._dir_fd, "fetch.ofd", self._mode)
            try:
                st = os.fstat(fd)
                if st.st_mode & 0o777 != self._mode and st.st_uid == os.geteuid():
                    os.fchmod(fd, self._mode)  # an older fastmat's, 0644: anyone could lock
            except BaseException:
                os.close(fd)
                raise
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
            return fd if self._ofd_try(fd, d) else None
        return locks.lock_file(self._dir_fd, f"{d.key}.fetch", fcntl.LOCK_EX, mode=self._mode)

    def wait_lock(self, d: Digest) -> int:
        """A token for ``unlock`` once the lock is granted; LockTimeoutError (naming the
        lock and, when /proc tells, its holder) after ``timeout_s``."""
        if not self._ofd:
            return locks.wait_file(
                self._dir_fd,
                f"{d.key}.fetch",
                fcntl.LOCK_EX,
                timeout_s=self._timeout_s,
                mode=self._mode,
            )
        fd = self._thread_fd()
        if not self._ofd_try(fd, d):
            byte = int(d.hash[:15], 16)

            def timed_out() -> LockTimeoutError:
                where = f"{locks.lock_path(self._dir_fd, 'fetch.ofd')} byte {byte} ({d})"
                holder = locks.holder_pid(fd, os.getpid(), byte)
                return LockTimeoutError(where, self._timeout_s, holder)

            deadline = time.monotonic() + self._timeout_s
            locks.wait_until(lambda: self._ofd_try(fd, d), deadline, timed_out)
        return fd

    def _ofd_try(self, fd: int, d: Digest) -> bool:
        try:
            fcntl.fcntl(fd, _OFD_SETLK, self._range(d, fcntl.F_WRLCK))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def unlock(self, d: Digest, token: int) -> None:
        if self._ofd:
            fcntl.fcntl(token, _OFD_SETLK, self._range(d, fcntl.F_UNLCK))
            return
        # Unlink while holding: a process that opened this inode meanwhile sees
        # the mismatch after locking and retries, so lock files never pile up.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{d.key}.fetch", dir_fd=self._dir_fd)
        os.close(token)


class FetchHost(Protocol):
    """What a :class:`FetchJob` needs from its fetcher."""

    locks: FetchLocks
    max_inflight: int

    @property
    def stream_threshold_bytes(self) -> int: ...

    def fetch_item(self, streamed: bool, ds: list[Digest], stored: OnReady | None) -> None:
        """One request: stream one blob or read one batch into the CAS."""

    def present(self, d: Digest) -> bool:
        """Whether the local CAS has ``d``."""

    def count(self, **deltas: int) -> None:
        """Adds to the fetcher's statistics."""


class FetchJob:
    """One ``fetch_blobs`` call: worker threads (one request each at a time), plus one
    thread waiting on the blobs other processes are fetching."""

    def __init__(
        self,
        fetcher: FetchHost,
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
            raise Cancelled("fetch cancelled")

    def worker(self) -> None:
        while (item := self.work.get()) is not None:
            try:
                if not self.cancel.is_set():
                    self.fetch(*item)
            except BaseException as e:  # re-raised by run()
                self.fail(e)
            finally:
                self.add(-1)
        self.f.locks.release_thread()

    def fetch(self, streamed: bool, ds: list[Digest]) -> None:
        f = self.f
        held: list[tuple[Digest, int]] = []
        mine: list[Digest] = []
        ready: list[Digest] = []
        try:
            for d in ds:
                fd = f.locks.try_lock(d)
                if fd is None:  # another process is fetching it: wait, do not fetch
                    self.add(1)
                    self.deferred.put(d)
                    continue
                held.append((d, fd))
                (ready if f.present(d) else mine).append(d)
            if ready and self.on_ready is not None:
                self.on_ready(ready)
            if mine:
                f.fetch_item(streamed, mine, self.on_ready)
        finally:
            for d, fd in held:
                f.locks.unlock(d, fd)

    def waiter(self) -> None:
        f = self.f
        while (d := self.deferred.get()) is not None:
            try:
                if self.cancel.is_set():
                    continue
                fd = f.locks.wait_lock(d)
                present = f.present(d)
                f.locks.unlock(d, fd)
                if present:
                    f.count(waited=1)
                    if self.on_ready is not None:
                        self.on_ready([d])
                else:  # the other process gave up: fetch it here
                    self.add(1)
                    self.work.put((d.size_bytes > f.stream_threshold_bytes, [d]))
            except BaseException as e:  # re-raised by run()
                self.fail(e)
            finally:
                self.add(-1)
        f.locks.release_thread()
