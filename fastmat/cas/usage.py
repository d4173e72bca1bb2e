"""The use record of a local CAS, shared by every process that opens it: which names
exist and how big they are, when each was last used, and which are pinned.

atime says nothing under ``relatime`` / ``noatime``, so uses are recorded here, in
two append-only logs under ``usage/`` that survive restarts:

- ``usage/store``: a chunk per group commit (``S``: the names about to be
  published, appended before their renames) and per eviction round (``E``: the
  names removed). A compaction rewrites it as a snapshot: ``C`` (the cumulative
  counters), ``X`` (recently evicted keys, to count re-fetches), then ``S``
  chunks of every name present, oldest use first.
- ``usage/uses``: a chunk per pinned scope that ended (``U``: the names a
  materialize, fetch or cache construction used). Cheap to write (the plan's
  name list, verbatim: no per-blob work); it only refreshes names ``store`` knows.

A chunk is ``\\n@<kind> <time_ns>\\n<name>\\0<name>...\\n``, one ``write(2)`` with
``O_APPEND``. A name is ``blobs/<hh>/<hash>-<size>`` or ``exec/..``; executable
variants are names of their own and share the budget; a use refreshes both names of
a key. Readers replay the logs into an :class:`Index`, then follow their tails;
garbage (a chunk torn by a crash) is skipped. The logs are hints for the policy,
never fsync'ed: after a crash a compaction rescans the shard directories.

Read-only (an instance of a read-only CAS, issue 12): the logs and the lock file are
opened for reading (absent ones read as empty), nothing is ever written, nothing
compacted (a never-compacted record is reported as it is), and a pin pins nothing:
such an opener cannot keep a writer elsewhere from evicting what it links (it then
fails with ``BlobNotFoundError``, its destination absent).

Pins: a running materialize, fetch or cache construction writes the names it needs
to ``tmp/<instance>/pin.<n>`` (removed at the end, with the instance's temp dir if
it dies) before it looks for them in the CAS. Eviction reads every pin file and
never removes a pinned key. Both sides serialize on ``usage/lock``:

- ``LOCK_SH`` to pin, to append, to read the logs (short: a write or a read);
- ``LOCK_EX`` to evict (at most :data:`EVICT_ROUND` names per hold), to admit a
  group into a bounded CAS, and to compact.

So a pin is either written before an eviction round starts (the round sees it)
or after it ended (its owner then finds the name absent and fetches it again, or
fails with ``BlobNotFoundError``): a pinned name is never removed. Threads of one
process share the lock through an in-process mutex.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fastmat.cas import layout
from fastmat.errors import LockTimeoutError, ReadOnlyCASError, naming
from fastmat.fs.access import Access
from fastmat.fs.locks import DEFAULT_LOCK_TIMEOUT_S, flock_within, lock_path, open_lock

__all__ = ["EVICT_ROUND", "Index", "Pin", "Usage", "UsageCounters"]

log = logging.getLogger("fastmat")

EVICT_ROUND = 256  # names removed per LOCK_EX hold at most
COMPACT_MIN_BYTES = 32 << 20  # logs are compacted once above this and 4x the snapshot
_EVICTED_KEPT = 100_000  # evicted keys remembered to count re-fetches
_APPEND = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_PIN_PREFIX = "pin."
_BITS = {layout.BLOBS: 1, layout.EXEC: 2}
_AREA_OF_BIT = {1: layout.BLOBS, 2: layout.EXEC}


def _open_file(dir_fd: int, name: str, flags: int, mode: int) -> int:
    """``os.open`` that keeps a shared group's bits whatever the umask (``mode`` 0660:
    the other members append to the logs and read the pin files too)."""
    fd = os.open(name, flags, mode, dir_fd=dir_fd)
    if mode & 0o070:
        try:
            os.fchmod(fd, mode)
        except PermissionError:
            pass  # another member made it, and set them
        except BaseException:
            os.close(fd)
            raise
    return fd


def _chunk(kind: bytes, t: int, body: bytes) -> bytes:
    return b"\n@" + kind + b" %d\n" % t + body + b"\n"


def split_name(name: bytes) -> tuple[bytes, int] | None:
    """``(key, area bit)`` of a CAS name (:mod:`fastmat.cas.layout`), None if malformed."""
    key = layout.key_of(name)
    if len(key) < 66 or key[64:65] != b"-" or not key[65:].isdigit():
        return None
    area = layout.area_of(name)
    return None if area is None else (key, _BITS[area])


@dataclass
class UsageCounters:
    """Cumulative over every process since the CAS was created (replayed from the log)."""

    evictions: int = 0  # names removed by eviction (a blob and its variant: 2)
    evicted_bytes: int = 0
    refetches: int = 0  # evicted keys that were stored again later


@dataclass
class Index:
    """The replayed logs: key -> [last use ns, area bits, size]; totals over names."""

    entries: dict[bytes, list[int]] = field(default_factory=dict)
    evicted: dict[bytes, None] = field(default_factory=dict)  # recently evicted keys
    total_bytes: int = 0  # over names: a key with its variant counts twice
    total_names: int = 0
    counters: UsageCounters = field(default_factory=UsageCounters)
    reconciled: bool = False  # a compaction's snapshot heads the store log

    def apply(self, kind: bytes, t: int, body: bytes) -> None:
        if kind == b"U":
            get = self.entries.get
            for name in body.split(b"\0"):
                e = get(name[name.rfind(b"/") + 1 :])  # layout.key_of, inlined: hot
                if e is not None and e[0] < t:  # a key's time covers both its names
                    e[0] = t
        elif kind == b"S":
            for name in body.split(b"\0"):
                self.stored(name, t)
        elif kind == b"E":
            for name in body.split(b"\0"):
                self.removed(name, count=True)
        elif kind == b"X":
            self.evicted.update(dict.fromkeys(k for k in body.split(b"\0") if k))
        elif kind == b"C":
            parts = body.split()
            if len(parts) == 3 and all(p.isdigit() for p in parts):
                ev, evb, rf = (int(p) for p in parts)
                self.counters = UsageCounters(ev, evb, rf)
                self.reconciled = True

    def stored(self, name: bytes, t: int) -> None:
        kb = split_name(name)
        if kb is None:
            return
        key, bit = kb
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = [t, 0, int(key[65:])]
            if key in self.evicted:
                del self.evicted[key]
                self.counters.refetches += 1
        if not e[1] & bit:
            e[1] |= bit
            self.total_bytes += e[2]
            self.total_names += 1
        e[0] = max(e[0], t)

    def removed(self, name: bytes, *, count: bool) -> None:
        kb = split_name(name)
        if kb is None:
            return
        key, bit = kb
        e = self.entries.get(key)
        if e is None or not e[1] & bit:
            return
        e[1] &= ~bit
        self.total_bytes -= e[2]
        self.total_names -= 1
        if count:
            self.counters.evictions += 1
            self.counters.evicted_bytes += e[2]
        if not e[1]:
            del self.entries[key]
            if count:
                self.evicted[key] = None
                if len(self.evicted) > _EVICTED_KEPT:
                    del self.evicted[next(iter(self.evicted))]

    def oldest(self, exclude: set[bytes], limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (last use, key) pairs, least recently used first."""
        items = ((e[0], k) for k, e in self.entries.items() if k not in exclude)
        return heapq.nsmallest(limit, items)


