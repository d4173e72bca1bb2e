"""Loading and validating REAPI ``Directory`` trees (invariant 10, docs/design.md).

Every ``Directory`` message is read from the local CAS (after one
``fetcher.fetch_directories(root)`` call when some are missing), checked
against its digest, decoded and validated, once per distinct digest. The
result is a flat :class:`~fastmat.tree.plan.Plan` (see :func:`load_plan`).

Decisions, all checked before anything is created:

- Names: one path component (not empty, ``.``, ``..``, no ``/`` or NUL),
  at most ``max_name_bytes`` UTF-8 bytes, unique across the files,
  directories and symlinks of one directory.
- Order: the spec says each node list MUST be sorted by name (UTF-8 byte
  order, which is code point order). An unsorted list is refused
  (``InvalidTreeError``), not normalised: a canonical tree has one digest.
- ``unix_mode``: permission bits only. setuid/setgid/sticky are dropped
  silently (a private inode gets ``unix_mode & 0o777``); bits above
  ``0o7777`` (file-type bits) are refused. A negative ``mtime`` or
  ``nanos`` outside ``[0, 1e9)`` is refused. ``node_properties`` of
  directories and symlinks are ignored: directories are always 0755
  (invariant 4) and Linux has no symlink modes.
- Symlink targets are kept verbatim (absolute, ``..``, dangling are fine:
  they are never followed) but must be non-empty, NUL-free and at most
  ``max_symlink_target_bytes``.
- The same ``Directory`` digest may appear in several places (a DAG); limits
  on depth and total entries apply to the tree after expansion, computed per
  distinct digest, so a "width bomb" is refused without being expanded.
- Validated nodes are kept in a bounded in-process cache keyed by digest and
  limits (:mod:`fastmat.tree.nodecache`): content addressing makes them valid
  forever, and a worker sees the same directories in action after action.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fastmat import proto
from fastmat.cas import layout
from fastmat.digest import BlobNotFoundError, Digest, DigestMismatchError
from fastmat.errors import InvalidTreeError
from fastmat.tree.limits import DEFAULT_LIMITS, TreeLimits
from fastmat.tree.node import BadNode, Node, build_node
from fastmat.tree.nodecache import node_cache
from fastmat.tree.plan import Plan, expand

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS

__all__ = ["Fetcher", "load_plan"]


_RDONLY = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


class Fetcher(Protocol):
    """What :func:`load_plan` / ``materialize`` need from a remote CAS client.

    Both methods put what they fetch into the local CAS (verified) and return
    nothing; whatever is still missing afterwards is reported as missing.
    """

    def fetch_directories(self, root: Digest) -> None:
        """Stores every ``Directory`` message of the tree under ``root``."""

    def fetch_blobs(self, digests: Sequence[Digest]) -> None:
        """Stores the given file blobs."""


def _join(parts: Sequence[str]) -> str:
    return "/".join(p for p in parts if p)


def _digest(key: str) -> Digest:
    h, _, size = key.partition("-")
    return Digest(h, int(size))


class _Loader:
    """Reads, verifies, decodes and validates each distinct Directory once.

    Directories are keyed by ``"hash-size"`` strings (their CAS file name), which
    hash faster than ``Digest`` objects; hashes were validated by the parent.
    """

    def __init__(self, cas: LocalCAS, fetcher: Fetcher | None, limits: TreeLimits) -> None:
        self.root_fd = cas.root_fd
        self.fetcher = fetcher
        self.limits = limits
        self.root: Digest | None = None
        self.reused = False  # some digest appears in more than one place
        # key -> (parent key, name) of the first place it was seen, for paths
        self.seen: dict[str, tuple[str | None, str]] = {}

    def path(self, key: str | None, name: str = "") -> str:
        parts = [name]
        while key is not None:
            parent, n = self.seen[key]
            parts.append(n)
            key = parent
        return _join(parts[::-1])

    def _open(self, key: str) -> int:
        rel = layout.key_rel(key)
        try:
            return os.open(rel, _RDONLY, dir_fd=self.root_fd)
        except FileNotFoundError:
            if self.fetcher is None or self.root is None:
                raise
        root, self.root = self.root, None  # fetch once per load
        self.fetcher.fetch_directories(root)
        return os.open(rel, _RDONLY, dir_fd=self.root_fd)

    def read(self, key: str, size: int) -> bytes:
        if size > self.limits.max_directory_bytes:
            raise InvalidTreeError(
                f"Directory {_digest(key)} is larger than max_directory_bytes "
                f"({self.limits.max_directory_bytes})",
                self.path(key),
            )
        try:
            fd = self._open(key)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFoundError(_digest(key), self.path(key) or ".") from None
        try:
            chunks = [os.read(fd, size + 1)]
            while chunks[-1] and sum(map(len, chunks)) <= size:
                chunks.append(os.read(fd, size + 1))
        finally:
            os.close(fd)
        return b"".join(chunks)

    def decode(self, key: str) -> Any:
        h, _, size_s = key.partition("-")
        size = int(size_s)
        data = self.read(key, size) if size else b""
        if len(data) != size or hashlib.sha256(data).hexdigest() != h:
            raise DigestMismatchError(
                _digest(key), Digest.of(data), f"Directory at {self.path(key) or '.'!r}"
            )
        try:
            return proto.Directory.FromString(data)
        except proto.DecodeError as e:
            raise InvalidTreeError(
                f"undecodable Directory message {_digest(key)}: {e}", self.path(key)
            ) from e

    def load(self, root: Digest) -> dict[str, Node]:
        """Breadth first over distinct digests; depth checked at the first sighting."""
        self.root = root
        seen = self.seen
        limits = self.limits
        seen[root.key] = (None, "")
        nodes: dict[str, Node] = {}
        cache = node_cache if node_cache.max_bytes > 0 else None
        level = [root.key]
        depth = 0
        loaded_entries = 0
        while level:
            nxt: list[str] = []
            for key in level:
                node = cache.get(key, limits) if cache is not None else None
                if node is None:
                    try:
                        node = build_node(self.decode(key), limits)
                    except BadNode as e:
                        raise InvalidTreeError(e.message, self.path(key, e.name)) from None
                    if cache is not None:
                        cache.put(key, limits, node)
                nodes[key] = node
                loaded_entries += node.n + len(node.children)
                if loaded_entries > limits.max_total_entries:
                    self.fail(key, f"more than max_total_entries ({limits.max_total_entries})")
                for name, child in node.children:
                    if child in seen:
                        self.reused = True
                    else:
                        seen[child] = (key, name.decode())
                        nxt.append(child)
            depth += 1
            if nxt and depth > limits.max_depth:
                self.fail(nxt[0], f"deeper than max_depth ({limits.max_depth})")
            level = nxt
        return nodes

    def fail(self, key: str, message: str, name: str = "") -> None:
        raise InvalidTreeError(message, self.path(key, name))


def _check_shape(nodes: dict[str, Node], root: str, limits: TreeLimits) -> None:
    """Depth and total entries after expansion, memoised per digest (post-order DFS).

    Only needed when a digest is reused: otherwise the tree is what was loaded.
    """
    memo: dict[str, tuple[int, int]] = {}  # key -> (height, expanded entries)
    stack: list[list[Any]] = [[root, 0]]
    names: list[str] = [""]

    def fail(message: str, extra: str = "") -> None:
        raise InvalidTreeError(message, _join([*names, extra]))

    while stack:
        top = stack[-1]
        node = nodes[top[0]]
        i = top[1]
        if i < len(node.children):
            top[1] = i + 1
            name_b, child = node.children[i]
            seen = memo.get(child)
            if seen is not None:
                if len(stack) + seen[0] > limits.max_depth:
                    fail(f"deeper than max_depth ({limits.max_depth})", name_b.decode())
                continue
            if len(stack) > limits.max_depth:
                fail(f"deeper than max_depth ({limits.max_depth})", name_b.decode())
            stack.append([child, 0])
            names.append(name_b.decode())
            continue
        height, total = 0, node.n + len(node.children)
        for _, child in node.children:
            h, t = memo[child]
            height = max(height, h + 1)
            total += t
        if total > limits.max_total_entries:
            fail(f"more than max_total_entries ({limits.max_total_entries}) after expansion")
        memo[top[0]] = (height, total)
        stack.pop()
        names.pop()


def load_plan(
    cas: LocalCAS,
    root: Digest | str,
    *,
    fetcher: Fetcher | None = None,
    limits: TreeLimits | None = None,
) -> Plan:
    """Loads, verifies and validates the tree under ``root`` (a ``Digest`` or
    ``"hash/size"``) into a flat :class:`Plan`.

    Raises ``BlobNotFoundError`` (a ``Directory`` is missing; its path in the
    tree), ``DigestMismatchError`` (its bytes hash to something else),
    ``InvalidTreeError`` (undecodable, bad name, duplicate, unsorted, limits...).
    File blobs are not looked at here (see ``fastmat.materialize``).
    """
    root = Digest.coerce(root)
    limits = limits or DEFAULT_LIMITS
    loader = _Loader(cas, fetcher, limits)
    nodes = loader.load(root)
    if loader.reused:
        _check_shape(nodes, root.key, limits)
    return expand(nodes, root)
