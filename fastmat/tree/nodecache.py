"""A bounded, process-wide cache of validated, packed ``Directory`` nodes.

A ``Directory`` digest names its content forever, so once its bytes were
hashed, decoded and validated (under some ``TreeLimits``) the packed
:class:`~fastmat.tree.node.Node` can be reused by every later ``load_plan`` with
the same limits: a worker sees the same toolchain and SDK directories in
action after action. Least recently used nodes are dropped beyond
``max_bytes`` (estimated from the packed sizes). Thread-safe.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastmat.tree.limits import TreeLimits
    from fastmat.tree.node import Node

__all__ = ["NodeCache", "node_cache"]

_NODE_OVERHEAD_BYTES = 400  # the Node, its arrays and dict slot
_CHILD_BYTES = 200  # a (name, key) tuple and its strings


def _cost(node: Node) -> int:
    mt = len(node.mtimes) * 8 if node.mtimes is not None else 0
    return (
        _NODE_OVERHEAD_BYTES
        + len(node.ops)
        + len(node.names)
        + len(node.srcs)
        + 4 * len(node.modes)
        + mt
        + _CHILD_BYTES * len(node.children)
    )


class NodeCache:
    """``"hash-size"`` key -> (limits, Node, cost); LRU by dict order."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._d: dict[str, tuple[TreeLimits, Node, int]] = {}
        self._lock = threading.Lock()

    def get(self, key: str, limits: TreeLimits) -> Node | None:
        with self._lock:
            item = self._d.pop(key, None)
            if item is None or not (item[0] is limits or item[0] == limits):
                if item is not None:
                    self.bytes -= item[2]
                self.misses += 1
                return None
            self._d[key] = item
            self.hits += 1
            return item[1]

    def put(self, key: str, limits: TreeLimits, node: Node) -> None:
        cost = _cost(node)
        if cost > self.max_bytes // 4:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            self._d[key] = (limits, node, cost)
            self.bytes += cost
            while self.bytes > self.max_bytes:
                oldest = next(iter(self._d))
                self.bytes -= self._d.pop(oldest)[2]

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.bytes = 0


node_cache = NodeCache()
"""The cache ``load_plan`` uses; ``node_cache.max_bytes = 0`` disables it."""
