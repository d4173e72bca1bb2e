"""The local content-addressable store: :class:`LocalCAS` (:mod:`.store`), its on-disk
layout (:mod:`.layout`, the one place the names are spelled), group commit
(:mod:`.commit`), the use record and pins (:mod:`.usage`), eviction (:mod:`.evict`)
and verification (:mod:`.verify`)."""

from fastmat.cas.evict import Budget, EvictReport
from fastmat.cas.store import Batch, CASCounters, CASUsage, LocalCAS
from fastmat.cas.usage import Pin, UsageCounters
from fastmat.cas.verify import DamagedBlob, VerifyReport

__all__ = [
    "Batch",
    "Budget",
    "CASCounters",
    "CASUsage",
    "DamagedBlob",
    "EvictReport",
    "LocalCAS",
    "Pin",
    "UsageCounters",
    "VerifyReport",
]
