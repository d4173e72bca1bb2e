"""What ``DirectoryCache`` reports: the result of one call and its statistics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CacheResult:
    """What ``DirectoryCache.materialize`` did: ``method`` is "hardlink" (replay from the
    entry), "clonefile" (macOS) or "materialize" (no cache kept, max_entries=0)."""

    hit: bool
    method: str
    bytes: int
    files: int
    acquire_s: float  # lookup, waiting for another constructor, or constructing
    clone_s: float
    duration_s: float
    rebuilt: bool = False  # a damaged entry was found, invalidated and rebuilt


@dataclass(frozen=True)
class CacheStats:
    """Event counters (hits/misses/...: since open, or over every instance's lifetime,
    see ``DirectoryCache.stats``) and the index now (entries/bytes/pinned)."""

    entries: int
    bytes: int
    pinned: int
    hits: int
    misses: int
    constructions: int
    adopted: int  # hits served by an entry another process (or a past run) built
    clonefile_hits: int
    hardlink_hits: int
    overlay_hits: int
    evictions: int
    fallbacks: int  # clonefile -> replay, overlay -> hardlink
    damaged: int  # entries found damaged, invalidated and rebuilt
    rotations: int = 0  # entry files replaced by a copy at a hit (EMLINK), sample refreshed

    @classmethod
    def of(cls, n: Mapping[str, int], *, entries: int, bytes: int, pinned: int) -> CacheStats:
        """From the cache's event counters and its index totals."""
        return cls(
            entries=entries,
            bytes=bytes,
            pinned=pinned,
            hits=n.get("hits", 0),
            misses=n.get("misses", 0),
            constructions=n.get("constructions", 0),
            adopted=n.get("adopted", 0),
            clonefile_hits=n.get("clonefile", 0),
            hardlink_hits=n.get("hardlink", 0),
            overlay_hits=n.get("overlay", 0),
            evictions=n.get("evictions", 0),
            fallbacks=n.get("fallbacks", 0),
            damaged=n.get("damaged", 0),
            rotations=n.get("rotations", 0),
        )