class _Log:
    """One append-only log file followed from where this process last read it."""

    def __init__(self, dir_fd: int, name: str, mode: int, path: Path, *, writable: bool) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.mode = mode
        self.path = path  # for messages
        self.writable = writable
        self.fd = -1
        self.ino = 0
        self._open()
        self.offset = 0
        self.kind = b""  # the header of a chunk whose body was not read yet
        self.t = 0

    def _open(self) -> None:
        with naming("opening the CAS use record", self.path):
            if self.writable:
                self.fd = _open_file(self.dir_fd, self.name, _APPEND, self.mode)
            elif self.dir_fd >= 0:
                try:
                    self.fd = os.open(self.name, _READ, dir_fd=self.dir_fd)
                except (FileNotFoundError, PermissionError):
                    self.fd = -1  # never written, or another user's: reads as empty
        self.ino = os.fstat(self.fd).st_ino if self.fd >= 0 else 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def replaced(self) -> bool:
        """Whether a compaction put another file under the name (lock held)."""
        if self.dir_fd < 0:
            return False
        try:
            return os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False).st_ino != self.ino
        except FileNotFoundError:
            return True

    def reopen(self) -> None:
        self.close()
        self._open()
        self.offset = 0
        self.kind = b""

    def append(self, data: bytes) -> int:
        with naming("appending to the CAS use record", self.path):
            n = os.write(self.fd, data)
        if n != len(data):  # a full disk: a torn chunk, skipped by readers
            msg = f"{os.strerror(errno.ENOSPC)} (short write to the CAS use record)"
            raise OSError(errno.ENOSPC, msg, str(self.path))
        return n

    def size(self) -> int:
        return os.fstat(self.fd).st_size if self.fd >= 0 else 0

    def read_new(self) -> Iterator[tuple[bytes, int, bytes]]:
        """The complete chunks appended since the last call: (kind, time, body)."""
        size = self.size()
        if size < self.offset:  # truncated by a compaction
            self.offset, self.kind = 0, b""
        if size == self.offset:
            return
        data = os.pread(self.fd, size - self.offset, self.offset)
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].split(b"\n"):
            if line.startswith(b"@"):
                kind, _, t = line[1:].partition(b" ")
                self.kind, self.t = kind, int(t) if t.isdigit() else 0
            elif self.kind:
                yield self.kind, self.t, line
                self.kind = b""


