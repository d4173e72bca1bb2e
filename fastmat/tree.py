"""Loading and validating REAPI ``Directory`` trees (DESIGN.md invariant 10).

Every ``Directory`` message is read from the local CAS (after one
``fetcher.fetch_directories(root)`` call when some are missing), checked
against its digest, decoded and validated, once per distinct digest. The
result is a flat :class:`~fastmat.plan.Plan` (see :func:`load_plan`).

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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fastmat import proto
from fastmat.digest import Digest
from fastmat.errors import BlobNotFoundError, DigestMismatchError, InvalidTreeError
from fastmat.plan import BadNode, Node, Plan, build_node, expand

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS

__all__ = ["DEFAULT_LIMITS", "Fetcher", "TreeLimits", "load_plan"]


@dataclass(frozen=True)
class TreeLimits:
    """Bounds on a tree, applied after DAG expansion (counts include every instance).

    ``max_depth``: directory nesting below the root (the root is depth 0).
    ``max_entries_per_dir``: files + directories + symlinks of one directory.
    ``max_total_entries``: files + directories + symlinks of the whole tree.
    ``max_name_bytes`` / ``max_symlink_target_bytes``: UTF-8 bytes (NAME_MAX,
    PATH_MAX - 1 on Linux). ``max_directory_bytes``: one ``Directory`` message.
    """

    max_depth: int = 256
    max_entries_per_dir: int = 1_000_000
    max_total_entries: int = 10_000_000
    max_name_bytes: int = 255
    max_symlink_target_bytes: int = 4095
    max_directory_bytes: int = 64 << 20


DEFAULT_LIMITS = TreeLimits()


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


class _Loader:
    """Reads, verifies, decodes and validates each distinct Directory once."""

    def __init__(self, cas: LocalCAS, fetcher: Fetcher | None, limits: TreeLimits) -> None:
        self.cas = cas
        self.fetcher = fetcher
        self.limits = limits
        self.fetched = False
        self.root: Digest | None = None
        # digest -> (parent digest, name) of the first place it was seen, for paths
        self.seen: dict[Digest, tuple[Digest | None, str]] = {}

    def path(self, d: Digest | None, name: str = "") -> str:
        parts = [name]
        while d is not None:
            parent, n = self.seen[d]
            parts.append(n)
            d = parent
        return _join(parts[::-1])

    def read(self, d: Digest) -> bytes:
        if d.size_bytes == 0:
            return b""
        if d.size_bytes > self.limits.max_directory_bytes:
            raise InvalidTreeError(
                f"Directory {d} is larger than max_directory_bytes "
                f"({self.limits.max_directory_bytes})",
                self.path(d),
            )
        if d not in self.cas and self.fetcher is not None and not self.fetched:
            self.fetched = True
            assert self.root is not None
            self.fetcher.fetch_directories(self.root)
        try:
            return self.cas.read(d)
        except (BlobNotFoundError, FileNotFoundError):
            raise BlobNotFoundError(d, self.path(d) or ".") from None

    def decode(self, d: Digest) -> Any:
        data = self.read(d)
        actual = Digest(hashlib.sha256(data).hexdigest(), len(data))
        if actual != d:
            raise DigestMismatchError(d, actual, f"Directory at {self.path(d) or '.'!r}")
        try:
            return proto.Directory.FromString(data)
        except proto.DecodeError as e:
            raise InvalidTreeError(f"undecodable Directory message {d}: {e}", self.path(d)) from e

    def load(self, root: Digest) -> dict[Digest, Node]:
        """Breadth first over distinct digests; depth checked at the first sighting."""
        self.root = root
        self.seen[root] = (None, "")
        nodes: dict[Digest, Node] = {}
        level = [root]
        depth = 0
        loaded_entries = 0
        while level:
            nxt: list[Digest] = []
            for d in level:
                try:
                    node = build_node(self.decode(d), self.limits)
                except BadNode as e:
                    raise InvalidTreeError(e.message, self.path(d, e.name)) from None
                nodes[d] = node
                loaded_entries += node.n + len(node.children)
                if loaded_entries > self.limits.max_total_entries:
                    self.fail(d, f"more than max_total_entries ({self.limits.max_total_entries})")
                for name, child in node.children:
                    if child not in self.seen:
                        self.seen[child] = (d, name.decode())
                        nxt.append(child)
            depth += 1
            if nxt and depth > self.limits.max_depth:
                self.fail(nxt[0], f"deeper than max_depth ({self.limits.max_depth})")
            level = nxt
        return nodes

    def fail(self, d: Digest, message: str, name: str = "") -> None:
        raise InvalidTreeError(message, self.path(d, name))


def _check_shape(nodes: dict[Digest, Node], root: Digest, limits: TreeLimits) -> None:
    """Depth and total entries after expansion, memoised per digest (post-order DFS)."""
    memo: dict[Digest, tuple[int, int]] = {}  # digest -> (height, expanded entries)
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
    root: Digest,
    *,
    fetcher: Fetcher | None = None,
    limits: TreeLimits | None = None,
) -> Plan:
    """Loads, verifies and validates the tree under ``root`` into a flat :class:`Plan`.

    Raises ``BlobNotFoundError`` (a ``Directory`` is missing; its path in the
    tree), ``DigestMismatchError`` (its bytes hash to something else),
    ``InvalidTreeError`` (undecodable, bad name, duplicate, unsorted, limits...).
    File blobs are not looked at here (see ``Plan.missing_blobs``).
    """
    limits = limits or DEFAULT_LIMITS
    loader = _Loader(cas, fetcher, limits)
    nodes = loader.load(root)
    _check_shape(nodes, root, limits)
    return expand(nodes, root)
