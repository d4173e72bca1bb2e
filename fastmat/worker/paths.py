"""Paths inside an action's directory: the Command's paths checked, and every file
operation done relative to a directory fd, one component at a time, never following a
symlink (invariants 3 and 13, docs/design.md).

The action runs as another user and may leave symlinks where the worker then looks
for outputs or creates output directories; nothing here can be led outside the tree.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from fastmat.errors import FastmatError

__all__ = [
    "O_DIR",
    "O_FILE",
    "BadPathError",
    "dir_fd",
    "make_dirs",
    "opened_dir",
    "split",
]

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO: no hang


class BadPathError(FastmatError, ValueError):
    """A path in a Command is not a normalized relative path (REAPI INVALID_ARGUMENT)."""


def split(path: str, what: str, *, empty_ok: bool = False) -> list[str]:
    """The components of a Command path: relative, no ``.`` / ``..`` / empty parts, no
    NUL, no trailing slash. ``BadPathError`` naming ``what`` otherwise."""
    if path == "":
        if empty_ok:
            return []
        raise BadPathError(f"{what} is empty")
    parts = path.split("/")
    if "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise BadPathError(f"{what} {path!r} is not a normalized relative path")
    return parts


def dir_fd(base_fd: int, parts: list[str]) -> int:
    """A new fd of directory ``parts`` under ``base_fd`` (``O_NOFOLLOW`` at each step:
    a symlink anywhere on the way is ``ELOOP`` / ``ENOTDIR``)."""
    fd = os.dup(base_fd)
    try:
        for p in parts:
            nfd = os.open(p, O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dirs(base_fd: int, parts: list[str], owner: tuple[int, int] | None) -> int:
    """Like ``mkdir -p`` of ``parts`` under ``base_fd`` without following symlinks; new
    directories are 0755; the last one, and every directory created, is chown'ed to
    ``owner`` (uid, gid) when given, so that the action's user can create entries in
    it. Returns the fd of the last directory."""
    fd = os.dup(base_fd)
    try:
        for i, p in enumerate(parts):
            created = False
            try:
                os.mkdir(p, 0o755, dir_fd=fd)
                created = True
            except FileExistsError:
                pass
            nfd = os.open(p, O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if owner is not None and (created or i == len(parts) - 1):
                os.fchown(fd, *owner)
            if created:
                os.fchmod(fd, 0o755)  # whatever the umask
        if not parts and owner is not None:
            os.fchown(fd, *owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def opened_dir(base_fd: int, parts: list[str]) -> Iterator[int | None]:
    """``dir_fd`` as a context; yields None when the directory is missing."""
    try:
        fd = dir_fd(base_fd, parts)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            yield None
            return
        raise
    try:
        yield fd
    finally:
        os.close(fd)
