"""Fetching what a tree needs from a remote CAS: :class:`RemoteFetcher`.

:class:`RemoteFetcher` binds a remote store (a :class:`~fastmat.remote.RemoteCAS`,
or anything with the :class:`BlobSource` methods) to a
:class:`~fastmat.cas.LocalCAS` and implements the ``fastmat.tree.Fetcher`` and
``fastmat.materialize.PipelinedFetcher`` protocols:

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
  lock (:class:`~fastmat.remote.flight.FetchLocks`) without waiting; a blob
  locked by another process is waited for by one waiter thread and only
  fetched if that process gave up. So processes sharing a CAS fetch each blob
  once (invariant 8). ``on_ready`` receives blobs as they land (a
  streamed blob alone, a batch's blobs 32 at a time).
- ``materialize_plan(plan, dest)``: the fetch -> link pipeline
  (:mod:`fastmat.remote.pipeline`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from fastmat import proto
from fastmat.cas import layout
from fastmat.digest import BlobNotFoundError, Digest, DigestMismatchError, InvalidDigestError
from fastmat.remote.flight import FetchJob, FetchLocks, OnReady
from fastmat.remote.pipeline import run_pipelined
from fastmat.remote.stats import FetchStats

if TYPE_CHECKING:
    from fastmat import _binding
    from fastmat.cas import LocalCAS
    from fastmat.cas.usage import Pin
    from fastmat.control import CancelToken, Reporter
    from fastmat.tree import Plan

__all__ = ["DEFAULT_MAX_INFLIGHT", "BlobSource", "FetchStats", "RemoteFetcher"]


DEFAULT_MAX_INFLIGHT = 128
_READY_GROUP = 32  # blobs of a batch handed to the linker together
_MAX_DIRECTORIES = 10_000_000  # a hostile tree cannot make the BFS run forever


class BlobSource(Protocol):
    """What a :class:`RemoteFetcher` reads from (``RemoteCAS`` is one)."""

    target: str

    @property
    def max_batch_bytes(self) -> int: ...

    def get_tree(self, root: Digest) -> list[bytes] | None: ...

    def read_blobs(
        self, digests: Iterable[Digest], *, missing_ok: bool = False
    ) -> Iterator[tuple[Digest, bytes]]: ...

    def read_batch(
        self, digests: list[Digest], *, missing_ok: bool = False
    ) -> list[tuple[Digest, bytes]]: ...

    def read_stream(self, d: Digest) -> Iterator[bytes]: ...


class RemoteFetcher:
    """Fetches from ``remote`` into ``cas``; see the module docstring.

    ``max_inflight``: requests in flight at most (default 128). ``batch_bytes``:
    total size of one BatchReadBlobs (0: the server's limit). Blobs above
    ``stream_threshold_bytes`` (0: a quarter of the batch size) are streamed.
    """

    def __init__(
        self,
        remote: BlobSource,
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
        self.locks = FetchLocks(
            cas.root / "locks", mode=cas.access.lock_mode, timeout_s=cas.lock_timeout_s
        )
        self._dir_pins = threading.local()  # per thread: the Directory messages of one load
        self._open_pins: set[contextlib.ExitStack] = set()

    def close(self) -> None:
        with self._mutex:
            pins, self._open_pins = self._open_pins, set()
        for stack in pins:
            stack.close()
        self.locks.close()

    def _dir_pin(self, fresh: bool) -> Pin:
        """This thread's pin of the Directory messages of the tree being loaded: from
        ``fetch_directories`` until ``materialize_plan`` ends (so ``load_plan`` reads
        what was just fetched even while another process evicts)."""
        if fresh:
            self._release_dir_pin()
        pin: Pin | None = getattr(self._dir_pins, "pin", None)
        if pin is None:
            stack = contextlib.ExitStack()
            pin = stack.enter_context(self.cas.pinned())
            with self._mutex:
                self._open_pins.add(stack)
            self._dir_pins.pin, self._dir_pins.stack = pin, stack
        return pin

    def _release_dir_pin(self) -> None:
        stack: contextlib.ExitStack | None = getattr(self._dir_pins, "stack", None)
        self._dir_pins.pin = self._dir_pins.stack = None
        if stack is not None:
            with self._mutex:
                self._open_pins.discard(stack)
            stack.close()

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

    def count(self, **deltas: int) -> None:
        """Adds to :attr:`stats` (thread-safe)."""
        with self._mutex:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def present(self, d: Digest) -> bool:
        return d in self.cas

    # ---- directories ----

    def _verified(self, d: Digest, data: bytes) -> None:
        actual = Digest.of(data)
        if actual != d:
            raise DigestMismatchError(d, actual, f"Directory from {self.remote.target}")
        self.cas.put(data, expected=d)
        self.count(directories=1)

    def fetch_directories(self, root: Digest) -> None:
        """Stores every ``Directory`` of the tree under ``root`` that ``cas`` lacks.

        Absent and undecodable messages and bad child digests are left for
        ``load_plan`` to report, with their path; ``DigestMismatchError`` and
        ``RemoteError`` propagate.
        """
        pin = self._dir_pin(fresh=True)
        pin.add(_names([root]))  # pinned before looked for: never evicted under our feet
        known: dict[Digest, bytes] = {}
        if root not in self.cas:
            with contextlib.suppress(BlobNotFoundError):  # load_plan names it
                for raw in self.remote.get_tree(root) or ():
                    known[Digest.of(raw)] = raw
            if known:
                self.count(get_tree=1)
        seen = {root}
        level = [root]
        while level:
            pin.add(_names(level))
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
        if not todo:
            return []  # nothing to fetch: nothing to ask the server (not even its limits)
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

    def fetch_item(self, streamed: bool, ds: list[Digest], stored: OnReady | None = None) -> None:
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
                self.count(blobs=1, bytes=d.size_bytes, streams=1)
                stored([d])
                return
            first: BaseException | None = None
            got: list[Digest] = []
            # One group commit for the whole response: its blobs are synced together,
            # then published; only then are they handed over (and their locks freed).
            with self.cas.batch(max_blobs=1 << 30, max_bytes=1 << 62) as batch:
                for d, data in self.remote.read_batch(ds):
                    try:
                        batch.put(data, expected=d)  # hashes, stages nothing on mismatch
                    except DigestMismatchError as e:
                        first = first or DigestMismatchError(
                            d, e.actual, f"from {self.remote.target}"
                        )
                        continue
                    got.append(d)
            self.count(blobs=len(ds), bytes=sum(d.size_bytes for d in ds), batches=1)
            for i in range(0, len(got), _READY_GROUP):
                stored(got[i : i + _READY_GROUP])
            if first is not None:
                raise first
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
            FetchJob(self, items, on_ready, cancel or threading.Event()).run()

    # ---- the pipeline ----

    def materialize_plan(
        self,
        plan: Plan,
        dest: str,
        *,
        threads: int = 0,
        max_inflight: int = 64,
        reporter: Reporter | None = None,
        cancel: CancelToken | None = None,
    ) -> _binding.ExecResult:
        """Builds ``plan`` at ``dest``, linking files while the missing blobs arrive
        (:func:`fastmat.remote.pipeline.run_pipelined`)."""
        try:
            return run_pipelined(
                self.cas,
                plan,
                dest,
                self,
                threads=threads,
                max_inflight=max_inflight,
                reporter=reporter,
                cancel=cancel,
            )
        finally:
            self._release_dir_pin()


def _names(digests: Iterable[Digest]) -> bytes:
    """CAS names, NUL-separated, for ``Pin.add``."""
    return b"\0".join(layout.rel(layout.BLOBS, d).encode() for d in digests)
