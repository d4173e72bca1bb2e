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

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastmat import proto
from fastmat.bench.shapes import SCALING_SHAPE, SEED_SHAPES, file_sizes, relative_dirs
from fastmat.digest import Digest

_ALL = {s.name: s for s in (*SEED_SHAPES, SCALING_SHAPE)}


def entries(
    name: str, *, files_scale: float = 1.0, bytes_scale: float = 1.0
) -> list[tuple[str, int, bool]]:
    """(relative path, size, executable) of every file of a shape; deterministic.

    The shapes, their size spread and their directory layout are ``fastmat.bench_shapes``'s
    (what ``fastmat bench`` uses); about 1 % of the files here are executables.
    """
    shape = _ALL[name].scaled(files=files_scale, size=bytes_scale)
    dirs = relative_dirs(shape)
    out = []
    for i, size in enumerate(file_sizes(shape)):
        ext = "swiftmodule" if i % 3 else "h"
        rel = f"{dirs[i % len(dirs)]}/f{i:06d}.{ext}".lstrip("/")
        out.append((rel, size, i % 100 == 99))
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
