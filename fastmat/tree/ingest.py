"""Storing a local directory as REAPI ``Directory`` messages (``ingest_tree``)."""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING, Any

from fastmat import proto
from fastmat.control import ProgressFn, Reporter
from fastmat.errors import InvalidTreeError

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS
    from fastmat.cas.store import Batch
    from fastmat.digest import Digest

__all__ = ["ingest_tree"]

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _utf8(text: str, path: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidTreeError(
            f"name or link target {text!r} is not valid UTF-8 (REAPI uses strings)", path
        ) from None


def _set_digest(msg: Any, d: Digest) -> None:
    msg.hash = d.hash
    msg.size_bytes = d.size_bytes


def ingest_tree(
    cas: LocalCAS, src_dir: str | os.PathLike[str], *, progress: ProgressFn | None = None
) -> Digest:
    """Stores ``src_dir`` in ``cas`` and returns the root ``Directory`` digest.

    lstat semantics (invariant 3): symlinks are stored verbatim and
    never followed (dangling ones included), regular files by content with
    ``is_executable`` if any x bit is set, directories recursively (empty ones
    too). Nodes are sorted by the UTF-8 bytes of their names, as the spec
    requires. A FIFO, socket or device raises ``InvalidTreeError`` naming it;
    so does a name that is not valid UTF-8. ``src_dir`` itself may not be a
    symlink (``NotADirectoryError``). ``progress`` is told the files stored ("ingest",
    at most every 0.1 s); it may raise (``Cancelled``) to stop the ingest.

    Blobs are published in group commits of a few thousand (``LocalCAS.batch``):
    one data sync and one fsync per shard directory per group, not per blob. All
    are published when it returns; after a failure, none of the unfinished group.
    """
    reporter = Reporter(progress, "ingest", None, "files")
    top = os.fspath(src_dir)
    if not stat.S_ISDIR(os.lstat(top).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "ingest source is not a directory", top)
    with cas.batch() as batch:
        root = _walk(batch, top, reporter)
    reporter.finish()
    return root


def _walk(cas: Batch, top: str, reporter: Reporter) -> Digest:
    """The post-order walk of :func:`ingest_tree`, staging into ``cas``."""
    # Iterative post-order walk: [message, subdirs (path, relative path), next subdir].
    stack: list[list[Any]] = []
    done: list[Digest] = []

    def open_dir(path: str, rel: str) -> None:
        msg = proto.Directory()
        subdirs: list[tuple[str, str]] = []
        with os.scandir(path) as it:
            entries = sorted(((_utf8(e.name, rel + e.name), e) for e in it), key=lambda t: t[0])
        for _, e in entries:
            where = rel + e.name
            if e.is_symlink():
                target = os.readlink(e.path)
                _utf8(target, where)
                msg.symlinks.add(name=e.name, target=target)
                continue
            st = e.stat(follow_symlinks=False)
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFDIR:
                subdirs.append((e.path, where))
            elif kind == stat.S_IFREG:
                node = msg.files.add(name=e.name, is_executable=bool(st.st_mode & 0o111))
                _set_digest(node.digest, cas.put_file(e.path))
                reporter.add(1)
            else:
                raise InvalidTreeError(
                    f"{_KINDS.get(kind, f'file type {kind:#o}')} cannot be stored in a tree",
                    where,
                )
        stack.append([msg, subdirs, 0])

    open_dir(top, "")
    while stack:
        top_item = stack[-1]
        msg, subdirs, i = top_item
        if i < len(subdirs):
            top_item[2] = i + 1
            sub, where = subdirs[i]
            open_dir(sub, where + "/")
            continue
        stack.pop()
        # the children's digests were pushed in order, last child last
        digests = done[len(done) - len(subdirs) :]
        del done[len(done) - len(subdirs) :]
        for (_, where), d in zip(subdirs, digests, strict=True):
            _set_digest(msg.directories.add(name=where.rsplit("/", 1)[-1]).digest, d)
        done.append(cas.put(msg.SerializeToString(deterministic=True)))
    return done[0]
