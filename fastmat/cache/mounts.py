"""Overlay workspace mounts, recorded before they are made, and the sweep of a dead
owner's ones (issue 10, item 8).

A mount outlives a SIGKILLed owner: the kernel keeps it, with its upper and work
directories in the dead instance's scratch and its lower layer the cache entry, and
actions the owner started may still be running inside. So every mount is recorded
first, in ``<cache>/mounts/<key>@<owner>@<ws>`` (``owner`` the instance's scratch dir
name, ``ws`` the workspace dir inside it; the content says ``dest``), and forgotten
only after it is gone. The names alone tell which entries are under a mount
(:func:`keys`: never evicted) and whose mounts they are.

Opening a cache sweeps (:func:`sweep`): for each owner with records whose
``owner.lock`` can be taken (dead; held while cleaning, so two openers never clean
the same owner), each mount is detached if ``/proc/self/mountinfo`` still shows an
overlay with that upper directory, ``dest`` (now an empty directory) is removed, and
only then the upper and work directories go to the trash. An owner whose mounts could
not all be cleaned (no CAP_SYS_ADMIN, say) keeps its records and its scratch dir.
Records are not fsynced: mounts do not survive a reboot either.

Limit: only the opener's mount namespace is visible. A mount made in another
namespace that still exists looks gone, and its upper directory would be removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastmat import _binding
from fastmat.fs.owned import OWNER_LOCK
from fastmat.fs.trash import Trasher, to_trash

log = logging.getLogger("fastmat")

MOUNTS = "mounts"
_SEP = "@"
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class DeadMount:
    """A dead owner's workspace found by a sweep, and what became of it."""

    key: str  # the entry it mounted
    owner: str  # the dead instance's scratch dir name
    dest: str
    was_mounted: bool  # the overlay was still in the mount table
    cleaned: bool  # detached, dest removed, upper/work trashed, record dropped
    problem: str = ""  # why not, when not cleaned


def _name(key: str, owner: str, ws: str) -> str:
    return _SEP.join((key, owner, ws))


def _component(s: str) -> bool:
    return bool(s) and s not in (".", "..") and "/" not in s and "\0" not in s


def record(mounts_fd: int, owner: str, key: str, ws: str, dest: Path) -> str:
    """Records instance ``owner``'s mount of entry ``key`` at ``dest`` (upper and work
    in its scratch dir ``ws``) before it is made; returns the record's name for
    :func:`forget`. Written under a temp name and renamed: never seen half-written."""
    name = _name(key, owner, ws)
    tmp = f".{name}.{secrets.token_hex(4)}"
    data = json.dumps({"key": key, "owner": owner, "ws": ws, "dest": str(dest)})
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=mounts_fd)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=mounts_fd, dst_dir_fd=mounts_fd)
    return name


def forget(mounts_fd: int, name: str) -> None:
    """Drops a record once its mount, ``dest`` and scratch are gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=mounts_fd)


def keys(mounts_fd: int) -> set[str]:
    """The entries with a mount record: live workspaces, and dead ones not yet swept."""
    return {n.split(_SEP, 1)[0] for n in os.listdir(mounts_fd) if _SEP in n[1:]}


def _unescape(s: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), s)


def overlays_by_upper() -> dict[str, str]:
    """Overlay mounts in this mount namespace: upper directory -> mount point."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] != "overlay":
            continue
        for opt in rest[2].split(","):  # a comma inside a value is escaped
            k, _, v = opt.partition("=")
            if k == "upperdir":
                out[_unescape(v)] = _unescape(fields[4])
    return out


@dataclass(frozen=True)
class Sweeper:
    """What a sweep works on: the records, the instances' scratch dirs (``tmp``, open
    at ``tmp_fd``; ``mine`` is the sweeper's own) and the cache's trash."""

    mounts_fd: int
    tmp: Path
    tmp_fd: int
    mine: str
    trash: Path
    trasher: Trasher


def sweep(sw: Sweeper) -> tuple[list[DeadMount], set[str]]:
    """Cleans the mounts of dead owners (see the module docstring). Returns what it
    found, and the owners whose records remain (their scratch dirs must be kept)."""
    by_owner: dict[str, list[str]] = defaultdict(list)
    for name in os.listdir(sw.mounts_fd):
        parts = name.split(_SEP)
        if len(parts) == 3 and not name.startswith(".") and parts[1] != sw.mine:
            by_owner[parts[1]].append(name)
    found: list[DeadMount] = []
    kept: set[str] = set()
    if not by_owner:
        return found, kept
    overlays = overlays_by_upper()
    for owner, names in sorted(by_owner.items()):
        if not _component(owner):
            continue
        with _dead_owner(sw.tmp_fd, owner) as dead:
            if not dead:
                continue  # alive, or another opener is cleaning it right now
            for name in sorted(names):
                m = _clean(sw, name, overlays)
                if m is not None:
                    found.append(m)
                    if not m.cleaned:
                        kept.add(owner)
    if found:
        log.warning(
            "cache %s: %d workspace(s) of dead owners found%s",
            sw.tmp.parent,
            len(found),
            "".join(f"; {m.dest}: {m.problem or 'cleaned'}" for m in found),
        )
    return found, kept


@contextlib.contextmanager
def _dead_owner(tmp_parent_fd: int, owner: str) -> Iterator[bool]:
    """True (holding the owner's lock for the block) if ``owner`` is dead."""
    try:
        dfd = os.open(owner, _O_DIR, dir_fd=tmp_parent_fd)
    except FileNotFoundError:
        yield True  # its scratch is gone: so is its owner
        return
    try:
        try:
            lfd = os.open(OWNER_LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dfd)
        except FileNotFoundError:
            yield False  # being created (a record cannot exist yet) or swept: not ours
            return
        try:
            try:
                fcntl.flock(lfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(lfd)
    finally:
        os.close(dfd)


def _clean(sw: Sweeper, name: str, overlays: dict[str, str]) -> DeadMount | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=sw.mounts_fd)
    except FileNotFoundError:
        return None  # cleaned by someone else meanwhile
    with os.fdopen(fd, "rb") as f:
        raw = f.read(1 << 16)
    try:
        rec = json.loads(raw)
        key, owner, ws, dest = (str(rec[k]) for k in ("key", "owner", "ws", "dest"))
    except (ValueError, KeyError, TypeError):
        log.warning("cache: unreadable mount record %s: removed", name)
        forget(sw.mounts_fd, name)
        return None
    if not (_component(owner) and _component(ws) and os.path.isabs(dest)):
        log.warning("cache: malformed mount record %s: removed", name)
        forget(sw.mounts_fd, name)
        return None
    upper = str(sw.tmp / owner / ws / "upper")
    point = overlays.get(upper)
    if point is not None:
        try:
            _binding.umount(point, detach=True)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: not mounted (any more)
                return DeadMount(key, owner, dest, True, False, f"cannot detach: {e.strerror}")
    try:
        os.rmdir(dest)  # the empty mount point it made (never anything with content)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cache: dead workspace %s left in place: %s", dest, e.strerror)
    with contextlib.suppress(FileNotFoundError):
        owner_fd = os.open(owner, _O_DIR, dir_fd=sw.tmp_fd)
        try:
            gone = to_trash(owner_fd, ws, sw.trash)
        finally:
            os.close(owner_fd)
        if gone is not None:
            sw.trasher.put(gone)
    forget(sw.mounts_fd, name)
    return DeadMount(key, owner, dest, point is not None, True)
