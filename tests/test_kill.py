"""Atomicity under SIGKILL (invariant 11): children are killed at random points of a
materialize, a cache construction and a cache replay; a fresh process then finds the
destination absent or complete, the CAS intact, and nothing left behind once it has
swept (staging directories beside the destination, the cache's scratch and trash).

A handful of kills in the default suite, many more under ``-m stress``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.fs.staging import PREFIX
from tests.cache_helpers import ingest, leftovers, mounted, shape, snapshot
from tests.helpers import can_mount

REPO = Path(__file__).resolve().parent.parent
FILES = 6000  # big enough that a kill lands inside the work, small enough to be quick

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from fastmat.cas import LocalCAS
    from fastmat.cache import DirectoryCache
    from fastmat.digest import Digest
    from fastmat.materialize import materialize
    from fastmat.tree.nodecache import node_cache

    mode, cas_dir, cache_dir, root, dest = sys.argv[1:6]
    node_cache.max_bytes = 0  # every run loads and validates the whole tree
    with LocalCAS(cas_dir, fsync=False) as cas:
        print("ready", flush=True)
        sys.stdin.readline()
        if mode == "materialize":
            materialize(cas, Digest.parse(root), dest)
        elif mode == "workspace":  # enter (mount) and leave (unmount) an overlay
            with DirectoryCache(cas, cache_dir, fsync=False) as cache:
                with cache.workspace(Digest.parse(root), dest) as ws:
                    assert ws.method == "overlay", ws.method
        else:
            with DirectoryCache(cas, cache_dir, fsync=False) as cache:
                cache.materialize(Digest.parse(root), dest)
    print("done", flush=True)
    """
)


@dataclass(frozen=True)
class Job:
    mode: str  # "materialize", "build" (a cache miss), "replay" (a hit), "workspace"
    cas: Path
    cache: Path
    root: str


def _child(job: Job, dest: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, job.mode, str(job.cas), str(job.cache), job.root, str(dest)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout is not None
    assert p.stdout.readline() == "ready\n"
    return p


def _run_to_end(job: Job, dest: Path) -> float:
    p = _child(job, dest)
    t0 = time.monotonic()
    out, _ = p.communicate("go\n", timeout=120)
    assert p.returncode == 0
    assert out == "done\n"
    return time.monotonic() - t0


def _kill_during(job: Job, dest: Path, delay: float) -> bool:
    """Starts the work, SIGKILLs it after ``delay`` s; True if it was still running."""
    p = _child(job, dest)
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()
    time.sleep(delay)
    running = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.communicate()
    return running


def _check(parent: Path, dest: Path, expected: dict[str, tuple[object, ...]]) -> None:
    """dest absent or complete; after a fresh process swept, no staging dir is left."""
    if os.path.lexists(dest):
        assert snapshot(dest) == expected  # complete, never partial (an empty dir included)
    # A fresh process staging in the same parent sweeps what the dead child left.
    probe = parent / "probe"
    code = (
        "import sys; from fastmat.fs.staging import staged\n"
        "with staged(sys.argv[1]) as st: st.publish()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code, str(probe)], check=True, env=env)
    os.rmdir(probe)
    assert [n for n in os.listdir(parent) if n.startswith(PREFIX)] == []


def _check_workspace(cas_dir: Path, cache_dir: Path, parent: Path, dest: Path) -> None:
    """A dead owner's workspace is gone once a fresh process has opened the cache: no
    mount at or below the work directory, no dest, no scratch left (before that, a
    kill between mkdir and mount may leave an empty dest, recorded for the sweep)."""
    code = (
        "import sys; from fastmat.cas import LocalCAS; from fastmat.cache import DirectoryCache\n"
        "with LocalCAS(sys.argv[1]) as cas, DirectoryCache(cas, sys.argv[2]) as c: c.drain()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code, str(cas_dir), str(cache_dir)], check=True, env=env)
    assert not mounted(parent)
    assert not os.path.lexists(dest)
    assert leftovers(cache_dir) == []


def _kills(n: int, mode: str, tmp_path: Path) -> None:
    rng = random.Random(f"{mode}-{n}")
    cas_dir, cache_dir = tmp_path / "cas", tmp_path / "cache"
    with LocalCAS(cas_dir, fsync=False) as cas:
        root = str(ingest(cas, tmp_path / "src", shape(FILES, seed=11)))
    expected = snapshot(tmp_path / "src")
    parent = tmp_path / "work"
    parent.mkdir()
    job = Job(mode, cas_dir, cache_dir, root)
    if mode in ("replay", "workspace"):  # the entry exists: every run below is a hit
        _run_to_end(job, parent / "warm")
    duration = min(_run_to_end(job, parent / f"t{i}") for i in range(2))
    inside = 0
    for i in range(n):
        dest = parent / f"d{i}"
        if mode == "build":  # each kill interrupts a construction: start without the entry
            with LocalCAS(cas_dir, fsync=False) as cas:
                DirectoryCache(cas, cache_dir, max_bytes=0).close()  # opening evicts all
        inside += _kill_during(job, dest, rng.uniform(0, duration))
        if mode == "workspace":
            _check_workspace(cas_dir, cache_dir, parent, dest)
        else:
            _check(parent, dest, expected)
    assert inside >= n // 2, "most kills must land while the work runs"
    with LocalCAS(cas_dir) as cas:
        assert cas.verify().ok
        if mode != "materialize":
            with DirectoryCache(cas, cache_dir) as cache:
                cache.drain()
                assert leftovers(cache_dir) == []
                # and the cache still serves the tree, complete
                cache.materialize(Digest.parse(root), parent / "after")
                assert snapshot(parent / "after") == expected


MODES = [
    "materialize",
    "build",
    "replay",
    pytest.param("workspace", marks=pytest.mark.skipif(not can_mount(), reason="cannot mount")),
]


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_leaves_dest_absent_or_complete(mode: str, tmp_path: Path) -> None:
    _kills(4, mode, tmp_path)


@pytest.mark.stress
@pytest.mark.parametrize("mode", MODES)
def test_sigkill_many(mode: str, tmp_path: Path) -> None:
    _kills(20, mode, tmp_path)


def test_a_sweep_never_takes_a_live_builders_fresh_staging_dir(tmp_path: Path) -> None:
    """Between its mkdir and its flock a staging directory is unlocked: a sweeper in
    another process must leave it alone while its builder lives (two processes staging
    in one parent failed with FileNotFoundError about once in 25 runs)."""
    from fastmat.fs import staging

    live = tmp_path / f"{PREFIX}{os.getpid()}.0123456789ab"
    live.mkdir()  # as _make leaves it, before the flock
    dead = tmp_path / f"{PREFIX}999999999.0123456789ab"
    dead.mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert staging.sweep(fd) == 1
    finally:
        os.close(fd)
    assert live.is_dir()
    assert not dead.exists()
