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


class LockTimeoutError(FastmatError):
    """A lock was not granted within its bound. ``path`` names the lock file (and the
    byte, for a byte-range lock); ``holder_pid`` is the process holding it when
    ``/proc`` tells (else None)."""

    def __init__(self, path: str, timeout_s: float, holder_pid: int | None = None) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.holder_pid = holder_pid
        held = f"held by pid {holder_pid}" if holder_pid is not None else "holder unknown"
        super().__init__(f"lock {path} not granted within {timeout_s:g} s ({held})")
