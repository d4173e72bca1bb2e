"""REAPI content digests (SHA-256) and the errors that name one.

:class:`Digest` is the value every layer passes around; ``str(d)`` is ``hash/size``
and ``d.key`` its on-disk name ``hash-size``. The errors below carry a ``Digest``,
which is why they live here rather than in :mod:`fastmat.errors` (which this module
builds on).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from fastmat.errors import FastmatError

__all__ = [
    "EMPTY_DIGEST",
    "BlobNotFoundError",
    "Digest",
    "DigestMismatchError",
    "InvalidDigestError",
    "hash_fd",
]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK_BYTES = 1 << 20


class InvalidDigestError(FastmatError, ValueError):
    """A digest string or value is malformed (not 64 hex digits / a size >= 0)."""


@dataclass(frozen=True, slots=True)
class Digest:
    """A SHA-256 content digest: lowercase hex ``hash`` and ``size_bytes``."""

    hash: str
    size_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.hash, str) or _HEX64.fullmatch(self.hash) is None:
            raise InvalidDigestError(f"digest hash must be 64 lowercase hex digits: {self.hash!r}")
        if (
            not isinstance(self.size_bytes, int)
            or isinstance(self.size_bytes, bool)
            or self.size_bytes < 0
        ):
            raise InvalidDigestError(f"digest size must be an int >= 0: {self.size_bytes!r}")

    def __str__(self) -> str:
        return f"{self.hash}/{self.size_bytes}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parses ``hash/size``; raises ``InvalidDigestError`` for anything else."""
        h, sep, size = text.strip().partition("/")
        if not sep or not size.isdigit() or not size.isascii():
            raise InvalidDigestError(f"expected 'hash/size', got {text!r}")
        return cls(h, int(size))

    @classmethod
    def coerce(cls, d: Digest | str) -> Digest:
        """``d`` itself, or parsed from ``hash/size`` text: what every public call that
        takes a digest accepts. ``InvalidDigestError`` for bad text or another type."""
        if isinstance(d, Digest):
            return d
        if isinstance(d, str):
            return cls.parse(d)
        raise InvalidDigestError(f"expected a Digest or 'hash/size' text, got {type(d).__name__}")

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        """The digest of ``data``."""
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    @property
    def key(self) -> str:
        """The on-disk name of this blob: ``<hash>-<size>``."""
        return f"{self.hash}-{self.size_bytes}"


EMPTY_DIGEST = Digest(hashlib.sha256(b"").hexdigest(), 0)


def hash_fd(fd: int) -> Digest:
    """The digest of everything ``fd`` reads from its current offset to EOF."""
    h = hashlib.sha256()
    buf = bytearray(min(_CHUNK_BYTES, max(os.fstat(fd).st_size + 1, 4096)))
    view = memoryview(buf)
    size = 0
    while n := os.readv(fd, [buf]):
        h.update(view[:n])
        size += n
    return Digest(h.hexdigest(), size)


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
