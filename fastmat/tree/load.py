"""Loading and validating REAPI ``Directory`` trees (invariant 10, docs/design.md).

Every ``Directory`` message is read from the local CAS (after one
``fetcher.fetch_directories(root)`` call when some are missing), checked
against its digest, decoded and validated, once per distinct digest (one call
to the C core each: :func:`fastmat.tree.node.decode_node`). The result is a
flat :class:`~fastmat.tree.plan.Plan` (see :func:`load_plan`).

Bytes that are no ``Directory`` message -- a malformed wire format, a string
that is not UTF-8, or a group (wire types 3/4, which proto3 never writes and
the C core refuses) -- are an ``InvalidTreeError`` "undecodable Directory
message". A singular field given twice follows protobuf's rules (the last
scalar wins, messages merge), as does a known field with another wire type
(skipped as an unknown one).

Decisions, all checked before anything is created:

- Names: one path component (not empty, ``.``, ``..``, no ``/`` or NUL),
  at most ``max_name_bytes`` UTF-8 bytes, unique across the files,
  directories and symlinks of one directory.
- Order: the spec says each node list MUST be sorted by name (UTF-8 byte
  order, which is code point order). An unsorted list is refused
  (``InvalidTreeError``), not normalised: a canonical tree has one digest.
- ``unix_mode``: permission bits only. setuid/setgid/sticky are dropped
  silently (a private inode gets ``unix_mode & 0o777``); bits above
  ``0o7777`` (file-type bits) are refused. An ``mtime`` before 1970 (the
  executor's "none" is -1), ``nanos`` outside ``[0, 1e9)`` or past 2**63 - 1
  ns (in 2262: the executor's int64) is refused. ``node_properties`` of
  directories and symlinks are ignored: directories are always 0755
  (invariant 4) and Linux has no symlink modes.
- Symlink targets are kept verbatim (absolute, ``..``, dangling are fine:
  they are never followed) but must be non-empty, NUL-free and at most
  ``max_symlink_target_bytes``.
- Paths: the dest-relative path of every entry is at most ``max_path_bytes``
  UTF-8 bytes (PATH_MAX - 1 by default), so no system call is refused
  ``ENAMETOOLONG`` halfway through a tree.
- The same ``Directory`` digest may appear in several places (a DAG); limits
  on depth, path length and total entries apply to the tree after expansion,
  computed per distinct digest (a reused digest counts at its deepest, longest
  place), so a "width bomb" is refused without being expanded.
- Validated nodes are kept in a bounded in-process cache keyed by digest and
  limits (:mod:`fastmat.tree.nodecache`): content addressing makes them valid
  forever, and a worker sees the same directories in action after action.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fastmat.cas import layout
from fastmat.digest import BlobNotFoundError, Digest, DigestMismatchError
from fastmat.errors import InvalidTreeError
from fastmat.tree.limits import DEFAULT_LIMITS, TreeLimits
from fastmat.tree.node import BadNode, Node, UndecodableNode, decode_node
from fastmat.tree.nodecache import node_cache
from fastmat.tree.plan import Plan, expand

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS

__all__ = ["Fetcher", "load_plan"]


# O_NONBLOCK: a FIFO under a CAS name opens at once (and reads as too short) instead
# of blocking until someone writes to it
_RDONLY = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


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


def _longest_entry(node: Node) -> str:
    """The name of one of ``node``'s longest entries (files, symlinks, directories)."""
    names = [*node.names.split(b"\0"), *(name for name, _ in node.children)]
    return next(x for x in names if len(x) == node.longest_name).decode()


def _path_too_long(n: int, limits: TreeLimits) -> str:
    return f"path of {n} bytes is longer than max_path_bytes ({limits.max_path_bytes})"


def _digest(key: str) -> Digest:
    h, _, size = key.partition("-")
    return Digest(h, int(size))


