"""The directory cache: whole materialized trees kept by root digest, shared by the
threads and processes of a worker.

- :mod:`.directory`: ``DirectoryCache``, the public API and the in-process side (index,
  pins, single-flight, when to evict);
- :mod:`.protocol`: the cross-process lock protocol and everything done under it
  (adopt-or-build, pins, eviction, adoption at open);
- :mod:`.build`: constructing an entry; :mod:`.replay`: serving a hit;
- :mod:`.entry`: an entry's sidecar format and hit-time damage checks;
- :mod:`.index`: the in-memory index and eviction policy;
- :mod:`.workspace`: overlay workspaces; :mod:`.mounts`: their records, and the sweep
  of a dead owner's ones;
- :mod:`.verify`: never serving what verify found bad, and verifying entries;
- :mod:`.types`: results and statistics.
"""

from fastmat.cache.directory import DirectoryCache
from fastmat.cache.mounts import DeadMount
from fastmat.cache.types import CacheResult, CacheStats
from fastmat.cache.verify import CacheVerifyReport
from fastmat.cache.workspace import Workspace

__all__ = [
    "CacheResult",
    "CacheStats",
    "CacheVerifyReport",
    "DeadMount",
    "DirectoryCache",
    "Workspace",
]
