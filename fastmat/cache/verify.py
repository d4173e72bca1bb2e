"""A cache never serves bytes verify found bad (issue 10, item 9).

An entry's files are hard links to CAS inodes, so when ``LocalCAS.verify()`` moves a
damaged blob to ``quarantine/``, the inode is still linked from every entry that has
it, and replaying the entry would serve the damaged bytes. Two defences:

- at every hit, :class:`QuarantineWatch` stats ``quarantine/`` (one call); when it
  changed since last seen it lists the quarantined inodes still linked elsewhere
  (link count above one), and an entry not yet checked against that set gets one
  ``lstat`` pass over its files (:func:`links_quarantined`) before it is served.
  Also after a reopen: a fresh watch starts from an unseen quarantine. A stamp whose
  mtime is within a second of now is not trusted (another quarantine in the same
  timestamp tick would not change it), so it is read again at the next hit;
- ``DirectoryCache.verify()`` runs the CAS verify, then checks every entry
  (:func:`check_entry`): no file links a quarantined inode, every CAS-linked file is
  the CAS's own inode (which the CAS verify just hashed), and every private inode
  (empty files, NodeProperties copies, copies made across filesystems) hashes to the
  digest the tree's plan gives; entries that fail are invalidated.

A quarantined file removed by hand before a cache saw it can no longer be recognised
at a hit: keep ``quarantine/`` until the caches over the CAS were verified or opened.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastmat import _binding
from fastmat.cas import layout
from fastmat.digest import EMPTY_DIGEST, hash_fd
from fastmat.errors import FastmatError
from fastmat.tree import load_plan

if TYPE_CHECKING:
    from fastmat.cache.entry import Replay
    from fastmat.cas import LocalCAS, VerifyReport
    from fastmat.tree import TreeLimits

Inode = tuple[int, int]  # (st_dev, st_ino)

_RACY_NS = 1_000_000_000  # a stamp this recent may hide a second change in its tick
_O_FILE = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


class QuarantineWatch:
    """The quarantined inodes a cache must not serve, re-read only when the CAS's
    ``quarantine/`` changed. Thread-safe."""

    def __init__(self, cas: LocalCAS) -> None:
        self._cas = cas
        self._mu = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._bad: frozenset[Inode] = frozenset()
        self.generation = 0  # bumped whenever the set of bad inodes changes

    def current(self) -> tuple[int, frozenset[Inode]]:
        """(generation, quarantined inodes some other name still links)."""
        stamp = self._cas.quarantine_stamp()
        with self._mu:
            if stamp == self._stamp:
                return self.generation, self._bad
            bad = frozenset(q.ino for q in self._cas.quarantined() if q.nlink > 1)
            if bad != self._bad:
                self._bad = bad
                self.generation += 1
            racy = time.time_ns() - stamp[1] < _RACY_NS
            self._stamp = None if racy else stamp
            return self.generation, self._bad


def links_quarantined(r: Replay, entry_fd: int, bad: frozenset[Inode]) -> str | None:
    """The path of an entry file that is a quarantined inode, else None (one ``lstat``
    per file; a missing file is the replay's business)."""
    srcs = r.arrays.srcs.split(b"\0")
    for op, src in zip(r.arrays.op, srcs, strict=False):
        if op != _binding.FM_OP_LINK:
            continue
        try:
            st = os.stat(src, dir_fd=entry_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) in bad:
            return os.fsdecode(src)
    return None


@dataclass
class EntryCheck:
    """What :func:`check_entry` found in one entry."""

    files: int = 0
    hashed: int = 0  # private inodes read and hashed
    problem: str | None = None


def check_entry(
    cas: LocalCAS,
    r: Replay,
    entry_fd: int,
    bad: frozenset[Inode],
    limits: TreeLimits | None = None,
) -> EntryCheck:
    """Checks an entry (open at ``entry_fd``, its sidecar's replay ``r``) against the
    tree's plan from the CAS: entry i of the plan is entry i of the replay
    (:func:`fastmat.cache.entry.from_plan`)."""
    out = EntryCheck()
    try:
        plan = load_plan(cas, r.root, limits=limits)
    except FastmatError as e:
        out.problem = f"its tree cannot be read from the CAS: {e}"
        return out
    # a file's replay source is its path in the entry; a symlink's is its target
    ops, names = plan.arrays.op, r.arrays.srcs.split(b"\0")
    srcs = plan.arrays.srcs.split(b"\0")
    if len(ops) != len(r.arrays.op):
        out.problem = "the sidecar does not match the tree"
        return out
    links = [i for i, op in enumerate(ops) if op == _binding.FM_OP_SYMLINK]
    link_paths = dict(zip(links, plan.paths_of_entries(links), strict=True))
    for i, op in enumerate(ops):
        path = names[i]
        if op == _binding.FM_OP_SYMLINK:
            try:
                ok = os.readlink(link_paths[i], dir_fd=entry_fd) == os.fsdecode(srcs[i])
            except OSError:
                ok = False
            if not ok:
                out.problem = f"{link_paths[i]}: not the symlink the tree has"
                return out
            continue
        out.files += 1
        out.problem, hashed = _check_file(cas, entry_fd, path, op=op, src=srcs[i], bad=bad)
        out.hashed += hashed
        if out.problem is not None:
            out.problem = f"{os.fsdecode(path)}: {out.problem}"
            return out
    return out


def _check_file(
    cas: LocalCAS, entry_fd: int, path: bytes, *, op: int, src: bytes, bad: frozenset[Inode]
) -> tuple[str | None, bool]:
    """(what is wrong with one entry file or None, whether it was hashed)."""
    try:
        st = os.stat(path, dir_fd=entry_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "missing", False
    ino = (st.st_dev, st.st_ino)
    if ino in bad:
        return "links a blob verify quarantined", False
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o222:
        return f"not a read-only file (mode {st.st_mode:o})", False
    d = EMPTY_DIGEST if op == _binding.FM_OP_EMPTY else layout.digest_of_rel(src)
    if op == _binding.FM_OP_LINK:
        try:
            cas_st = os.stat(src, dir_fd=cas.root_fd, follow_symlinks=False)
            if (cas_st.st_dev, cas_st.st_ino) == ino:
                return None, False  # the CAS's own inode: the CAS verify hashed it
        except FileNotFoundError:
            pass  # gone from the CAS: the entry holds the only copy, hash it
    if st.st_size != d.size_bytes:
        return f"size {st.st_size}, expected {d.size_bytes}", False
    fd = os.open(path, _O_FILE, dir_fd=entry_fd)
    try:
        got = hash_fd(fd)
    finally:
        os.close(fd)
    return (None if got == d else "content does not hash to its digest"), True


@dataclass
class CacheVerifyReport:
    """The result of ``DirectoryCache.verify()``: the CAS's report, then the entries'."""

    cas: VerifyReport
    entries_checked: int = 0
    files_checked: int = 0
    files_hashed: int = 0
    invalidated: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    busy: list[tuple[str, str]] = field(default_factory=list)  # bad, but in use elsewhere
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.cas.ok and not self.invalidated and not self.busy


def open_dir(entries_fd: int, key: str) -> int | None:
    """An fd on entry ``key``'s directory; None if it is gone."""
    try:
        return os.open(key, _O_DIR, dir_fd=entries_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
