"""fastmat's own failures. System-call failures stay ``OSError`` with paths."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastmat.digest import Digest


class FastmatError(Exception):
    """Base class of every error fastmat raises for reasons of its own."""


class NativeBuildError(FastmatError):
    """The compiled core is missing or was built from another version of the header."""


class InvalidDigestError(FastmatError, ValueError):
    """A digest string or value is malformed (not 64 hex digits / a size >= 0)."""


class DigestMismatchError(FastmatError):
    """Bytes do not hash to the digest they were stored or fetched under."""

    def __init__(self, expected: Digest, actual: Digest, where: str = "") -> None:
        self.expected = expected
        self.actual = actual
        self.where = where
        suffix = f" ({where})" if where else ""
        super().__init__(f"digest mismatch: expected {expected}, got {actual}{suffix}")


class BlobNotFoundError(FastmatError, KeyError):
    """A blob is in neither the local CAS nor (when given) the remote one."""

    def __init__(self, digest: Digest, path: str | None = None) -> None:
        self.digest = digest
        self.path = path
        at = f" (needed at {path!r})" if path is not None else ""
        super().__init__(f"blob not found: {digest}{at}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class InvalidTreeError(FastmatError):
    """A Directory tree is malformed or hostile; ``path`` names the offending node."""

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        at = f" at {path!r}" if path else ""
        super().__init__(f"invalid tree{at}: {message}")


class RemoteError(FastmatError):
    """The remote CAS failed in a way retries did not fix (unreachable, protocol error)."""
