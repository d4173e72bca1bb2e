"""``fastmat bench``: fastmat against the floor and the obvious alternatives, one process.

Set-up needs nothing: a temporary directory (on the filesystem of ``--dir``, default
the system temp dir) holds the generated source trees, a CAS they are ingested into,
a directory cache and every destination, and is removed afterwards. Each method runs
once untimed (warm-up), then ``runs`` times interleaved with the other methods so
background noise spreads evenly; the figure is the median, and every ratio is taken
against the floor measured in the same run. Dirty pages are flushed (``sync``) before
every run, so the write-back of an earlier step (the generated trees, a copytree's
bytes) does not stall a later method's metadata operations inside its clock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmat import _binding
from fastmat.bench.methods import METHODS, Env, Method, Skip, Subject
from fastmat.bench.shapes import Shape, generate, shapes_for
from fastmat.errors import FastmatError
from fastmat.version import __version__

ProgressFn = Callable[[str, int, int], None]
"""``(what is running, steps done, steps in all)``, called as the bench goes."""

log = logging.getLogger("fastmat")

_CACHE_MAX_BYTES = 1 << 50  # the bench never wants an eviction
# How long `fastmat bench --quick` takes on an idle 2-CPU VM: 16-19 s (issue 12) and 25 s
# (docs/bench-2026-11-21-quick.json's duration_s) measured; far longer on a loaded
# machine. The help, the README and docs/ say these words (tests/test_bench.py checks).
QUICK_SECONDS = 20
QUICK_DURATION = f"about {QUICK_SECONDS} s on an idle 2-CPU machine"


@dataclass(frozen=True)
class BenchConfig:
    quick: bool = False
    runs: int = 0  # 0: 5, or 3 with quick
    budget_s: float = 0.0  # per shape and method; 0: 20 s, or 2 s with quick
    threads: int = 0  # 0: one per online CPU (the same for fastmat and the floor)
    scale: float = 1.0  # multiplies file counts and sizes (tests use tiny values)
    workdir: Path | None = None
    remote: str | None = None
    shapes: tuple[str, ...] = ()  # empty: all
    methods: tuple[str, ...] = ()  # empty: all that apply


class _Ticker:
    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        self.fn, self.total, self.done, self.what = fn, total, 0, "bench"

    def label(self, what: str) -> None:
        self.what = what
        if self.fn is not None:
            self.fn(what, self.done, self.total)

    def advance(self) -> None:
        self.done += 1
        if self.fn is not None:
            self.fn(self.what, self.done, self.total)


def selected_methods(cfg: BenchConfig) -> list[Method]:
    wanted = set(cfg.methods)
    unknown = wanted - {m.name for m in METHODS}
    if unknown:
        raise ValueError(f"unknown method(s): {', '.join(sorted(unknown))}")
    out = []
    for m in METHODS:
        if wanted and m.name not in wanted and m.name != "floor":
            continue
        if m.name.startswith("remote") and cfg.remote is None:
            continue
        out.append(m)
    return out


def selected_shapes(cfg: BenchConfig) -> list[Shape]:
    shapes = shapes_for(quick=cfg.quick, scale=cfg.scale)
    if cfg.shapes:
        known = {s.name for s in shapes}
        unknown = set(cfg.shapes) - known
        if unknown:
            raise ValueError(
                f"unknown shape(s): {', '.join(sorted(unknown))}; have {sorted(known)}"
            )
        shapes = [s for s in shapes if s.name in cfg.shapes]
    return shapes


def run_bench(cfg: BenchConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Runs the whole comparison; returns the results object (see ``--out``).
    ``progress`` is told what runs, step by step."""
    from fastmat.cache import DirectoryCache
    from fastmat.cas import LocalCAS

    runs = cfg.runs or (3 if cfg.quick else 5)
    budget_s = cfg.budget_s or (2.0 if cfg.quick else 20.0)
    threads = cfg.threads or os.cpu_count() or 1
    methods = selected_methods(cfg)
    shapes = selected_shapes(cfg)
    started = time.monotonic()
    date = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    base = tempfile.mkdtemp(prefix="fastmat-bench-", dir=cfg.workdir)
    work = Path(base)
    results: list[dict[str, Any]] = []
    shape_info: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            cas = stack.enter_context(LocalCAS(work / "cas"))  # the default: durable
            cache = stack.enter_context(
                DirectoryCache(cas, work / "cache", max_bytes=_CACHE_MAX_BYTES, threads=threads)
            )
            remote = None
            if cfg.remote is not None:
                from fastmat.remote import RemoteCAS

                remote = stack.enter_context(RemoteCAS(cfg.remote))
            env = Env(cas, cache, work / "dest", threads, remote, cfg.remote)
            env.work.mkdir()
            total = len(shapes) * len(methods) * (runs + 1)
            bar = _Ticker(progress, total)
            for shape in shapes:
                bar.label(f"bench: preparing {shape.name}")
                t0 = time.monotonic()
                subj = _prepare(env, shape, work)
                shape_info.append({**_shape_json(subj), "prepare_s": _since(t0)})
                bar.label(f"bench: {shape.name}")
                t0 = time.monotonic()
                results.extend(_measure(env, subj, methods, runs=runs, budget_s=budget_s, bar=bar))
                shape_info[-1]["measure_s"] = _since(t0)
                bar.label(f"bench: cleaning up {shape.name}")
                _binding.remove_tree(str(subj.src))
    finally:
        _binding.remove_tree(base)
    return {
        "fastmat_version": __version__,
        "date": date.isoformat(),
        "machine": machine_info(cfg.workdir or Path(tempfile.gettempdir())),
        "config": {
            "quick": cfg.quick,
            "runs": runs,
            "warmup_runs": 1,
            "budget_s": budget_s,
            "threads": threads,
            "scale": cfg.scale,
            "remote": cfg.remote,
        },
        "methods": [
            {"name": m.name, "label": m.label, "description": m.description} for m in methods
        ],
        "shapes": shape_info,
        "results": results,
        "duration_s": _since(started),
    }


