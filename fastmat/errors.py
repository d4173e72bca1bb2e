"""fastmat's own failures: the :class:`FastmatError` base and the errors that carry no
digest. The errors that name a digest (``InvalidDigestError``, ``DigestMismatchError``,
``BlobNotFoundError``) live beside :class:`~fastmat.digest.Digest` in
:mod:`fastmat.digest`. Everything is re-exported from ``fastmat``.

System-call failures are never wrapped: they stay ``OSError`` carrying their paths
(:func:`naming` gives one made relative to a directory fd its full path and what was
being done, errno kept: issue 12).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


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


class ReadOnlyCASError(FastmatError, OSError):
    """A write (``operation``) was asked of a CAS opened read-only (on a read-only
    filesystem, or not writable by this user). An ``OSError`` too: ``errno`` is
    ``EROFS`` (or ``EACCES``), ``filename`` the CAS root."""

    def __init__(self, root: str | os.PathLike[str], operation: str, err: int = errno.EROFS):
        super().__init__(err, os.strerror(err), os.fspath(root))
        self.operation = operation

    def __str__(self) -> str:
        return f"cannot {self.operation}: the CAS {self.filename} is read-only ({self.strerror})"


def with_path(e: OSError, what: str, path: str | os.PathLike[str]) -> OSError:
    """``e`` again (same class and errno) naming ``path`` and what was being done:
    ``[Errno 28] No space left on device (writing blob temp): '/cas/tmp/1.ab/put.3'``.
    An error that already names an absolute path, or is fastmat's own, is returned
    as it is."""
    if isinstance(e, FastmatError) or e.errno is None:
        return e
    name = e.filename
    if isinstance(name, (str, bytes)) and os.path.isabs(os.fsdecode(name)):
        return e
    out = type(e)(e.errno, f"{e.strerror or os.strerror(e.errno)} ({what})", os.fspath(path))
    out.__cause__ = e
    return out


@contextlib.contextmanager
def naming(what: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raises an ``OSError`` of the block as :func:`with_path` makes it."""
    try:
        yield
    except OSError as e:
        out = with_path(e, what, path)
        if out is e:
            raise
        raise out from e
