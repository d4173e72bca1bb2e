"""Soak (``-m stress``): four processes share a bounded CAS and materialize, from a
real BuildGrid, trees totalling five times its budget, for two minutes
(``FASTMAT_SOAK_S`` to change): no failed or wrong tree, the CAS's bytes never above
``max_bytes`` plus one batch, evictions and re-fetches counted in ``fastmat stats``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from tests.reapi_server import MAX_MESSAGE, BuildGrid, Uploader, build_tree, buildgrid

pytestmark = [pytest.mark.stress, pytest.mark.remote]
_ = buildgrid  # the fixture, imported for pytest

SPAWN = mp.get_context("spawn")
MAX_BYTES = 32 << 20
TREES = 40  # of about MAX_BYTES / 8 each: 5 x MAX_BYTES in all
PROCESSES = 4
BATCH_SLACK = MAX_MESSAGE  # one BatchReadBlobs response is one group commit at most

Expected = dict[str, tuple[str, bool]]  # path -> (sha256, executable)


def tree_spec(t: int) -> dict[str, Any]:
    rnd = random.Random(t)
    spec: dict[str, Any] = {}
    total = 0
    i = 0
    while total < MAX_BYTES // 8:
        size = rnd.randrange(20_000, 400_000)
        data = f"soak{t}:{i}:".encode() + rnd.randbytes(size)
        total += len(data)
        path = f"m{i % 3}/f{i}.o"
        spec[path] = ("exec", data) if i % 10 == 3 else data
        i += 1
    return spec


def _worker(cfg: dict[str, Any], barrier: Barrier, out: Any, index: int) -> None:
    from fastmat import materialize
    from fastmat.remote import RemoteCAS

    cas_dir, url, roots = cfg["cas_dir"], cfg["url"], cfg["roots"]
    expected: list[Expected] = cfg["expected"]
    done = 0
    failures: list[str] = []
    rnd = random.Random(index)
    work = Path(cas_dir).parent / f"w{index}"
    work.mkdir()
    try:
        with LocalCAS(cas_dir, max_bytes=MAX_BYTES) as cas, RemoteCAS(url) as remote:
            barrier.wait()
            until = time.monotonic() + cfg["duration_s"]
            while time.monotonic() < until:
                t = rnd.randrange(len(roots))
                dest = work / f"t{done}"
                try:
                    materialize(cas, Digest.parse(roots[t]), dest, fetcher=remote)
                    _check(dest, expected[t])
                except Exception:
                    failures.append(traceback.format_exc())
                finally:
                    shutil.rmtree(dest, ignore_errors=True)
                done += 1
    except Exception:
        failures.append(traceback.format_exc())
    out.put((index, done, failures))


def _check(dest: Path, expected: Expected) -> None:
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert found == sorted(expected), "wrong file list"
    for path, (h, exe) in expected.items():
        p = dest / path
        assert hashlib.sha256(p.read_bytes()).hexdigest() == h, f"wrong bytes: {path}"
        assert stat.S_IMODE(p.lstat().st_mode) == (0o555 if exe else 0o444), f"mode: {path}"


def cas_bytes(cas_dir: Path) -> int:
    total = 0
    for area in ("blobs", "exec"):
        for shard in os.scandir(cas_dir / area):
            for e in os.scandir(shard.path):
                total += int(e.name.rsplit("-", 1)[1])
    return total


def test_four_processes_five_times_the_budget(buildgrid: BuildGrid, tmp_path: Path) -> None:
    duration_s = float(os.environ.get("FASTMAT_SOAK_S", "120"))
    roots, expected = [], []
    up = Uploader(buildgrid.address)
    total = 0
    for t in range(TREES):
        spec = tree_spec(t)
        root, blobs = build_tree(spec)
        up.upload(blobs)
        roots.append(str(root))
        expected.append(
            {
                p: (hashlib.sha256(v[1] if isinstance(v, tuple) else v).hexdigest(),
                    isinstance(v, tuple))
                for p, v in spec.items()
            }
        )  # fmt: skip
        total += sum(len(v[1] if isinstance(v, tuple) else v) for v in spec.values())
    up.close()
    assert total >= 5 * MAX_BYTES
    cas_dir = tmp_path / "cas"
    LocalCAS(cas_dir).close()
    peak = 0
    stop = threading.Event()

    def monitor() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, cas_bytes(cas_dir))
            time.sleep(0.02)

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    barrier = SPAWN.Barrier(PROCESSES)
    out: Any = SPAWN.Queue()
    cfg = {
        "cas_dir": str(cas_dir),
        "url": buildgrid.url,
        "roots": roots,
        "expected": expected,
        "duration_s": duration_s,
    }
    procs = [SPAWN.Process(target=_worker, args=(cfg, barrier, out, i)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    results = [out.get(timeout=duration_s + 600) for _ in procs]
    for p in procs:
        p.join(120)
    stop.set()
    mon.join()
    failures = [f for _, _, fs in results for f in fs]
    assert failures == [], failures[0]
    assert all(done > 0 for _, done, _ in results)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    assert peak <= MAX_BYTES + BATCH_SLACK, (peak, MAX_BYTES)
    res = subprocess.run(
        [sys.executable, "-m", "fastmat", "stats", "--cas", str(cas_dir), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    stats = json.loads(res.stdout)["cas"]
    assert stats["evictions"] > 0
    assert stats["refetches"] > 0
    assert stats["recorded_bytes"] <= MAX_BYTES + BATCH_SLACK
    print(
        f"soak: {sum(d for _, d, _ in results)} trees materialized in {duration_s:.0f} s, "
        f"peak CAS {peak} bytes (budget {MAX_BYTES}), {stats['evictions']} evictions, "
        f"{stats['refetches']} re-fetches"
    )
