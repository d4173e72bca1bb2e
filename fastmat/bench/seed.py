"""Seeding a REAPI server with the bench trees (``fastmat bench --remote URL``).

The bench needs its generated trees on the server first: this module finds which of a
tree's ``Directory`` messages and file blobs the server lacks and sends them with
``RemoteCAS.upload``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastmat import proto
from fastmat.digest import Digest

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS
    from fastmat.remote import RemoteCAS


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
    missing = remote.find_missing(tree_digests(cas, root))
    return remote.upload((d, cas.read(d)) for d in missing)