class Pin:
    """Names pinned by one scope (:meth:`Usage.pin`); :meth:`add` pins more."""

    def __init__(self, usage: Usage, name: str, fd: int) -> None:
        self._usage = usage
        self.name = name
        self.fd = fd
        self.body: list[bytes] = []

    def add(self, names: bytes) -> None:
        """Pins more names (``\\0``-separated) before the caller looks for them (a
        read-only instance's pin pins nothing)."""
        if not names or self.fd < 0:
            return
        with self._usage.shared(), naming("writing a pin file", self._usage.pin_path(self.name)):
            os.write(self.fd, names + b"\0")
        self.body.append(names)


class Usage:
    """The use record and pins of one ``LocalCAS`` instance (see the module)."""

    def __init__(
        self,
        root_fd: int,
        tmp_parent_fd: int,
        scratch: Callable[[str], tuple[int, Path]],
        *,
        access: Access | None = None,
        timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        root: Path | None = None,
        read_only: bool = False,
    ) -> None:
        self.root_fd = root_fd
        self.tmp_parent_fd = tmp_parent_fd
        self.scratch = scratch  # (fd, path) of the instance's temp dir, made on first need
        self.access = access or Access()
        self.timeout_s = timeout_s
        self.read_only = read_only
        self.root = root or Path(".")
        mode = self.access.lock_mode  # 0600, or 0660 when the CAS is shared with a group
        self.file_mode = mode
        fds: list[int] = []
        where = self.root / layout.USAGE
        try:
            with naming("opening the CAS use record", where):
                self.dir_fd = _open_usage_dir(root_fd, self.access, create=not read_only)
                if self.dir_fd >= 0:
                    fds.append(self.dir_fd)
                self.lock_fd = -1
                if not read_only:
                    self.lock_fd = open_lock(self.dir_fd, layout.USAGE_LOCK, mode)
                elif self.dir_fd >= 0:
                    with contextlib.suppress(FileNotFoundError, PermissionError):
                        self.lock_fd = os.open(layout.USAGE_LOCK, _READ, dir_fd=self.dir_fd)
                if self.lock_fd >= 0:
                    fds.append(self.lock_fd)
            writable = not read_only
            self.store = _Log(
                self.dir_fd, layout.STORE_LOG, mode, where / layout.STORE_LOG, writable=writable
            )
            if self.store.fd >= 0:
                fds.append(self.store.fd)
            self.uses = _Log(
                self.dir_fd, layout.USES_LOG, mode, where / layout.USES_LOG, writable=writable
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._mutex = threading.Lock()  # the flock is per open file: one holder at a time
        self._pins = itertools.count()
        self.index: Index | None = None  # replayed on first need
        self.appended = 0  # log bytes this instance wrote (compaction trigger)
        self._compacting = threading.Lock()
        self._closed = False

    def close(self, in_child: bool = False) -> None:
        """Waits for a compaction running in the background, then closes the files. In a
        forked child (no thread, maybe a mutex copied while held) it only closes them:
        the flock belongs to the parent's open file description."""
        if in_child:
            if not self._closed:
                self._closed = True
                self._close_fds()
            return
        with self._compacting, self._mutex:  # _compacting: held by a compaction thread
            if self._closed:
                return
            self._closed = True
            self._close_fds()

    def _close_fds(self) -> None:
        self.store.close()
        self.uses.close()
        for fd in (self.lock_fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)

    def pin_path(self, name: str) -> Path:
        """A pin file's full path (for messages)."""
        return self.scratch("pin")[1] / name

    # ---- the lock ----

    @contextlib.contextmanager
    def _flock(self, how: int) -> Iterator[None]:
        """The in-process mutex, then the flock; each wait bounded by ``timeout_s``
        (``LockTimeoutError`` naming ``usage/lock`` and, when /proc tells, its holder)."""
        if not self._mutex.acquire(timeout=self.timeout_s):
            path = lock_path(self.dir_fd, layout.USAGE_LOCK)
            raise LockTimeoutError(path, self.timeout_s, os.getpid())
        if self.lock_fd < 0:  # read-only, and no writer ever made the lock file
            try:
                yield
            finally:
                self._mutex.release()
            return
        try:
            flock_within(
                self.lock_fd,
                how,
                self.timeout_s,
                lambda: lock_path(self.dir_fd, layout.USAGE_LOCK),
            )
            try:
                yield
            finally:
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def shared(self) -> contextlib.AbstractContextManager[None]:
        return self._flock(fcntl.LOCK_SH)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self._flock(fcntl.LOCK_EX)

    # ---- writing (lock held by the caller) ----

    def _append(self, log_: _Log, kind: bytes, names: Iterable[bytes] | bytes) -> None:
        if self.read_only:
            raise ReadOnlyCASError(self.root, "write the use record")
        body = names if isinstance(names, bytes) else b"\0".join(names)
        if not body:
            return
        if log_ is self.store and log_.replaced():
            self._reload()
        self.appended += log_.append(_chunk(kind, time.time_ns(), body))

    def record_stored(self, names: list[bytes]) -> None:
        """``S``: these names are about to be published (an unbounded instance's commit)."""
        with self.shared():
            self._append(self.store, b"S", names)
            if self.index is not None:
                self._tail()
        self.maybe_compact()

    def append_stored_locked(self, names: list[bytes]) -> None:
        """``S`` under the caller's LOCK_EX (admission), applied to the index at once."""
        self._append(self.store, b"S", names)
        self._tail()

    # ---- pins ----

    @contextlib.contextmanager
    def pin(self, names: bytes) -> Iterator[Pin]:
        """Pins ``names`` (``\\0``-separated) for the ``with`` block; records their use
        (``U``) when it ends."""
        if self.read_only:  # nothing can be written: a pin that pins nothing
            yield Pin(self, "", -1)
            return
        name = f"{_PIN_PREFIX}{next(self._pins)}"
        tmp_fd, tmp_dir = self.scratch("pin blobs")
        with self.shared(), naming("writing a pin file", tmp_dir / name):
            fd = _open_file(tmp_fd, name, _APPEND | os.O_EXCL, self.file_mode)
            try:
                if names:
                    os.write(fd, names + b"\0")
            except BaseException:
                os.close(fd)
                os.unlink(name, dir_fd=tmp_fd)
                raise
        pin = Pin(self, name, fd)
        pin.body.append(names)
        try:
            yield pin
        finally:
            try:
                with self.shared():
                    self._append(self.uses, b"U", b"\0".join(b for b in pin.body if b))
            finally:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=tmp_fd)
            self.maybe_compact()

    def pinned_keys(self) -> set[bytes]:
        """Every key pinned by any live or not yet swept instance (lock held)."""
        keys: set[bytes] = set()
        with os.scandir(self.tmp_parent_fd) as it:
            owners = [e.name for e in it if e.is_dir(follow_symlinks=False)]
        for owner in owners:
            try:
                dfd = os.open(owner, _DIR, dir_fd=self.tmp_parent_fd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except PermissionError:
                if self.read_only:  # another user's: a reader only reports, never evicts
                    continue
                raise
            try:
                with os.scandir(dfd) as it:
                    pins = [e.name for e in it if e.name.startswith(_PIN_PREFIX)]
                for p in pins:
                    try:
                        fd = os.open(p, _READ, dir_fd=dfd)
                    except FileNotFoundError:
                        continue  # its scope ended
                    try:
                        data = _read_all(fd)
                    finally:
                        os.close(fd)
                    keys.update(layout.key_of(n) for n in data.split(b"\0"))
            finally:
                os.close(dfd)
        keys.discard(b"")
        return keys

    # ---- reading ----

    def _reload(self) -> None:
        """After a compaction: everything again from the start."""
        self.store.reopen()
        self.uses.offset, self.uses.kind = 0, b""
        if self.index is not None:
            self.index = Index()

    def _tail(self) -> Index:
        """The index, brought up to date with both logs (lock held)."""
        if self.store.replaced():
            self._reload()
        if self.index is None:
            self.index = Index()
            self.uses.offset, self.uses.kind = 0, b""
            self.store.offset, self.store.kind = 0, b""
        idx = self.index
        for kind, t, body in self.store.read_new():
            idx.apply(kind, t, body)
        for kind, t, body in self.uses.read_new():
            idx.apply(kind, t, body)
        return idx

    def tail(self) -> Index:
        """The up-to-date index (takes LOCK_SH; reconciles a never-compacted log)."""
        with self.shared():
            idx = self._tail()
        if not idx.reconciled and not self.read_only:
            with self.exclusive():
                idx = self._tail()
                if not idx.reconciled:
                    self._compact_locked()
                    idx = self._tail()
        return idx

    def refresh(self) -> Index:
        """The index, brought up to date under the caller's lock (shared or exclusive);
        never compacts (that needs LOCK_EX: :meth:`tail_locked`)."""
        return self._tail()

    def tail_locked(self) -> Index:
        """:meth:`tail` under the caller's LOCK_EX (reconciles a never-compacted log)."""
        idx = self._tail()
        if not idx.reconciled:
            self._compact_locked()
            idx = self._tail()
        return idx

    # ---- eviction (LOCK_EX held) ----

    def remove(self, victims: list[tuple[int, bytes]], pinned: set[bytes]) -> list[bytes]:
        """Unlinks the names of each victim key that is still unused since the given
        time and not pinned; records them (``E``). Returns the names removed."""
        idx = self._tail()
        removed: list[bytes] = []
        for t, key in victims:
            e = idx.entries.get(key)
            if e is None or e[0] != t or key in pinned:
                continue
            for bit in (2, 1):  # the variant first: it is made from the blob
                if not e[1] & bit:
                    continue
                name = layout.name_of(_AREA_OF_BIT[bit], key)
                try:
                    os.unlink(name, dir_fd=self.root_fd)
                except FileNotFoundError:
                    pass  # removed by hand, or its rename did not happen yet: keep the index
                else:
                    removed.append(name)
        if removed:
            self._append(self.store, b"E", removed)
            self._tail()
        return removed

    # ---- compaction ----

    def maybe_compact(self) -> None:
        """Compacts in a background thread once this instance appended a lot."""
        if self.appended < COMPACT_MIN_BYTES // 4 or self._closed:
            return
        self.appended = 0
        if self.store.size() + self.uses.size() < COMPACT_MIN_BYTES:
            return
        if not self._compacting.acquire(blocking=False):
            return
        threading.Thread(target=self._compact_bg, name="fastmat-cas-compact", daemon=True).start()

    def _compact_bg(self) -> None:
        try:
            if self._closed:
                return
            with self.exclusive():
                idx = self._tail()
                live = len(idx.entries) * 96
                if self.store.size() + self.uses.size() >= max(COMPACT_MIN_BYTES, 4 * live):
                    self._compact_locked()
        except OSError as e:
            log.warning("CAS use record: compaction failed: %s", e)
        finally:
            self._compacting.release()

    def compact(self) -> Index:
        """Rescans the CAS and rewrites the logs as a snapshot (``gc``)."""
        with self.exclusive():
            self._compact_locked()
            return self._tail()

    def _compact_locked(self) -> None:
        """The shard directories are the truth: names present but unknown are added
        (last use: their mtime), names known but absent dropped (not counted as
        evictions). Then ``store`` becomes the snapshot and ``uses`` is emptied."""
        idx = self._tail()
        present = scan_names(self.root_fd)
        for name in present:
            kb = split_name(name)
            if kb is None:
                continue
            key, bit = kb
            e = idx.entries.get(key)
            if e is None or not e[1] & bit:
                try:
                    st = os.stat(name, dir_fd=self.root_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                idx.stored(name, st.st_mtime_ns if e is None else e[0])
        for key, e in list(idx.entries.items()):
            for bit, area in _AREA_OF_BIT.items():
                name = layout.name_of(area, key)
                if e[1] & bit and name not in present:
                    idx.removed(name, count=False)
        c = idx.counters
        parts = [
            _chunk(b"C", time.time_ns(), b"%d %d %d" % (c.evictions, c.evicted_bytes, c.refetches))
        ]
        if idx.evicted:
            parts.append(_chunk(b"X", 0, b"\0".join(idx.evicted)))
        by_time: dict[int, list[bytes]] = {}
        for key, e in sorted(idx.entries.items(), key=lambda kv: kv[1][0]):
            for bit, area in _AREA_OF_BIT.items():
                if e[1] & bit:
                    by_time.setdefault(e[0], []).append(layout.name_of(area, key))
        parts.extend(_chunk(b"S", t, b"\0".join(names)) for t, names in by_time.items())
        tmp = f"{layout.STORE_LOG}.{os.getpid()}.new"
        fd = _open_file(
            self.dir_fd, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.file_mode
        )
        try:
            for part in parts:
                os.write(fd, part)
        finally:
            os.close(fd)
        os.rename(tmp, layout.STORE_LOG, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.ftruncate(self.uses.fd, 0)
        self.index = None
        self._reload()
        log.info("CAS use record compacted: %d keys", len(idx.entries))


def _open_usage_dir(root_fd: int, access: Access, *, create: bool = True) -> int:
    """``usage/``, made at first use (a CAS older than the use record has none) with
    the CAS's access (private, or the shared group's 2770); -1 if absent and not
    ``create``."""
    try:
        return os.open(layout.USAGE, _DIR, dir_fd=root_fd)
    except (FileNotFoundError, PermissionError):
        if not create:
            return -1  # read-only: no record (or another user's), read as empty
    made = True
    try:
        os.mkdir(layout.USAGE, 0o755 if access.gid is None else 0o2770, dir_fd=root_fd)
    except FileExistsError:
        made = False  # another opener was first, and gave it the access
    fd = os.open(layout.USAGE, _DIR, dir_fd=root_fd)
    if made and access.gid is not None:  # whatever the umask took
        try:
            os.fchown(fd, -1, access.gid)
            os.fchmod(fd, 0o2770)
        except BaseException:
            os.close(fd)
            raise
    return fd


def scan_names(root_fd: int) -> set[bytes]:
    """Every ``blobs/..`` and ``exec/..`` name in the shard directories (readdir only)."""
    out: set[bytes] = set()
    for area in layout.AREAS:
        for shard in layout.SHARDS:
            d = f"{area}/{shard}"
            try:
                fd = os.open(d, _DIR, dir_fd=root_fd)
            except FileNotFoundError:
                continue
            try:
                with os.scandir(fd) as it:
                    prefix = f"{d}/".encode()
                    out.update(
                        prefix + os.fsencode(e.name) for e in it if not e.name.startswith(".")
                    )
            finally:
                os.close(fd)
    return out


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def file_links(root_fd: int, names: Iterable[bytes]) -> tuple[int, int]:
    """(bytes held only by the CAS, bytes shared with linked trees): lstat per name."""
    only = shared = 0
    for name in names:
        try:
            st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if st.st_nlink > 1:
            shared += st.st_size
        else:
            only += st.st_size
    return only, shared
