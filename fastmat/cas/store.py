"""``LocalCAS``: the local content-addressable store, shared by the threads and
processes of a worker.

Layout: :mod:`fastmat.cas.layout`. Opening writes nothing: the instance's own temp
dir (``tmp/<pid>.<rand>/``, flock-owned, swept by later openers once its owner is
dead) is made at its first write. Everything is built there, checked, and renamed
into place without replacing by a group commit
(:mod:`fastmat.cas.commit`): a final name only ever holds a complete file whose
bytes were made durable before the rename (invariants 6 and 14), at the cost of one
sync per group of blobs rather than per blob (:class:`Batch`, and threads that
commit at the same time). A blob's inode is never written, chmod'ed or
utime'd after insertion (invariant 1); executables link a per-digest 0555 variant
built once across threads and processes (invariant 2). Content already stored is
never written again: every put looks its digest up first (``put_file`` hashes the
source, reading only).

A CAS this process cannot write (a read-only filesystem or mount, or directories it
may not write) opens read-only (issue 12): lookups, reads, ``usage()``, ``verify()``
(which then reports damage without quarantining it) and materializing from it work;
a put of content already stored succeeds (nothing to write); any other write
raises :class:`~fastmat.errors.ReadOnlyCASError` naming the CAS and the operation.
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
from collections.abc import Callable, Container, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fastmat import _binding
from fastmat.cas import layout
from fastmat.cas.commit import CommitResult, Committer, Staged, sync_mode_for
from fastmat.cas.evict import Budget, Evictor, EvictReport
from fastmat.cas.usage import Index, Pin, Usage, UsageCounters, file_links, scan_names
from fastmat.cas.verify import (
    Quarantined,
    VerifyReport,
    quarantine_stamp,
    quarantined,
    verify_cas,
)
from fastmat.control import ProgressFn
from fastmat.digest import BlobNotFoundError, Digest, DigestMismatchError, hash_fd
from fastmat.errors import ReadOnlyCASError, naming, with_path
from fastmat.fs import locks
from fastmat.fs.access import Access
from fastmat.fs.forks import OpenedHere
from fastmat.fs.owned import OwnedDir, sweep_dead

__all__ = ["Batch", "CASCounters", "CASUsage", "LocalCAS"]

log = logging.getLogger("fastmat")

_CHUNK_BYTES = 1 << 20
_RDONLY = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_PATH = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC  # macOS: no O_PATH
_NO_REFLINK = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ELOOP})
_MAX_PARALLEL_VARIANTS = 8
_VARIANT_ATTEMPTS = 4
_WRITEBACK_BYTES = 8 << 20  # a temp's writeback is started every this many bytes written
_SMALL_FILE = 1 << 20  # put_file reads a file smaller than this once, into memory
_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


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


@dataclass
class CASUsage:
    """``LocalCAS.usage()``: what the CAS holds now, and what eviction did so far."""

    names: int  # blobs + executable variants
    blobs: int
    exec_variants: int
    blob_bytes: int
    exec_bytes: int
    bytes: int
    bytes_cas_only: int  # link count 1: freed if evicted
    bytes_shared: int  # link count > 1: also linked into trees or cache entries
    pinned_keys: int
    max_bytes: int | None
    max_blobs: int | None
    counters: UsageCounters  # evictions, evicted bytes, re-fetches: every process, ever
    recorded_bytes: int  # what the use record counts (the budget's view)
    recorded_names: int


def _release(
    scratch: list[OwnedDir],
    tmp_parent_fd: int,
    fds: list[int],
    pid: int,
    closers: list[Callable[[bool], None]],
) -> None:
    try:
        in_child = os.getpid() != pid
        for close in closers:  # the evictor's thread, the use record's files
            close(in_child)
        for owned in scratch:  # the temp dir, if a write made it
            if not in_child:
                owned.release(tmp_parent_fd)
            else:  # a forked child: the temp dir (and the flock, shared) belong to the parent
                os.close(owned.fd)
                os.close(owned.lock_fd)
    finally:
        for fd in fds:
            os.close(fd)


def _writable(root_fd: int) -> bool:
    """Whether this process may create files in the CAS (its temp area), by
    ``faccessat``: false on a read-only filesystem (EROFS) as for permissions."""
    return os.access(layout.TMP, os.W_OK, dir_fd=root_fd)


def _ro_errno(root: Path) -> int:
    try:
        return errno.EROFS if os.statvfs(root).f_flag & os.ST_RDONLY else errno.EACCES
    except OSError:
        return errno.EACCES


def _size_of(name: bytes) -> int:
    """The size a CAS name says its blob has (``.../<hash>-<size>``)."""
    tail = name.rsplit(b"-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _read_chunks(fd: int) -> Iterable[bytes]:
    while chunk := os.read(fd, _CHUNK_BYTES):
        yield chunk


class LocalCAS:
    """A local CAS directory; see the module docstring. Thread- and multi-process-safe.

    ``fsync=False`` skips every fsync (faster, not crash-safe). ``max_bytes`` /
    ``max_blobs`` bound the CAS (:mod:`fastmat.cas.evict`: its names, executable
    variants included, least recently used evicted first, pinned ones never). A new
    root is private (0700, lock files 0600); ``group`` (a name or gid) shares it with
    that group's members instead (2770 and group-owned, lock files 0660): see
    :mod:`fastmat.fs.access`. ``lock_timeout_s`` bounds every wait for a lock another
    thread or process holds (a variant being built, a blob being fetched, the use
    record's lock): then ``LockTimeoutError`` names the lock and its holder.
    ``create=False`` opens only an existing CAS (else ``FileNotFoundError`` naming
    ``path``, and nothing is created).

    Opening writes nothing; the instance's temp dir is made at its first write.
    ``read_only``: None (default) opens read-only exactly when the CAS is not
    writable here (a read-only filesystem or bind mount, or directories this user
    may not write); True never writes; False requires a writable CAS
    (``ReadOnlyCASError`` at open otherwise). A read-only instance serves lookups,
    reads, materialize (an executable variant it lacks becomes a private 0555 copy in
    the destination), ``usage()`` and ``verify()`` (damage reported, not
    quarantined); it pins nothing, and a bounded one (``max_bytes``) evicts nothing.
    Any write it would need raises ``ReadOnlyCASError`` naming the CAS and the
    operation; a put of content already stored needs none.

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
        max_bytes: int | None = None,
        max_blobs: int | None = None,
        group: str | int | None = None,
        lock_timeout_s: float = locks.DEFAULT_LOCK_TIMEOUT_S,
        create: bool = True,
        read_only: bool | None = None,
    ) -> None:
        self.root = Path(path).absolute()
        exists = layout.exists(self.root)
        if not create and not exists:
            raise FileNotFoundError(errno.ENOENT, "no CAS here", str(self.root))
        self._fsync = fsync
        self.lock_timeout_s = lock_timeout_s
        self.access = Access.of(group)
        if not exists or (
            self.access.gid is not None
            and read_only is not True
            and os.access(self.root / layout.TMP, os.W_OK)
        ):
            layout.create(self.root, self.access)  # a new CAS, or one shared for the first time
        self._opened = OpenedHere(f"LocalCAS {self.root}")
        with naming("opening the CAS", self.root):
            self._root_fd = os.open(self.root, _DIR_PATH)
        fds = [self._root_fd]
        try:
            with naming("opening the CAS", self.root):
                self._tmp_parent_fd = os.open(layout.TMP, _DIR, dir_fd=self.root_fd)
                fds.append(self._tmp_parent_fd)
                self._locks_fd = os.open(layout.LOCKS, _DIR_PATH, dir_fd=self.root_fd)
                fds.append(self._locks_fd)
                writable = _writable(self._root_fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._ro_errno = 0 if writable else _ro_errno(self.root)
        self.read_only: bool = not writable if read_only is None else read_only
        if read_only is False and not writable:
            for fd in fds:
                os.close(fd)
            raise ReadOnlyCASError(self.root, "open it for writing", self._ro_errno)
        self._scratch_dir: list[OwnedDir] = []  # the temp dir, once a write made it
        self._scratch_mutex = threading.Lock()
        closers: list[Callable[[bool], None]] = []
        self._finalizer = weakref.finalize(
            self, _release, self._scratch_dir, self._tmp_parent_fd, fds, os.getpid(), closers
        )
        self._locks = locks.KeyedLock(
            self._locks_fd, mode=self.access.lock_mode, timeout_s=lock_timeout_s
        )
        self._names = itertools.count()
        self._mutex = threading.Lock()
        self._counters = CASCounters()
        self._reflink: bool | None = None  # probed on first put_file
        self._no_reflink_devs: set[int] = set()
        self._committer = Committer(
            -1, self._root_fd, fsync=fsync, sync_mode=sync_mode_for(self._root_fd), root=self.root
        )
        try:
            self._usage = Usage(
                self._root_fd,
                self._tmp_parent_fd,
                self._scratch,
                access=self.access,
                timeout_s=lock_timeout_s,
                root=self.root,
                read_only=self.read_only,
            )
        except BaseException:
            self._finalizer()
            raise
        closers.append(self._usage.close)
        self.budget = Budget(max_bytes, max_blobs)
        self._evictor: Evictor | None = None
        if self.read_only:
            return  # nothing to sweep; nothing is written, so nothing to evict
        if self.budget.bounded:
            self._evictor = Evictor(self._usage, self.budget)
            closers.insert(0, self._evictor.close)
            self._committer.admit = self._evictor.admit
            if max_bytes is not None:  # a group is what admission may add at once
                self._committer.max_group_bytes = min(
                    self._committer.max_group_bytes, max(1 << 20, max_bytes // 16)
                )
        else:
            self._committer.admit = self._record_stored
        swept = sweep_dead(self._tmp_parent_fd, keep=())
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

    def require_writable(self, operation: str) -> None:
        """Raises ``ReadOnlyCASError`` naming ``operation`` when the CAS is read-only:
        for a caller that would otherwise find out after costly work (a download)."""
        if self.read_only:
            raise ReadOnlyCASError(self.root, operation, self._ro_errno)

    def _scratch(self, operation: str) -> tuple[int, Path]:
        """(fd, path) of this instance's temp dir, made now if no write made it yet.
        ``ReadOnlyCASError`` naming ``operation`` on a read-only CAS."""
        self._opened.check()
        if self._scratch_dir:
            owned = self._scratch_dir[0]
            return owned.fd, self.root / layout.TMP / owned.name
        self.require_writable(operation)
        if not self._finalizer.alive:
            raise ValueError(f"LocalCAS {self.root} is closed")
        with self._scratch_mutex:
            if not self._scratch_dir:
                try:
                    owned = OwnedDir.create(
                        self._tmp_parent_fd, self.access.dir_mode, self.access.lock_mode
                    )
                except OSError as e:
                    if e.errno in _NOT_WRITABLE:  # remounted read-only since the open
                        raise ReadOnlyCASError(self.root, operation, e.errno) from e
                    where = f"making this instance's temp dir to {operation}"
                    raise with_path(e, where, self.root / layout.TMP) from e
                self._committer.tmp_fd = owned.fd
                self._committer.tmp_dir = self.root / layout.TMP / owned.name
                self._scratch_dir.append(owned)
        owned = self._scratch_dir[0]
        return owned.fd, self.root / layout.TMP / owned.name

    @property
    def tmp_fd(self) -> int:
        """An fd of this instance's own temp directory (made by the first write, or
        now). ``ReadOnlyCASError`` on a read-only CAS."""
        return self._scratch("write to it")[0]

    @property
    def tmp_dir(self) -> Path:
        """This instance's own temp directory (made by the first write, or now; after
        ``close`` the one it had). ``ReadOnlyCASError`` on a read-only CAS."""
        if self._scratch_dir:
            return self.root / layout.TMP / self._scratch_dir[0].name
        return self._scratch("write to it")[1]

    @property
    def rotation_fd(self) -> int:
        """Where the executor builds an EMLINK rotation's copy: the temp dir, or -1 on
        a read-only CAS (beside the blob, where a rotation then fails: the link fails)."""
        return -1 if self.read_only else self.tmp_fd

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

    def _tmp_path(self, name: str) -> Path:
        return self.tmp_dir / name

    def _unlink_tmp(self, name: str) -> None:
        if not self._scratch_dir:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._scratch_dir[0].fd)

    def commit(self, staged: Sequence[Staged], **counts: int) -> CommitResult:
        """Publishes staged temps as one group (:mod:`fastmat.cas.commit`) and counts
        them; the result says, per blob, whether this call published it."""
        self._opened.check()
        res = self._committer.commit(staged)
        written = [s for s, p in zip(staged, res.published, strict=True) if p]
        present = sum(
            1 for p, e in zip(res.published, res.errors, strict=True) if not p and e is None
        )
        self._count(
            blobs_written=sum(1 for s in written if s.area == layout.BLOBS),
            bytes_written=sum(s.digest.size_bytes for s in written if s.area == layout.BLOBS),
            blobs_present=present,
            **counts,
        )
        return res

    def _commit_one(self, staged: Staged, **counts: int) -> Digest:
        self.commit([staged], **counts).raise_first()
        return staged.digest

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
        try:  # O_NONBLOCK: a FIFO under the name opens at once (refused below)
            fd = os.open(self.relpath(d), _RDONLY | os.O_NONBLOCK, dir_fd=self.root_fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP):
                raise BlobNotFoundError(d) from None
            raise
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                why = "CAS file is not a regular file; run verify"
                raise OSError(errno.EINVAL, why, str(self.root / self.relpath(d)))
            return f.read()

    def _ensure_empty(self, d: Digest, area: str) -> None:
        if self._is_file(layout.rel(area, d)):
            return
        mode = layout.MODES[area]
        tmp_fd, _ = self._scratch(f"store the empty blob in {area}/")
        tmp = self._tmp_name("empty")
        with naming("writing blob temp", self._tmp_path(tmp)):
            _binding.durable_write(tmp_fd, tmp, b"", mode, fsync=False, noreplace=True)
        if mode & 0o111:
            fd = os.open(tmp, _RDONLY, dir_fd=self.tmp_fd)
            try:
                locks.wait_no_writers(fd)
            finally:
                os.close(fd)
        self.commit([Staged(tmp, d, area)]).raise_first()

    # ---- insertion ----

    def batch(self, *, max_blobs: int = 4096, max_bytes: int = 256 << 20) -> Batch:
        """A :class:`Batch`: puts staged now, published together by its ``commit()``
        (at the end of a ``with`` block, and whenever ``max_blobs`` or ``max_bytes``
        are staged): one durable group commit for many blobs."""
        return Batch(self, max_blobs=max_blobs, max_bytes=max_bytes)

    def put(self, data: bytes, *, expected: Digest | None = None) -> Digest:
        """Stores ``data``; DigestMismatchError (nothing stored) if it is not ``expected``.
        Published (and durable unless ``fsync=False``) when it returns."""
        d, staged = self._stage_bytes(data, expected)
        return d if staged is None else self._commit_one(staged)

    def put_file(self, path: str | os.PathLike[str], *, expected: Digest | None = None) -> Digest:
        """Stores a copy of the file at ``path`` (never moved, never modified).

        Looks first: content already stored is not copied again (a file under 1 MiB is
        read once; a larger one is hashed, reading only). What is absent is reflinked
        into the temp dir where the filesystem allows, else streamed, and the copy's
        bytes are hashed, not the source's, so a concurrent writer cannot make a blob
        disagree with its name.
        """
        d, staged = self._stage_file(path, expected)
        return d if staged is None else self._commit_one(staged)

    def put_stream(self, chunks: Iterable[bytes], expected: Digest | None) -> Digest:
        """Stores the concatenated ``chunks``, hashing as it writes, and checks them
        against ``expected`` before publishing (DigestMismatchError, temp removed)."""
        d, staged = self._stage_chunks(chunks, expected, "put_stream")
        return d if staged is None else self._commit_one(staged)

    # ---- staging: a complete, checked temp (published by a commit) ----

    def _stage_bytes(
        self,
        data: bytes,
        expected: Digest | None,
        where: str = "put",
        pending: Container[Digest] = (),
        **counts: int,
    ) -> tuple[Digest, Staged | None]:
        """Stages ``data`` unless its digest is stored (or in ``pending``: staged by the
        caller's batch): then nothing is written. ``counts`` are counted if it is."""
        d = Digest.of(data)
        if expected is not None and d != expected:
            raise DigestMismatchError(expected, d, where)
        if d.size_bytes == 0 or d in pending or d in self:
            self._count(blobs_present=1)
            return d, None
        self._scratch(where)
        tmp = self._tmp_name("put")
        self._write_temp(tmp, (data,))
        if counts:
            self._count(**counts)
        return d, Staged(tmp, d)

    def _stage_file(
        self, path: str | os.PathLike[str], expected: Digest | None, pending: Container[Digest] = ()
    ) -> tuple[Digest, Staged | None]:
        """Looks first, copies only what is absent: a small file is read once (hashed,
        and written from memory if absent); a larger one is hashed (reads only), then,
        if absent, reflinked or streamed into a temp whose bytes are hashed again (a
        concurrent writer of the source cannot make a blob disagree with its name)."""
        path = os.fspath(path)
        src_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO: no hang
        try:
            st = os.fstat(src_fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "put_file needs a regular file", path)
            if st.st_size < _SMALL_FILE:
                data = b"".join(_read_chunks(src_fd))
                return self._stage_bytes(data, expected, "put_file", pending, copied_files=1)
            with naming("reading the file to store", path):
                d = hash_fd(src_fd)
            if expected is not None and d != expected:
                raise DigestMismatchError(expected, d, "put_file")
            if d in pending or d in self:  # stored already: copy nothing
                self._count(blobs_present=1)
                return d, None
            os.lseek(src_fd, 0, os.SEEK_SET)
            self._scratch("put_file")
            tmp = self._tmp_name("file")
            if not self._reflink_into(path, st.st_dev, tmp):
                self._count(copied_files=1)
                return self._stage_chunks(_read_chunks(src_fd), expected, "put_file")
        finally:
            os.close(src_fd)
        self._count(reflinked_files=1)
        fd = os.open(tmp, _RDONLY, dir_fd=self.tmp_fd)
        try:
            d = hash_fd(fd)
        finally:
            os.close(fd)
        return d, self._checked(tmp, d, expected, "put_file")

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
                raise with_path(e, f"reflinking {path} into blob temp", self._tmp_path(tmp)) from e
            if e.errno == errno.EXDEV:
                self._no_reflink_devs.add(dev)
            return False
        finally:
            os.close(dir_fd)
        return True

    def _stage_chunks(
        self, chunks: Iterable[bytes], expected: Digest | None, where: str
    ) -> tuple[Digest, Staged | None]:
        if expected is not None and expected in self:  # verify, never write
            h = hashlib.sha256()
            size = 0
            for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
            d = Digest(h.hexdigest(), size)
            if d != expected:
                raise DigestMismatchError(expected, d, where)
            self._count(blobs_present=1)
            return d, None
        self._scratch(where)
        tmp = self._tmp_name("stream")
        h = hashlib.sha256()
        size = self._write_temp(tmp, chunks, h)
        d = Digest(h.hexdigest(), size)
        return d, self._checked(tmp, d, expected, where)

    def _write_temp(self, tmp: str, chunks: Iterable[bytes], h: hashlib._Hash | None = None) -> int:
        """Writes ``chunks`` to a new temp (0444), hashing them into ``h``; the temp is
        removed if anything fails. Starts the writeback of every ``_WRITEBACK_BYTES``
        written (durable instances): the group's sync then finds little left to do."""
        tmp_fd, tmp_dir = self._scratch("write a blob")
        with naming("creating blob temp", tmp_dir / tmp):
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                layout.BLOB_MODE,
                dir_fd=tmp_fd,
            )
        size = unsynced = 0
        try:
            with naming("writing blob temp", tmp_dir / tmp):
                for chunk in chunks:
                    if h is not None:
                        h.update(chunk)
                    size += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    unsynced += len(chunk)
                    if self._fsync and unsynced >= _WRITEBACK_BYTES:
                        _binding.sync_batch(tmp_fd, [tmp.encode()], "writeback")
                        unsynced = 0
                os.fchmod(fd, layout.BLOB_MODE)
                closing, fd = fd, -1
                os.close(closing)  # (closed even when it fails)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            self._unlink_tmp(tmp)
            raise
        return size

    def _checked(self, tmp: str, d: Digest, expected: Digest | None, where: str) -> Staged | None:
        if expected is not None and d != expected:
            self._unlink_tmp(tmp)
            raise DigestMismatchError(expected, d, where)
        if d.size_bytes == 0:
            self._unlink_tmp(tmp)
            self._count(blobs_present=1)
            return None
        return Staged(tmp, d)

    # ---- executable variants ----

    def executable_path(self, d: Digest) -> Path:
        """The 0555 variant of blob ``d`` (another inode), built once across threads and
        processes and the same inode on every later call. BlobNotFoundError if absent;
        ``ReadOnlyCASError`` if the variant is absent and the CAS read-only."""
        rel = self.exec_relpath(d)
        if self._is_file(rel):
            return self.root / rel
        if self.read_only:
            if d.size_bytes and not self._is_file(self.relpath(d)):
                raise BlobNotFoundError(d)
            self.require_writable(f"make the executable variant of {d}")
        if d.size_bytes == 0:
            self._ensure_empty(d, layout.EXEC)
            return self.root / rel
        self._scratch(f"make the executable variant of {d}")
        with contextlib.ExitStack() as held:
            with naming("taking the variant's lock", self.root / layout.LOCKS / f"{d.key}.exec"):
                held.enter_context(self._locks.hold(f"{d.key}.exec"))
            if not self._is_file(rel):
                self._build_variant(d)
        return self.root / rel

    def missing_variants(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests whose executable variant is not stored (distinct, in order)."""
        return [d for d in dict.fromkeys(digests) if not self._is_file(self.exec_relpath(d))]

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
                    fsync=False,
                    noreplace=True,
                )
            except FileNotFoundError:
                raise BlobNotFoundError(d) from None
            except OSError as e:
                where = f"copying {self.relpath(d)} into variant temp"
                raise with_path(e, where, self._tmp_path(tmp)) from e
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
            self.commit([Staged(tmp, d, layout.EXEC)]).raise_first()
            return

    # ---- the use record, pins, eviction ----

    def _record_stored(self, staged: Sequence[Staged]) -> None:
        """An unbounded instance's commit hook: the names join the use record."""
        self._usage.record_stored([s.final.encode() for s in staged])

    def pinned(
        self, names: bytes | Iterable[Digest] = b""
    ) -> contextlib.AbstractContextManager[Pin]:
        """Pins blobs for a ``with`` block: no process evicts them (nor their executable
        variants) until it ends, and the end records their use (LRU).

        ``names``: the digests, or ``Plan.blobs`` as it is (``blobs/..`` paths separated
        by NUL bytes: no per-blob work). Pin *before* looking for the blobs: one
        evicted before the pin is absent when looked for (fetch it again, or raise
        ``BlobNotFoundError``). ``Pin.add`` pins more inside the block.
        """
        self._opened.check()
        if not isinstance(names, bytes):
            names = b"\0".join(layout.rel(layout.BLOBS, d).encode() for d in names)
        return self._usage.pin(names)

    def gc(self, max_bytes: int | None = None, max_blobs: int | None = None) -> EvictReport:
        """Rescans the CAS (the use record is rebuilt from the shard directories where
        they disagree), then evicts least recently used unpinned names until at most
        ``max_bytes`` / ``max_blobs`` remain (default: this instance's bounds; neither:
        only the rescan)."""
        self._opened.check()
        self.require_writable("collect garbage (gc)")
        self._usage.compact()
        mb = self.budget.max_bytes if max_bytes is None else max_bytes
        mn = self.budget.max_blobs if max_blobs is None else max_blobs
        evictor = self._evictor or Evictor(self._usage, Budget(mb, mn), background=False)
        inf = float("inf")
        return evictor.evict_to(inf if mb is None else mb, inf if mn is None else mn)

    def usage(self) -> CASUsage:
        """Names and bytes held, by area and by sharing, pins and cumulative evictions
        (a readdir and an lstat per name: for ``fastmat stats``, not a hot path)."""
        self._opened.check()
        idx = self._usage.tail()
        names = scan_names(self.root_fd)
        only, shared = file_links(self.root_fd, names)
        blobs = [n for n in names if layout.area_of(n) == layout.BLOBS]
        exec_ = [n for n in names if layout.area_of(n) == layout.EXEC]
        with self._usage.shared():
            pinned = len(self._usage.pinned_keys())
        return CASUsage(
            names=len(names),
            blobs=len(blobs),
            exec_variants=len(exec_),
            blob_bytes=sum(_size_of(n) for n in blobs),
            exec_bytes=sum(_size_of(n) for n in exec_),
            bytes=only + shared,
            bytes_cas_only=only,
            bytes_shared=shared,
            pinned_keys=pinned,
            max_bytes=self.budget.max_bytes,
            max_blobs=self.budget.max_blobs,
            counters=idx.counters,
            recorded_bytes=idx.total_bytes,
            recorded_names=idx.total_names,
        )

    @property
    def max_bytes(self) -> int | None:
        """The byte budget (None: unbounded)."""
        return self.budget.max_bytes

    @property
    def max_blobs(self) -> int | None:
        """The bound on names (None: unbounded)."""
        return self.budget.max_blobs

    @property
    def index(self) -> Index:
        """The use record, up to date (tests, diagnostics)."""
        self._opened.check()
        return self._usage.tail()

    # ---- verification ----

    def verify(
        self, *, progress: ProgressFn | None = None, quarantine: bool | None = None
    ) -> VerifyReport:
        """Checks every blob and variant (type, mode, size, hash); moves each damaged
        one to ``quarantine/`` (it then reads as missing) and reports it.
        ``quarantine=False`` (the default on a read-only CAS, where moving is a write)
        only reports (``VerifyReport.quarantined`` empty); True on a read-only CAS
        raises ``ReadOnlyCASError``."""
        if quarantine is None:
            quarantine = not self.read_only
        elif quarantine:
            self.require_writable("quarantine damaged blobs")
        return verify_cas(self.root, self.root_fd, progress=progress, quarantine=quarantine)

    def quarantine_stamp(self) -> tuple[int, int, int, int]:
        """A fingerprint of ``quarantine/`` (one stat): it changes when verify
        quarantines something (what a cache checks before serving a hit)."""
        return quarantine_stamp(self.root_fd)

    def quarantined(self) -> list[Quarantined]:
        """Every file ``verify`` moved to ``quarantine/``, with its inode."""
        return quarantined(self.root_fd)


class Batch:
    """Puts whose blobs are published together: one group commit (one data sync, one
    fsync per shard directory) for many blobs. ``put`` / ``put_file`` /
    ``put_stream`` check and stage at once and return the digest; the blob is
    published by :meth:`commit` (at the end of a ``with`` block, or whenever
    ``max_blobs`` / ``max_bytes`` are staged). A ``with`` block left by an exception
    discards what is staged. Not for several threads at once (threads sharing a
    ``LocalCAS`` commit together anyway: :mod:`fastmat.cas.commit`)."""

    def __init__(self, cas: LocalCAS, *, max_blobs: int, max_bytes: int) -> None:
        self.cas = cas
        self.max_blobs = max_blobs
        self.max_bytes = max_bytes
        self._staged: dict[Digest, Staged] = {}
        self._bytes = 0
        self._unsynced: list[bytes] = []  # temps whose writeback is not started
        self._unsynced_bytes = 0

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if t is None:
            self.commit()
        else:
            self.discard()

    def __len__(self) -> int:
        return len(self._staged)

    def put(self, data: bytes, *, expected: Digest | None = None) -> Digest:
        if expected is not None and expected in self._staged:
            return self._dup(expected, Digest.of(data), "put")
        return self._add(*self.cas._stage_bytes(data, expected, "put", self._staged))

    def put_file(self, path: str | os.PathLike[str], *, expected: Digest | None = None) -> Digest:
        return self._add(*self.cas._stage_file(path, expected, self._staged))

    def put_stream(self, chunks: Iterable[bytes], expected: Digest | None) -> Digest:
        return self._add(*self.cas._stage_chunks(chunks, expected, "put_stream"))

    def _dup(self, expected: Digest, d: Digest, where: str) -> Digest:
        if d != expected:
            raise DigestMismatchError(expected, d, where)
        self.cas._count(blobs_present=1)
        return d

    def _add(self, d: Digest, staged: Staged | None) -> Digest:
        if staged is None:
            return d
        if d in self._staged:  # staged twice: keep the first
            self.cas._unlink_tmp(staged.tmp)
            self.cas._count(blobs_present=1)
            return d
        self._staged[d] = staged
        self._bytes += d.size_bytes
        if self.cas._fsync:
            self._unsynced.append(staged.tmp.encode())
            self._unsynced_bytes += d.size_bytes
            if self._unsynced_bytes >= _WRITEBACK_BYTES:
                _binding.sync_batch(self.cas.tmp_fd, self._unsynced, "writeback", threads=1)
                self._unsynced, self._unsynced_bytes = [], 0
        if len(self._staged) >= self.max_blobs or self._bytes >= self.max_bytes:
            self.commit()
        return d

    def commit(self) -> CommitResult:
        """Publishes everything staged; raises the first failure after publishing the
        rest (a blob whose data could not be synced is not published)."""
        staged = list(self._staged.values())
        self._staged.clear()
        self._bytes = 0
        self._unsynced, self._unsynced_bytes = [], 0
        res = self.cas.commit(staged)
        res.raise_first()
        return res

    def discard(self) -> None:
        """Removes every staged temp: nothing of it is published."""
        for s in self._staged.values():
            self.cas._unlink_tmp(s.tmp)
        self._staged.clear()
        self._bytes = 0
        self._unsynced, self._unsynced_bytes = [], 0
