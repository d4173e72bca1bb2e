"""fastmat: materialize REAPI v2 input trees close to the system-call floor."""

from __future__ import annotations

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

__version__ = "0.1.0"

__all__ = [
    "EMPTY_DIGEST",
    "BlobNotFoundError",
    "Digest",
    "DigestMismatchError",
    "FastmatError",
    "InvalidDigestError",
    "InvalidTreeError",
    "NativeBuildError",
    "RemoteError",
    "__version__",
]
