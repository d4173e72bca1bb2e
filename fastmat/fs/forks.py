"""Objects bound to the process that opened them: fds, flocks, threads and in-process
locks do not survive ``fork`` in a usable state (a lock another thread held at the fork
stays held in the child forever; the parent's background threads do not exist there).
A ``LocalCAS`` or ``DirectoryCache`` used in a forked child therefore raises instead of
hanging or corrupting the parent's state: open them after forking.

The check costs one global read and one compare: a fork hook bumps a generation
counter in every child, so no ``getpid`` system call is needed per use.
"""

from __future__ import annotations

import os

from fastmat.errors import FastmatError

_generation = [0]  # bumped in every forked child


def _forked() -> None:
    _generation[0] += 1


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forked)


class OpenedHere:
    """Remembers the process (and fork generation) that opened ``what``."""

    __slots__ = ("_generation", "pid", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.pid = os.getpid()
        self._generation = _generation[0]

    @property
    def here(self) -> bool:
        """Whether this is still the opening process (not a forked child of it)."""
        return _generation[0] == self._generation

    def check(self) -> None:
        """Raises ``FastmatError`` in a forked child of the opening process."""
        if _generation[0] != self._generation:
            raise FastmatError(
                f"{self.what} was opened in process {self.pid}; open it after fork "
                f"(this is process {os.getpid()})"
            )