class _Loader:
    """Reads, verifies, decodes and validates each distinct Directory once.

    Directories are keyed by ``"hash-size"`` strings (their CAS file name), which
    hash faster than ``Digest`` objects; hashes were validated by the parent.
    """

    def __init__(self, cas: LocalCAS, fetcher: Fetcher | None, limits: TreeLimits) -> None:
        self.cas = cas
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
        # a read-only CAS could not store what a fetch brings: say so before downloading
        self.cas.require_writable(f"fetch Directory {_digest(key)} (at {self.path(key) or '.'!r})")
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

    def node(self, key: str) -> Node:
        """The Directory stored under ``key``: read, hashed, decoded, validated."""
        h, _, size_s = key.partition("-")
        size = int(size_s)
        data = self.read(key, size) if size else b""
        if len(data) != size or hashlib.sha256(data).hexdigest() != h:
            raise DigestMismatchError(
                _digest(key), Digest.of(data), f"Directory at {self.path(key) or '.'!r}"
            )
        try:
            return decode_node(data, self.limits)
        except UndecodableNode as e:
            raise InvalidTreeError(
                f"undecodable Directory message {_digest(key)}: {e.message}", self.path(key)
            ) from None
        except BadNode as e:
            raise InvalidTreeError(e.message, self.path(key, e.name)) from None

    def load(self, root: Digest) -> dict[str, Node]:
        """Breadth first over distinct digests; depth and path length checked at the
        first sighting (the only one, unless ``self.reused``)."""
        self.root = root
        seen = self.seen
        limits = self.limits
        max_path = limits.max_path_bytes
        seen[root.key] = (None, "")
        prefix = {root.key: 0}  # key -> UTF-8 bytes of "its/path/" at the first sighting
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
                    node = self.node(key)
                    if cache is not None:
                        cache.put(key, limits, node)
                nodes[key] = node
                loaded_entries += node.n + len(node.children)
                if loaded_entries > limits.max_total_entries:
                    self.fail(key, f"more than max_total_entries ({limits.max_total_entries})")
                here = prefix[key]
                if node.longest_name and here + node.longest_name > max_path:
                    n = here + node.longest_name
                    self.fail(key, _path_too_long(n, limits), _longest_entry(node))
                for name, child in node.children:
                    if child in seen:
                        self.reused = True
                    else:
                        seen[child] = (key, name.decode())
                        prefix[child] = here + len(name) + 1
                        nxt.append(child)
            depth += 1
            if nxt and depth > limits.max_depth:
                self.fail(nxt[0], f"deeper than max_depth ({limits.max_depth})")
            level = nxt
        return nodes

    def fail(self, key: str, message: str, name: str = "") -> None:
        raise InvalidTreeError(message, self.path(key, name))


def _check_shape(nodes: dict[str, Node], root: str, limits: TreeLimits) -> None:
    """Depth, total entries and path length after expansion, memoised per digest
    (post-order DFS).

    Only needed when a digest is reused: otherwise the tree is what was loaded.
    """
    # key -> (height, expanded entries, UTF-8 bytes of the longest path below it)
    memo: dict[str, tuple[int, int, int]] = {}
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
        height, total, longest = 0, node.n + len(node.children), node.longest_name
        for name_b, child in node.children:
            h, t, p = memo[child]
            height = max(height, h + 1)
            total += t
            if p:
                longest = max(longest, len(name_b) + 1 + p)
        if total > limits.max_total_entries:
            fail(f"more than max_total_entries ({limits.max_total_entries}) after expansion")
        memo[top[0]] = (height, total, longest)
        stack.pop()
        names.pop()
    longest = memo[root][2]
    if longest > limits.max_path_bytes:
        raise InvalidTreeError(_path_too_long(longest, limits), _longest_path(nodes, memo, root))


def _longest_path(nodes: dict[str, Node], memo: dict[str, tuple[int, int, int]], key: str) -> str:
    """The path of one of the longest entries below ``key`` (from ``_check_shape``'s memo)."""
    parts: list[str] = []
    while True:
        node, want = nodes[key], memo[key][2]
        if node.longest_name == want:
            return _join([*parts, _longest_entry(node)])
        name_b, key = next(
            (name_b, c)
            for name_b, c in node.children
            if memo[c][2] and len(name_b) + 1 + memo[c][2] == want
        )
        parts.append(name_b.decode())


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
