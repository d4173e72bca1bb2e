"""Uploading blobs to a REAPI server: ``BatchUpdateBlobs`` within the server's batch
limit, ``ByteStream.Write`` for blobs too large to share a batch. Used through
:meth:`fastmat.remote.RemoteCAS.upload`."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from fastmat import proto
from fastmat.errors import RemoteError

if TYPE_CHECKING:
    from fastmat.digest import Digest
    from fastmat.remote.channel import Channel

_ENTRY_OVERHEAD = 200  # digest, tags and status around each blob in a batch
_WRITE_CHUNK = 1 << 20
_WRITE_FLOOR_BPS = 1 << 20  # the Write deadline grows by 1 s per MiB of blob


def upload_blobs(
    ch: Channel,
    blobs: Iterable[tuple[Digest, bytes]],
    *,
    instance_name: str,
    limit: int,
    timeout_s: float,
) -> int:
    """Stores every ``(digest, data)`` on the server; returns how many were sent.

    Batches stay under ``limit`` bytes; a blob larger than half of it is streamed.
    Calls are retried like every other call on ``ch``; a refused blob or a short write
    raises ``RemoteError``. The bytes are sent as given: the caller vouches that they
    match their digests (the server verifies them too).
    """
    batch: list[tuple[Digest, bytes]] = []
    total = sent = 0
    for d, data in blobs:
        sent += 1
        if len(data) + _ENTRY_OVERHEAD > limit // 2:
            _write(ch, instance_name, timeout_s, d, data)
            continue
        if batch and total + len(data) + _ENTRY_OVERHEAD > limit:
            _batch(ch, instance_name, timeout_s, batch)
            batch, total = [], 0
        batch.append((d, data))
        total += len(data) + _ENTRY_OVERHEAD
    if batch:
        _batch(ch, instance_name, timeout_s, batch)
    return sent


def _batch(
    ch: Channel, instance_name: str, timeout_s: float, batch: list[tuple[Digest, bytes]]
) -> None:
    req = proto.BatchUpdateBlobsRequest(instance_name=instance_name)
    for d, data in batch:
        req.requests.add(digest=proto.Digest(hash=d.hash, size_bytes=d.size_bytes), data=data)
    resp = ch.unary("BatchUpdateBlobs", lambda: ch.batch_update(req, timeout=timeout_s))
    bad = [r for r in resp.responses if r.status.code != 0]
    if bad:
        msg = bad[0].status.message
        raise RemoteError(f"BatchUpdateBlobs on {ch.target} refused {len(bad)} blob(s): {msg}")
    if len(resp.responses) != len(batch):
        n = len(resp.responses)
        raise RemoteError(f"BatchUpdateBlobs on {ch.target} answered {n} of {len(batch)}")


def _write(ch: Channel, instance_name: str, timeout_s: float, d: Digest, data: bytes) -> None:
    prefix = f"{instance_name}/" if instance_name else ""

    def requests() -> Iterator[Any]:
        name = f"{prefix}uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"
        for off in range(0, max(len(data), 1), _WRITE_CHUNK):
            yield proto.WriteRequest(
                resource_name=name if off == 0 else "",
                write_offset=off,
                data=data[off : off + _WRITE_CHUNK],
                finish_write=off + _WRITE_CHUNK >= len(data),
            )

    timeout = timeout_s + len(data) / _WRITE_FLOOR_BPS
    # a retry starts a fresh upload (new uuid), never resumes a half-written one
    resp = ch.unary("Write", lambda: ch.write(requests(), timeout=timeout))
    if resp.committed_size != len(data):
        n = resp.committed_size
        raise RemoteError(f"ByteStream.Write of {d} to {ch.target}: committed {n} bytes")
