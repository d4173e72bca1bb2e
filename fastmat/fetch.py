"""Fetching what a tree needs from a remote CAS: :class:`RemoteFetcher`.

:class:`RemoteFetcher` binds a :class:`~fastmat.remote.RemoteCAS` to a
:class:`~fastmat.cas.LocalCAS` and implements the ``fastmat.tree.Fetcher``
protocol:

- ``fetch_directories(root)``: GetTree when the root is absent (the server's
  answer is hashed message by message; only messages reachable from ``root``
  by digest are kept), then level by level with BatchReadBlobs for whatever is
  still missing. Every message is verified against its digest before it is
  stored.
- ``fetch_blobs(digests, on_ready=...)``: each distinct digest once; small
  blobs packed into BatchReadBlobs requests under the server's batch limit,
  large ones streamed (ByteStream.Read) into a CAS temp while hashed; every
  byte verified before it is published; at most ``max_inflight`` requests in
  flight per fetcher. Before fetching a blob a worker takes its per-digest
  lock (:class:`~fastmat.fetch_flight._FetchLocks`) without waiting; a blob
  locked by another process is waited for by one waiter thread and only
  fetched if that process gave up. So processes sharing a CAS fetch each blob
  once (DESIGN.md invariant 8). ``on_ready`` receives blobs as they land (a
  streamed blob alone, a batch's blobs 32 at a time).

The fetch -> link pipeline (:func:`run_pipelined`, :func:`materialize_remote`)
is in :mod:`fastmat.fetch_pipeline`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastmat import proto
from fastmat.digest import Digest
from fastmat.errors import BlobNotFoundError, DigestMismatchError, InvalidDigestError
from fastmat.fetch_flight import OnReady, _FetchLocks, _Job
from fastmat.fetch_pipeline import materialize_remote, run_pipelined

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS
    from fastmat.remote import RemoteCAS

__all__ = [
    "DEFAULT_MAX_INFLIGHT",
    "FetchStats",
    "RemoteFetcher",
    "_FetchLocks",  # the tests' handle on the lock
    "bind",
    "materialize_remote",
    "run_pipelined",
]


DEFAULT_MAX_INFLIGHT = 128
_READY_GROUP = 32  # blobs of a batch handed to the linker together
_MAX_DIRECTORIES = 10_000_000  # a hostile tree cannot make the BFS run forever


@dataclass
class FetchStats:
    """What one fetcher did (cumulative). ``waited``: blobs another process was
    fetching, that this one waited for instead. ``first_link_ns`` /
    ``last_fetch_ns``: ``time.monotonic_ns()`` of the first link call that
    linked fetched files and of the last fetch completion of the last
    ``run_pipelined`` (event order, for tests; not a timing)."""

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


class RemoteFetcher:
    """Fetches from ``remote`` into ``cas``; see the module docstring.

    ``max_inflight``: requests in flight at most (default 128). ``batch_bytes``:
    total size of one BatchReadBlobs (0: the server's limit). Blobs above
    ``stream_threshold_bytes`` (0: a quarter of the batch size) are streamed.
    """

    def __init__(
        self,
        remote: RemoteCAS,
        cas: LocalCAS,
        *,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        batch_bytes: int = 0,
        stream_threshold_bytes: int = 0,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.remote = remote
        self.cas = cas
        self.max_inflight = max_inflight
        self._batch_bytes = batch_bytes
        self._stream_threshold = stream_threshold_bytes
        self.stats = FetchStats()
        self._mutex = threading.Lock()
        self._inflight = 0
        # the bound holds per fetcher, however many fetch_blobs calls run at once
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._locks = _FetchLocks(cas.root / "locks")

    def close(self) -> None:
        self._locks.close()

    def __enter__(self) -> RemoteFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def batch_bytes(self) -> int:
        limit = self.remote.max_batch_bytes
        return min(self._batch_bytes, limit) if self._batch_bytes else limit

    @property
    def stream_threshold_bytes(self) -> int:
        return self._stream_threshold or self.batch_bytes // 4

    def _count(self, **deltas: int) -> None:
        with self._mutex:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    # ---- directories ----

    def _verified(self, d: Digest, data: bytes) -> None:
        actual = Digest.of(data)
        if actual != d:
            raise DigestMismatchError(d, actual, f"Directory from {self.remote.target}")
        self.cas.put(data, expected=d)
        self._count(directories=1)

    def fetch_directories(self, root: Digest) -> None:
        """Stores every ``Directory`` of the tree under ``root`` that ``cas`` lacks.

        Absent and undecodable messages and bad child digests are left for
        ``load_plan`` to report, with their path; ``DigestMismatchError`` and
        ``RemoteError`` propagate.
        """
        known: dict[Digest, bytes] = {}
        if root not in self.cas:
            with contextlib.suppress(BlobNotFoundError):  # load_plan names it
                for raw in self.remote.get_tree(root) or ():
                    known[Digest.of(raw)] = raw
            if known:
                self._count(get_tree=1)
        seen = {root}
        level = [root]
        while level:
            data: dict[Digest, bytes] = {}
            absent = []
            for d in level:
                if d in self.cas:
                    data[d] = self.cas.read(d)
                elif d in known:
                    self._verified(d, known[d])  # hashed above: stored under its own hash
                    data[d] = known[d]
                else:
                    absent.append(d)
            for d, blob in self.remote.read_blobs(absent, missing_ok=True):
                self._verified(d, blob)
                data[d] = blob
            nxt: list[Digest] = []
            for d in level:
                try:
                    msg = proto.Directory.FromString(data[d])
                    children = [Digest(c.digest.hash, c.digest.size_bytes) for c in msg.directories]
                except (proto.DecodeError, InvalidDigestError, KeyError):
                    continue  # load_plan reports it, with the path
                for c in children:
                    if c not in seen and len(seen) < _MAX_DIRECTORIES:
                        seen.add(c)
                        nxt.append(c)
            level = nxt

    # ---- file blobs ----

    def _plan_items(self, digests: Iterable[Digest]) -> list[tuple[bool, list[Digest]]]:
        """(streamed?, digests) work items: large blobs alone, small ones in batches."""
        todo = [d for d in dict.fromkeys(digests) if d.size_bytes > 0]
        threshold = self.stream_threshold_bytes
        large = [d for d in todo if d.size_bytes > threshold]
        small = [d for d in todo if d.size_bytes <= threshold]
        items: list[tuple[bool, list[Digest]]] = [(True, [d]) for d in large]
        limit = self.batch_bytes
        batch: list[Digest] = []
        total = 0
        for d in small:
            cost = d.size_bytes + 100
            if batch and total + cost > limit:
                items.append((False, batch))
                batch, total = [], 0
            batch.append(d)
            total += cost
        if batch:
            items.append((False, batch))
        return items

    def _fetch(self, streamed: bool, ds: list[Digest], stored: OnReady | None = None) -> None:
        """One request (its in-flight slot held): stream one blob or read one batch.
        ``stored`` gets the blobs as they land, a few at a time."""
        with self._slots:
            self._fetch_in_slot(streamed, ds, stored or (lambda _: None))

    def _fetch_in_slot(self, streamed: bool, ds: list[Digest], stored: OnReady) -> None:
        with self._mutex:
            self._inflight += 1
            self.stats.peak_inflight = max(self.stats.peak_inflight, self._inflight)
        try:
            if streamed:
                (d,) = ds
                try:
                    self.cas.put_stream(self.remote.read_stream(d), d)
                except DigestMismatchError as e:
                    raise DigestMismatchError(d, e.actual, f"from {self.remote.target}") from e
                self._count(blobs=1, bytes=d.size_bytes, streams=1)
                stored([d])
                return
            first: BaseException | None = None
            group: list[Digest] = []
            for d, data in self.remote.read_batch(ds):
                try:
                    self.cas.put(data, expected=d)  # hashes, stores nothing on mismatch
                except DigestMismatchError as e:
                    first = first or DigestMismatchError(d, e.actual, f"from {self.remote.target}")
                    continue
                group.append(d)
                if len(group) == _READY_GROUP:
                    stored(group)
                    group = []
            self._count(blobs=len(ds), bytes=sum(d.size_bytes for d in ds), batches=1)
            if first is not None:
                raise first
            if group:
                stored(group)
        finally:
            with self._mutex:
                self._inflight -= 1

    def fetch_blobs(
        self,
        digests: Sequence[Digest],
        *,
        on_ready: OnReady | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Stores the given file blobs (see the module docstring).

        Raises the first failure once the requests in flight have ended:
        ``BlobNotFoundError`` (digest only), ``DigestMismatchError`` (nothing
        stored for that blob), ``RemoteError``. Setting ``cancel`` stops it early
        (no new requests).
        """
        items = self._plan_items(digests)
        if items:
            _Job(self, items, on_ready, cancel or threading.Event()).run()


def bind(fetcher: Any, cas: LocalCAS) -> Any:
    """What ``materialize`` / ``DirectoryCache`` should use for ``fetcher``: a
    ``RemoteCAS`` becomes a ``RemoteFetcher`` into ``cas``; anything else is
    returned unchanged (a ``RemoteFetcher``, another ``Fetcher``, None)."""
    from fastmat.remote import RemoteCAS

    return RemoteFetcher(fetcher, cas) if isinstance(fetcher, RemoteCAS) else fetcher
