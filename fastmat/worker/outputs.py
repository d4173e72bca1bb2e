"""An action's outputs: found as the Command names them, stored in the local CAS,
described in the ``ActionResult``, uploaded where the server lacks them.

- ``Command.output_paths`` (REAPI v2.1): each path a file, a directory or a symlink,
  reported in ``output_files`` / ``output_directories`` / ``output_symlinks``;
- else the older ``output_files`` (a symlink there goes to ``output_file_symlinks``) and
  ``output_directories`` (``output_directory_symlinks``);
- a missing output is not an error (the client decides); an output of the wrong kind
  (a directory named in ``output_files``, a FIFO anywhere) is ``FAILED_PRECONDITION``;
- a directory becomes a ``Tree`` (children deduplicated, parents before children) and,
  as ``Command.output_directory_format`` asks, its root ``Directory`` digest too;
- files keep their executable bit (the owner's x bit), symlinks their target verbatim.

Everything is read relative to directory fds opened ``O_NOFOLLOW`` (:mod:`.paths`):
the action ran as another user and may have left symlinks anywhere. File contents go
into the local CAS as they are hashed (one pass), so a later action that takes them as
inputs links them without a fetch; ``upload`` then asks the server which blobs it lacks
(``FindMissingBlobs``) and sends only those, through ``RemoteCAS.upload``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastmat import proto
from fastmat.digest import Digest
from fastmat.errors import FastmatError
from fastmat.worker import paths
from fastmat.worker import proto as wproto

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS
    from fastmat.remote import RemoteCAS

__all__ = ["OutputError", "Outputs", "collect", "store_file", "upload"]

_CHUNK = 1 << 20
_MAX_DEPTH = 256


class OutputError(FastmatError):
    """An output exists but cannot be reported (wrong kind, unreadable name):
    REAPI ``FAILED_PRECONDITION``."""


@dataclass
class Outputs:
    """The output part of an ``ActionResult`` and the blobs it references.

    ``blobs``: digest -> bytes for messages (Trees, Directories) built here, None for
    files already in the local CAS. ``files`` / ``bytes``: output file count and size.
    """

    result: Any
    blobs: dict[Digest, bytes | None] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0


def _pb(d: Digest) -> Any:
    return proto.Digest(hash=d.hash, size_bytes=d.size_bytes)


def _read_chunks(fd: int) -> Iterator[bytes]:
    while chunk := os.read(fd, _CHUNK):
        yield chunk


def store_file(cas: LocalCAS, parent_fd: int, name: str) -> tuple[Digest, os.stat_result] | None:
    """Hashes the regular file ``name`` under ``parent_fd`` into the CAS; None if it is
    not there. ``OutputError`` if it is not a regular file."""
    try:
        fd = os.open(name, paths.O_FILE, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"output {name!r} is not a regular file (mode {st.st_mode:o})")
        return cas.put_stream(_read_chunks(fd), None), st
    finally:
        os.close(fd)


class _Collector:
    def __init__(self, cas: LocalCAS, out: Outputs) -> None:
        self.cas = cas
        self.out = out

    def file_node(self, msg: Any, parent_fd: int, name: str) -> None:
        got = store_file(self.cas, parent_fd, name)
        if got is None:  # vanished between the listing and the open
            raise OutputError(f"output file {name!r} vanished while it was collected")
        d, st = got
        msg.files.add(name=name, digest=_pb(d), is_executable=bool(st.st_mode & stat.S_IXUSR))
        self.out.blobs.setdefault(d, None)
        self.out.files += 1
        self.out.bytes += d.size_bytes

    def directory(self, fd: int, where: str, depth: int) -> tuple[Any, list[tuple[Digest, bytes]]]:
        """The Directory message of ``fd`` and its descendants' (digest, bytes), in
        breadth-first order under each child (deduplicated by the caller)."""
        if depth > _MAX_DEPTH:
            raise OutputError(f"output directory {where!r} is nested deeper than {_MAX_DEPTH}")
        msg = proto.Directory()
        below: list[tuple[Digest, bytes]] = []
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            name = e.name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise OutputError(f"output name {where}/{name!r} is not UTF-8") from None
            st = e.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                self.file_node(msg, fd, name)
            elif stat.S_ISLNK(st.st_mode):
                msg.symlinks.add(name=name, target=os.readlink(name, dir_fd=fd))
            elif stat.S_ISDIR(st.st_mode):
                cfd = os.open(name, paths.O_DIR, dir_fd=fd)
                try:
                    child, grand = self.directory(cfd, f"{where}/{name}", depth + 1)
                finally:
                    os.close(cfd)
                data = child.SerializeToString(deterministic=True)
                d = Digest.of(data)
                msg.directories.add(name=name, digest=_pb(d))
                below.append((d, data))
                below.extend(grand)
            else:
                raise OutputError(f"output {where}/{name} is neither file, directory nor symlink")
        return msg, below

    def tree(self, fd: int, path: str, fmt: int) -> Any:
        """The OutputDirectory for directory ``fd`` (its Tree and Directory blobs stored)."""
        root, below = self.directory(fd, path, 0)
        children: dict[Digest, bytes] = {}
        for d, data in _breadth_first(root, below):
            children.setdefault(d, data)
        tree = proto.Tree(root=root)
        for data in children.values():
            tree.children.add().ParseFromString(data)
        tree_bytes = tree.SerializeToString(deterministic=True)
        root_bytes = root.SerializeToString(deterministic=True)
        tree_d, root_d = Digest.of(tree_bytes), Digest.of(root_bytes)
        # Directory messages go into the local CAS too: an action taking this directory
        # as input later finds them here
        for d, data in [(root_d, root_bytes), *children.items()]:
            self.cas.put(data, expected=d)
        od = wproto.OutputDirectory(path=path, is_topologically_sorted=True)
        if fmt in (wproto.TREE_ONLY, wproto.TREE_AND_DIRECTORY):
            od.tree_digest.CopyFrom(_pb(tree_d))
            self.out.blobs[tree_d] = tree_bytes
        if fmt in (wproto.DIRECTORY_ONLY, wproto.TREE_AND_DIRECTORY):
            od.root_directory_digest.CopyFrom(_pb(root_d))
            self.out.blobs[root_d] = root_bytes
            for d, data in children.items():
                self.out.blobs[d] = data
        return od


def _breadth_first(root: Any, below: list[tuple[Digest, bytes]]) -> list[tuple[Digest, bytes]]:
    """``below`` reordered breadth-first from ``root`` (each directory before its
    children: ``Tree.is_topologically_sorted``)."""
    by_digest = dict(below)
    order: list[tuple[Digest, bytes]] = []
    seen: set[Digest] = set()
    level = [root]
    while level:
        nxt = []
        for msg in level:
            for node in msg.directories:
                d = Digest(node.digest.hash, node.digest.size_bytes)
                if d in seen:
                    continue
                seen.add(d)
                data = by_digest[d]
                order.append((d, data))
                nxt.append(proto.Directory.FromString(data))
        level = nxt
    return order


@contextlib.contextmanager
def _parent(wd_fd: int, parts: list[str]) -> Iterator[int | None]:
    with paths.opened_dir(wd_fd, parts[:-1]) as fd:
        yield fd


def collect(cas: LocalCAS, wd_fd: int, command: Any) -> Outputs:
    """The outputs ``command`` names, found under its working directory ``wd_fd``."""
    out = Outputs(wproto.ActionResult())
    c = _Collector(cas, out)
    r = out.result
    fmt = int(command.output_directory_format)
    if command.output_paths:
        wanted = [(p, "path") for p in command.output_paths]
    else:
        wanted = [(p, "file") for p in command.output_files]
        wanted += [(p, "directory") for p in command.output_directories]
    for path, kind in wanted:
        parts = paths.split(path, f"output {kind}")
        with _parent(wd_fd, parts) as pfd:
            if pfd is None:
                continue
            name = parts[-1]
            try:
                st = os.lstat(name, dir_fd=pfd)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                link = wproto.OutputSymlink(path=path, target=os.readlink(name, dir_fd=pfd))
                field_ = {"path": r.output_symlinks, "file": r.output_file_symlinks}.get(
                    kind, r.output_directory_symlinks
                )
                field_.add().CopyFrom(link)
            elif stat.S_ISREG(st.st_mode) and kind in ("path", "file"):
                got = store_file(cas, pfd, name)
                if got is not None:
                    d, fst = got
                    r.output_files.add(
                        path=path, digest=_pb(d), is_executable=bool(fst.st_mode & stat.S_IXUSR)
                    )
                    out.blobs.setdefault(d, None)
                    out.files += 1
                    out.bytes += d.size_bytes
            elif stat.S_ISDIR(st.st_mode) and kind in ("path", "directory"):
                fd = os.open(name, paths.O_DIR, dir_fd=pfd)
                try:
                    r.output_directories.add().CopyFrom(c.tree(fd, path, fmt))
                finally:
                    os.close(fd)
            else:
                what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
                if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                    what = "neither a file nor a directory"
                raise OutputError(f"output {kind} {path!r} is {what}")
    return out


def upload(remote: RemoteCAS, cas: LocalCAS, blobs: dict[Digest, bytes | None]) -> tuple[int, int]:
    """Sends the blobs the server lacks (``FindMissingBlobs``); returns (count, bytes)."""
    wanted = [d for d in blobs if d.size_bytes > 0]
    if not wanted:
        return 0, 0
    missing = remote.find_missing(wanted)

    def pairs() -> Iterator[tuple[Digest, bytes]]:
        for d in missing:
            data = blobs.get(d)
            yield d, cas.read(d) if data is None else data

    n = remote.upload(pairs())
    return n, sum(d.size_bytes for d in missing)
