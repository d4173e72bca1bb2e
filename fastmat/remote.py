"""A REAPI v2 CAS client over gRPC: the remote side of fetching.

``RemoteCAS`` speaks ``FindMissingBlobs``, ``BatchReadBlobs``, ``GetTree``,
``GetCapabilities`` and ``ByteStream.Read`` through generic gRPC calls on the
message classes of :mod:`fastmat.proto` (no generated stubs). Every call has a
deadline; ``UNAVAILABLE`` and ``RESOURCE_EXHAUSTED`` are retried with
exponential backoff and jitter, then reported as :class:`RemoteError`.

Bytes are returned as received: the caller verifies them (``LocalCAS.put`` /
``put_stream`` hash before publishing), so every byte is hashed exactly once.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from fastmat import proto
from fastmat.digest import Digest
from fastmat.errors import BlobNotFoundError, RemoteError
from fastmat.remote_grpc import (
    _RETRYABLE,
    GrpcClient,
    RemoteStats,
    _parse_target,
    split_get_tree_response,
)

__all__ = ["RemoteCAS", "RemoteStats", "split_get_tree_response"]

_DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
_ENTRY_OVERHEAD = 100  # digest + status + tags around each blob in a batch response
_FIND_MISSING_CHUNK = 10_000  # ~80 bytes per digest: stays far below 4 MiB requests
_STREAM_FLOOR_BPS = 1 << 20  # ByteStream deadline grows by 1 s per MiB of blob

_UNASKED: Any = object()


def _pb(d: Digest) -> Any:
    return proto.Digest(hash=d.hash, size_bytes=d.size_bytes)


class RemoteCAS(GrpcClient):
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
        address, tls = _parse_target(target)
        if not tls and (tls_ca_cert or tls_client_cert or tls_client_key):
            raise ValueError("TLS files given for a plaintext target: use grpcs://")
        self.target = target
        self.instance_name = instance_name
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_message_bytes = max_message_bytes
        self.stats = RemoteStats()
        self._lock = threading.Lock()
        self._batch_limit: int | None = None
        self._caps_msg: Any = _UNASKED
        self._connect(
            address,
            tls=tls,
            tls_ca_cert=tls_ca_cert,
            tls_client_cert=tls_client_cert,
            tls_client_key=tls_client_key,
            max_message_bytes=max_message_bytes,
        )

    # -- plumbing ---------------------------------------------------------

    def __enter__(self) -> RemoteCAS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def __repr__(self) -> str:
        return f"RemoteCAS({self.target!r}, {self.instance_name!r})"

    # -- API --------------------------------------------------------------

    def capabilities(self) -> Any:
        """The server's ``ServerCapabilities`` (asked once), or None when it does not
        implement GetCapabilities."""
        if self._caps_msg is _UNASKED:
            try:
                self._caps_msg = self._call(
                    "GetCapabilities",
                    lambda: self._caps(
                        proto.GetCapabilitiesRequest(instance_name=self.instance_name),
                        timeout=self.timeout_s,
                    ),
                )
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise self._fail("GetCapabilities", e, 1) from e
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

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The subset of ``digests`` the server does not have."""
        todo = list(dict.fromkeys(digests))
        missing: list[Digest] = []
        for i in range(0, len(todo), _FIND_MISSING_CHUNK):
            req = proto.FindMissingBlobsRequest(
                instance_name=self.instance_name,
                blob_digests=[_pb(d) for d in todo[i : i + _FIND_MISSING_CHUNK]],
            )
            call = functools.partial(self._find_missing, req, timeout=self.timeout_s)
            try:
                resp = self._call("FindMissingBlobs", call)
            except grpc.RpcError as e:
                raise self._fail("FindMissingBlobs", e, 1) from e
            missing.extend(Digest(m.hash, m.size_bytes) for m in resp.missing_blob_digests)
        return missing

    def batches(self, digests: Iterable[Digest]) -> Iterator[list[Digest]]:
        """Groups ``digests`` into BatchReadBlobs requests within the server's limit."""
        limit = self.max_batch_bytes
        batch: list[Digest] = []
        total = 0
        for d in digests:
            cost = d.size_bytes + _ENTRY_OVERHEAD
            if batch and total + cost > limit:
                yield batch
                batch, total = [], 0
            batch.append(d)
            total += cost
        if batch:
            yield batch

    def read_batch(
        self, digests: list[Digest], *, missing_ok: bool = False
    ) -> list[tuple[Digest, bytes]]:
        """One BatchReadBlobs call. ``BlobNotFoundError`` for the first absent blob,
        unless ``missing_ok``: then absent blobs are left out of the result."""
        req = proto.BatchReadBlobsRequest(
            instance_name=self.instance_name, digests=[_pb(d) for d in digests]
        )
        try:
            resp = self._call(
                "BatchReadBlobs", functools.partial(self._batch_read, req, timeout=self.timeout_s)
            )
        except grpc.RpcError as e:
            raise self._fail("BatchReadBlobs", e, 1) from e
        wanted = set(digests)
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
        for d in digests:
            if d not in got:
                raise RemoteError(f"BatchReadBlobs on {self.target}: no response for {d}")
        with self._lock:
            self.stats.bytes_received += nbytes
        return out

    def read_blobs(
        self, digests: Iterable[Digest], *, missing_ok: bool = False
    ) -> Iterator[tuple[Digest, bytes]]:
        """``(digest, bytes)`` for each blob, batch by batch (large blobs too, streamed).
        ``BlobNotFoundError`` for an absent blob, unless ``missing_ok`` (then skipped)."""
        small: list[Digest] = []
        for d in dict.fromkeys(digests):
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

    def upload(self, blobs: Iterable[tuple[Digest, bytes]]) -> int:
        """Stores ``(digest, data)`` pairs on the server (batched, large ones streamed);
        returns how many were sent. See :func:`fastmat.remote_upload.upload_blobs`."""
        from fastmat.remote_upload import upload_blobs

        return upload_blobs(self, blobs)

    def resource_name(self, d: Digest) -> str:
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        return f"{prefix}blobs/{d.hash}/{d.size_bytes}"

    def read_stream(self, d: Digest) -> Iterator[bytes]:
        """ByteStream.Read of one blob, resumed at the received offset on retries."""
        offset = 0
        timeout = self.timeout_s + d.size_bytes / _STREAM_FLOOR_BPS
        for attempt in range(self.retries + 1):
            req = proto.ReadRequest(resource_name=self.resource_name(d), read_offset=offset)
            self._enter("Read")
            received = 0
            try:
                for resp in self._read(req, timeout=timeout):
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
                if code not in _RETRYABLE or attempt == self.retries:
                    raise self._fail("Read", e, attempt + 1) from e
            finally:
                self._leave(received)
            self._backoff(attempt)

    def get_tree(self, root: Digest, *, page_size: int = 0) -> list[bytes] | None:
        """Every Directory under ``root`` (raw bytes), or ``None`` if the server does
        not implement GetTree. Pages normally arrive on one stream; a stream that
        ends (or breaks) with a page token is continued from it. Callers hash each
        message: GetTree does not say which digest a message belongs to, and may
        omit missing parts. ``page_size`` 0: the server's choice."""
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
            self._enter("GetTree")
            received = 0
            try:
                for raw in self._get_tree(req, timeout=self.timeout_s):
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
                if code not in _RETRYABLE or attempt >= self.retries:
                    raise self._fail("GetTree", e, attempt + 1) from e
                if not token:
                    out.clear()  # restart from the beginning
            finally:
                self._leave(received)
            self._backoff(attempt)
            attempt += 1
