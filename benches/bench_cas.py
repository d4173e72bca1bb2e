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

Issue 11's durability figures, each a ratio taken in one run (medians, methods
interleaved, ``sync`` before every run):

- ``--sync DIR[,DIR...]``: a batch of temps (1,000 x 16 KiB and 64 x 1 MiB) made
  durable by a serial fsync + directory fsync per file (the old recipe), by
  ``fm_sync_batch`` fsyncs on 2 / 8 / 32 / 64 pool threads, and by one
  ``syncfs``, on each directory's filesystem (ext4, a loop XFS, tmpfs): what
  ``fastmat.cas.commit`` picks per filesystem;
- ``--ingest``: ``ingest_tree`` of a copy of a Python standard library (the
  running interpreter's, without site-packages) into a durable (default) and a
  non-durable CAS (target <= 1.5x);
- ``--usage``: the use record's cost per blob: a pinned scope of a
  1,978-blob plan (pin file, use chunk) against a cold materialize of it.

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
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # shapes.py, in script mode

from fastmat import _binding
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


# ---- issue 11: sync strategies, durable ingest, the use record


def _fs_name(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        magic = _binding.fs_magic(fd)
    finally:
        os.close(fd)
    return {0xEF53: "ext4", 0x58465342: "xfs", 0x01021994: "tmpfs"}.get(magic, hex(magic))


def _temps(d: Path, n: int, size: int) -> list[bytes]:
    d.mkdir()
    data = os.urandom(size)
    names = []
    for i in range(n):
        (d / f"t{i}").write_bytes(data[:-8] + i.to_bytes(8, "little"))
        names.append(f"t{i}".encode())
    return names


def _serial(fd: int, names: list[bytes]) -> None:
    for n in names:
        f = os.open(n, os.O_RDONLY, dir_fd=fd)
        os.fsync(f)
        os.close(f)
        os.fsync(fd)


def sync_strategies(where: Path, runs: int) -> None:
    """Seconds to make a batch of fresh temps durable, per strategy (medians)."""

    def pool(threads: int) -> Callable[[int, list[bytes]], object]:
        return lambda fd, names: _binding.sync_batch(fd, names, "fsync", threads=threads)

    methods: dict[str, Callable[[int, list[bytes]], object]] = {
        "serial fsync + dir fsync": _serial,
        **{f"pool fsync, {t} threads": pool(t) for t in (2, 8, 32, 64)},
        "one syncfs": lambda fd, names: _binding.sync_batch(fd, names, "syncfs"),
    }
    for n, size in ((1000, 16 << 10), (64, 1 << 20)):
        times: dict[str, list[float]] = {m: [] for m in methods}
        for run in range(runs):
            for name, fn in methods.items():
                d = where / f"sync-{run}-{len(times[name])}-{name.split()[0]}-{n}"
                os.sync()  # others' dirty pages out of the way; then fresh, unsynced temps
                names = _temps(d, n, size)
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                t0 = time.perf_counter()
                fn(fd, names)
                times[name].append(time.perf_counter() - t0)
                os.close(fd)
                shutil.rmtree(d)
        base = statistics.median(times["serial fsync + dir fsync"])
        print(f"{_fs_name(where)} {where}: {n} x {size >> 10} KiB, {runs} runs (medians)")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:<26} {med * 1e3:9.1f} ms  {med / base:5.2f}x serial")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def durable_ingest(where: Path, runs: int) -> dict[str, float]:
    """Median seconds of ingest_tree of a standard-library copy, durable and not."""
    from fastmat.tree import ingest_tree

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=where))
    try:
        src = work / "src"
        shutil.copytree(
            stdlib_dir(), src, symlinks=True, ignore=shutil.ignore_patterns("site-packages")
        )
        files = sum(len(f) for _, _, f in os.walk(src))
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        times: dict[str, list[float]] = {"durable": [], "non-durable": []}
        for run in range(runs):
            for name, samples in times.items():
                cas_dir = work / f"cas-{run}-{name}"
                LocalCAS(cas_dir).close()  # the 512 shard directories, outside the clock
                os.sync()
                with LocalCAS(cas_dir, fsync=name == "durable") as cas:
                    t0 = time.perf_counter()
                    ingest_tree(cas, src)
                    samples.append(time.perf_counter() - t0)
                shutil.rmtree(cas_dir)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"ingest of {stdlib_dir()} ({files:,} files, {size / 1e6:.0f} MB) on "
            f"{_fs_name(work)}, {runs} runs (medians), load {os.getloadavg()[0]:.1f}:\n"
            f"  durable {med['durable']:.2f} s  non-durable {med['non-durable']:.2f} s  "
            f"ratio {med['durable'] / med['non-durable']:.2f} (target <= 1.5)\n"
            f"  samples {times}"
        )
        return med
    finally:
        shutil.rmtree(work, ignore_errors=True)


