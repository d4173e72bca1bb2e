"""A bounded local CAS: least-recently-used names are evicted to stay within a budget.

``LocalCAS(path, max_bytes=..., max_blobs=...)`` counts every name (a blob and its
executable variant are two) in the use record (:mod:`fastmat.cas.usage`), shared by
every process that opens the CAS:

- **admission** (:meth:`Evictor.admit`, the group commit's hook, under
  ``LOCK_EX``): a group is published only once it fits; if it would not, the
  least recently used unpinned names are evicted first. So the CAS holds at most
  ``max_bytes`` (and ``max_blobs`` names) whenever its unpinned names can make
  room; pinned names are never evicted, so pins can push it over.
- **in the background** (one thread per bounded instance): above the high
  watermark (90 %), names are evicted down to the low watermark (80 %), at most
  :data:`~fastmat.cas.usage.EVICT_ROUND` per ``LOCK_EX`` hold, so pins and commits
  of other processes wait little.
- **on demand**: :meth:`Evictor.evict_to` (``fastmat gc --cas``).

Eviction unlinks the CAS name only: trees and cache entries linked to the blob keep
their inode (a name removed from the CAS never changes a tree). A materialize whose
blob was evicted before it pinned it finds it absent and fetches it again (counted as
a re-fetch) or fails with ``BlobNotFoundError``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fastmat.cas.commit import Staged
from fastmat.cas.usage import EVICT_ROUND, Index, Usage

__all__ = ["Budget", "EvictReport", "Evictor"]

log = logging.getLogger("fastmat")

_CANDIDATES = 4096  # least recently used keys considered per pass
_PERIOD_S = 5.0  # the background thread also looks at this interval (other processes fill)


@dataclass(frozen=True)
class Budget:
    """Bounds over the CAS's names (``None``: unbounded); watermarks as fractions."""

    max_bytes: int | None = None
    max_blobs: int | None = None
    high: float = 0.9  # background eviction starts above this fraction...
    low: float = 0.8  # ...and stops at this one

    def __post_init__(self) -> None:
        for v in (self.max_bytes, self.max_blobs):
            if v is not None and v < 0:
                raise ValueError("max_bytes and max_blobs must be >= 0")
        if not 0 < self.low <= self.high <= 1:
            raise ValueError("need 0 < low <= high <= 1")

    @property
    def bounded(self) -> bool:
        return self.max_bytes is not None or self.max_blobs is not None

    def limits(self, fraction: float) -> tuple[float, float]:
        inf = float("inf")
        b = inf if self.max_bytes is None else self.max_bytes * fraction
        n = inf if self.max_blobs is None else self.max_blobs * fraction
        return b, n


@dataclass
class EvictReport:
    """One eviction run: the CAS's names before and after, what was removed."""

    bytes_before: int = 0
    names_before: int = 0
    bytes_after: int = 0
    names_after: int = 0
    evicted: int = 0  # names removed
    evicted_bytes: int = 0
    pinned: int = 0  # keys pinned when the run ended (never evicted)
    duration_s: float = 0.0


def _fits(idx: Index, max_bytes: float, max_names: float) -> bool:
    return idx.total_bytes <= max_bytes and idx.total_names <= max_names


