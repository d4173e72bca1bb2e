"""materialize against its floor and against the obvious Python code.

Ratios, all taken in one run (medians of >= 7):

- 1,978 files in ~100 directories: ``materialize`` / floor (``_binding.floor_exec``:
  a bare C mkdirat + linkat loop over the same plan, same threads) -- target
  <= 1.25; the plain Python ``os.link`` walk / ``materialize`` -- target >= 1.8.
- 100,000 files: cost per file / the 1,978-file cost per file -- target <= 1.3;
  plan memory per file (tracemalloc, retained after ``load_plan``) -- <= 300 B.
- The Python (load, validate, blob checks) vs system-call split of ``materialize``.
- "cold": the in-process cache of validated Directory nodes cleared before each
  run (every message read, hashed, decoded, validated); otherwise warm.
  "nocheck": ``check_blobs_first=False`` (no presence check of every blob).

``python benches/bench_materialize.py [--runs N] [--bytes-scale F]`` prints them;
``pytest benches/bench_materialize.py`` runs the pytest-benchmark versions.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import build_shape

from fastmat import _binding, proto
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.materialize import materialize
from fastmat.tree import Plan, load_plan
from fastmat.tree.nodecache import node_cache

THREADS = os.cpu_count() or 1


def python_link_walk(cas: LocalCAS, root: Digest, dest: str) -> None:
    """The obvious Python code: read each Directory, mkdir, os.link each file."""
    blobs = str(cas.root)

    def walk(d: Digest, path: str) -> None:
        os.mkdir(path, 0o755)
        msg = proto.Directory.FromString(cas.read(d))
        for f in msg.files:
            h, size = f.digest.hash, f.digest.size_bytes
            area = "exec" if f.is_executable else "blobs"
            os.link(f"{blobs}/{area}/{h[:2]}/{h}-{size}", f"{path}/{f.name}")
        for s in msg.symlinks:
            os.symlink(s.target, f"{path}/{s.name}")
        for sub in msg.directories:
            walk(Digest(sub.digest.hash, sub.digest.size_bytes), f"{path}/{sub.name}")

    walk(root, dest)


def floor_s(cas: LocalCAS, plan: Plan, dest: str) -> float:
    os.mkdir(dest, 0o755)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _binding.floor_exec(fd, cas.root_fd, plan.arrays, THREADS) / 1e9
    finally:
        os.close(fd)


class Bench:
    """One CAS with the shapes stored; fresh destinations under ``work``."""

    def __init__(self, work: Path, bytes_scale: float) -> None:
        self.work = work
        self.cas = LocalCAS(work / "cas")  # the defaults a user gets (durable)
        self.bytes_scale = bytes_scale
        self._n = 0

    def root(self, shape: str) -> Digest:
        root = build_shape(self.cas.put, shape, bytes_scale=self.bytes_scale)
        materialize(self.cas, root, self.dest())  # makes exec variants, warms caches
        self.clean()
        return root

    def dest(self) -> str:
        self._n += 1
        return str(self.work / f"dest{self._n}")

    def clean(self) -> None:
        for p in self.work.glob("dest*"):
            _binding.remove_tree(p)

    def once(self, fn: Callable[[str], float | None], *, cold: bool = False) -> float:
        dest = self.dest()
        if cold:
            node_cache.clear()
        gc.collect()
        t0 = time.perf_counter()
        inner = fn(dest)
        took = inner if inner is not None else time.perf_counter() - t0
        self.clean()
        return took

    def medians(
        self, methods: dict[str, Callable[[str], float | None]], runs: int
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Round-robin over the methods (same load conditions for all): medians, minima."""
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(runs):
            for name, fn in methods.items():
                times[name].append(self.once(fn, cold=name.endswith("cold")))
        return (
            {k: statistics.median(v) for k, v in times.items()},
            {k: min(v) for k, v in times.items()},
        )


def plan_bytes_per_file(cas: LocalCAS, root: Digest) -> tuple[float, int]:
    """Memory held by a Plan (node cache off: the cache is accounted separately)."""
    saved, node_cache.max_bytes = node_cache.max_bytes, 0
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    plan = load_plan(cas, root)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    node_cache.max_bytes = saved
    return held / plan.n_files, plan.n_files


