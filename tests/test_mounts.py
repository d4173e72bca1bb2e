"""Overlay workspaces whose owner was SIGKILLed (fastmat.cache.mounts, issue 10, item 8):
the mount stays; the entry under it is never evicted; the next open detaches the mount,
removes dest and only then the upper/work directories; ``fastmat gc`` reports it."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat import _binding
from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.cli import main
from tests.cache_helpers import ingest, leftovers, mounted, shape, snapshot
from tests.helpers import mount_problem, wait_for_path

pytestmark = pytest.mark.skipif(mount_problem() is not None, reason=str(mount_problem()))

# argv: cas cache root ws: holds a workspace on root at ws, writes ws.ready, sleeps
CHILD = r"""
import sys, time
from pathlib import Path
from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
cas_dir, cache_dir, root, ws = sys.argv[1:5]
with LocalCAS(cas_dir) as cas, DirectoryCache(cas, cache_dir) as c:
    with c.workspace(Digest.parse(root), ws) as w:
        assert w.method == "overlay"
        (w.path / "out.o").write_bytes(b"the action's output")
        Path(ws + ".ready").write_text("ready")
        time.sleep(600)
"""


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas") as c:
        yield c


def _kill_inside_a_workspace(cas: LocalCAS, tmp_path: Path, root: object, ws: Path) -> int:
    """A child enters a workspace and is SIGKILLed there; returns its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cas.root), str(tmp_path / "cache"), str(root), str(ws)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_path(Path(f"{ws}.ready"), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert mounted(ws)  # the kernel keeps the mount of a dead owner
    return proc.pid


def _scratch_dirs(cache_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(cache_dir)) for p in (cache_dir / "tmp").glob("*/ws-*"))


def test_a_killed_workspace_is_detached_then_cleaned_and_its_entry_never_evicted(
    cas: LocalCAS, tmp_path: Path
) -> None:
    a = ingest(cas, tmp_path / "a", shape(60, 1))
    b = ingest(cas, tmp_path / "b", shape(60, 2))
    ws = tmp_path / "ws"
    cache_dir = tmp_path / "cache"
    with DirectoryCache(cas, cache_dir) as warm:  # the entry exists before the child
        warm.materialize(a, tmp_path / "warm")
    # an instance opened while the child is alive knows entry a, pinned by the child
    with DirectoryCache(cas, cache_dir, max_entries=1) as other:
        assert other.entry_path(a) is not None
        _kill_inside_a_workspace(cas, tmp_path, a, ws)
        assert len(os.listdir(cache_dir / "mounts")) == 1  # recorded before it was made
        assert _scratch_dirs(cache_dir)  # its upper/work, under the live mount
        # the dead child's pin is gone with it; the mount record keeps a from eviction
        assert not other.materialize(b, tmp_path / "db").hit
        other.drain()
        assert other.entry_path(a) is not None  # over max_entries: b went instead
        assert other.entry_path(b) is None
        assert (cache_dir / "entries" / a.key).is_dir()
        assert (ws / "out.o").read_bytes() == b"the action's output"  # the workspace lives
        output = {"out.o": ("f", b"the action's output", False)}
        assert snapshot(ws) == {**snapshot(tmp_path / "a"), **output}
    # the next open: detach, remove dest, and only then the upper/work
    with DirectoryCache(cas, cache_dir) as fresh:
        assert [(m.key, m.dest, m.was_mounted, m.cleaned) for m in fresh.dead_mounts] == [
            (a.key, str(ws), True, True)
        ]
        assert not mounted(ws)
        assert not ws.exists()
        fresh.drain()
        assert _scratch_dirs(cache_dir) == []
        assert leftovers(cache_dir) == []
        res = fresh.materialize(a, tmp_path / "da")  # the entry is intact
        assert res.hit
        assert snapshot(tmp_path / "da") == snapshot(tmp_path / "a")
    # no longer under a mount: evictable again
    with DirectoryCache(cas, cache_dir, max_bytes=0) as tight:
        assert tight.stats().entries == 0
        assert tight.stats().evictions == 1


def test_a_mount_that_cannot_be_detached_is_kept_with_its_scratch_and_entry(
    cas: LocalCAS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = ingest(cas, tmp_path / "a", shape(30, 3))
    ws = tmp_path / "ws"
    cache_dir = tmp_path / "cache"
    _kill_inside_a_workspace(cas, tmp_path, a, ws)

    def refuse(target: str, detach: bool = False) -> None:  # an opener without the right
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), target)

    monkeypatch.setattr(_binding, "umount", refuse)
    with DirectoryCache(cas, cache_dir, max_bytes=0) as weak:
        (m,) = weak.dead_mounts
        assert (m.cleaned, m.was_mounted) == (False, True)
        assert "cannot detach" in m.problem
        weak.drain()
        assert mounted(ws)
        assert (ws / "out.o").read_bytes() == b"the action's output"
        assert _scratch_dirs(cache_dir)  # the dead owner's scratch is kept
        assert (cache_dir / "entries" / a.key).is_dir()  # and the entry, over max_bytes=0
    monkeypatch.undo()
    with DirectoryCache(cas, cache_dir) as able:
        assert [m.cleaned for m in able.dead_mounts] == [True]
        able.drain()
        assert leftovers(cache_dir) == []
    assert not mounted(ws)
    assert not ws.exists()


def test_gc_reports_and_cleans_dead_workspaces(
    cas: LocalCAS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = ingest(cas, tmp_path / "a", shape(20, 4))
    ws = tmp_path / "ws"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmat", "materialize", str(a), str(ws), "--cas",
         str(cas.root), "--cache", str(tmp_path / "cache"), "--workspace"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert "workspace for" in proc.stdout.readline()  # held: mounted, banner printed
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert mounted(ws)
    rc = main(["gc", "--cas", str(cas.root), "--cache", str(tmp_path / "cache"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (m,) = json.loads(out)["dead_mounts"]
    assert (m["dest"], m["key"], m["was_mounted"], m["cleaned"]) == (str(ws), a.key, True, True)
    assert not mounted(ws)
    assert not ws.exists()
    rc = main(["gc", "--cas", str(cas.root), "--cache", str(tmp_path / "cache")])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert "dead workspace" not in out  # cleaned once, gone
    assert leftovers(tmp_path / "cache") == []
