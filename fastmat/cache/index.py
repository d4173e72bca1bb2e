"""The in-memory index of a DirectoryCache: entries, pins, sizes and the eviction policy.

Everything here is plain data guarded by the cache's lock; nothing touches the disk.
The policy is data too (a table, as in python-diskcache). The index is a dict kept in
eviction order (oldest first), so touching and evicting are O(1) per entry, never a sort.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from fastmat.cache.entry import Replay
from fastmat.digest import Digest

REPLAY_BUDGET_FILES = 2_000_000  # replay plans kept in memory (~100 B per file)


@dataclass(eq=False)
class Entry:
    """One complete entry on disk, as this process knows it."""

    root: Digest
    bytes: int  # sum of the file digests' sizes (from the plan, never a stat walk)
    files: int
    ident: str  # the random id in its sidecar: tells a rebuilt entry from this one
    replay: Replay | None = None  # loaded lazily from the sidecar
    pins: int = 0  # clones, constructions and workspaces running on it in this process
    lock_fd: int = -1  # held LOCK_SH on locks/<key>.lock while pins > 0 (other processes)
    quarantine_checked: int = 0  # the QuarantineWatch generation it was last checked at

    @property
    def key(self) -> str:
        return self.root.key


# name -> whether a hit moves the entry to the back of the eviction queue
EVICTION_POLICIES: dict[str, bool] = {
    "least-recently-used": True,
    "least-recently-stored": False,
}


@dataclass(frozen=True)
class Limits:
    """Capacity of a cache: ``max_entries`` 0 keeps nothing (materialize straight to dest)."""

    max_bytes: int
    max_entries: int
    policy: str = "least-recently-used"

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.max_entries < 0:
            raise ValueError("max_bytes and max_entries must be >= 0")
        if self.policy not in EVICTION_POLICIES:
            raise ValueError(f"unknown eviction policy {self.policy!r}")


class CacheIndex:
    """Entries by key with running totals; callers hold the cache lock."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._entries: dict[str, Entry] = {}
        self.bytes = 0
        self._replays: OrderedDict[int, Entry] = OrderedDict()  # loaded, least recent first
        self._replay_files = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def insert(self, e: Entry) -> None:
        old = self._entries.get(e.key)
        if old is not None:
            self.remove(old)
        self._entries[e.key] = e
        self.bytes += e.bytes

    def remove(self, e: Entry) -> bool:
        """Takes ``e`` out if it is still the indexed entry for its key."""
        if self._entries.get(e.key) is not e:
            return False
        del self._entries[e.key]
        self.bytes -= e.bytes
        if self._replays.pop(id(e), None) is not None:
            self._replay_files -= e.files
        return True

    def retain_replay(self, e: Entry) -> None:
        """Keeps ``e``'s loaded replay plan as the most recent; drops the least recently
        used unpinned ones beyond REPLAY_BUDGET_FILES (they reload from the sidecar)."""
        if e.replay is None:
            return
        if id(e) not in self._replays:
            self._replay_files += e.files
        self._replays[id(e)] = e
        self._replays.move_to_end(id(e))
        if self._replay_files <= REPLAY_BUDGET_FILES:
            return
        for k, old in list(self._replays.items()):
            if self._replay_files <= REPLAY_BUDGET_FILES or old is e:
                break
            if not old.pins:
                old.replay = None
                self._replay_files -= old.files
                del self._replays[k]

    def touch(self, e: Entry) -> None:
        """A hit: under LRU, ``e`` goes to the back of the eviction queue."""
        if EVICTION_POLICIES[self.limits.policy] and self._entries.get(e.key) is e:
            self._entries[e.key] = self._entries.pop(e.key)

    @property
    def pinned(self) -> int:
        return sum(1 for e in self._entries.values() if e.pins)

    def over(self) -> bool:
        lim = self.limits
        return len(self._entries) > lim.max_entries or self.bytes > lim.max_bytes

    def victims(self) -> Iterator[Entry]:
        """Unpinned entries in policy order, offered while the index is over its limits.

        The caller removes (or skips) each one before asking for the next.
        """
        for e in list(self._entries.values()):
            if not self.over():
                return
            if self._entries.get(e.key) is e and not e.pins:
                yield e
