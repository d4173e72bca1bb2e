"""The seeds' SwiftCompile-like input trees, built straight into a CAS (pure Python).

No C involved: :func:`build_shape` only needs a ``put(bytes) -> Digest``
callable (``LocalCAS.put``), so any code (benches, tests, the remote helper's
server fixtures) can reuse it. Every file has distinct content (no inode is
shared, so no EMLINK); about 1 % are executables. ``bytes_scale`` shrinks the
bytes but keeps the file count, which is what materialization pays for.

    shape          files   bytes    directories
    small_flat        64   64 KB    1 (flat)
    pcm_cluster      219   40 MB    12
    medium_flat      635  180 MB    1 (flat)
    large_tree     1,978  466 MB    ~100 (two levels)
    scale_100k   100,000  100 MB    ~1,000 (two levels)
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmat import proto
from fastmat.digest import Digest

MB = 1_000_000


@dataclass(frozen=True)
class Shape:
    name: str
    files: int
    total_bytes: int
    dirs: int = 1


SHAPES = {
    s.name: s
    for s in (
        Shape("small_flat", 64, 64_000),
        Shape("pcm_cluster", 219, 40 * MB, 12),
        Shape("medium_flat", 635, 180 * MB),
        Shape("large_tree", 1978, 466 * MB, 100),
        Shape("scale_100k", 100_000, 100 * MB, 1000),
    )
}


def entries(
    name: str, *, files_scale: float = 1.0, bytes_scale: float = 1.0
) -> list[tuple[str, int, bool]]:
    """(relative path, size, executable) of every file of a shape; deterministic."""
    shape = SHAPES[name]
    n = max(1, round(shape.files * files_scale))
    rng = random.Random(f"{name}/{n}")
    weights = [rng.lognormvariate(0.0, 1.2) for _ in range(n)]
    total = max(n * 64, round(shape.total_bytes * bytes_scale))
    scale = (total - 64 * n) / sum(weights)
    ndirs = max(1, min(shape.dirs, n // 8)) if shape.dirs > 1 else 1
    fan = max(1, math.isqrt(ndirs))
    dirs = [f"d{i // fan:03d}/s{i % fan:03d}" if ndirs > 1 else "" for i in range(ndirs)]
    out = []
    for i, w in enumerate(weights):
        ext = "swiftmodule" if i % 3 else "h"
        rel = f"{dirs[i % ndirs]}/f{i:06d}.{ext}".lstrip("/")
        out.append((rel, 64 + int(w * scale), i % 100 == 99))
    return out


def content(name: str, i: int, size: int, block: bytes) -> bytes:
    """Distinct bytes for file ``i``: a unique header, then a slice of ``block``."""
    head = f"{name}:{i}:".encode().ljust(63, b".") + b"\n"
    body = size - len(head)
    if body <= 0:
        return head[:size]
    reps = body // len(block) + 2
    off = i % 4096
    return head + (block * reps)[off : off + body] if reps > 2 else head + block[off : off + body]


def build_shape(
    put: Callable[[bytes], Digest],
    name: str,
    *,
    files_scale: float = 1.0,
    bytes_scale: float = 1.0,
) -> Digest:
    """Stores the shape's blobs and ``Directory`` messages via ``put``; the root digest."""
    block = random.Random(name).randbytes(1 << 20)
    tree: dict[str, Any] = {}
    for i, (rel, size, exe) in enumerate(
        entries(name, files_scale=files_scale, bytes_scale=bytes_scale)
    ):
        d = put(content(name, i, size, block))
        *parts, leaf = rel.split("/")
        node = tree
        for p in parts:
            node = node.setdefault(p, {})
        node[leaf] = (d, exe)
    return _store(put, tree)


def _store(put: Callable[[bytes], Digest], tree: dict[str, Any]) -> Digest:
    msg = proto.Directory()
    for key in sorted(tree, key=str.encode):
        v = tree[key]
        if isinstance(v, dict):
            node = msg.directories.add(name=key)
            d = _store(put, v)
        else:
            d, exe = v
            node = msg.files.add(name=key, is_executable=exe)
        node.digest.hash = d.hash
        node.digest.size_bytes = d.size_bytes
    return put(msg.SerializeToString(deterministic=True))


def write_shape(
    dest: str | os.PathLike[str],
    name: str,
    *,
    files_scale: float = 1.0,
    bytes_scale: float = 1.0,
) -> None:
    """Writes the same shape as plain files under ``dest`` (for ``cp``-style baselines)."""
    block = random.Random(name).randbytes(1 << 20)
    for i, (rel, size, exe) in enumerate(
        entries(name, files_scale=files_scale, bytes_scale=bytes_scale)
    ):
        path = Path(dest, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content(name, i, size, block))
        path.chmod(0o755 if exe else 0o644)
