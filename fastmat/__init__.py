"""fastmat: materialize REAPI v2 input trees close to the system-call floor.

Public API (everything else is internal):

- ``Digest``, ``EMPTY_DIGEST``: SHA-256 content digests.
- ``LocalCAS``: the on-disk content-addressable store shared by threads and processes.
- ``ingest_tree``: store a directory as REAPI ``Directory`` messages.
- ``materialize``: build a tree from the CAS at a destination (``MaterializeStats``).
- ``DirectoryCache``: whole-tree cache with pinning, single-flight, eviction, workspaces.
- ``RemoteCAS``: a REAPI v2 client, usable as ``fetcher``.
- ``FastmatError`` and its subclasses.
"""

from __future__ import annotations

from fastmat.cache import DirectoryCache
from fastmat.cache_types import CacheResult, CacheStats
from fastmat.cas import CASCounters, DamagedBlob, LocalCAS, VerifyReport
from fastmat.digest import EMPTY_DIGEST, Digest
from fastmat.errors import (
    BlobNotFoundError,
    DigestMismatchError,
    FastmatError,
    InvalidDigestError,
    InvalidTreeError,
    NativeBuildError,
    RemoteError,
)
from fastmat.ingest import ingest_tree
from fastmat.materialize import MaterializeStats, materialize
from fastmat.remote import RemoteCAS
from fastmat.tree import TreeLimits

__version__ = "0.1.0"

__all__ = [
    "EMPTY_DIGEST",
    "BlobNotFoundError",
    "CASCounters",
    "CacheResult",
    "CacheStats",
    "DamagedBlob",
    "Digest",
    "DigestMismatchError",
    "DirectoryCache",
    "FastmatError",
    "InvalidDigestError",
    "InvalidTreeError",
    "LocalCAS",
    "MaterializeStats",
    "NativeBuildError",
    "RemoteCAS",
    "RemoteError",
    "TreeLimits",
    "VerifyReport",
    "__version__",
    "ingest_tree",
    "materialize",
]
