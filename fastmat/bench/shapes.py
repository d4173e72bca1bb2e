"""The benchmark's standing tree shapes and a cheap, deterministic generator for them.

The seed shapes are the SwiftCompile-like input trees from the NativeLink threads
(64 files / 64 KB up to 1,978 files / 466 MB); the scaling tree has 100,000 small
files. Content is a random block generated once per run, repeated, behind a
per-file prefix: every blob is distinct (no file shares an inode, so no EMLINK) and
generating 466 MB costs a few memory copies, not 466 MB of ``os.urandom``.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

MB = 1_000_000
_BLOCK_BYTES = 1 << 20
_MIN_FILE_BYTES = 64


@dataclass(frozen=True)
class Shape:
    """A tree: ``files`` regular files totalling ``total_bytes`` spread over ``dirs``
    subdirectories (0 = all files in the root)."""

    name: str
    files: int
    total_bytes: int
    dirs: int = 0

    def scaled(self, *, files: float = 1.0, size: float = 1.0) -> Shape:
        n = max(1, round(self.files * files))
        total = max(n * _MIN_FILE_BYTES, round(self.total_bytes * size))
        d = min(self.dirs, max(1, n // 8)) if self.dirs else 0
        return replace(self, files=n, total_bytes=total, dirs=d)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.files:,} files, {_human_mb(self.total_bytes)})"


SEED_SHAPES = (
    Shape("small_flat", 64, 64 * 1000),
    Shape("pcm_cluster", 219, 40 * MB, dirs=12),
    Shape("medium_flat", 635, 180 * MB),
    Shape("large_tree", 1978, 466 * MB, dirs=100),
)
SCALING_SHAPE = Shape("scale_100k", 100_000, 100 * MB, dirs=1000)
QUICK_SCALING_SHAPE = Shape("scale_10k", 10_000, 10 * MB, dirs=100)
_QUICK_SIZE = 1 / 16  # --quick keeps the file counts (what costs) and shrinks big trees' bytes


def shapes_for(*, quick: bool, scale: float = 1.0) -> list[Shape]:
    """The shapes of a run: the seeds plus one scaling tree, optionally scaled down
    (``scale`` multiplies file counts and sizes; tests use it to stay tiny)."""
    size = _QUICK_SIZE if quick else 1.0
    shapes = [s.scaled(size=size) if s.total_bytes > MB else s for s in SEED_SHAPES]
    shapes.append(QUICK_SCALING_SHAPE if quick else SCALING_SHAPE)
    if scale != 1.0:
        shapes = [s.scaled(files=scale, size=scale) for s in shapes]
    return shapes


def file_sizes(shape: Shape) -> list[int]:
    """Per-file sizes: a skewed (log-normal) spread summing to about ``total_bytes``,
    every one at least 64 bytes; deterministic for a given shape."""
    rng = random.Random(f"{shape.name}/{shape.files}/{shape.total_bytes}")  # noqa: S311 - sizes, not secrets
    weights = [rng.lognormvariate(0.0, 1.2) for _ in range(shape.files)]
    spare = max(0, shape.total_bytes - _MIN_FILE_BYTES * shape.files)
    scale = spare / sum(weights)
    return [_MIN_FILE_BYTES + int(w * scale) for w in weights]


def relative_dirs(shape: Shape) -> list[str]:
    """The subdirectories files go into: ``dNNN/sNNN`` two levels deep (about
    sqrt(dirs) top-level directories), or just ``""`` for a flat shape."""
    if shape.dirs <= 0:
        return [""]
    fan = max(1, math.isqrt(shape.dirs))
    return [f"d{i // fan:03d}/s{i % fan:03d}" for i in range(shape.dirs)]


def generate(shape: Shape, dest: Path, *, block: bytes | None = None) -> int:
    """Writes the shape as plain files under ``dest`` (created); returns bytes written."""
    if block is None:
        block = os.urandom(_BLOCK_BYTES)
    view = memoryview(block)
    dirs = relative_dirs(shape)
    for d in dirs:
        (dest / d).mkdir(parents=True, exist_ok=True)
    written = 0
    for i, size in enumerate(file_sizes(shape)):
        rel = os.path.join(dirs[i % len(dirs)], f"f{i:06d}.swiftmodule")
        prefix = f"{shape.name}:{i}:".encode().ljust(_MIN_FILE_BYTES - 1, b".") + b"\n"
        fd = os.open(dest / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, prefix)
            left = size - len(prefix)
            offset = i % 4096  # a per-file offset into the block: distinct tails too
            while left > 0:
                chunk = view[offset : offset + left]
                n = os.write(fd, chunk)
                left -= n
                offset = (offset + n) % len(view)
        finally:
            os.close(fd)
        written += size
    return written


def _human_mb(n: int) -> str:
    if n < MB:
        return f"{n / 1000:.0f} KB"
    return f"{n / MB:.0f} MB"