def run(runs: int, bytes_scale: float, big_files_scale: float) -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fastmat-bench-", dir="/var/tmp") as tmp:
        b = Bench(Path(tmp), bytes_scale)
        cas = b.cas
        for shape in ("large_tree", "scale_100k"):
            if shape == "scale_100k" and big_files_scale <= 0:
                continue
            root = b.root(shape)
            plan = load_plan(cas, root)
            n = plan.n_files
            warm: list[Any] = []
            cold: list[Any] = []

            def mat(dest: str, root: Digest = root, log: list[Any] = warm) -> None:
                log.append(materialize(cas, root, dest, threads=THREADS))

            def mat_cold(dest: str, root: Digest = root, log: list[Any] = cold) -> None:
                log.append(materialize(cas, root, dest, threads=THREADS))

            def mat_nocheck(dest: str, root: Digest = root) -> None:
                materialize(cas, root, dest, threads=THREADS, check_blobs_first=False)

            def floor(dest: str, plan: Plan = plan) -> float:
                return floor_s(cas, plan, dest)

            def walk(dest: str, root: Digest = root) -> None:
                python_link_walk(cas, root, dest)

            methods: dict[str, Callable[[str], float | None]] = {
                "materialize": mat,
                "materialize_cold": mat_cold,
                "materialize_nocheck": mat_nocheck,
                "floor": floor,
            }
            if shape == "large_tree":
                methods["python_walk"] = walk
            t, best = b.medians(methods, runs)
            out[f"{shape}.files"] = n
            for k, v in t.items():
                out[f"{shape}.{k}_ms"] = v * 1e3
                out[f"{shape}.{k}_min_ms"] = best[k] * 1e3
            out[f"{shape}.min_ratio_vs_floor"] = best["materialize"] / best["floor"]
            out[f"{shape}.ratio_vs_floor"] = t["materialize"] / t["floor"]
            out[f"{shape}.cold_ratio_vs_floor"] = t["materialize_cold"] / t["floor"]
            out[f"{shape}.nocheck_ratio_vs_floor"] = t["materialize_nocheck"] / t["floor"]
            out[f"{shape}.python_ms"] = statistics.median(s.plan_s for s in warm) * 1e3
            out[f"{shape}.python_cold_ms"] = statistics.median(s.plan_s for s in cold) * 1e3
            out[f"{shape}.exec_ms"] = statistics.median(s.exec_s for s in warm) * 1e3
            out[f"{shape}.us_per_file"] = t["materialize"] / n * 1e6
            out[f"{shape}.floor_us_per_file"] = t["floor"] / n * 1e6
            if shape == "large_tree":
                out[f"{shape}.speedup_vs_python_walk"] = t["python_walk"] / t["materialize"]
            else:
                out[f"{shape}.plan_bytes_per_file"] = plan_bytes_per_file(cas, root)[0]
            del plan
        if "scale_100k.us_per_file" in out:
            out["per_file_100k_vs_1978"] = (
                out["scale_100k.us_per_file"] / out["large_tree.us_per_file"]
            )
            out["floor_per_file_100k_vs_1978"] = (
                out["scale_100k.floor_us_per_file"] / out["large_tree.floor_us_per_file"]
            )
        cas.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--bytes-scale", type=float, default=1 / 64, help="shrink file bytes")
    ap.add_argument("--no-100k", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.runs, args.bytes_scale, 0.0 if args.no_100k else 1.0)
    for k, v in res.items():
        print(f"{k:42s} {v:12.3f}")


# ---- pytest-benchmark versions ----


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bench, Digest]]:
    b = Bench(tmp_path_factory.mktemp("bench"), 1 / 64)
    yield b, b.root("large_tree")
    b.cas.close()
    shutil.rmtree(b.work, ignore_errors=True)


def _pedantic(benchmark: Any, b: Bench, fn: Callable[[str], object]) -> None:
    def setup() -> tuple[tuple[str], dict[str, Any]]:
        b.clean()
        return (b.dest(),), {}

    benchmark.pedantic(fn, setup=setup, rounds=9, iterations=1)
    b.clean()


def test_materialize_1978(benchmark: Any, bench: tuple[Bench, Digest]) -> None:
    b, root = bench
    _pedantic(benchmark, b, lambda d: materialize(b.cas, root, d, threads=THREADS))


def test_floor_1978(benchmark: Any, bench: tuple[Bench, Digest]) -> None:
    b, root = bench
    plan = load_plan(b.cas, root)
    _pedantic(benchmark, b, lambda d: floor_s(b.cas, plan, d))


def test_python_link_walk_1978(benchmark: Any, bench: tuple[Bench, Digest]) -> None:
    b, root = bench
    _pedantic(benchmark, b, lambda d: python_link_walk(b.cas, root, d))


if __name__ == "__main__":
    main()
