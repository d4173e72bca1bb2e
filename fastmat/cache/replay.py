"""A cache hit: check the entry, then copy it to the destination (hardlink replay of the
sidecar's plan with the C executor, no readdir or stat walk; or ``clonefile(2)`` of the
whole tree where it exists). The entry is pinned by the caller."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastmat import _binding
from fastmat.cache import entry
from fastmat.cache.entry import Damaged
from fastmat.control import Cancelled, CancelToken, ProgressFn, Reporter, watching
from fastmat.fs.staging import staged

if TYPE_CHECKING:
    from pathlib import Path

    from fastmat.cache.index import Entry
    from fastmat.cache.protocol import Disk

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
# translate(): count the entries with a flag
_FELL_BACK = bytes(b for b in range(256) if b & (_binding.FM_HOW_XDEV | _binding.FM_HOW_DENIED))
_ROTATED = bytes(b for b in range(256) if b & _binding.FM_HOW_ROTATED)


@dataclass(frozen=True)
class Copied:
    """How a hit made ``dest``: ``method``, files copied instead of linked (clonefile
    refused, ``dest`` on another filesystem, a link denied: EPERM), entry files
    rotated (EMLINK)."""

    method: str
    fell_back: int = 0
    rotated: int = 0


def open_entry(disk: Disk, e: Entry) -> int:
    """An fd on ``e``'s directory once it passed the hit-time checks (the entry this
    process indexed: same id in the sidecar; an intact sidecar; the sampled files as
    built); else raises ``Damaged`` (``stale`` when it is another entry now)."""
    try:
        fd = os.open(e.key, _O_DIR, dir_fd=disk.entries_fd)
    except OSError as err:
        raise Damaged(f"entry directory: {err}", stale=True) from None
    try:
        if e.replay is None:
            try:
                e.replay = entry.load(disk.entries_fd, e.key)
            except entry.SidecarError as err:
                raise Damaged(f"sidecar: {err}") from None
            if e.replay.ident != e.ident:
                raise Damaged("entry replaced", stale=True)
        elif entry.read_ident(disk.entries_fd, e.key) != e.ident:
            raise Damaged("entry replaced", stale=True)
        why = entry.check_samples(e.replay, fd)
        if why is not None:
            # another process may have refreshed a sample after a rotation: look again
            try:
                fresh = entry.load(disk.entries_fd, e.key)
            except entry.SidecarError as err:
                raise Damaged(f"sidecar: {err}") from None
            if fresh.ident == e.ident and fresh.samples != e.replay.samples:
                e.replay = fresh
                why = entry.check_samples(fresh, fd)
        if why is not None:
            raise Damaged(why)
    except BaseException:
        os.close(fd)
        raise
    return fd


def clone(
    disk: Disk,
    e: Entry,
    dest: Path,
    *,
    threads: int,
    max_inflight: int,
    fsync: bool = True,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> Copied:
    """Copies entry ``e`` to ``dest``. Entry files an EMLINK rotation replaced get their
    sample refreshed (here and in the sidecar), so the next hit still serves the entry.
    ``progress`` is told the entries copied ("replay"); ``cancel`` stops the copy."""
    efd = open_entry(disk, e)
    fell_back = 0
    try:
        if _binding.HAS_CLONEFILE:
            try:
                _binding.clone_tree(disk.entries_fd, e.key, _binding.AT_FDCWD, str(dest))
                return Copied("clonefile")
            except OSError as err:
                if err.errno not in (errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
                    raise
                fell_back = 1  # another filesystem: the per-file replay below
        r = e.replay
        if r is None:  # pragma: no cover - open_entry loaded it
            raise Damaged("no replay")
        reporter = Reporter(progress, "replay", r.arrays.n_entries, "entries")
        how = replay(
            disk,
            r,
            efd,
            dest,
            threads=threads,
            max_inflight=max_inflight,
            reporter=reporter,
            cancel=cancel,
        )
        reporter.finish()
        fell_back += len(how) - len(how.translate(None, _FELL_BACK))
        rotated = len(how) - len(how.translate(None, _ROTATED))
        if rotated:
            srcs = r.arrays.srcs.split(b"\0")
            paths = {os.fsdecode(srcs[i]) for i, h in enumerate(how) if h & _binding.FM_HOW_ROTATED}
            fresh = entry.rewrite(
                disk.entries_fd, e.key, efd, ident=e.ident, rotated=paths, tmp_fd=disk.tmp_fd,
                fsync=fsync,
            )  # fmt: skip
            if fresh is not None:
                e.replay = fresh
        return Copied("hardlink", fell_back, rotated)
    finally:
        os.close(efd)


def replay(
    disk: Disk,
    r: entry.Replay,
    entry_fd: int,
    dest: Path,
    *,
    threads: int,
    max_inflight: int,
    reporter: Reporter | None = None,
    cancel: CancelToken | None = None,
) -> bytes:
    """Hardlinks the entry into ``dest`` (built beside it, published by one rename)
    with the C executor; returns each entry's ``FM_HOW_*`` code. ``reporter`` is told
    the entries done; ``cancel`` stops the executor between chunks (:class:`Cancelled`,
    nothing at ``dest``)."""
    ctl = _binding.ExecControl()
    with staged(dest) as st:
        with watching(lambda: ctl.done, ctl.cancel, reporter, cancel):
            res = _binding.exec_plan(
                st.fd,
                entry_fd,
                r.arrays,
                threads=threads,
                max_inflight=max_inflight,
                tmp_dirfd=disk.tmp_fd,  # an EMLINK rotation never builds inside an entry
                ctl=ctl,
            )
        if res.rc == -errno.ECANCELED and ctl.cancelled:
            raise Cancelled(f"copy of the cache entry {r.root} to {dest} cancelled")
        if res.rc != 0:
            bad = [i for i, s in enumerate(res.status) if s == -errno.ENOENT]
            if bad:
                src = os.fsdecode(r.arrays.srcs.split(b"\0")[bad[0]])
                raise Damaged(f"entry file missing: {src}")
            raise OSError(-res.rc, os.strerror(-res.rc), str(dest))
        st.publish()
    if reporter is not None:
        reporter.set(ctl.done)
    return res.how
