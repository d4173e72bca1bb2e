"""The local content-addressable store, shareable by the threads and processes of a worker.

Layout under the root: ``blobs/<hh>/<hash>-<size>`` (0444, never written again),
``exec/<hh>/<hash>-<size>`` (the 0555 variant: another inode), ``tmp/<pid>.<rand>/``
(one per open instance, flock-owned, swept by others once its owner is dead),
``locks/`` (single-flight lock files) and ``quarantine/`` (what ``verify()`` moved out).
Everything is built in the instance's temp dir and renamed into place without
replacing, so a final name only ever holds a complete, fsync'ed file.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from fastmat import _binding, _locks, cas_verify
from fastmat.cas_store import (
    _BLOB_MODE,
    _CHUNK_BYTES,
    _DIR_PATH,
    _EXEC_MODE,
    _RDONLY,
    CASBase,
    CASCounters,
    _hash_fd,
)
from fastmat.cas_verify import DamagedBlob, VerifyReport
from fastmat.digest import Digest
from fastmat.errors import BlobNotFoundError, DigestMismatchError

__all__ = ["CASCounters", "DamagedBlob", "LocalCAS", "VerifyReport"]

log = logging.getLogger("fastmat")

_NO_REFLINK = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ELOOP})
_MAX_PARALLEL_VARIANTS = 8
_VARIANT_ATTEMPTS = 4


class LocalCAS(CASBase):
    """A local CAS directory; see the module docstring. Thread- and multi-process-safe."""

    exec_writers_timeout_s: float = 2.0  # see _build_variant

    def __enter__(self) -> LocalCAS:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

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
            self.tmp_fd, tmp, bytes(data), _BLOB_MODE, fsync=self._fsync, noreplace=True
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
            d = _hash_fd(fd)
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
                _BLOB_MODE,
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
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _BLOB_MODE, dir_fd=self.tmp_fd
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
                os.fchmod(fd, _BLOB_MODE)
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
            self._ensure_empty(d, "exec", _EXEC_MODE)
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
                    _EXEC_MODE,
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
                    busy = _locks.wait_no_writers(fd, self.exec_writers_timeout_s) is False
                    actual = None if busy and attempt < _VARIANT_ATTEMPTS else _hash_fd(fd)
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
            self._publish(tmp, d, "exec")
            return

    # ---- verification ----

    def verify(self) -> VerifyReport:
        """Checks every blob and variant (type, mode, size, hash); moves each damaged
        one to ``quarantine/`` (it then reads as missing) and reports it."""
        return cas_verify.verify(self)


def _read_chunks(fd: int) -> Iterable[bytes]:
    while chunk := os.read(fd, _CHUNK_BYTES):
        yield chunk
