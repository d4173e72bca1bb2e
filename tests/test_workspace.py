"""DirectoryCache.workspace: overlay mounts of a pinned entry, and the hardlink fallback."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat import _binding
from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from tests.cache_helpers import (
    BASIC,
    ingest,
    leftovers,
    modes_problems,
    mounted,
    shape,
    snapshot,
)
from tests.helpers import as_nobody, mount_problem, open_to_all

needs_mount = pytest.mark.skipif(mount_problem() is not None, reason=str(mount_problem()))

Y_H = b"#define Y 1\n" * 100


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas") as c:
        yield c


@pytest.fixture(params=["overlay", "hardlink"])
def cache(
    request: pytest.FixtureRequest, cas: LocalCAS, tmp_path: Path
) -> Iterator[DirectoryCache]:
    if request.param == "overlay" and mount_problem() is not None:
        pytest.skip(str(mount_problem()))
    overlay = None if request.param == "overlay" else False  # as without CAP_SYS_ADMIN
    with DirectoryCache(cas, tmp_path / "cache", max_entries=1, overlay=overlay) as c:
        yield c


def _entry_snapshot(cache: DirectoryCache, root: Digest) -> tuple[object, ...]:
    entry = cache.entry_path(root)
    assert entry is not None
    st = (entry / "src/lib/y.h").stat()
    return snapshot(entry), st.st_ino, st.st_mode, st.st_mtime_ns


def _try_write(path: str) -> str:
    try:
        with open(path, "ab"):
            return "written"
    except PermissionError:
        return "denied"


def test_workspace_content_modes_and_cleanup(
    cache: DirectoryCache, cas: LocalCAS, tmp_path: Path
) -> None:
    root = ingest(cas, tmp_path / "src", BASIC)
    ws_path = tmp_path / "ws"
    with cache.workspace(root, ws_path) as ws:
        want = "hardlink" if cache.overlay is False else "overlay"
        assert ws.method == want
        assert ws.path == ws_path
        assert mounted(ws_path) == (want == "overlay")
        assert snapshot(ws_path) == snapshot(tmp_path / "src")
        assert modes_problems(ws_path) == []
        assert stat.S_IMODE(ws_path.stat().st_mode) == 0o755
        # an action writes outputs into input directories, and cannot write inputs
        (ws_path / "src" / "lib" / "deep" / "out.o").write_bytes(b"obj")
        (ws_path / "outputs" / "result").write_bytes(b"result")
        open_to_all(ws_path / "src" / "lib")
        assert as_nobody(_try_write, str(ws_path / "src" / "lib" / "y.h")) == "denied"
        assert cache.stats().pinned == (1 if want == "overlay" else 0)
    assert not ws_path.exists()
    assert not mounted(ws_path)
    assert cache.stats().pinned == 0
    cache.drain()
    assert leftovers(cache.path) == []


@needs_mount
def test_overlay_action_rewrites_and_chmods_an_input(cas: LocalCAS, tmp_path: Path) -> None:
    root = ingest(cas, tmp_path / "src", BASIC)
    blob = cas.path(Digest.of(Y_H))
    blob_before = (blob.read_bytes(), blob.stat().st_mode, blob.stat().st_ino)
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        with cache.workspace(root, tmp_path / "warm"):
            pass
        entry_before = _entry_snapshot(cache, root)
        with cache.workspace(root, tmp_path / "ws") as ws:
            assert (ws.method, ws.hit) == ("overlay", True)
            f = ws.path / "src" / "lib" / "y.h"
            f.chmod(0o644)  # the action chmods an input...
            f.write_bytes(b"rewritten by the action\n")  # ...and rewrites it
            (ws.path / "a.txt").unlink()
            (ws.path / "bin" / "tool").chmod(0o777)
            assert f.read_bytes() == b"rewritten by the action\n"
            assert ws.upper is not None
            assert (ws.upper / "src" / "lib" / "y.h").exists()  # copied up
        assert _entry_snapshot(cache, root) == entry_before
        # the next workspace sees the pristine tree again
        with cache.workspace(root, tmp_path / "ws2") as ws2:
            assert snapshot(ws2.path) == snapshot(tmp_path / "src")
        st = cache.stats()
        assert (st.overlay_hits, st.constructions, st.pinned) == (2, 1, 0)
    assert (blob.read_bytes(), blob.stat().st_mode, blob.stat().st_ino) == blob_before
    assert not mounted(tmp_path)
    assert not (tmp_path / "ws").exists()
    assert leftovers(tmp_path / "cache") == []


def test_eviction_cleanup_never_changes_modes_in_a_live_workspace(
    cache: DirectoryCache, cas: LocalCAS, tmp_path: Path
) -> None:
    shared = {"shared/common.h": Y_H}
    a = ingest(cas, tmp_path / "a", {**shape(40, 1), **shared})
    b = ingest(cas, tmp_path / "b", {**shape(40, 2), **shared})
    c = ingest(cas, tmp_path / "c", {**shape(40, 3), **shared})
    blob = cas.path(Digest.of(Y_H))
    with cache.workspace(a, tmp_path / "ws") as ws:
        before = {p: p.lstat().st_mode for p in ws.path.rglob("*")}
        # max_entries=1 and a is pinned (overlay): b then c are built and evicted
        cache.materialize(b, tmp_path / "db")
        cache.materialize(c, tmp_path / "dc")
        cache.drain()
        assert cache.stats().evictions >= 1
        if ws.method == "overlay":
            assert cache.entry_path(a) is not None  # pinned: never the victim
        assert {p: p.lstat().st_mode for p in ws.path.rglob("*")} == before
        assert snapshot(ws.path) == snapshot(tmp_path / "a")
        assert modes_problems(ws.path) == []
    assert blob.stat().st_mode & 0o777 == 0o444
    assert (tmp_path / "db" / "shared" / "common.h").stat().st_mode & 0o777 == 0o444


@needs_mount
def test_overlay_workspace_of_a_big_tree_and_exception_in_body(
    cas: LocalCAS, tmp_path: Path
) -> None:
    root = ingest(cas, tmp_path / "src", shape(600, 9))
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        seen = []

        def action() -> None:
            with cache.workspace(root, tmp_path / "ws") as ws:
                seen.append(len(list(ws.path.rglob("*.txt"))))
                raise KeyError("the action failed")

        with pytest.raises(KeyError):
            action()
        assert seen == [600]
        assert not (tmp_path / "ws").exists()
        assert not mounted(tmp_path)
        assert cache.stats().pinned == 0
        cache.drain()
        assert leftovers(tmp_path / "cache") == []


@needs_mount
def test_an_action_that_unmounts_its_workspace(cas: LocalCAS, tmp_path: Path) -> None:
    root = ingest(cas, tmp_path / "src", BASIC)
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        with cache.workspace(root, tmp_path / "ws") as ws:
            _binding.umount(ws.path)
        assert cache.stats().pinned == 0
        cache.drain()
        assert leftovers(tmp_path / "cache") == []
    assert not (tmp_path / "ws").exists()


@needs_mount
def test_a_failing_mount_falls_back_to_hardlinks(
    cas: LocalCAS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = ingest(cas, tmp_path / "src", BASIC)

    def refuse(lower: str, upper: str, work: str, target: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)

    with DirectoryCache(cas, tmp_path / "cache") as cache:
        assert cache.can_overlay()  # probed for real first
        monkeypatch.setattr(_binding, "mount_overlay", refuse)
        with cache.workspace(root, tmp_path / "ws") as ws:
            assert ws.method == "hardlink"
            assert snapshot(ws.path) == snapshot(tmp_path / "src")
        st = cache.stats()
        assert (st.fallbacks, st.pinned) == (1, 0)
        cache.drain()
        assert leftovers(tmp_path / "cache") == []
    assert not (tmp_path / "ws").exists()


@needs_mount
def test_workspace_dest_must_not_exist(cas: LocalCAS, tmp_path: Path) -> None:
    root = ingest(cas, tmp_path / "src", BASIC)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "mine").write_bytes(b"keep")
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        with pytest.raises(FileExistsError), cache.workspace(root, tmp_path / "ws"):
            pass
        assert cache.stats().pinned == 0
        cache.drain()
        assert leftovers(tmp_path / "cache") == []
    assert (tmp_path / "ws" / "mine").read_bytes() == b"keep"
    assert not mounted(tmp_path / "ws")
    assert os.listdir(tmp_path / "ws") == ["mine"]


# What an action running as root can do to an input: mode bits do not stop it.
_ROOT_ACTION = "echo appended >> src/lib/y.h && chmod 666 src/lib/y.h && chmod 777 bin/tool"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs an action running as root")
@pytest.mark.parametrize("overlay", [True, False], ids=["overlay", "hardlink"])
def test_a_root_action_and_the_cas(cas: LocalCAS, tmp_path: Path, overlay: bool) -> None:
    """Issue 10, item 11 (what the README says): an overlay workspace keeps the CAS and
    the entry intact against an action running as root that appends to and chmods an
    input; a hardlinked one does not, which is why the CLI warns about it."""
    if overlay and mount_problem() is not None:
        pytest.skip(str(mount_problem()))
    root = ingest(cas, tmp_path / "src", BASIC)
    with DirectoryCache(cas, tmp_path / "cache", overlay=None if overlay else False) as cache:
        cache.materialize(root, tmp_path / "warm")
        entry_before = _entry_snapshot(cache, root)
        with cache.workspace(root, tmp_path / "ws") as ws:
            assert ws.method == ("overlay" if overlay else "hardlink")
            subprocess.run(["sh", "-c", _ROOT_ACTION], cwd=ws.path, check=True)
            assert (ws.path / "src/lib/y.h").read_bytes() == Y_H + b"appended\n"
        report = cas.verify()
        if overlay:
            assert report.ok
            assert _entry_snapshot(cache, root) == entry_before
            with cache.workspace(root, tmp_path / "ws2") as ws2:
                assert snapshot(ws2.path) == snapshot(tmp_path / "src")
        else:  # the action wrote through the hardlinks into the CAS
            assert {str(b.digest) for b in report.damaged} == {
                str(Digest.of(Y_H)),
                str(Digest.of(b"#!/bin/sh\necho tool\n")),
            }
