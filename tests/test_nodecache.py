"""The bounded cache of validated Directory nodes."""

from __future__ import annotations

from fastmat import proto
from fastmat.tree import DEFAULT_LIMITS, TreeLimits
from fastmat.tree.node import Node, decode_node
from fastmat.tree.nodecache import NodeCache


def _node(n: int) -> Node:
    msg = proto.Directory()
    for i in range(n):
        f = msg.files.add(name=f"f{i:04d}")
        f.digest.hash, f.digest.size_bytes = "ab" * 32, 10
    return decode_node(msg.SerializeToString(), DEFAULT_LIMITS)


def test_bounded_lru_and_limits_aware() -> None:
    cache = NodeCache(max_bytes=20_000)
    node = _node(20)  # ~2.5 KB packed
    for k in range(20):
        cache.put(f"k{k}", DEFAULT_LIMITS, node)
        assert cache.bytes <= cache.max_bytes
    assert cache.get("k0", DEFAULT_LIMITS) is None  # the oldest went first
    assert cache.get("k19", DEFAULT_LIMITS) is node
    assert cache.get("k19", TreeLimits(max_depth=3)) is None  # other limits: revalidate
    assert cache.get("k19", DEFAULT_LIMITS) is None
    cache.put("big", DEFAULT_LIMITS, _node(200))
    assert cache.get("big", DEFAULT_LIMITS) is None  # over a quarter of the budget: not kept
    cache.clear()
    assert cache.bytes == 0
