"""The local content-addressable store: :class:`LocalCAS` (:mod:`.store`), its on-disk
layout (:mod:`.layout`, the one place the names are spelled) and its verification
(:mod:`.verify`)."""

from fastmat.cas.store import CASCounters, LocalCAS
from fastmat.cas.verify import DamagedBlob, VerifyReport

__all__ = ["CASCounters", "DamagedBlob", "LocalCAS", "VerifyReport"]
