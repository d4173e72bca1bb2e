"""``LocalCAS``: the local content-addressable store, shared by the threads and
processes of a worker.

Layout: :mod:`fastmat.cas.layout`. Everything is built in the instance's own temp
dir (``tmp/<pid>.<rand>/``, flock-owned, swept by later openers once its owner is
dead) and renamed into place without replacing, so a final name only ever holds a
complete, fsync'ed file (invariant 6). A blob's inode is never written, chmod'ed or
utime'd after insertion (invariant 1); executables link a per-digest 0555 variant
built once across threads and processes (invariant 2).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import stat
import threading
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fastmat import _binding
from fastmat.cas import layout
from fastmat.cas.verify import (
    Quarantined,
    VerifyReport,
    quarantine_stamp,
    quarantined,
    verify_cas,
)
from fastmat.control import ProgressFn
from fastmat.digest import BlobNotFoundError, Digest, DigestMismatchError, hash_fd
from fastmat.fs import locks
from fastmat.fs.access import Access
from fastmat.fs.forks import OpenedHere
from fastmat.fs.owned import OwnedDir, sweep_dead

__all__ = ["CASCounters", "LocalCAS"]

log = logging.getLogger("fastmat")

_CHUNK_BYTES = 1 << 20
_RDONLY = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_PATH = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC  # macOS: no O_PATH
_NO_REFLINK = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ELOOP})
_MAX_PARALLEL_VARIANTS = 8
_VARIANT_ATTEMPTS = 4


@dataclass
class CASCounters:
    """What this instance did since it was opened (thread-safe snapshot via ``counters``)."""

    blobs_written: int = 0  # blobs this instance published
    blobs_present: int = 0  # puts that found the blob already there (or lost the race)
    bytes_written: int = 0
    reflinked_files: int = 0  # put_file calls served by a reflink
    copied_files: int = 0  # put_file calls that streamed the bytes
    exec_variants_built: int = 0  # variant constructions (published or not: single-flight
    # across threads and processes makes this one per digest over all instances)
    exec_variants_rebuilt: int = 0  # extra inodes: a forked child kept the first writable
    temp_dirs_swept: int = 0  # dead owners' temp dirs removed at open


def _release(owned: OwnedDir, tmp_parent_fd: int, fds: list[int], pid: int) -> None:
    try:
        if os.getpid() == pid:
            owned.release(tmp_parent_fd)
        else:  # a forked child: the temp dir (and the flock, shared) belong to the parent
            os.close(owned.fd)
            os.close(owned.lock_fd)
    finally:
        for fd in fds:
            os.close(fd)


def _read_chunks(fd: int) -> Iterable[bytes]:
    while chunk := os.read(fd, _CHUNK_BYTES):
        yield chunk


class LocalCAS:
    """A local CAS directory; see the module docstring. Thread- and multi-process-safe.

    ``fsync=False`` skips every fsync (faster, not crash-safe). A new root is private
    (0700, lock files 0600); ``group`` (a name or gid) shares it with that group's
    members instead (2770 and group-owned, lock files 0660): see
    :mod:`fastmat.fs.access`. ``lock_timeout_s`` bounds every wait for a lock another
    thread or process holds (a variant being built, a blob being fetched): then
    ``LockTimeoutError`` names the lock and its holder. ``create=False`` opens only an
    existing CAS (else ``FileNotFoundError`` naming ``path``, and nothing is created).

    Open it after fork: an instance belongs to the process that opened it, and any use
    in a forked child (but ``close``) raises ``FastmatError``. Processes share a CAS by
    each opening it.
    """

    exec_writers_timeout_s: float = 2.0  # see _build_variant

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = True,
        group: str | int | None = None,
        lock_timeout_s: float = locks.DEFAULT_LOCK_TIMEOUT_S,
        create: bool = True,
    ) -> None:
        self.root = Path(path).absolute()
        if not create and not layout.exists(self.root):
            raise FileNotFoundError(errno.ENOENT, "no CAS here", str(self.root))
        self._fsync = fsync
        self.lock_timeout_s = lock_timeout_s
        self.access = Access.of(group)
        layout.create(self.root, self.access)
        self._opened = OpenedHere(f"LocalCAS {self.root}")
        self._root_fd = os.open(self.root, _DIR_PATH)
        fds = [self._root_fd]
        try:
            self._tmp_parent_fd = os.open(layout.TMP, _DIR, dir_fd=self.root_fd)
            fds.append(self._tmp_parent_fd)
            self._locks_fd = os.open(layout.LOCKS, _DIR_PATH, dir_fd=self.root_fd)
            fds.append(self._locks_fd)
            self._owned = OwnedDir.create(
                self._tmp_parent_fd, self.access.dir_mode, self.access.lock_mode
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.tmp_dir = self.root / layout.TMP / self._owned.name
        self._tmp_fd = self._owned.fd
        self._finalizer = weakref.finalize(
            self, _release, self._owned, self._tmp_parent_fd, fds, os.getpid()
        )
        self._locks = locks.KeyedLock(
            self._locks_fd, mode=self.access.lock_mode, timeout_s=lock_timeout_s
        )
        self._names = itertools.count()
        self._mutex = threading.Lock()
        self._counters = CASCounters()
        self._reflink: bool | None = None  # probed on first put_file
        self._no_reflink_devs: set[int] = set()
        swept = sweep_dead(self._tmp_parent_fd, keep=self._owned.name)
        self._count(temp_dirs_swept=swept)
        if swept:
            log.info("CAS %s: swept %d temp dirs of dead owners", self.root, swept)

    # ---- lifetime ----

    def __enter__(self) -> LocalCAS:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Removes this instance's temp dir and releases its owner lock. Idempotent."""
        self._finalizer()

    @property
    def root_fd(self) -> int:
        """An fd of the CAS root (``O_PATH`` where there is one), for ``*at()`` calls."""
        self._opened.check()
        return self._root_fd

    @property
    def tmp_fd(self) -> int:
        """An fd of this instance's own temp directory."""
        self._opened.check()
        return self._tmp_fd

    @property
    def counters(self) -> CASCounters:
        self._opened.check()
        with self._mutex:
            return CASCounters(**vars(self._counters))

    def _count(self, **deltas: int) -> None:
        self._opened.check()
        with self._mutex:
            for name, delta in deltas.items():
                setattr(self._counters, name, getattr(self._counters, name) + delta)

    # ---- names ----

    @staticmethod
    def relpath(d: Digest) -> str:
        """``blobs/<hh>/<hash>-<size>``, relative to ``root`` / ``root_fd`` (no check)."""
        return layout.rel(layout.BLOBS, d)

    @staticmethod
    def exec_relpath(d: Digest) -> str:
        """``exec/<hh>/<hash>-<size>``, relative to ``root`` / ``root_fd`` (no check)."""
        return layout.rel(layout.EXEC, d)

    def _is_file(self, rel: str) -> bool:
        try:
            st = os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode)

    def _tmp_name(self, what: str) -> str:
        return f"{what}.{next(self._names)}"

    def _unlink_tmp(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.tmp_fd)

    def _publish(self, tmp: str, d: Digest, area: str) -> bool:
        """Renames temp ``tmp`` to its final name; False (temp discarded) if it exists."""
        try:
            if self._fsync:  # the fsync is of the final directory: open it for that
                dir_fd = os.open(layout.shard_dir(area, d.hash), _DIR, dir_fd=self.root_fd)
                try:
                    _binding.publish(self.tmp_fd, tmp, dir_fd, d.key, noreplace=True, fsync=True)
                finally:
                    os.close(dir_fd)
            else:
                _binding.publish(
                    self.tmp_fd, tmp, self.root_fd, layout.rel(area, d), noreplace=True
                )
        except FileExistsError:  # lost the race: the winner's file is the same bytes
            self._unlink_tmp(tmp)
            return False
        except BaseException:
            self._unlink_tmp(tmp)
            raise
        return True

    def _published(self, tmp: str, d: Digest, **counts: int) -> Digest:
        if self._publish(tmp, d, layout.BLOBS):
            self._count(blobs_written=1, bytes_written=d.size_bytes, **counts)
        else:
            self._count(blobs_present=1, **counts)
        return d

    # ---- lookup ----

    def __contains__(self, d: object) -> bool:
        if not isinstance(d, Digest):
            return False
        return d.size_bytes == 0 or self._is_file(self.relpath(d))

    def missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests not stored here, in first-seen order, without duplicates."""
        return [d for d in dict.fromkeys(digests) if d not in self]

    def path(self, d: Digest) -> Path:
        """The blob's file (0444). BlobNotFoundError if absent; the empty blob always is."""
        rel = self.relpath(d)
        if d.size_bytes == 0:
            self._ensure_empty(d, layout.BLOBS)
        elif not self._is_file(rel):
            raise BlobNotFoundError(d)
        return self.root / rel

    def read(self, d: Digest) -> bytes:
        """The blob's bytes. BlobNotFoundError if absent."""
        self._opened.check()
        if d.size_bytes == 0:
            return b""
        try:
            fd = os.open(self.relpath(d), _RDONLY, dir_fd=self.root_fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP):
                raise BlobNotFoundError(d) from None
            raise
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _ensure_empty(self, d: Digest, area: str) -> None:
        if self._is_file(layout.rel(area, d)):
            return
        mode = layout.MODES[area]
        tmp = self._tmp_name("empty")
        _binding.durable_write(self.tmp_fd, tmp, b"", mode, fsync=self._fsync, noreplace=True)
        if mode & 0o111:
            fd = os.open(tmp, _RDONLY, dir_fd=self.tmp_fd)
            try:
                locks.wait_no_writers(fd)
            finally:
                os.close(fd)
        self._publish(tmp, d, area)

    # ---- insertion ----

    def put(self, data: bytes, *, expected: Digest | None = None) -> Digest:
        """Stores ``data``; DigestMismatchError (nothing stored) if it is not ``expected``."""
        d = Digest.of(data)
        if expected is not None and d != expected:
            raise DigestMismatchError(expected, d, "put")
        if d.size_bytes == 0 or d in self:
            self._count(blobs_present=1)
            return d
        tmp = self._tmp_name("put")
        _binding.durable_write(
            self.tmp_fd, tmp, bytes(data), layout.BLOB_MODE, fsync=self._fsync, noreplace=True
        )
        return self._published(tmp, d)

    def put_file(self, path: str | os.PathLike[str], *, expected: Digest | None = None) -> Digest:
        """Stores a copy of the file at ``path`` (never moved, never modified).

        Reflinks it into the temp dir when the filesystem allows and hashes the copy,
        not the source, so a concurrent writer cannot make a blob disagree with its
        name; else streams it, hashing the bytes as they are written.
        """
        path = os.fspath(path)
        src_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO: no hang
        try:
            st = os.fstat(src_fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "put_file needs a regular file", path)
            if expected is not None and expected in self:  # only check, copy nothing
                return self._put_chunks(_read_chunks(src_fd), expected, "put_file")
            tmp = self._tmp_name("file")
            if not self._reflink_into(path, st.st_dev, tmp):
                return self._put_chunks(_read_chunks(src_fd), expected, "put_file", copied_files=1)
        finally:
            os.close(src_fd)
        fd = os.open(tmp, _RDONLY, dir_fd=self.tmp_fd)
        try:
            d = hash_fd(fd)
            if self._fsync and (expected is None or d == expected):
                os.fsync(fd)
        finally:
            os.close(fd)
        return self._check_and_publish(tmp, d, expected, "put_file", reflinked_files=1)

    def _reflink_into(self, path: str, dev: int, tmp: str) -> bool:
        if self._reflink is None:
            try:
                self._reflink = _binding.probe_reflink(self.tmp_dir)
            except OSError as e:
                log.debug("reflink probe failed in %s: %s", self.tmp_dir, e)
                self._reflink = False
        if not self._reflink or dev in self._no_reflink_devs:
            return False
        head, tail = os.path.split(os.path.abspath(path))
        dir_fd = os.open(head, _DIR_PATH)
        try:
            _binding.private_copy(
                dir_fd,
                tail,
                self.tmp_fd,
                tmp,
                layout.BLOB_MODE,
                fsync=False,
                noreplace=True,
                reflink=True,
            )
        except OSError as e:
            if e.errno not in _NO_REFLINK:
                raise
            if e.errno == errno.EXDEV:
                self._no_reflink_devs.add(dev)
            return False
        finally:
            os.close(dir_fd)
        return True

    def put_stream(self, chunks: Iterable[bytes], expected: Digest | None) -> Digest:
        """Stores the concatenated ``chunks``, hashing as it writes, and checks them
        against ``expected`` before publishing (DigestMismatchError, temp removed)."""
        return self._put_chunks(chunks, expected, "put_stream")

    def _put_chunks(
        self, chunks: Iterable[bytes], expected: Digest | None, where: str, **counts: int
    ) -> Digest:
        if expected is not None and expected in self:  # verify, never write
            h = hashlib.sha256()
            size = 0
            for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
            d = Digest(h.hexdigest(), size)
            if d != expected:
                raise DigestMismatchError(expected, d, where)
            self._count(blobs_present=1, **counts)
            return d
        tmp = self._tmp_name("stream")
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            layout.BLOB_MODE,
            dir_fd=self.tmp_fd,
        )
        try:
            h = hashlib.sha256()
            size = 0
            for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            d = Digest(h.hexdigest(), size)
            if expected is None or d == expected:
                os.fchmod(fd, layout.BLOB_MODE)
                if self._fsync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._unlink_tmp(tmp)
            raise
        os.close(fd)
        return self._check_and_publish(tmp, d, expected, where, **counts)

    def _check_and_publish(
        self, tmp: str, d: Digest, expected: Digest | None, where: str, **counts: int
    ) -> Digest:
        if expected is not None and d != expected:
            self._unlink_tmp(tmp)
            raise DigestMismatchError(expected, d, where)
        if d.size_bytes == 0:
            self._unlink_tmp(tmp)
            self._count(blobs_present=1, **counts)
            return d
        return self._published(tmp, d, **counts)

    # ---- executable variants ----

    def executable_path(self, d: Digest) -> Path:
        """The 0555 variant of blob ``d`` (another inode), built once across threads and
        processes and the same inode on every later call. BlobNotFoundError if absent."""
        rel = self.exec_relpath(d)
        if self._is_file(rel):
            return self.root / rel
        if d.size_bytes == 0:
            self._ensure_empty(d, layout.EXEC)
            return self.root / rel
        with self._locks.hold(f"{d.key}.exec"):
            if not self._is_file(rel):
                self._build_variant(d)
        return self.root / rel

    def ensure_executables(self, digests: Iterable[Digest]) -> None:
        """``executable_path`` for each digest, a few at a time."""
        todo = [d for d in dict.fromkeys(digests) if not self._is_file(self.exec_relpath(d))]
        if not todo:
            return
        built = self.counters.exec_variants_built
        if len(todo) == 1:
            self.executable_path(todo[0])
        else:
            with ThreadPoolExecutor(min(len(todo), _MAX_PARALLEL_VARIANTS)) as pool:
                list(pool.map(self.executable_path, todo))
        built = self.counters.exec_variants_built - built
        log.debug("executable variants: %d missing, %d built here", len(todo), built)

    def _build_variant(self, d: Digest) -> None:
        for attempt in range(1, _VARIANT_ATTEMPTS + 1):
            tmp = self._tmp_name("exec")
            try:
                _binding.private_copy(
                    self.root_fd,
                    self.relpath(d),
                    self.tmp_fd,
                    tmp,
                    layout.EXEC_MODE,
                    fsync=self._fsync,
                    noreplace=True,
                )
            except FileNotFoundError:
                raise BlobNotFoundError(d) from None
            self._count(**{"exec_variants_built" if attempt == 1 else "exec_variants_rebuilt": 1})
            try:
                fd = os.open(tmp, _RDONLY, dir_fd=self.tmp_fd)
                try:
                    # A child that another thread forked while the copy's writable fd was
                    # open holds a copy of it until it execs: exec'ing the variant before
                    # that would fail with ETXTBSY. Wait for it; a child that does not
                    # exec soon may never do it, so then build another inode.
                    busy = locks.wait_no_writers(fd, self.exec_writers_timeout_s) is False
                    actual = None if busy and attempt < _VARIANT_ATTEMPTS else hash_fd(fd)
                finally:
                    os.close(fd)
                if actual is None:
                    self._unlink_tmp(tmp)
                    log.info("variant of %s is held open for writing elsewhere: rebuilt", d)
                    continue
                if actual != d:
                    raise DigestMismatchError(d, actual, f"blob {self.relpath(d)}; run verify()")
            except BaseException:
                self._unlink_tmp(tmp)
                raise
            self._publish(tmp, d, layout.EXEC)
            return

    # ---- verification ----

    def verify(self, *, progress: ProgressFn | None = None) -> VerifyReport:
        """Checks every blob and variant (type, mode, size, hash); moves each damaged
        one to ``quarantine/`` (it then reads as missing) and reports it."""
        return verify_cas(self.root, self.root_fd, progress=progress)

    def quarantine_stamp(self) -> tuple[int, int, int, int]:
        """A fingerprint of ``quarantine/`` (one stat): it changes when verify
        quarantines something (what a cache checks before serving a hit)."""
        return quarantine_stamp(self.root_fd)

    def quarantined(self) -> list[Quarantined]:
        """Every file ``verify`` moved to ``quarantine/``, with its inode."""
        return quarantined(self.root_fd)
