"""The on-disk layout of a local CAS: the one place its names are spelled.

Under the root::

    blobs/<hh>/<hash>-<size>   a blob, mode 0444, never written again (invariant 1)
    exec/<hh>/<hash>-<size>    its executable variant: another inode, mode 0555 (invariant 2)
    tmp/<pid>.<rand>/          one per open instance, owned by an flock (fastmat.fs.locks);
                               its pin.<n> files list the names it has pinned
    locks/                     single-flight lock files
    usage/store, usage/uses    the use record: names stored / evicted, names used
    usage/lock                 flock'ed shared to pin or append, exclusive to evict
    quarantine/                what ``verify()`` moved out of the way

``<hh>`` is the first two hex digits of the hash: 256 shard directories per area, all
created when the CAS is, so a lookup never creates a directory. Paths are relative to
the CAS root and meant for ``*at()`` calls on its directory fd. The plan executor
reads the same names: the C core's ``fm_dir_decode`` spells them for every file of a
``Directory`` (``<prefix><hh>/<hash>-<size>``, the prefixes :data:`BLOBS_PREFIX` and
:data:`EXEC_PREFIX` passed from here by ``fastmat.tree.node``), exactly as
:func:`blob_rel` / :func:`exec_rel` do (``tests/test_native_decode.py`` checks it).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastmat.digest import Digest
from fastmat.fs.access import Access

BLOBS = "blobs"
EXEC = "exec"
AREAS = (BLOBS, EXEC)
TMP = "tmp"
LOCKS = "locks"
QUARANTINE = "quarantine"
USAGE = "usage"  # the use record (fastmat.cas.usage): made at first use
STORE_LOG = "store"
USES_LOG = "uses"
USAGE_LOCK = "lock"  # in USAGE: pins and appends share it, eviction takes it alone
SHARDS = tuple(f"{i:02x}" for i in range(256))

BLOB_MODE = 0o444
EXEC_MODE = 0o555
MODES = {BLOBS: BLOB_MODE, EXEC: EXEC_MODE}

BLOBS_PREFIX = f"{BLOBS}/"
EXEC_PREFIX = f"{EXEC}/"
_BLOBS_B = BLOBS_PREFIX.encode()
_EXEC_B = EXEC_PREFIX.encode()


def blob_rel(h: str, size: int) -> str:
    """``blobs/<hh>/<hash>-<size>`` for a validated hex hash."""
    return f"blobs/{h[:2]}/{h}-{size}"


def blob_rels(hashes: list[str], sizes: list[int]) -> list[str]:
    """:func:`blob_rel` of each (hash, size): one call per directory on the hot path."""
    return [f"blobs/{h[:2]}/{h}-{s}" for h, s in zip(hashes, sizes, strict=True)]


def exec_rel(h: str, size: int) -> str:
    """``exec/<hh>/<hash>-<size>``: the executable variant of the same blob."""
    return f"exec/{h[:2]}/{h}-{size}"


def rel(area: str, d: Digest) -> str:
    """The path of ``d`` in ``area`` (:data:`BLOBS` or :data:`EXEC`)."""
    return f"{area}/{d.hash[:2]}/{d.key}"


def key_rel(key: str) -> str:
    """The blob path of a ``<hash>-<size>`` key (a Directory message's file)."""
    return f"blobs/{key[:2]}/{key}"


def shard_dir(area: str, h: str) -> str:
    """The shard directory ``<area>/<hh>`` holding hash ``h``."""
    return f"{area}/{h[:2]}"


def name_of(area: str, key: bytes) -> bytes:
    """``<area>/<hh>/<key>`` for a ``<hash>-<size>`` key (bytes, for the use record)."""
    return area.encode() + b"/" + key[:2] + b"/" + key


def area_of(name: bytes) -> str | None:
    """:data:`BLOBS` or :data:`EXEC` for a ``blobs/..`` / ``exec/..`` name, else None."""
    if name.startswith(_BLOBS_B):
        return BLOBS
    if name.startswith(_EXEC_B):
        return EXEC
    return None


def key_of(name: bytes) -> bytes:
    """The ``<hash>-<size>`` key that ends a CAS name (or a bare key)."""
    return name[name.rfind(b"/") + 1 :]


def digest_of_rel(path: bytes) -> Digest:
    """The digest named by a ``blobs/..`` or ``exec/..`` path."""
    h, _, size = path.rsplit(b"/", 1)[1].decode().partition("-")
    return Digest(h, int(size))


def plain_of(path: bytes) -> bytes:
    """``exec/..`` -> the ``blobs/..`` path of the same digest (others unchanged)."""
    return _BLOBS_B + path[len(_EXEC_B) :] if path.startswith(_EXEC_B) else path


def variant_of(path: bytes) -> bytes:
    """``blobs/..`` -> the ``exec/..`` path of the same digest."""
    return _EXEC_B + path[len(_BLOBS_B) :]


def exists(root: Path) -> bool:
    """Whether a complete CAS layout is at ``root`` (its last shard is made last)."""
    return (root / EXEC / SHARDS[-1]).is_dir()


def create(root: Path, access: Access) -> None:
    """Creates the directories of a CAS at ``root`` (idempotent; the last shard of the
    last area is made last, so its presence means the layout is complete). A new root
    is private (0700), or shared with ``access.gid`` (2770, and so is every directory
    in it, also when an existing CAS is shared for the first time)."""
    fresh = access.make_root(root)
    if not fresh and exists(root):
        return
    for sub in (TMP, LOCKS, QUARANTINE):
        access.make_dir(root / sub)
    for area in AREAS:
        access.make_dir(root / area)
        for shard in SHARDS:
            access.make_dir(root / area / shard)
    access.make_dir(root / USAGE)
    # Durable once: a blob's group commit fsyncs its shard, not the shard's parents.
    for d in (*(root / area for area in AREAS), root, root.parent):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
