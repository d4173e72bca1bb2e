"""fastmat's own failures: the :class:`FastmatError` base and the errors that carry no
digest. The errors that name a digest (``InvalidDigestError``, ``DigestMismatchError``,
``BlobNotFoundError``) live beside :class:`~fastmat.digest.Digest` in
:mod:`fastmat.digest`. Everything is re-exported from ``fastmat``.

System-call failures are never wrapped: they stay ``OSError`` carrying their paths.
"""

from __future__ import annotations


class FastmatError(Exception):
    """Base class of every error fastmat raises for reasons of its own."""


class NativeBuildError(FastmatError):
    """The compiled core is missing or was built from another version of the header."""


class InvalidTreeError(FastmatError):
    """A Directory tree is malformed or hostile; ``path`` names the offending node."""

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        at = f" at {path!r}" if path else ""
        super().__init__(f"invalid tree{at}: {message}")


class RemoteError(FastmatError):
    """The remote CAS failed in a way retries did not fix (unreachable, protocol error)."""
