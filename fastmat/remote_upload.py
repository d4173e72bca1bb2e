"""Uploading blobs to a REAPI server: ``BatchUpdateBlobs`` within the server's batch
limit, ``ByteStream.Write`` for blobs too large to share a batch. Used through
:meth:`fastmat.remote.RemoteCAS.upload`."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from fastmat import proto
from fastmat.digest import Digest
from fastmat.errors import RemoteError

if TYPE_CHECKING:
    from fastmat.remote import RemoteCAS

_ENTRY_OVERHEAD = 200  # digest, tags and status around each blob in a batch
_WRITE_CHUNK = 1 << 20
_WRITE_FLOOR_BPS = 1 << 20  # the Write deadline grows by 1 s per MiB of blob


def upload_blobs(remote: RemoteCAS, blobs: Iterable[tuple[Digest, bytes]]) -> int:
    """Stores every ``(digest, data)`` on the server; returns how many were sent.

    Batches stay under ``remote.max_batch_bytes``; a blob larger than half of it is
    streamed. Calls are retried like every other call of ``remote``; a refused blob or a
    short write raises ``RemoteError``. The bytes are sent as given: the caller vouches
    that they match their digests (the server verifies them too).
    """
    limit = remote.max_batch_bytes
    batch: list[tuple[Digest, bytes]] = []
    total = sent = 0
    for d, data in blobs:
        sent += 1
        if len(data) + _ENTRY_OVERHEAD > limit // 2:
            _write(remote, d, data)
            continue
        if batch and total + len(data) + _ENTRY_OVERHEAD > limit:
            _batch(remote, batch)
            batch, total = [], 0
        batch.append((d, data))
        total += len(data) + _ENTRY_OVERHEAD
    if batch:
        _batch(remote, batch)
    return sent


def _batch(remote: RemoteCAS, batch: list[tuple[Digest, bytes]]) -> None:
    req = proto.BatchUpdateBlobsRequest(instance_name=remote.instance_name)
    for d, data in batch:
        req.requests.add(digest=proto.Digest(hash=d.hash, size_bytes=d.size_bytes), data=data)
    try:
        resp = remote._call(
            "BatchUpdateBlobs", lambda: remote._batch_update(req, timeout=remote.timeout_s)
        )
    except grpc.RpcError as e:
        raise remote._fail("BatchUpdateBlobs", e, 1) from e
    bad = [r for r in resp.responses if r.status.code != 0]
    if bad:
        msg = bad[0].status.message
        raise RemoteError(f"BatchUpdateBlobs on {remote.target} refused {len(bad)} blob(s): {msg}")
    if len(resp.responses) != len(batch):
        n = len(resp.responses)
        raise RemoteError(f"BatchUpdateBlobs on {remote.target} answered {n} of {len(batch)}")


def _write(remote: RemoteCAS, d: Digest, data: bytes) -> None:
    prefix = f"{remote.instance_name}/" if remote.instance_name else ""

    def requests() -> Iterator[Any]:
        name = f"{prefix}uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"
        for off in range(0, max(len(data), 1), _WRITE_CHUNK):
            yield proto.WriteRequest(
                resource_name=name if off == 0 else "",
                write_offset=off,
                data=data[off : off + _WRITE_CHUNK],
                finish_write=off + _WRITE_CHUNK >= len(data),
            )

    timeout = remote.timeout_s + len(data) / _WRITE_FLOOR_BPS
    try:  # a retry starts a fresh upload (new uuid), never resumes a half-written one
        resp = remote._call("Write", lambda: remote._write(requests(), timeout=timeout))
    except grpc.RpcError as e:
        raise remote._fail("Write", e, 1) from e
    if resp.committed_size != len(data):
        n = resp.committed_size
        raise RemoteError(f"ByteStream.Write of {d} to {remote.target}: committed {n} bytes")
