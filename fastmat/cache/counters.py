"""A directory cache's event counters (hits, misses, evictions...), kept across processes.

Each open instance counts in memory and writes its own totals to
``counters/<instance>.json`` (temp + rename, no fsync: counters are advisory) every
:data:`FLUSH_EVERY` events and at close, never once per hit. Reading sums every
instance's file (:func:`read_all`). Opening a cache folds the files of instances whose
scratch directory is gone (closed, or dead and swept) into ``counters/total.json``,
under an flock of ``counters/.lock``, so the directory holds about one file per live
instance. Limits: a SIGKILLed instance loses the events since its last write (fewer
than ``FLUSH_EVERY``); a crash between writing the total and unlinking the folded file
counts that file twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping

from fastmat.fs import locks

log = logging.getLogger("fastmat")

DIR = "counters"
FLUSH_EVERY = 256  # events between two writes of an instance's file
_TOTAL = "total"
_LOCK = ".lock"
_SUFFIX = ".json"
_TMP = ".tmp"
_O_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW


class Counters:
    """One instance's counters; thread-safe. ``add`` writes the file every
    ``flush_every`` events (in the calling thread), ``flush`` whenever asked."""

    def __init__(self, dir_fd: int, name: str, mode: int, flush_every: int | None = None):
        self._dir_fd, self._name, self._mode = dir_fd, name, mode
        self._flush_every = flush_every or FLUSH_EVERY
        self._n: Counter[str] = Counter()
        self._mu = threading.Lock()
        self._unwritten = 0

    def add(self, what: str, n: int = 1) -> None:
        if not n:
            return
        with self._mu:
            self._n[what] += n
            self._unwritten += 1
            due = self._unwritten >= self._flush_every
        if due:
            self.flush()

    def snapshot(self) -> Counter[str]:
        with self._mu:
            return Counter(self._n)

    def flush(self) -> None:
        """Writes this instance's file if anything changed since the last write."""
        with self._mu:
            if not self._unwritten:
                return
            self._unwritten = 0
            data = dict(self._n)
            try:
                _write(self._dir_fd, self._name, data, self._mode)
            except OSError as e:  # advisory: never fail a hit over it
                log.warning("cache counters: cannot write %s: %s", self._name, e)


def _write(dir_fd: int, name: str, data: Mapping[str, int], mode: int) -> None:
    tmp = name + _TMP
    fd = os.open(tmp, _O_WRITE, mode, dir_fd=dir_fd)
    try:
        os.write(fd, json.dumps(data, sort_keys=True).encode())
    finally:
        os.close(fd)
    os.rename(tmp, name + _SUFFIX, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _read(dir_fd: int, filename: str) -> Counter[str]:
    try:
        fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return Counter()
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except ValueError:
        log.warning("cache counters: %s is not JSON: ignored", filename)
        return Counter()
    if not isinstance(data, dict):
        return Counter()
    return Counter({str(k): v for k, v in data.items() if isinstance(v, int) and v > 0})


def read_all(dir_fd: int, *, skip: str | None = None) -> Counter[str]:
    """Every instance's counters as last written, and the folded total, summed (but
    instance ``skip``'s: the caller adds its live counters instead)."""
    out: Counter[str] = Counter()
    for filename in os.listdir(dir_fd):
        if filename.endswith(_SUFFIX) and filename != f"{skip}{_SUFFIX}":
            out.update(_read(dir_fd, filename))
    return out


def fold_dead(dir_fd: int, live: set[str], *, mode: int, timeout_s: float) -> int:
    """Adds the files of the instances not in ``live`` (their scratch is gone) to the
    total and removes them, under the counters lock; returns how many."""
    names = {f[: -len(_SUFFIX)] for f in os.listdir(dir_fd) if f.endswith(_SUFFIX)}
    dead = sorted(names - live - {_TOTAL})
    temps = [f for f in os.listdir(dir_fd) if f.endswith(_TMP) and f[: -len(_TMP)] not in live]
    if not dead and not temps:
        return 0
    fd = locks.wait_file(dir_fd, _LOCK, fcntl.LOCK_EX, timeout_s=timeout_s, mode=mode)
    try:
        total = _read(dir_fd, _TOTAL + _SUFFIX)
        folded = []
        for n in dead:
            got = _read(dir_fd, n + _SUFFIX)
            if got or _exists(dir_fd, n + _SUFFIX):
                total.update(got)
                folded.append(n)
        if folded:
            _write(dir_fd, _TOTAL, total, mode)
        for n in folded:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(n + _SUFFIX, dir_fd=dir_fd)
        for t in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t, dir_fd=dir_fd)
    finally:
        os.close(fd)
    return len(folded)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
