"""DirectoryCache hits against the floor, and overlay workspaces against hardlink hits.

Ratios, all taken in one run (medians):

- a hit on the 1,978-file shape (hardlink replay from the entry, the whole
  ``DirectoryCache.materialize`` call) / the floor (``_binding.floor_exec``: a bare C
  mkdirat + linkat loop over the same tree from the same entry, same threads) --
  target <= 1.15;
- an overlay workspace (enter + exit of ``DirectoryCache.workspace``) at 1,978 and at
  100,000 files -- target <= 2 ms and flat in the file count; the hardlink hit / the
  overlay workspace at 1,978 files -- target >= 10.

``python benches/bench_cache.py [--runs N] [--bytes-scale F] [--no-100k]`` prints them;
``pytest benches/bench_cache.py`` runs the pytest-benchmark versions (1,978 files).
File bytes are scaled down by default (links cost the same whatever the size).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import build_shape

from fastmat import _binding
from fastmat.cache import DirectoryCache
from fastmat.cache import entry as cache_entry
from fastmat.cas import LocalCAS
from fastmat.digest import Digest

THREADS = os.cpu_count() or 1
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class Bench:
    """A CAS, one cache, and fresh destination names under one temp directory."""

    def __init__(self, stack: ExitStack, base: Path) -> None:
        self.base = base
        self.cas = stack.enter_context(LocalCAS(base / "cas"))
        self.cache = stack.enter_context(DirectoryCache(self.cas, base / "cache", threads=THREADS))
        self._n = 0

    def dest(self) -> Path:
        self._n += 1
        return self.base / f"d{self._n}"

    def tree(self, shape: str, bytes_scale: float) -> Digest:
        root = build_shape(self.cas.put, shape, bytes_scale=bytes_scale)
        warm = self.dest()
        self.cache.materialize(root, warm)  # the miss: builds the entry
        _binding.remove_tree(warm)
        return root

    def hit_s(self, root: Digest) -> float:
        dest = self.dest()
        t0 = time.perf_counter()
        res = self.cache.materialize(root, dest)
        dt = time.perf_counter() - t0
        assert (res.hit, res.method) == (True, "hardlink")
        _binding.remove_tree(dest)
        return dt

    def floor_s(self, root: Digest) -> float:
        entry = self.cache.entry_path(root)
        assert entry is not None
        arrays = cache_entry.decode(Path(f"{entry}.plan").read_bytes()).arrays
        dest = self.dest()
        os.mkdir(dest, 0o755)
        efd, dfd = os.open(entry, _O_DIR), os.open(dest, _O_DIR)
        try:
            ns = _binding.floor_exec(dfd, efd, arrays, THREADS)
        finally:
            os.close(efd)
            os.close(dfd)
        _binding.remove_tree(dest)
        return ns / 1e9

    def workspace_s(self, root: Digest) -> tuple[float, float]:
        """(enter, enter + exit) of one workspace."""
        dest = self.dest()
        t0 = time.perf_counter()
        with self.cache.workspace(root, dest) as ws:
            t1 = time.perf_counter()
            method = ws.method
        t2 = time.perf_counter()
        assert method == "overlay", method
        return t1 - t0, t2 - t0


def _median(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--bytes-scale", type=float, default=0.01)
    ap.add_argument("--no-100k", action="store_true", help="skip the 100,000-file tree")
    ap.add_argument("--dir", default=None, help="where to build (default: $TMPDIR)")
    args = ap.parse_args(argv)
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir)))
        b = Bench(stack, base)
        root = b.tree("large_tree", args.bytes_scale)
        for _ in range(3):  # warm up both sides
            b.floor_s(root)
            b.hit_s(root)
        floors, hits = [], []
        for _ in range(args.runs):  # interleaved: the same conditions for both
            floors.append(b.floor_s(root))
            hits.append(b.hit_s(root))
        floor, hit = statistics.median(floors), statistics.median(hits)
        print(f"threads={THREADS} runs={args.runs} bytes_scale={args.bytes_scale}")
        print(f"1,978 files  floor (mkdirat+linkat)   {floor * 1e3:8.3f} ms")
        print(f"1,978 files  hit via hardlink replay  {hit * 1e3:8.3f} ms")
        print(f"  hit / floor = {hit / floor:.3f}   (target <= 1.15)")
        if not b.cache.can_overlay():
            print("overlay workspaces unavailable here (no CAP_SYS_ADMIN / overlayfs)")
            return 0
        big = None if args.no_100k else b.tree("scale_100k", args.bytes_scale)
        roots = [root] if big is None else [root, big]
        (enter, full), *rest = _workspace_medians(b, roots, args.runs)
        print(f"1,978 files  overlay workspace enter  {enter * 1e3:8.3f} ms")
        print(f"1,978 files  overlay enter+exit       {full * 1e3:8.3f} ms   (target <= 2)")
        print(f"  hardlink hit / overlay workspace = {hit / full:.1f}x   (target >= 10)")
        if big is not None:
            enter_b, full_b = rest[0]
            hit_b = _median(lambda: b.hit_s(big), 3)
            print(f"100k files   overlay workspace enter  {enter_b * 1e3:8.3f} ms")
            print(f"100k files   overlay enter+exit       {full_b * 1e3:8.3f} ms   (target <= 2)")
            print(f"100k files   hit via hardlink replay  {hit_b * 1e3:8.3f} ms   (for scale)")
            print(f"  overlay 100k / 1,978 = {full_b / full:.2f}   (flat: ~1)")
        st = b.cache.stats()
        print(f"cache: {st}")
    return 0


def _workspace_medians(b: Bench, roots: list[Digest], runs: int) -> list[tuple[float, float]]:
    """(enter, enter + exit) medians per root, the roots interleaved run by run."""
    for _ in range(3):
        for r in roots:
            b.workspace_s(r)
    samples: list[list[tuple[float, float]]] = [[] for _ in roots]
    for _ in range(runs):
        for i, r in enumerate(roots):
            samples[i].append(b.workspace_s(r))
    return [
        (statistics.median(s[0] for s in rs), statistics.median(s[1] for s in rs)) for rs in samples
    ]


# -- pytest-benchmark versions -------------------------------------------------------


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bench, Digest]]:
    with ExitStack() as stack:
        b = Bench(stack, tmp_path_factory.mktemp("bench_cache"))
        yield b, b.tree("large_tree", 0.01)


def test_hit_hardlink_replay_1978(benchmark: Any, bench: tuple[Bench, Digest]) -> None:
    b, root = bench
    benchmark.pedantic(lambda: b.hit_s(root), rounds=10)


def test_floor_1978(benchmark: Any, bench: tuple[Bench, Digest]) -> None:
    b, root = bench
    benchmark.pedantic(lambda: b.floor_s(root), rounds=10)


def test_overlay_workspace_1978(benchmark: Any, bench: tuple[Bench, Digest]) -> None:
    b, root = bench
    if not b.cache.can_overlay():
        pytest.skip("cannot mount an overlay here")
    benchmark.pedantic(lambda: b.workspace_s(root), rounds=10)


if __name__ == "__main__":
    sys.exit(main())
