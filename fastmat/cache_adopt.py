"""Opening a DirectoryCache: adopt the complete entries on disk, discard the orphans."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from fastmat import cache_entry
from fastmat.cache_disk import Trasher, lock_key, unlink_lock
from fastmat.cache_index import Entry
from fastmat.cache_ops import discard, file_ident, stat_at
from fastmat.digest import Digest
from fastmat.errors import InvalidDigestError


def adopt_all(entries_fd: int, locks_fd: int, trash: Path, trasher: Trasher) -> list[Entry]:
    """Complete entries found on disk at open, least recently used first (sidecar
    mtimes: set at construction, touched at every hit); orphans (a tree
    without sidecar or the reverse) are discarded when nobody holds their lock."""
    names = os.listdir(entries_fd)
    plans = {n[: -len(".plan")] for n in names if n.endswith(".plan")}
    dirs = {n for n in names if not n.endswith(".plan")}
    found: list[tuple[int, Entry]] = []
    orphans = {k for k in plans ^ dirs if parse_key(k) is not None}
    bad: set[str] = set()
    for key in sorted(plans & dirs):
        root = parse_key(key)
        st = stat_at(entries_fd, key)
        if root is None or st is None or not stat.S_ISDIR(st.st_mode):
            continue
        try:
            fd = os.open(f"{key}.plan", os.O_RDONLY | os.O_CLOEXEC, dir_fd=entries_fd)
            with os.fdopen(fd, "rb") as f:
                head = f.read(1 << 16)
                if b"\n" not in head[len(cache_entry.MAGIC) :]:
                    head += f.read()
                mtime = os.fstat(f.fileno()).st_mtime_ns
            got, size, files = cache_entry.read_totals(head)
        except (OSError, cache_entry.SidecarError):
            got = None
        if got != root:
            bad.add(key)
            continue
        found.append((mtime, Entry(root, size, files, file_ident(st))))
    for key in orphans | bad:
        lfd = lock_key(locks_fd, key, fcntl.LOCK_EX, block=False)
        if lfd is None:
            continue  # somebody builds, adopts or pins it right now
        try:
            complete = stat_at(entries_fd, key) and stat_at(entries_fd, f"{key}.plan")
            if key in bad or not complete:  # else finished since we listed: keep it
                discard(entries_fd, key, trash, trasher)
                unlink_lock(locks_fd, key)
        finally:
            os.close(lfd)
    _sweep_locks(locks_fd, entries_fd, plans | dirs)
    found.sort(key=lambda t: t[0])
    return [e for _, e in found]


def _sweep_locks(locks_fd: int, entries_fd: int, keys: set[str]) -> None:
    """Unlinks the lock files of digests without an entry (a failed construction's),
    each under its own LOCK_EX so nobody waiting on one is left holding a ghost."""
    for name in os.listdir(locks_fd):
        key = name[: -len(".lock")]
        if not name.endswith(".lock") or key in keys or parse_key(key) is None:
            continue
        fd = lock_key(locks_fd, key, fcntl.LOCK_EX, block=False)
        if fd is None:
            continue
        try:
            if stat_at(entries_fd, key) is None and stat_at(entries_fd, f"{key}.plan") is None:
                unlink_lock(locks_fd, key)
        finally:
            os.close(fd)


def parse_key(key: str) -> Digest | None:
    h, _, size = key.partition("-")
    try:
        return Digest(h, int(size)) if size.isdigit() else None
    except InvalidDigestError:
        return None
