"""gRPC plumbing of :class:`~fastmat.remote.RemoteCAS`: target parsing, the
channel, per-client counters, retries with backoff, and the hand decoding of
raw GetTree responses."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from fastmat import proto
from fastmat.errors import RemoteError

_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_CAPS = "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"
_READ = "/google.bytestream.ByteStream/Read"
_WRITE = "/google.bytestream.ByteStream/Write"
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

T = TypeVar("T")


@dataclass
class RemoteStats:
    """Counters of one client (thread-safe through ``RemoteCAS``)."""

    calls: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    bytes_received: int = 0
    inflight: int = 0
    peak_inflight: int = 0


def _parse_target(target: str) -> tuple[str, bool]:
    """``grpc://h:p`` / ``h:p`` -> insecure, ``grpcs://h:p`` -> TLS."""
    for scheme, tls in (("grpcs://", True), ("grpc://", False)):
        if target.startswith(scheme):
            rest = target[len(scheme) :].rstrip("/")
            if not rest:
                raise ValueError(f"no address in remote target {target!r}")
            return rest, tls
    if "://" in target:
        raise ValueError(f"unsupported remote target {target!r}: use grpc:// or grpcs://")
    return target, False


def _read_file(path: str | os.PathLike[str] | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


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


def _open_channel(
    address: str,
    *,
    tls: bool,
    tls_ca_cert: str | os.PathLike[str] | None,
    tls_client_cert: str | os.PathLike[str] | None,
    tls_client_key: str | os.PathLike[str] | None,
    max_message_bytes: int,
) -> Any:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read_file(tls_ca_cert),
            private_key=_read_file(tls_client_key),
            certificate_chain=_read_file(tls_client_cert),
        )
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


class GrpcClient:
    """The channel, REAPI method handles, counters and retried calls of one client
    (the annotated attributes are set by the subclass)."""

    target: str
    retries: int
    backoff_s: float
    stats: RemoteStats
    _lock: threading.Lock

    def _connect(
        self,
        address: str,
        *,
        tls: bool,
        tls_ca_cert: str | os.PathLike[str] | None,
        tls_client_cert: str | os.PathLike[str] | None,
        tls_client_key: str | os.PathLike[str] | None,
        max_message_bytes: int,
    ) -> None:
        """Opens the channel and the generic calls on :mod:`fastmat.proto` messages."""
        self._channel: Any = _open_channel(
            address,
            tls=tls,
            tls_ca_cert=tls_ca_cert,
            tls_client_cert=tls_client_cert,
            tls_client_key=tls_client_key,
            max_message_bytes=max_message_bytes,
        )
        ch = self._channel
        self._find_missing = ch.unary_unary(
            _CAS + "FindMissingBlobs",
            request_serializer=proto.FindMissingBlobsRequest.SerializeToString,
            response_deserializer=proto.FindMissingBlobsResponse.FromString,
        )
        self._batch_read = ch.unary_unary(
            _CAS + "BatchReadBlobs",
            request_serializer=proto.BatchReadBlobsRequest.SerializeToString,
            response_deserializer=proto.BatchReadBlobsResponse.FromString,
        )
        self._get_tree = ch.unary_stream(
            _CAS + "GetTree",
            request_serializer=proto.GetTreeRequest.SerializeToString,
            response_deserializer=None,  # raw bytes: see split_get_tree_response
        )
        self._caps = ch.unary_unary(
            _CAPS,
            request_serializer=proto.GetCapabilitiesRequest.SerializeToString,
            response_deserializer=proto.ServerCapabilities.FromString,
        )
        self._read = ch.unary_stream(
            _READ,
            request_serializer=proto.ReadRequest.SerializeToString,
            response_deserializer=proto.ReadResponse.FromString,
        )
        self._batch_update = ch.unary_unary(
            _CAS + "BatchUpdateBlobs",
            request_serializer=proto.BatchUpdateBlobsRequest.SerializeToString,
            response_deserializer=proto.BatchUpdateBlobsResponse.FromString,
        )
        self._write = ch.stream_unary(
            _WRITE,
            request_serializer=proto.WriteRequest.SerializeToString,
            response_deserializer=proto.WriteResponse.FromString,
        )

    def _enter(self, method: str) -> None:
        with self._lock:
            s = self.stats
            s.calls[method] = s.calls.get(method, 0) + 1
            s.inflight += 1
            s.peak_inflight = max(s.peak_inflight, s.inflight)

    def _leave(self, nbytes: int = 0) -> None:
        with self._lock:
            self.stats.inflight -= 1
            self.stats.bytes_received += nbytes

    def _fail(self, method: str, err: grpc.RpcError, attempts: int) -> RemoteError:
        code = err.code()
        name = code.name if code is not None else "UNKNOWN"
        return RemoteError(
            f"{method} on {self.target} failed after {attempts} attempt(s): {name}: {err.details()}"
        )

    def _backoff(self, attempt: int) -> None:
        with self._lock:
            self.stats.retries += 1
        delay = self.backoff_s * (2**attempt)
        time.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter, not crypto

    def _call(self, method: str, fn: Callable[[], T]) -> T:
        """Runs one unary call with retries; non-retryable RpcErrors propagate."""
        for attempt in range(self.retries + 1):
            self._enter(method)
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() not in _RETRYABLE:
                    raise
                if attempt == self.retries:
                    raise self._fail(method, e, attempt + 1) from e
            finally:
                self._leave()
            self._backoff(attempt)
        raise AssertionError("unreachable")
