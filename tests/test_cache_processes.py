"""DirectoryCache shared by real processes: single-flight, pins, SIGKILL and reopen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from tests.cache_helpers import ingest as ingest_spec
from tests.cache_helpers import leftovers, mounted, shape, snapshot
from tests.helpers import mount_problem, wait_for_path

# argv: cas cache root dest go-file mode [marker]
# mode: "slow" (the constructor sleeps 0.5 s after building), "hang-<stage>" (writes the
# marker at <stage> then sleeps until killed), "workspace" (holds a workspace on root
# until the marker file appears, then reports what it saw in it).
CHILD = r"""
import json, os, sys, time
from pathlib import Path
from fastmat.cache import build as cache_build
from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
cas_dir, cache_dir, root, dest, go, mode = sys.argv[1:7]
marker = Path(sys.argv[7]) if len(sys.argv) > 7 else None
if mode == "slow":
    cache_build.stage_hook = lambda stage: time.sleep(0.5) if stage == "built" else None
elif mode.startswith("hang-"):
    def hang(stage):
        if stage == mode[5:]:
            marker.write_text("here")
            time.sleep(600)
    cache_build.stage_hook = hang
with LocalCAS(cas_dir) as cas, DirectoryCache(cas, cache_dir) as c:
    Path(dest + ".opened").write_text("opened")  # the cache is open (its index read)
    while not os.path.exists(go):
        time.sleep(0.002)
    if mode == "workspace":
        with c.workspace(Digest.parse(root), dest) as ws:
            Path(dest + ".ready").write_text(ws.method)
            while not marker.exists():
                time.sleep(0.01)
            seen = sorted(str(p.relative_to(ws.path)) for p in ws.path.rglob("*"))
            data = {str(p.relative_to(ws.path)): p.read_text() for p in ws.path.rglob("*.txt")}
        print(json.dumps({"method": ws.method, "seen": seen, "data": data}))
        sys.exit(0)
    r = c.materialize(Digest.parse(root), dest)
    s = c.stats()