def use_record_cost(where: Path, runs: int) -> None:
    """What pinning costs a materialize: a pinned scope of a 1,978-blob plan (pin
    file, use chunk) against a cold materialize of that tree (large_tree's files,
    bytes scaled down), both measured in turns in the same run; and the replay of
    those use chunks by another instance's index."""
    from shapes import build_shape

    from fastmat.materialize import materialize
    from fastmat.tree import load_plan
    from fastmat.tree.nodecache import node_cache

    work = Path(tempfile.mkdtemp(prefix="bench-usage-", dir=where))
    try:
        with LocalCAS(work / "cas", fsync=False) as cas:
            root = build_shape(cas.put, "large_tree", bytes_scale=0.01)
            names = load_plan(cas, root).blobs
            scopes: list[float] = []
            cold: list[float] = []
            for i in range(max(runs, 5) * 4):
                t0 = time.perf_counter()
                with cas.pinned(names):
                    pass
                scopes.append(time.perf_counter() - t0)
                node_cache.clear()
                dest = work / f"d{i}"
                t0 = time.perf_counter()
                materialize(cas, root, dest)
                cold.append(time.perf_counter() - t0)
                _binding.remove_tree(dest)
            with LocalCAS(work / "cas") as other:
                t0 = time.perf_counter()
                idx = other.index
                replay = time.perf_counter() - t0
        med, mat = statistics.median(scopes), statistics.median(cold)
        n = names.count(b"\0") + 1
        print(
            f"use record: a pinned scope of {n:,} names {med * 1e6:.0f} us "
            f"({med * 1e9 / n:.0f} ns per blob), {med / mat:.1%} of a cold materialize of "
            f"those files ({mat * 1e3:.1f} ms, which pins once itself), "
            f"{len(scopes)} turns (medians), load {os.getloadavg()[0]:.1f}; "
            f"replaying the {2 * len(scopes)} use chunks: {replay * 1e3:.0f} ms "
            f"({len(idx.entries):,} names known)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to work (its filesystem is measured)")
    ap.add_argument("--shapes", default="small,medium,large")
    ap.add_argument("--no-fsync-variants", action="store_true")
    ap.add_argument("--sync", default=None, metavar="DIRS", help="sync strategies in these dirs")
    ap.add_argument("--ingest", action="store_true", help="durable vs non-durable stdlib ingest")
    ap.add_argument("--usage", action="store_true", help="the use record's cost per blob")
    args = ap.parse_args(argv)
    where = Path(args.dir or tempfile.gettempdir())
    if args.sync or args.ingest or args.usage:
        for d in (args.sync or "").split(","):
            if d:
                sync_strategies(Path(tempfile.mkdtemp(prefix="bench-sync-", dir=d)), args.runs)
        if args.ingest:
            durable_ingest(where, args.runs)
        if args.usage:
            use_record_cost(where, args.runs)
        sys.stdout.flush()
        return
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
