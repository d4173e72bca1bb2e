"""REAPI content digests (SHA-256)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from fastmat.errors import InvalidDigestError

_HEX64 = re.compile(r"[0-9a-f]{64}")


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
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        """The digest of ``data``."""
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    @property
    def key(self) -> str:
        """The on-disk name of this blob: ``<hash>-<size>``."""
        return f"{self.hash}-{self.size_bytes}"


EMPTY_DIGEST = Digest(hashlib.sha256(b"").hexdigest(), 0)
