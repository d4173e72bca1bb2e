"""gRPC plumbing of a REAPI client: target parsing, the channel and its method
handles (generic calls on :mod:`fastmat.proto` messages, no generated stubs),
per-client counters, and retries with exponential backoff and jitter."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from fastmat import proto
from fastmat.errors import RemoteError
from fastmat.remote.stats import RemoteStats

__all__ = ["RETRYABLE", "Channel", "RemoteStats", "parse_target"]

_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_CAPS = "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"
_READ = "/google.bytestream.ByteStream/Read"
_WRITE = "/google.bytestream.ByteStream/Write"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

T = TypeVar("T")


def parse_target(target: str) -> tuple[str, bool]:
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


class Channel:
    """One gRPC channel with the REAPI method handles, counters and retried calls.

    ``retries``: how many times an ``UNAVAILABLE`` / ``RESOURCE_EXHAUSTED`` call is
    repeated, after ``backoff_s`` doubling each time. ``stats`` counts calls, retries,
    bytes received and calls in flight.
    """

    def __init__(
        self,
        target: str,
        *,
        retries: int,
        backoff_s: float,
        tls_ca_cert: str | os.PathLike[str] | None = None,
        tls_client_cert: str | os.PathLike[str] | None = None,
        tls_client_key: str | os.PathLike[str] | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        address, tls = parse_target(target)
        if not tls and (tls_ca_cert or tls_client_cert or tls_client_key):
            raise ValueError("TLS files given for a plaintext target: use grpcs://")
        self.target = target
        self.retries = retries
        self.backoff_s = backoff_s
        self.stats = RemoteStats()
        self._lock = threading.Lock()
        self._channel: Any = _open_channel(
            address,
            tls=tls,
            tls_ca_cert=tls_ca_cert,
            tls_client_cert=tls_client_cert,
            tls_client_key=tls_client_key,
            max_message_bytes=max_message_bytes,
        )
        ch = self._channel
        self.find_missing = ch.unary_unary(
            _CAS + "FindMissingBlobs",
            request_serializer=proto.FindMissingBlobsRequest.SerializeToString,
            response_deserializer=proto.FindMissingBlobsResponse.FromString,
        )
        self.batch_read = ch.unary_unary(
            _CAS + "BatchReadBlobs",
            request_serializer=proto.BatchReadBlobsRequest.SerializeToString,
            response_deserializer=proto.BatchReadBlobsResponse.FromString,
        )
        self.get_tree = ch.unary_stream(
            _CAS + "GetTree",
            request_serializer=proto.GetTreeRequest.SerializeToString,
            response_deserializer=None,  # raw bytes: see client.split_get_tree_response
        )
        self.capabilities = ch.unary_unary(
            _CAPS,
            request_serializer=proto.GetCapabilitiesRequest.SerializeToString,
            response_deserializer=proto.ServerCapabilities.FromString,
        )
        self.read = ch.unary_stream(
            _READ,
            request_serializer=proto.ReadRequest.SerializeToString,
            response_deserializer=proto.ReadResponse.FromString,
        )
        self.batch_update = ch.unary_unary(
            _CAS + "BatchUpdateBlobs",
            request_serializer=proto.BatchUpdateBlobsRequest.SerializeToString,
            response_deserializer=proto.BatchUpdateBlobsResponse.FromString,
        )
        self.write = ch.stream_unary(
            _WRITE,
            request_serializer=proto.WriteRequest.SerializeToString,
            response_deserializer=proto.WriteResponse.FromString,
        )

    def close(self) -> None:
        self._channel.close()

    def unary_method(self, path: str, request_cls: Any, response_cls: Any) -> Any:
        """A unary-unary handle for the method ``path`` ("/package.Service/Method") taking
        ``request_cls`` and answering ``response_cls`` messages: another service on the
        same server (the worker's Bots calls), through the same channel options."""
        return self._channel.unary_unary(
            path,
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )

    def enter(self, method: str) -> None:
        """Counts a call to ``method`` as started (in flight)."""
        with self._lock:
            s = self.stats
            s.calls[method] = s.calls.get(method, 0) + 1
            s.inflight += 1
            s.peak_inflight = max(s.peak_inflight, s.inflight)

    def leave(self, nbytes: int = 0) -> None:
        """Counts a call as ended, having received ``nbytes``."""
        with self._lock:
            self.stats.inflight -= 1
            self.stats.bytes_received += nbytes

    def received(self, nbytes: int) -> None:
        with self._lock:
            self.stats.bytes_received += nbytes

    def fail(self, method: str, err: grpc.RpcError, attempts: int) -> RemoteError:
        """The ``RemoteError`` saying that ``method`` failed with ``err``."""
        code = err.code()
        name = code.name if code is not None else "UNKNOWN"
        return RemoteError(
            f"{method} on {self.target} failed after {attempts} attempt(s): {name}: {err.details()}"
        )

    def backoff(self, attempt: int) -> None:
        """Sleeps before retry number ``attempt`` (0-based), with jitter."""
        with self._lock:
            self.stats.retries += 1
        delay = self.backoff_s * (2**attempt)
        time.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter, not crypto

    def call(self, method: str, fn: Callable[[], T]) -> T:
        """Runs one unary call with retries; a non-retryable ``RpcError`` propagates,
        retries running out raise ``RemoteError``."""
        for attempt in range(self.retries + 1):
            self.enter(method)
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise
                if attempt == self.retries:
                    raise self.fail(method, e, attempt + 1) from e
            finally:
                self.leave()
            self.backoff(attempt)
        raise AssertionError("unreachable")

    def unary(self, method: str, fn: Callable[[], T]) -> T:
        """:meth:`call`, with every failure a ``RemoteError``."""
        try:
            return self.call(method, fn)
        except grpc.RpcError as e:
            raise self.fail(method, e, 1) from e