print(json.dumps({"hit": r.hit, "constructions": s.constructions, "adopted": s.adopted}))
"""


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas") as c:
        yield c


def _spawn(
    cas: LocalCAS, tmp_path: Path, root: Digest, dest: str, mode: str, *, marker: str = ""
) -> subprocess.Popen[str]:
    args = [str(cas.root), str(tmp_path / "cache"), str(root), dest, str(tmp_path / "go"), mode]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args, *([marker] if marker else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)  # reaps it and closes the pipes


def _result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def test_four_processes_one_construction(cas: LocalCAS, tmp_path: Path) -> None:
    root = ingest_spec(cas, tmp_path / "src", shape(300, 1))
    procs = [_spawn(cas, tmp_path, root, str(tmp_path / f"d{i}"), "slow") for i in range(4)]
    for i, p in enumerate(procs):  # all four opened the cache empty, then all go at once
        wait_for_path(tmp_path / f"d{i}.opened", p)
    (tmp_path / "go").write_text("go")
    results = [_result(p) for p in procs]
    assert sum(int(str(r["constructions"])) for r in results) == 1
    assert sum(int(str(r["adopted"])) for r in results) == 3
    assert sorted(bool(r["hit"]) for r in results) == [False, True, True, True]
    want = snapshot(tmp_path / "src")
    for i in range(4):
        assert snapshot(tmp_path / f"d{i}") == want
    entries = os.listdir(tmp_path / "cache" / "entries")
    assert sorted(entries) == [root.key, f"{root.key}.plan"]


def test_sigkill_mid_construction_leaves_no_entry(cas: LocalCAS, tmp_path: Path) -> None:
    root = ingest_spec(cas, tmp_path / "src", shape(100, 2))
    marker = tmp_path / "marker"
    (tmp_path / "go").write_text("go")
    proc = _spawn(cas, tmp_path, root, str(tmp_path / "d0"), "hang-built", marker=str(marker))
    wait_for_path(marker, proc)
    _kill(proc)
    entries = tmp_path / "cache" / "entries"
    assert os.listdir(entries) == []  # the built tree is still under the dead tmp name
    assert any((tmp_path / "cache" / "tmp").rglob("b-*"))
    assert not (tmp_path / "d0").exists()
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        res = cache.materialize(root, tmp_path / "d1")
        st = cache.stats()
        cache.drain()
        assert leftovers(tmp_path / "cache") == []  # the dead instance's temp was swept
    assert (res.hit, st.constructions) == (False, 1)
    assert snapshot(tmp_path / "d1") == snapshot(tmp_path / "src")
    assert os.listdir(tmp_path / "cache" / "tmp") == []


def test_sigkill_after_publish_entry_is_adopted(cas: LocalCAS, tmp_path: Path) -> None:
    root = ingest_spec(cas, tmp_path / "src", shape(100, 3))
    marker = tmp_path / "marker"
    (tmp_path / "go").write_text("go")
    proc = _spawn(cas, tmp_path, root, str(tmp_path / "d0"), "hang-published", marker=str(marker))
    wait_for_path(marker, proc)
    _kill(proc)
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        assert cache.stats().entries == 1
        res = cache.materialize(root, tmp_path / "d1")
        assert (res.hit, cache.stats().constructions) == (True, 0)
        cache.drain()
        assert leftovers(tmp_path / "cache") == []
    assert snapshot(tmp_path / "d1") == snapshot(tmp_path / "src")


@pytest.mark.skipif(mount_problem() is not None, reason=str(mount_problem()))
def test_another_process_never_evicts_a_mounted_entry(cas: LocalCAS, tmp_path: Path) -> None:
    a = ingest_spec(cas, tmp_path / "a", shape(50, 4))
    b = ingest_spec(cas, tmp_path / "b", shape(50, 5))
    c = ingest_spec(cas, tmp_path / "c", shape(50, 6))
    release = tmp_path / "release"
    (tmp_path / "go").write_text("go")
    ws = str(tmp_path / "ws")
    proc = _spawn(cas, tmp_path, a, ws, "workspace", marker=str(release))
    wait_for_path(Path(ws + ".ready"), proc)
    try:
        # this process adopts a at open, then needs room: a is pinned by the child
        with DirectoryCache(cas, tmp_path / "cache", max_entries=1) as cache:
            assert cache.stats().entries == 1
            cache.materialize(b, tmp_path / "db")
            cache.materialize(c, tmp_path / "dc")
            cache.drain()
            assert (tmp_path / "cache" / "entries" / a.key).is_dir()
    finally:
        release.write_text("done")
    seen = _result(proc)
    assert seen["method"] == "overlay"
    want = snapshot(tmp_path / "a")
    assert seen["seen"] == sorted(want)
    data = seen["data"]
    assert isinstance(data, dict)
    assert data == {k: bytes(v[1]).decode() for k, v in want.items() if v[0] == "f"}  # type: ignore[call-overload]
    assert not mounted(tmp_path)
    assert not Path(ws).exists()


def test_entry_evicted_by_another_process_is_rebuilt(cas: LocalCAS, tmp_path: Path) -> None:
    root = ingest_spec(cas, tmp_path / "src", shape(40, 7))
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d0")
        # another process opens the same cache with no room: it evicts the unpinned entry
        evictor = (
            "import sys; from fastmat.cas import LocalCAS; from fastmat.cache import "
            "DirectoryCache\nwith LocalCAS(sys.argv[1]) as cas, "
            "DirectoryCache(cas, sys.argv[2], max_bytes=0) as c: print(c.stats().evictions)"
        )
        out = subprocess.run(
            [sys.executable, "-c", evictor, str(cas.root), str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        assert out.stdout.strip() == "1"
        assert cache.entry_path(root) is not None  # this process still lists it...
        res = cache.materialize(root, tmp_path / "d1")  # ...notices it is gone, rebuilds
        assert (res.hit, cache.stats().constructions) == (False, 2)
        assert (tmp_path / "cache" / "entries" / root.key).is_dir()
    assert snapshot(tmp_path / "d1") == snapshot(tmp_path / "src")
