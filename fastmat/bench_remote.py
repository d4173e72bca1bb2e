"""Seeding a REAPI server with the bench trees (``fastmat bench --remote URL``).

fastmat itself only reads from a remote; the bench needs its generated trees on the
server first, so this module uploads every ``Directory`` message and file blob of a
tree (FindMissingBlobs, then BatchUpdateBlobs under the batch limit, ByteStream Write
for larger blobs). It is bench plumbing, not a general upload client.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastmat import proto
from fastmat.digest import Digest
from fastmat.errors import RemoteError

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS
    from fastmat.remote import RemoteCAS

_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_WRITE = "/google.bytestream.ByteStream/Write"
_CHUNK = 1 << 20
_ENTRY_OVERHEAD = 200
_TIMEOUT_S = 300.0


def tree_digests(cas: LocalCAS, root: Digest) -> list[Digest]:
    """Every ``Directory`` and file digest of the tree under ``root`` (each once)."""
    seen: dict[Digest, None] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        if d in seen:
            continue
        seen[d] = None
        msg = proto.Directory.FromString(cas.read(d))
        for f in msg.files:
            seen.setdefault(Digest(f.digest.hash, f.digest.size_bytes), None)
        stack.extend(Digest(c.digest.hash, c.digest.size_bytes) for c in msg.directories)
    return list(seen)


def upload_tree(cas: LocalCAS, remote: RemoteCAS, root: Digest) -> int:
    """Uploads what the remote lacks of the tree; returns the number of blobs sent."""
    import grpc

    missing = remote.find_missing(tree_digests(cas, root))
    if not missing:
        return 0
    channel: Any = remote._channel  # the client's channel: one connection per server
    update = channel.unary_unary(
        _CAS + "BatchUpdateBlobs",
        request_serializer=proto.BatchUpdateBlobsRequest.SerializeToString,
        response_deserializer=proto.BatchUpdateBlobsResponse.FromString,
    )
    write = channel.stream_unary(
        _WRITE,
        request_serializer=proto.WriteRequest.SerializeToString,
        response_deserializer=proto.WriteResponse.FromString,
    )
    limit = remote.max_batch_bytes
    batch: list[Digest] = []
    total = 0
    try:
        for d in missing:
            if d.size_bytes + _ENTRY_OVERHEAD > limit // 2:
                _stream(write, remote.instance_name, d, cas.read(d))
                continue
            if batch and total + d.size_bytes + _ENTRY_OVERHEAD > limit:
                _batch(update, remote.instance_name, cas, batch)
                batch, total = [], 0
            batch.append(d)
            total += d.size_bytes + _ENTRY_OVERHEAD
        if batch:
            _batch(update, remote.instance_name, cas, batch)
    except grpc.RpcError as e:
        raise RemoteError(f"uploading the bench tree to {remote.target}: {e.details()}") from e
    return len(missing)


def _batch(update: Any, instance: str, cas: LocalCAS, batch: list[Digest]) -> None:
    req = proto.BatchUpdateBlobsRequest(instance_name=instance)
    for d in batch:
        req.requests.add(
            digest=proto.Digest(hash=d.hash, size_bytes=d.size_bytes), data=cas.read(d)
        )
    resp = update(req, timeout=_TIMEOUT_S)
    bad = [r for r in resp.responses if r.status.code != 0]
    if bad:
        raise RemoteError(f"BatchUpdateBlobs refused {len(bad)} blob(s): {bad[0].status.message}")
    if len(resp.responses) != len(batch):
        raise RemoteError(f"BatchUpdateBlobs answered {len(resp.responses)} of {len(batch)}")


def _stream(write: Any, instance: str, d: Digest, data: bytes) -> None:
    prefix = f"{instance}/" if instance else ""
    name = f"{prefix}uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"

    def requests() -> Iterator[Any]:
        for off in range(0, max(len(data), 1), _CHUNK):
            yield proto.WriteRequest(
                resource_name=name if off == 0 else "",
                write_offset=off,
                data=data[off : off + _CHUNK],
                finish_write=off + _CHUNK >= len(data),
            )

    resp = write(requests(), timeout=_TIMEOUT_S)
    if resp.committed_size != len(data):
        raise RemoteError(f"ByteStream.Write of {d}: committed {resp.committed_size} bytes")
