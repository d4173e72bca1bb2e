"""Who may use a CAS or a directory cache: its owner only, or the members of one group.

Anyone who can open a lock file can flock it, and a lock held forever blocks every
process that waits for it (issue 10, item 4). So a root is created private (0700) and
lock files are 0600; with ``group=`` (a name or a gid) the root and the directories
fastmat makes in it are 2770 and owned by that group (setgid: what is created inside
inherits the group) and lock files 0660, so the group's members share it and nobody
else can reach it. An existing root keeps its mode unless a group is asked for; lock
files are private either way.

Members of a shared group should run with a umask that keeps group bits (002 or 007):
the trees and temp files one member creates are removed by whichever member sweeps
or evicts them.
"""

from __future__ import annotations

import contextlib
import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fastmat.fs.locks import LOCK_MODE, SHARED_LOCK_MODE

PRIVATE_DIR_MODE = 0o700
SHARED_DIR_MODE = 0o2770


@dataclass(frozen=True)
class Access:
    """Private (``gid`` None) or shared with group ``gid``."""

    gid: int | None = None

    @classmethod
    def of(cls, group: str | int | None) -> Access:
        """From a group name or gid; ValueError for a name no group has."""
        if group is None:
            return cls()
        if isinstance(group, int):
            if group < 0:
                raise ValueError(f"gid must be >= 0, not {group}")
            return cls(group)
        try:
            return cls(grp.getgrnam(group).gr_gid)
        except KeyError:
            raise ValueError(f"no group named {group!r}") from None

    @property
    def dir_mode(self) -> int:
        return PRIVATE_DIR_MODE if self.gid is None else SHARED_DIR_MODE

    @property
    def lock_mode(self) -> int:
        return LOCK_MODE if self.gid is None else SHARED_LOCK_MODE

    def make_root(self, path: Path) -> bool:
        """Creates ``path`` (parents as ``mkdir -p`` would) with :attr:`dir_mode`. Returns
        whether the directories below it need :meth:`make_dir` again: always after
        creating it, and when a shared root was not yet shared (it is made so here)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, PRIVATE_DIR_MODE)
        except FileExistsError:
            if self.gid is None or self._is_shared(os.stat(path)):
                return False
        self.fix(path)
        return True

    def make_dir(self, path: Path) -> None:
        """Creates a directory below a root (if absent) and, when shared, makes it
        group-owned 2770 whatever the umask."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755 if self.gid is None else SHARED_DIR_MODE)
        if self.gid is not None:
            self.fix(path)

    def fix(self, path: Path) -> None:
        """Gives ``path`` this access: group and mode; nothing to do for private
        directories below a root."""
        st = os.stat(path, follow_symlinks=False)
        if self.gid is not None and st.st_gid != self.gid:
            os.chown(path, -1, self.gid, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != self.dir_mode:
            os.chmod(path, self.dir_mode, follow_symlinks=False)

    def _is_shared(self, st: os.stat_result) -> bool:
        return st.st_gid == self.gid and stat.S_IMODE(st.st_mode) == SHARED_DIR_MODE
