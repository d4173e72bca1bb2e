"""A cache hit: check the entry, then copy it to the destination (hardlink replay of the
sidecar's plan with the C executor, no readdir or stat walk; or ``clonefile(2)`` of the
whole tree where it exists). The entry is pinned by the caller."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from fastmat import _binding
from fastmat.cache import entry
from fastmat.cache.entry import Damaged
from fastmat.fs.staging import staged

if TYPE_CHECKING:
    from pathlib import Path

    from fastmat.cache.index import Entry
    from fastmat.cache.protocol import Disk

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_XDEV = bytes(b for b in range(256) if b & _binding.FM_HOW_XDEV)  # translate(): count flags


def open_entry(disk: Disk, e: Entry) -> int:
    """An fd on ``e``'s directory once it passed the hit-time checks (the same
    directory as indexed, an intact sidecar, the sampled files as built); else
    raises ``Damaged``."""
    try:
        fd = os.open(e.key, _O_DIR, dir_fd=disk.entries_fd)
    except OSError as err:
        raise Damaged(f"entry directory: {err}", stale=True) from None
    try:
        if entry.file_ident(os.fstat(fd)) != e.ident:
            raise Damaged("entry directory replaced", stale=True)
        if e.replay is None:
            try:
                e.replay = entry.load(disk.entries_fd, e.key)
            except entry.SidecarError as err:
                raise Damaged(f"sidecar: {err}") from None
        why = entry.check_samples(e.replay, fd)
        if why is not None:
            raise Damaged(why)
    except BaseException:
        os.close(fd)
        raise
    return fd


def clone(disk: Disk, e: Entry, dest: Path, *, threads: int, max_inflight: int) -> tuple[str, int]:
    """Copies entry ``e`` to ``dest``: (method, fallbacks: clonefile refused, files
    copied across filesystems)."""
    efd = open_entry(disk, e)
    fell_back = 0
    try:
        if _binding.HAS_CLONEFILE:
            try:
                _binding.clone_tree(disk.entries_fd, e.key, _binding.AT_FDCWD, str(dest))
                return "clonefile", 0
            except OSError as err:
                if err.errno not in (errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
                    raise
                fell_back = 1  # another filesystem: the per-file replay below
        if e.replay is None:  # pragma: no cover - open_entry loaded it
            raise Damaged("no replay")
        fell_back += replay(disk, e.replay, efd, dest, threads=threads, max_inflight=max_inflight)
        return "hardlink", fell_back
    finally:
        os.close(efd)


def replay(
    disk: Disk, r: entry.Replay, entry_fd: int, dest: Path, *, threads: int, max_inflight: int
) -> int:
    """Hardlinks the entry into ``dest`` (built beside it, published by one rename)
    with the C executor; returns how many files were copied instead (``dest`` on
    another filesystem)."""
    with staged(dest) as st:
        res = _binding.exec_plan(
            st.fd,
            entry_fd,
            r.arrays,
            threads=threads,
            max_inflight=max_inflight,
            tmp_dirfd=disk.tmp_fd,  # an EMLINK rotation never builds inside an entry
        )
        if res.rc != 0:
            bad = [i for i, s in enumerate(res.status) if s == -errno.ENOENT]
            if bad:
                src = os.fsdecode(r.arrays.srcs.split(b"\0")[bad[0]])
                raise Damaged(f"entry file missing: {src}")
            raise OSError(-res.rc, os.strerror(-res.rc), str(dest))
        st.publish()
    return len(res.how) - len(res.how.translate(None, _XDEV))
