"""Overlay workspaces: a cache entry mounted read-only under a private upper layer.

``mount`` makes ``dest`` an overlay whose lower layer is the entry and whose upper and
work directories live in a fresh ``<cache>/tmp/<instance>/ws-<unique>/`` (the same
filesystem as the cache, as overlayfs requires). It is O(1) in the number of files, and
an action that rewrites or chmods an input only ever touches a copied-up inode in its
upper layer: the entry and the CAS inodes it links are never written. ``unmount`` undoes
all of it, ``dest`` included.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastmat import _binding
from fastmat.digest import Digest
from fastmat.fs.owned import unique

log = logging.getLogger("fastmat")

_BAD_CHARS = frozenset(",:\\\n")  # overlayfs option syntax cannot carry these in a path


@dataclass(frozen=True)
class Workspace:
    """One action's input tree; ``method`` says how it was made.

    ``"overlay"``: ``path`` is an overlay mount of the cache entry, ``upper`` the private
    layer holding whatever the action changed. Otherwise (``"hardlink"``, ``"clonefile"``,
    ``"materialize"``) ``path`` is a plain materialized tree and ``upper`` is None.
    """

    path: Path
    method: str
    root: Digest
    hit: bool
    upper: Path | None = None


def usable_path(p: Path) -> bool:
    return not (_BAD_CHARS & set(str(p)))


def probe(scratch: Path) -> bool:
    """True if this process can mount an overlay here (tried once, for real)."""
    if not _binding.HAS_OVERLAY or not usable_path(scratch):
        return False
    base = scratch / unique("probe-")
    try:
        for d in ("lower", "upper", "work", "mnt"):
            (base / d).mkdir(parents=True)
        try:
            _binding.mount_overlay(
                str(base / "lower"), str(base / "upper"), str(base / "work"), str(base / "mnt")
            )
        except OSError as e:
            log.info("overlay workspaces unavailable (%s): falling back to hardlinks", e)
            return False
        _binding.umount(str(base / "mnt"), detach=True)
        return True
    finally:
        with contextlib.suppress(OSError):
            _binding.remove_tree(base)


def mount(lower: Path, scratch: Path, dest: Path, record: Callable[[str], object]) -> Path:
    """Creates ``dest`` and mounts the overlay; returns the private dir to pass to
    ``unmount``. ``record(name of that dir)`` is called before ``dest`` is created or
    anything mounted (so a crash from then on leaves a record for the next opener;
    :mod:`.mounts`). Leaves nothing behind on failure but the record."""
    ws = scratch / unique("ws-")
    os.mkdir(ws, 0o700)
    made_dest = False
    try:
        os.mkdir(ws / "upper", 0o755)
        os.chmod(ws / "upper", 0o755)  # noqa: S103 - the mount root takes its mode
        os.mkdir(ws / "work", 0o700)
        record(ws.name)
        os.mkdir(dest, 0o755)
        made_dest = True
        _binding.mount_overlay(str(lower), str(ws / "upper"), str(ws / "work"), str(dest))
    except BaseException:
        if made_dest:
            with contextlib.suppress(OSError):
                os.rmdir(dest)
        _binding.remove_tree(ws)
        raise
    return ws


def unmount(dest: Path, ws: Path, trash: Path) -> Path | None:
    """Unmounts ``dest``, removes it, and moves ``ws`` (the upper layer: whatever the
    action wrote, possibly large) into ``trash``; returns its new name for the caller's
    background deleter, or None if it had to be deleted here.

    The unmount is MNT_DETACH: the overlay leaves the mount table at once even if a
    straggler process of the action still has a file open or its cwd inside (it keeps
    its private view until it lets go), so leaving a workspace cannot fail on EBUSY.
    """
    try:
        _binding.umount(str(dest), detach=True)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        log.warning("workspace %s was no longer mounted at exit", dest)  # the action did it
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(dest)
    gone = trash / unique(f"{ws.name}.")
    try:
        os.rename(ws, gone)
    except OSError as e:
        log.warning("workspace scratch %s: cannot move to the trash (%s)", ws, e)
        _binding.remove_tree(ws)
        return None
    return gone