def _prepare(env: Env, shape: Shape, work: Path) -> Subject:
    from fastmat.tree import ingest_tree, load_plan

    src = work / "src" / shape.name
    generate(shape, src)
    root = ingest_tree(env.cas, src)
    plan = load_plan(env.cas, root)
    # Warm the cache entry (the miss is not a method: it is materialize + a rename).
    probe = env.work / f"{shape.name}.populate"
    env.cache.materialize(root, probe)
    _binding.remove_tree(str(probe))
    if env.remote is not None:
        from fastmat.bench.seed import upload_tree

        upload_tree(env.cas, env.remote, root)
    return Subject(shape, src, root, plan, dirs=len(plan.arrays.dir_parent) - 1)


def _measure(
    env: Env, subj: Subject, methods: list[Method], *, runs: int, budget_s: float, bar: _Ticker
) -> list[dict[str, Any]]:
    """Warm-up, then ``runs`` rounds of every method in turn. A method whose warm-up
    shows it cannot do ``runs`` runs within ``budget_s`` gets fewer (at least one);
    one slower than the whole budget keeps its warm-up as its only sample."""
    samples: dict[str, list[float]] = {m.name: [] for m in methods}
    planned: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for run in range(runs + 1):  # run 0 is the warm-up
        for m in methods:
            bar.advance()
            if m.name in skipped or (run and len(samples[m.name]) >= planned[m.name]):
                continue
            dest = env.work / f"{subj.shape.name}.{m.name}.{run}"
            os.sync()  # write-back of earlier steps (copytree's bytes) must not land here
            try:
                seconds = m.run(env, subj, dest)
            except Skip as e:
                skipped[m.name] = str(e)
                continue
            except (FastmatError, OSError, subprocess.CalledProcessError) as e:
                # One broken method must not cost the whole comparison: record it.
                log.warning("bench: %s on %s failed: %s", m.name, subj.shape.name, e)
                skipped[m.name] = f"failed: {type(e).__name__}: {e}"
                if os.path.lexists(dest):
                    _binding.remove_tree(str(dest))
                continue
            if run:
                samples[m.name].append(seconds * 1e3)
            elif seconds > budget_s:
                samples[m.name].append(seconds * 1e3)
                planned[m.name] = 1
            else:
                planned[m.name] = min(runs, max(1, int(budget_s / max(seconds, 1e-9)) - 1))
    floor = statistics.median(samples["floor"]) if samples.get("floor") else None
    out = []
    for m in methods:
        ms = samples[m.name]
        med = statistics.median(ms) if ms else None
        out.append(
            {
                "shape": subj.shape.name,
                "method": m.name,
                "samples_ms": [round(x, 4) for x in ms],
                "median_ms": None if med is None else round(med, 4),
                "ratio_to_floor": None if med is None or not floor else round(med / floor, 3),
                "us_per_file": None if med is None else round(med * 1e3 / subj.shape.files, 3),
                "skipped": skipped.get(m.name),
            }
        )
    return out


def _since(t0: float) -> float:
    return round(time.monotonic() - t0, 3)


def _shape_json(subj: Subject) -> dict[str, Any]:
    return {
        "name": subj.shape.name,
        "files": subj.shape.files,
        "dirs": subj.dirs,
        "bytes": subj.shape.total_bytes,
        "root": str(subj.root),
    }


def machine_info(where: Path) -> dict[str, Any]:
    """Where the numbers come from: CPU, memory, kernel, the filesystem benched on."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "cpu_model": _first_field("/proc/cpuinfo", "model name"),
        "mem_total": _first_field("/proc/meminfo", "MemTotal"),
        "filesystem": _fs_type(where),
        "capabilities": {
            "ficlone": _binding.HAS_FICLONE,
            "clonefile": _binding.HAS_CLONEFILE,
            "overlay": _binding.HAS_OVERLAY,
        },
    }
    return info


def _first_field(path: str, key: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        return None
    return None


def _fs_type(where: Path) -> str | None:
    """The type of the filesystem holding ``where`` (longest mount-point prefix)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            mounts = [line.split()[1:3] for line in f if line.strip()]
    except OSError:
        return None
    target = os.path.realpath(where)
    best, fstype = "", None
    for mnt, typ in mounts:
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, typ
    return fstype
