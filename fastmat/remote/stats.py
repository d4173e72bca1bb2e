"""Counters of the remote side: one client's calls, one fetcher's work."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RemoteStats:
    """Counters of one client (thread-safe through its channel)."""

    calls: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    bytes_received: int = 0
    inflight: int = 0
    peak_inflight: int = 0


@dataclass
class FetchStats:
    """What one fetcher did (cumulative). ``waited``: blobs another process was
    fetching, that this one waited for instead. ``first_link_ns`` /
    ``last_fetch_ns``: ``time.monotonic_ns()`` of the first link call that
    linked fetched files and of the last fetch completion of the last
    pipelined materialize (event order, for tests; not a timing)."""

    directories: int = 0
    get_tree: int = 0
    blobs: int = 0
    bytes: int = 0
    batches: int = 0
    streams: int = 0
    waited: int = 0
    peak_inflight: int = 0
    link_calls: int = 0
    first_link_ns: int = 0
    last_fetch_ns: int = 0