class Evictor:
    """Admission and background eviction for one bounded ``LocalCAS`` instance."""

    def __init__(self, usage: Usage, budget: Budget, *, background: bool = True) -> None:
        self.usage = usage
        self.budget = budget
        self.evicted = 0  # names this instance removed
        self.evicted_bytes = 0
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="fastmat-cas-evict", daemon=True)
            self._thread.start()

    def close(self, in_child: bool = False) -> None:
        """Stops the background thread (a forked child has none: nothing to do)."""
        if in_child:
            return
        self._closed.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # ---- admission (the group commit's hook) ----

    def admit(self, staged: Sequence[Staged]) -> None:
        """Makes room for the group (evicting under this same ``LOCK_EX`` hold), then
        records its names (``S``); never raises: a failed eviction is logged and the
        group published over the budget."""
        names = [s.final.encode() for s in staged]
        add_bytes = sum(s.digest.size_bytes for s in staged)
        max_b, max_n = self.budget.limits(1.0)
        with self.usage.exclusive():
            idx = self.usage.tail_locked()
            if not _fits(idx, max_b - add_bytes, max_n - len(names)):
                try:
                    self._evict_locked(idx, max_b - add_bytes, max_n - len(names))
                except OSError as e:
                    log.warning("CAS: eviction at admission failed: %s", e)
                idx = self.usage.tail_locked()
                if not _fits(idx, max_b - add_bytes, max_n - len(names)):
                    log.info(
                        "CAS over its budget: %d bytes in %d names plus %d pinned or in use",
                        idx.total_bytes,
                        idx.total_names,
                        add_bytes,
                    )
            self.usage.append_stored_locked(names)
            high_b, high_n = self.budget.limits(self.budget.high)
            over = not _fits(idx, high_b, high_n)
        if over:
            self._wake.set()

    # ---- eviction ----

    def _evict_locked(self, idx: Index, max_bytes: float, max_names: float) -> None:
        """Evicts least recently used unpinned names until the index fits (LOCK_EX held,
        for as long as it takes: admission's slow path)."""
        pinned = self.usage.pinned_keys()
        while not _fits(idx, max_bytes, max_names):
            cands = idx.oldest(pinned, _CANDIDATES)
            if not cands:
                return
            if not self._remove_some(
                idx, cands, pinned, fit=(max_bytes, max_names), limit=len(cands)
            ):
                return
            idx = self.usage.tail_locked()

    def _remove_some(
        self,
        idx: Index,
        cands: list[tuple[int, bytes]],
        pinned: set[bytes],
        *,
        fit: tuple[float, float],
        limit: int,
    ) -> int:
        """Removes candidates in order until the index fits or ``limit`` keys were
        taken; returns the names removed."""
        need_b = idx.total_bytes - fit[0]
        need_n = idx.total_names - fit[1]
        victims: list[tuple[int, bytes]] = []
        for t, key in cands:
            if (need_b <= 0 and need_n <= 0) or len(victims) >= limit:
                break
            e = idx.entries.get(key)
            if e is None or e[0] != t or key in pinned:
                continue
            victims.append((t, key))
            n = bin(e[1]).count("1")
            need_b -= e[2] * n
            need_n -= n
        if not victims:
            return 0
        before = idx.total_bytes
        removed = self.usage.remove(victims, pinned)
        assert self.usage.index is not None
        self.evicted += len(removed)
        self.evicted_bytes += before - self.usage.index.total_bytes
        return len(removed)

    def evict_to(self, max_bytes: float, max_names: float) -> EvictReport:
        """Evicts down to the bounds in rounds of at most ``EVICT_ROUND`` names per
        ``LOCK_EX`` hold; stops early when everything left is pinned or in use."""
        t0 = time.monotonic()
        idx = self.usage.tail()
        rep = EvictReport(bytes_before=idx.total_bytes, names_before=idx.total_names)
        evicted0, bytes0 = self.evicted, self.evicted_bytes
        pinned: set[bytes] = set()
        while not self._closed.is_set():
            with self.usage.shared():
                idx = self.usage.refresh()
                if _fits(idx, max_bytes, max_names):
                    break
                cands = idx.oldest(set(), _CANDIDATES)
            if not cands:
                break
            progressed = False
            for i in range(0, len(cands), EVICT_ROUND):
                with self.usage.exclusive():
                    idx = self.usage.tail_locked()
                    if _fits(idx, max_bytes, max_names):
                        break
                    pinned = self.usage.pinned_keys()
                    chunk = cands[i : i + EVICT_ROUND]
                    if self._remove_some(
                        idx, chunk, pinned, fit=(max_bytes, max_names), limit=EVICT_ROUND
                    ):
                        progressed = True
            if not progressed:
                break
        with self.usage.shared():
            idx = self.usage.refresh()
            pinned = self.usage.pinned_keys()
        rep.bytes_after, rep.names_after = idx.total_bytes, idx.total_names
        rep.evicted = self.evicted - evicted0
        rep.evicted_bytes = self.evicted_bytes - bytes0
        rep.pinned = len(pinned)
        rep.duration_s = time.monotonic() - t0
        if rep.evicted:
            log.info(
                "CAS: evicted %d names (%d bytes); %d bytes in %d names remain",
                rep.evicted,
                rep.evicted_bytes,
                rep.bytes_after,
                rep.names_after,
            )
        return rep

    def _run(self) -> None:
        try:  # the use record replayed at once: the first admission finds it ready
            self.usage.tail()
        except OSError as e:
            log.warning("CAS use record: replay failed: %s", e)
        while not self._closed.is_set():
            self._wake.wait(_PERIOD_S)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                idx = self.usage.tail()
                high_b, high_n = self.budget.limits(self.budget.high)
                if not _fits(idx, high_b, high_n):
                    self.evict_to(*self.budget.limits(self.budget.low))
            except OSError as e:  # the CAS is being removed, a full disk: try later
                log.warning("CAS background eviction failed: %s", e)
