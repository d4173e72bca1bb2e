"""The base of :class:`~fastmat.cas.LocalCAS`: its layout, lifetime, names,
publishing and lookup. See :mod:`fastmat.cas` for the layout."""

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
from dataclasses import dataclass
from pathlib import Path

from fastmat import _binding, _locks
from fastmat.digest import Digest
from fastmat.errors import BlobNotFoundError

log = logging.getLogger("fastmat")

_CHUNK_BYTES = 1 << 20
_BLOB_MODE = 0o444
_EXEC_MODE = 0o555
_RDONLY = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_PATH = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC  # macOS: no O_PATH


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


def _hash_fd(fd: int) -> Digest:
    h = hashlib.sha256()
    buf = bytearray(min(_CHUNK_BYTES, max(os.fstat(fd).st_size + 1, 4096)))
    view = memoryview(buf)
    size = 0
    while n := os.readv(fd, [buf]):
        h.update(view[:n])
        size += n
    return Digest(h.hexdigest(), size)


def _release(owned: _locks.OwnedDir, tmp_parent_fd: int, fds: list[int], pid: int) -> None:
    try:
        if os.getpid() == pid:
            owned.release(tmp_parent_fd)
        else:  # a forked child: the temp dir (and the flock, shared) belong to the parent
            os.close(owned.fd)
            os.close(owned.lock_fd)
    finally:
        for fd in fds:
            os.close(fd)


class CASBase:
    """Layout, lifetime, names, publishing and lookup of a local CAS directory."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(path).absolute()
        self._fsync = fsync
        self._create_layout()
        self.root_fd = os.open(self.root, _DIR_PATH)
        fds = [self.root_fd]
        try:
            self._tmp_parent_fd = os.open("tmp", _DIR, dir_fd=self.root_fd)
            fds.append(self._tmp_parent_fd)
            self._locks_fd = os.open("locks", _DIR_PATH, dir_fd=self.root_fd)
            fds.append(self._locks_fd)
            self._owned = _locks.OwnedDir.create(self._tmp_parent_fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.tmp_dir = self.root / "tmp" / self._owned.name
        self.tmp_fd = self._owned.fd
        self._finalizer = weakref.finalize(
            self, _release, self._owned, self._tmp_parent_fd, fds, os.getpid()
        )
        self._locks = _locks.KeyedLock(self._locks_fd)
        self._names = itertools.count()
        self._mutex = threading.Lock()
        self._counters = CASCounters()
        self._reflink: bool | None = None  # probed on first put_file
        self._no_reflink_devs: set[int] = set()
        swept = _locks.sweep_dead(self._tmp_parent_fd, keep=self._owned.name)
        self._count(temp_dirs_swept=swept)
        if swept:
            log.info("CAS %s: swept %d temp dirs of dead owners", self.root, swept)

    def _create_layout(self) -> None:
        if (self.root / "exec" / "ff").is_dir():  # created last: the layout is complete
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("tmp", "locks", "quarantine"):
            (self.root / sub).mkdir(exist_ok=True)
        for area in ("blobs", "exec"):
            (self.root / area).mkdir(exist_ok=True)
            for i in range(256):
                (self.root / area / f"{i:02x}").mkdir(exist_ok=True)

    # ---- lifetime ----

    def close(self) -> None:
        """Removes this instance's temp dir and releases its owner lock. Idempotent."""
        self._finalizer()

    @property
    def counters(self) -> CASCounters:
        with self._mutex:
            return CASCounters(**vars(self._counters))

    def _count(self, **deltas: int) -> None:
        with self._mutex:
            for name, delta in deltas.items():
                setattr(self._counters, name, getattr(self._counters, name) + delta)

    # ---- names ----

    @staticmethod
    def relpath(d: Digest) -> str:
        """``blobs/<hh>/<hash>-<size>``, relative to ``root`` / ``root_fd`` (no check)."""
        return f"blobs/{d.hash[:2]}/{d.key}"

    @staticmethod
    def exec_relpath(d: Digest) -> str:
        """``exec/<hh>/<hash>-<size>``, relative to ``root`` / ``root_fd`` (no check)."""
        return f"exec/{d.hash[:2]}/{d.key}"

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
                dir_fd = os.open(f"{area}/{d.hash[:2]}", _DIR, dir_fd=self.root_fd)
                try:
                    _binding.publish(self.tmp_fd, tmp, dir_fd, d.key, noreplace=True, fsync=True)
                finally:
                    os.close(dir_fd)
            else:
                rel = f"{area}/{d.hash[:2]}/{d.key}"
                _binding.publish(self.tmp_fd, tmp, self.root_fd, rel, noreplace=True)
        except FileExistsError:  # lost the race: the winner's file is the same bytes
            self._unlink_tmp(tmp)
            return False
        except BaseException:
            self._unlink_tmp(tmp)
            raise
        return True

    def _published(self, tmp: str, d: Digest, **counts: int) -> Digest:
        if self._publish(tmp, d, "blobs"):
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
            self._ensure_empty(d, "blobs", _BLOB_MODE)
        elif not self._is_file(rel):
            raise BlobNotFoundError(d)
        return self.root / rel

    def read(self, d: Digest) -> bytes:
        """The blob's bytes. BlobNotFoundError if absent."""
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

    def _ensure_empty(self, d: Digest, area: str, mode: int) -> None:
        if self._is_file(f"{area}/{d.hash[:2]}/{d.key}"):
            return
        tmp = self._tmp_name("empty")
        _binding.durable_write(self.tmp_fd, tmp, b"", mode, fsync=self._fsync, noreplace=True)
        if mode & 0o111:
            fd = os.open(tmp, _RDONLY, dir_fd=self.tmp_fd)
            try:
                _locks.wait_no_writers(fd)
            finally:
                os.close(fd)
        self._publish(tmp, d, area)
