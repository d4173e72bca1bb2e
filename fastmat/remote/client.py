"""A REAPI v2 CAS client over gRPC: the remote side of fetching.

``RemoteCAS`` speaks ``FindMissingBlobs``, ``BatchReadBlobs``, ``GetTree``,
``GetCapabilities`` and ``ByteStream.Read`` through generic gRPC calls on the
message classes of :mod:`fastmat.proto` (no generated stubs; plumbing in
:mod:`.channel`). Every call has a deadline; ``UNAVAILABLE`` and
``RESOURCE_EXHAUSTED`` are retried with exponential backoff and jitter, then
reported as :class:`~fastmat.errors.RemoteError`.

Bytes are returned as received: the caller verifies them (``LocalCAS.put`` /
``put_stream`` hash before publishing), so every byte is hashed exactly once.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from fastmat import proto
from fastmat.digest import BlobNotFoundError, Digest
from fastmat.errors import RemoteError
from fastmat.remote import upload
from fastmat.remote.channel import RETRYABLE, Channel
from fastmat.remote.fetch import RemoteFetcher
from fastmat.remote.stats import RemoteStats

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS

__all__ = ["RemoteCAS", "RemoteStats", "split_get_tree_response"]

_DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
_ENTRY_OVERHEAD = 100  # digest + status + tags around each blob in a batch response
_FIND_MISSING_CHUNK = 10_000  # ~80 bytes per digest: stays far below 4 MiB requests
_STREAM_FLOOR_BPS = 1 << 20  # ByteStream deadline grows by 1 s per MiB of blob

_UNASKED: Any = object()


def _pb(d: Digest) -> Any:
    return proto.Digest(hash=d.hash, size_bytes=d.size_bytes)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise RemoteError("truncated GetTree response")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def split_get_tree_response(buf: bytes) -> tuple[list[bytes], str]:
    """The raw bytes of each ``directories`` entry (field 1) and ``next_page_token``.

    Decoded by hand so that every Directory keeps the exact bytes the server
    stored: re-serializing a parsed message is not guaranteed to reproduce them.
    """
    dirs: list[bytes] = []
    token = ""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 2:
            length, i = _varint(buf, i)
            if i + length > n:
                raise RemoteError("truncated GetTree response")
            if number == 1:
                dirs.append(buf[i : i + length])
            elif number == 2:
                token = buf[i : i + length].decode("utf-8", "replace")
            i += length
        elif wire == 0:
            _, i = _varint(buf, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise RemoteError(f"unexpected wire type {wire} in GetTree response")
    return dirs, token


class RemoteCAS:
    """A REAPI v2 content-addressable store reached over gRPC.

    ``target`` is ``grpc://host:port``, ``grpcs://host:port`` or ``host:port``.
    TLS files (PEM) apply to ``grpcs://`` only. ``timeout_s`` is the deadline
    of each call (ByteStream reads get one more second per MiB); ``retries`` is
    how many times an ``UNAVAILABLE`` / ``RESOURCE_EXHAUSTED`` call is repeated,
    after ``backoff_s``, doubling each time.
    """

    def __init__(
        self,
        target: str,
        instance_name: str = "",
        *,
        tls_ca_cert: str | os.PathLike[str] | None = None,
        tls_client_cert: str | os.PathLike[str] | None = None,
        tls_client_key: str | os.PathLike[str] | None = None,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.1,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.channel = Channel(
            target,
            retries=retries,
            backoff_s=backoff_s,
            tls_ca_cert=tls_ca_cert,
            tls_client_cert=tls_client_cert,
            tls_client_key=tls_client_key,
            max_message_bytes=max_message_bytes,
        )
        self.target = target
        self.instance_name = instance_name
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_message_bytes = max_message_bytes
        self.stats = self.channel.stats
        self._batch_limit: int | None = None
        self._caps_msg: Any = _UNASKED
        self._caps_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------

    def __enter__(self) -> RemoteCAS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def __repr__(self) -> str:
        return f"RemoteCAS({self.target!r}, {self.instance_name!r})"

    # -- API --------------------------------------------------------------

    def capabilities(self) -> Any:
        """The server's ``ServerCapabilities`` (asked once, on first use, however many
        threads ask at once), or None when it does not implement GetCapabilities."""
        with self._caps_lock:
            if self._caps_msg is _UNASKED:
                ch = self.channel
                req = proto.GetCapabilitiesRequest(instance_name=self.instance_name)
                try:
                    self._caps_msg = ch.call(
                        "GetCapabilities", lambda: ch.capabilities(req, timeout=self.timeout_s)
                    )
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise ch.fail("GetCapabilities", e, 1) from e
                    self._caps_msg = None
            return self._caps_msg

    @property
    def max_batch_bytes(self) -> int:
        """``max_batch_total_size_bytes`` from GetCapabilities (4 MiB when unset),
        kept below ``max_message_bytes``."""
        if self._batch_limit is None:
            caps = self.capabilities()
            limit = 0 if caps is None else int(caps.cache_capabilities.max_batch_total_size_bytes)
            self._batch_limit = min(limit or _DEFAULT_BATCH_BYTES, self.max_message_bytes - 65536)
        return self._batch_limit

    def find_missing(self, digests: Iterable[Digest | str]) -> list[Digest]:
        """The subset of ``digests`` the server does not have."""
        todo = list(dict.fromkeys(map(Digest.coerce, digests)))
        missing: list[Digest] = []
        for i in range(0, len(todo), _FIND_MISSING_CHUNK):
            req = proto.FindMissingBlobsRequest(
                instance_name=self.instance_name,
                blob_digests=[_pb(d) for d in todo[i : i + _FIND_MISSING_CHUNK]],
            )
            call = functools.partial(self.channel.find_missing, req, timeout=self.timeout_s)
            resp = self.channel.unary("FindMissingBlobs", call)
            missing.extend(Digest(m.hash, m.size_bytes) for m in resp.missing_blob_digests)
        return missing

    def batches(self, digests: Iterable[Digest]) -> Iterator[list[Digest]]:
        """Groups ``digests`` into BatchReadBlobs requests within the server's limit
        (asked of the server only when there is something to group)."""
        limit = 0
        batch: list[Digest] = []
        total = 0
        for d in digests:
            limit = limit or self.max_batch_bytes
            cost = d.size_bytes + _ENTRY_OVERHEAD
            if batch and total + cost > limit:
                yield batch
                batch, total = [], 0
            batch.append(d)
            total += cost
        if batch:
            yield batch

    def read_batch(
        self, digests: Sequence[Digest | str], *, missing_ok: bool = False
    ) -> list[tuple[Digest, bytes]]:
        """One BatchReadBlobs call. ``BlobNotFoundError`` for the first absent blob,
        unless ``missing_ok``: then absent blobs are left out of the result."""
        asked = [Digest.coerce(d) for d in digests]
        req = proto.BatchReadBlobsRequest(
            instance_name=self.instance_name, digests=[_pb(d) for d in asked]
        )
        call = functools.partial(self.channel.batch_read, req, timeout=self.timeout_s)
        resp = self.channel.unary("BatchReadBlobs", call)
        wanted = set(asked)
        out: list[tuple[Digest, bytes]] = []
        absent: set[Digest] = set()
        nbytes = 0
        for r in resp.responses:
            d = Digest(r.digest.hash, r.digest.size_bytes)
            if r.status.code == grpc.StatusCode.NOT_FOUND.value[0]:
                if not missing_ok:
                    raise BlobNotFoundError(d)
                absent.add(d)
                continue
            if r.status.code != 0:
                raise RemoteError(
                    f"BatchReadBlobs on {self.target}: {d}: status {r.status.code}: "
                    f"{r.status.message}"
                )
            if d not in wanted:
                raise RemoteError(f"BatchReadBlobs on {self.target}: unrequested blob {d}")
            data = r.data
            nbytes += len(data)
            out.append((d, data))
        got = {d for d, _ in out} | absent
        for d in asked:
            if d not in got:
                raise RemoteError(f"BatchReadBlobs on {self.target}: no response for {d}")
        self.channel.received(nbytes)
        return out

    def read_blobs(
        self, digests: Iterable[Digest | str], *, missing_ok: bool = False
    ) -> Iterator[tuple[Digest, bytes]]:
        """``(digest, bytes)`` for each blob, batch by batch (large blobs too, streamed).
        ``BlobNotFoundError`` for an absent blob, unless ``missing_ok`` (then skipped)."""
        small: list[Digest] = []
        for d in dict.fromkeys(map(Digest.coerce, digests)):
            if d.size_bytes + _ENTRY_OVERHEAD > self.max_batch_bytes:
                try:
                    data = b"".join(self.read_stream(d))
                except BlobNotFoundError:
                    if not missing_ok:
                        raise
                    continue
                yield d, data
            else:
                small.append(d)
        for batch in self.batches(small):
            yield from self.read_batch(batch, missing_ok=missing_ok)

    def upload(self, blobs: Iterable[tuple[Digest | str, bytes]]) -> int:
        """Stores ``(digest, data)`` pairs on the server (batched, large ones streamed);
        returns how many were sent (nothing sent, nothing asked).
        See :func:`fastmat.remote.upload.upload_blobs`."""
        it = ((Digest.coerce(d), data) for d, data in blobs)
        first = next(it, None)
        if first is None:
            return 0
        return upload.upload_blobs(
            self.channel,
            itertools.chain([first], it),
            instance_name=self.instance_name,
            limit=self.max_batch_bytes,
            timeout_s=self.timeout_s,
        )

    def fetcher(self, cas: LocalCAS) -> RemoteFetcher:
        """A :class:`~fastmat.remote.fetch.RemoteFetcher` from this server into ``cas``
        (what ``materialize(..., fetcher=remote)`` uses)."""
        return RemoteFetcher(self, cas)

    def resource_name(self, d: Digest | str) -> str:
        d = Digest.coerce(d)
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        return f"{prefix}blobs/{d.hash}/{d.size_bytes}"

    def read_stream(self, d: Digest | str) -> Iterator[bytes]:
        """ByteStream.Read of one blob, resumed at the received offset on retries."""
        d = Digest.coerce(d)
        offset = 0
        timeout = self.timeout_s + d.size_bytes / _STREAM_FLOOR_BPS
        for attempt in range(self.retries + 1):
            req = proto.ReadRequest(resource_name=self.resource_name(d), read_offset=offset)
            self.channel.enter("Read")
            received = 0
            try:
                for resp in self.channel.read(req, timeout=timeout):
                    chunk = resp.data
                    received += len(chunk)
                    offset += len(chunk)
                    if offset > d.size_bytes:
                        raise RemoteError(f"Read on {self.target}: {d} longer than its size")
                    yield chunk
                return
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.NOT_FOUND:
                    raise BlobNotFoundError(d) from e
                if code not in RETRYABLE or attempt == self.retries:
                    raise self.channel.fail("Read", e, attempt + 1) from e
            finally:
                self.channel.leave(received)
            self.channel.backoff(attempt)

    def get_tree(self, root: Digest | str, *, page_size: int = 0) -> list[bytes] | None:
        """Every Directory under ``root`` (raw bytes), or ``None`` if the server does
        not implement GetTree. Pages normally arrive on one stream; a stream that
        ends (or breaks) with a page token is continued from it. Callers hash each
        message: GetTree does not say which digest a message belongs to, and may
        omit missing parts. ``page_size`` 0: the server's choice."""
        root = Digest.coerce(root)
        out: list[bytes] = []
        token = ""
        tokens: set[str] = set()
        attempt = 0
        while True:
            if token in tokens:
                raise RemoteError(f"GetTree on {self.target}: page token {token!r} repeats")
            if token:
                tokens.add(token)
            req = proto.GetTreeRequest(
                instance_name=self.instance_name,
                root_digest=_pb(root),
                page_size=page_size,
                page_token=token,
            )
            self.channel.enter("GetTree")
            received = 0
            try:
                for raw in self.channel.get_tree(req, timeout=self.timeout_s):
                    received += len(raw)
                    dirs, token = split_get_tree_response(raw)
                    out.extend(dirs)
                    attempt = 0  # progress: retries count per page
                if not token:
                    return out
                continue
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    return None
                if code == grpc.StatusCode.NOT_FOUND:
                    raise BlobNotFoundError(root) from e
                if code not in RETRYABLE or attempt >= self.retries:
                    raise self.channel.fail("GetTree", e, attempt + 1) from e
                if not token:
                    out.clear()  # restart from the beginning
            finally:
                self.channel.leave(received)
            self.channel.backoff(attempt)
            attempt += 1
