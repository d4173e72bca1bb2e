"""fastmat: materialize REAPI v2 input trees close to the system-call floor.

Public API (everything else is internal):

- ``Digest``, ``EMPTY_DIGEST``: SHA-256 content digests.
- ``LocalCAS``: the on-disk content-addressable store shared by threads and processes.
- ``ingest_tree``: store a directory as REAPI ``Directory`` messages.
- ``materialize``: build a tree from the CAS at a destination (``MaterializeStats``).
- ``DirectoryCache``: whole-tree cache with pinning, single-flight, eviction, workspaces.
- ``RemoteCAS``: a REAPI v2 client, usable as ``fetcher`` (imported on first use, so
  ``import fastmat`` does not load grpc).
- ``Progress`` (what ``progress=`` callbacks receive) and ``Cancelled`` (what a set
  ``cancel=`` token raises).
- ``FastmatError`` and its subclasses.

Where things are: docs/design.md ("Where things are").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastmat.cache import (
    CacheResult,
    CacheStats,
    CacheVerifyReport,
    DeadMount,
    DirectoryCache,
)
from fastmat.cas import CASCounters, DamagedBlob, LocalCAS, VerifyReport
from fastmat.control import Cancelled, Progress
from fastmat.digest import (
    EMPTY_DIGEST,
    BlobNotFoundError,
    Digest,
    DigestMismatchError,
    InvalidDigestError,
)
from fastmat.errors import (
    FastmatError,
    InvalidTreeError,
    LockTimeoutError,
    NativeBuildError,
    ReadOnlyCASError,
    RemoteError,
)
from fastmat.materialize import MaterializeStats, materialize
from fastmat.tree import TreeLimits, ingest_tree
from fastmat.version import __version__

if TYPE_CHECKING:
    from fastmat.remote import RemoteCAS

__all__ = [
    "EMPTY_DIGEST",
    "BlobNotFoundError",
    "CASCounters",
    "CacheResult",
    "CacheStats",
    "CacheVerifyReport",
    "Cancelled",
    "DamagedBlob",
    "DeadMount",
    "Digest",
    "DigestMismatchError",
    "DirectoryCache",
    "FastmatError",
    "InvalidDigestError",
    "InvalidTreeError",
    "LocalCAS",
    "LockTimeoutError",
    "MaterializeStats",
    "NativeBuildError",
    "Progress",
    "ReadOnlyCASError",
    "RemoteCAS",
    "RemoteError",
    "TreeLimits",
    "VerifyReport",
    "__version__",
    "ingest_tree",
    "materialize",
]


def __getattr__(name: str) -> Any:
    """``fastmat.RemoteCAS`` imports the remote side (and grpc) on first use."""
    if name == "RemoteCAS":
        from fastmat.remote import RemoteCAS

        return RemoteCAS
    raise AttributeError(f"module 'fastmat' has no attribute {name!r}")
