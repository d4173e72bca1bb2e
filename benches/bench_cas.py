"""LocalCAS insertion throughput against ``cp`` of the same files.

Ratios, all taken in one run (medians of several runs, interleaved so that both
sides see the same machine load), for a few file-size shapes:

- ``put_file`` (copy or reflink into the temp dir, hash the copy, publish) / ``cp -R``
- ``put`` (bytes already in memory: hash, durable write, publish) / ``cp -R``

Both with ``fsync=False`` (``cp`` does not fsync either); ``fsync=True`` (the default:
file + directory fsyncs per blob) is printed too. A ratio is fastmat throughput over
``cp`` throughput: > 1 means faster than ``cp``. ``cp`` hashes nothing: for large files
the bound of ``put`` is SHA-256, so ``sha256 only`` (hashing the bytes in memory, no
I/O) is printed as that floor.

``python benches/bench_cas.py [--runs N] [--dir D] [--shapes small,medium,large]``
prints the table; ``pytest benches/bench_cas.py`` runs the pytest-benchmark versions.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastmat.cas import LocalCAS


@dataclass(frozen=True)
class Shape:
    name: str
    n_files: int
    file_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.n_files * self.file_bytes


SHAPES = {
    s.name: s
    for s in (
        Shape("small", 1000, 4 << 10),
        Shape("medium", 64, 1 << 20),
        Shape("large", 4, 32 << 20),
    )
}


def make_files(src: Path, shape: Shape) -> list[Path]:
    src.mkdir(parents=True)
    paths = []
    for i in range(shape.n_files):
        p = src / f"f{i:05d}"
        p.write_bytes(os.urandom(shape.file_bytes))
        paths.append(p)
    return paths


def time_cp(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", "-R", "--reflink=auto", str(src), str(dst)], check=True)
    return time.perf_counter() - t0


def time_put_file(paths: list[Path], cas_dir: Path, fsync: bool) -> float:
    with LocalCAS(cas_dir, fsync=fsync) as cas:
        t0 = time.perf_counter()
        for p in paths:
            cas.put_file(p)
        return time.perf_counter() - t0


def time_put(blobs: list[bytes], cas_dir: Path, fsync: bool) -> float:
    with LocalCAS(cas_dir, fsync=fsync) as cas:
        t0 = time.perf_counter()
        for b in blobs:
            cas.put(b)
        return time.perf_counter() - t0


def time_sha256(blobs: list[bytes], _dst: Path) -> float:
    t0 = time.perf_counter()
    for b in blobs:
        hashlib.sha256(b).digest()
    return time.perf_counter() - t0


def _remove(p: Path) -> None:
    if p.exists():
        for sub in p.rglob("*"):  # blobs are 0444 in 0755 dirs: root or owner can unlink
            if sub.is_dir() and not sub.is_symlink():
                sub.chmod(0o755)
        shutil.rmtree(p)


def measure(work: Path, shape: Shape, runs: int, with_fsync: bool) -> dict[str, float]:
    """Median seconds per method for ``shape``; every method measured in every run."""
    src = work / f"src-{shape.name}"
    paths = make_files(src, shape)
    blobs = [p.read_bytes() for p in paths]
    methods: dict[str, Callable[[Path], float]] = {
        "cp": lambda d: time_cp(src, d),
        "put_file": lambda d: time_put_file(paths, d, False),
        "put": lambda d: time_put(blobs, d, False),
        "sha256 only": lambda d: time_sha256(blobs, d),
    }
    if with_fsync:
        methods["put_file fsync"] = lambda d: time_put_file(paths, d, True)
        methods["put fsync"] = lambda d: time_put(blobs, d, True)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for run in range(runs):
        for name, fn in methods.items():
            dst = work / f"dst-{run}-{name.replace(' ', '-')}"
            os.sync()  # nobody's writeback lands in the next method's clock
            times[name].append(fn(dst))
            _remove(dst)
    _remove(src)
    return {m: statistics.median(t) for m, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to work (its filesystem is measured)")
    ap.add_argument("--shapes", default="small,medium,large")
    ap.add_argument("--no-fsync-variants", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-cas-", dir=args.dir))
    try:
        print(f"{'shape':<28} {'method':<15} {'median s':>9} {'MB/s':>9} {'vs cp':>7}")
        for name in args.shapes.split(","):
            shape = SHAPES[name]
            med = measure(work, shape, args.runs, not args.no_fsync_variants)
            label = f"{name} ({shape.n_files} x {shape.file_bytes >> 10} KiB)"
            for method, s in med.items():
                mbps = shape.total_bytes / s / 1e6
                print(f"{label:<28} {method:<15} {s:>9.4f} {mbps:>9.1f} {med['cp'] / s:>6.2f}x")
    finally:
        _remove(work)


# ---- pytest-benchmark versions (fsync=False, like cp) ----


@pytest.fixture(scope="module", params=["small", "large"])
def files(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list[Path]]]:
    work = tmp_path_factory.mktemp("bench-cas")
    paths = make_files(work / "src", SHAPES[request.param])
    yield work, paths
    _remove(work)


def _pedantic(
    benchmark: Any, work: Path, fn: Callable[[Path], float], with_cas: bool = True
) -> None:
    counter = iter(range(1 << 30))

    def setup() -> tuple[tuple[Path], dict[str, Any]]:
        for old in work.glob("dst-*"):
            _remove(old)
        dst = work / f"dst-{next(counter)}"
        if with_cas:  # the 512 directories of a CAS exist before the clock starts
            LocalCAS(dst).close()
        os.sync()
        return (dst,), {}

    benchmark.pedantic(fn, setup=setup, rounds=5, iterations=1)


def test_cp(benchmark: Any, files: tuple[Path, list[Path]]) -> None:
    work, _ = files
    _pedantic(benchmark, work, lambda d: time_cp(work / "src", d), with_cas=False)


def test_put_file(benchmark: Any, files: tuple[Path, list[Path]]) -> None:
    work, paths = files
    _pedantic(benchmark, work, lambda d: time_put_file(paths, d, False))


def test_put(benchmark: Any, files: tuple[Path, list[Path]]) -> None:
    work, paths = files
    blobs = [p.read_bytes() for p in paths]
    _pedantic(benchmark, work, lambda d: time_put(blobs, d, False))


if __name__ == "__main__":
    main()
