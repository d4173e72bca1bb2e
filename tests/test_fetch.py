"""The fetch -> link pipeline against a real BuildGrid, through real gRPC / TCP proxies."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastmat import proto
from fastmat.cas import LocalCAS
from fastmat.digest import BlobNotFoundError, Digest, DigestMismatchError
from fastmat.errors import RemoteError
from fastmat.materialize import materialize
from fastmat.remote import RemoteCAS, RemoteFetcher
from tests.reapi_server import (
    BuildGrid,
    GrpcProxy,
    LatencyProxy,
    Uploader,
    build_tree,
    buildgrid,
    directory_digests,
    free_port,
)

pytestmark = pytest.mark.remote
_ = buildgrid  # the fixture, imported for pytest
REPO = Path(__file__).resolve().parent.parent


def content(tag: str, i: int, n: int) -> bytes:
    return (f"{tag}:{i}:".encode() * (n // 6 + 2))[:n]


def make_spec(tag: str, n_small: int = 40, n_large: int = 3) -> dict[str, Any]:
    """Files of several sizes (duplicates, executables, empties), symlinks, empty dirs."""
    spec: dict[str, Any] = {}
    for i in range(n_small):
        spec[f"src/m{i % 5}/f{i}.swift"] = content(tag, i, 500 + 97 * i)
    for i in range(n_large):
        spec[f"big/blob{i}.bin"] = content(tag + "big", i, 2 * 1024 * 1024 + i)
    spec["dup/a"] = content(tag, 1, 597)  # same bytes as src/m1/f1.swift
    spec["dup/b"] = content(tag, 1, 597)
    spec["bin/tool"] = ("exec", b"#!/bin/sh\necho " + tag.encode() + b"\n")
    spec["bin/tool2"] = ("exec", content(tag, 2, 694))  # same bytes as f2: plain + exec
    spec["empty_file"] = b""
    spec["link"] = ("symlink", "src/m0/f0.swift")
    spec["dangling"] = ("symlink", "../nowhere")
    spec["empty_dir/"] = None
    return spec


def check_tree(dest: Path, spec: dict[str, Any]) -> None:
    for path, value in spec.items():
        p = dest / path
        if path.endswith("/"):
            assert p.is_dir()
            assert stat.S_IMODE(p.stat().st_mode) == 0o755
        elif isinstance(value, tuple) and value[0] == "symlink":
            assert os.readlink(p) == value[1]
        else:
            data = value[1] if isinstance(value, tuple) else value
            assert p.read_bytes() == data, path
            mode = stat.S_IMODE(p.lstat().st_mode)
            assert mode == (0o555 if isinstance(value, tuple) else 0o444), path


@pytest.fixture
def uploader(buildgrid: BuildGrid) -> Iterator[Uploader]:
    up = Uploader(buildgrid.address)
    yield up
    up.close()


@pytest.fixture
def proxy(buildgrid: BuildGrid) -> Iterator[GrpcProxy]:
    p = GrpcProxy(buildgrid.address)
    yield p
    p.stop()


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", fsync=False) as c:
        yield c


def test_materialize_from_empty_cas(
    uploader: Uploader, proxy: GrpcProxy, cas: LocalCAS, tmp_path: Path
) -> None:
    spec = make_spec("empty-cas")
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    dest = tmp_path / "out"
    with RemoteCAS(proxy.url) as remote, RemoteFetcher(remote, cas) as f:
        res = materialize(cas, root, dest, fetcher=f)
        n_files = sum(1 for v in spec.values() if isinstance(v, bytes) or (v and v[0] == "exec"))
        assert res.files == n_files
        check_tree(dest, spec)
        # every blob fetched once (deduplicated), directories through one GetTree
        assert proxy.calls["GetTree"] == 1
        assert max(proxy.fetches.values()) == 1
        files = {d for d in blobs if d not in directory_digests(root, blobs) and d.size_bytes}
        assert set(proxy.fetches) == files
        assert f.stats.streams == 3  # the 2 MiB blobs; the rest batched
        assert f.stats.batches >= 1
        dirs = {d for d in directory_digests(root, blobs) if d.size_bytes}
        assert f.stats.directories == len(dirs)  # the empty Directory is never stored
        # the link of a fetched file shares the CAS inode
        d = Digest.of(spec["big/blob0.bin"])
        assert (dest / "big/blob0.bin").stat().st_ino == cas.path(d).stat().st_ino
        assert f.locks.open_fds == 0  # worker threads closed their lock fds
        # second run: everything local, nothing fetched
        before = sum(proxy.calls.values())
        materialize(cas, root, tmp_path / "again", fetcher=f)
        check_tree(tmp_path / "again", spec)
        assert sum(proxy.calls.values()) == before


def test_in_flight_bound_is_respected(buildgrid: BuildGrid, uploader: Uploader, cas: LocalCAS,
                                      tmp_path: Path) -> None:  # fmt: skip
    spec = {f"d{i % 7}/f{i}": content("bound", i, 100 + i) for i in range(60)}
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    slow = GrpcProxy(buildgrid.address, delay_s=0.05)  # keeps requests overlapping
    try:
        with (
            RemoteCAS(slow.url) as remote,
            RemoteFetcher(remote, cas, max_inflight=5, stream_threshold_bytes=1) as f,
        ):  # every blob its own ByteStream.Read: 60 requests for 5 slots
            materialize(cas, root, tmp_path / "out", fetcher=f)
            assert slow.calls["Read"] == 60
            assert 1 < slow.peak_inflight <= 5  # counted by the server side
            assert f.stats.peak_inflight <= 5
            assert remote.stats.peak_inflight <= 5
    finally:
        slow.stop()
    check_tree(tmp_path / "out", spec)


def test_default_bound_is_128(buildgrid: BuildGrid, uploader: Uploader, cas: LocalCAS,
                              tmp_path: Path) -> None:  # fmt: skip
    spec = {f"d{i % 13}/f{i}": content("bound128", i, 64 + i) for i in range(300)}
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    slow = GrpcProxy(buildgrid.address, delay_s=0.2)
    try:
        with (
            RemoteCAS(slow.url) as remote,
            RemoteFetcher(remote, cas, stream_threshold_bytes=1) as f,
        ):
            assert f.max_inflight == 128
            materialize(cas, root, tmp_path / "out", fetcher=f)
            assert slow.calls["Read"] == 300
            assert 1 < slow.peak_inflight <= 128
    finally:
        slow.stop()
    check_tree(tmp_path / "out", spec)


def test_directories_level_by_level_without_get_tree(
    buildgrid: BuildGrid, uploader: Uploader, cas: LocalCAS, tmp_path: Path
) -> None:
    spec = make_spec("no-gettree", n_small=12, n_large=1)
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    p = GrpcProxy(buildgrid.address, unimplemented=frozenset({"GetTree"}))
    try:
        with RemoteCAS(p.url) as remote, RemoteFetcher(remote, cas) as f:
            materialize(cas, root, tmp_path / "out", fetcher=f)
            assert p.calls["GetTree"] == 1  # tried once, UNIMPLEMENTED
            assert f.stats.get_tree == 0
            dirs = {d for d in directory_digests(root, blobs) if d.size_bytes}
            assert f.stats.directories == len(dirs)
    finally:
        p.stop()
    check_tree(tmp_path / "out", spec)


def test_absent_blob_names_digest_and_path(
    uploader: Uploader, proxy: GrpcProxy, cas: LocalCAS, tmp_path: Path
) -> None:
    spec = make_spec("absent", n_small=10, n_large=1)
    spec["src/m3/gone.swift"] = b"this blob is not on the server"
    root, blobs = build_tree(spec)
    gone = Digest.of(spec["src/m3/gone.swift"])
    uploader.upload({d: b for d, b in blobs.items() if d != gone})
    dest = tmp_path / "out"
    with (
        RemoteCAS(proxy.url) as remote,
        RemoteFetcher(remote, cas) as f,
        pytest.raises(BlobNotFoundError) as e,
    ):
        materialize(cas, root, dest, fetcher=f)
    assert e.value.digest == gone
    assert e.value.path == "src/m3/gone.swift"
    assert str(gone) in str(e.value)
    assert not os.path.lexists(dest)
    assert gone not in cas


@pytest.mark.parametrize("streamed", [False, True])
def test_wrong_bytes_never_enter_the_cas(
    uploader: Uploader, proxy: GrpcProxy, cas: LocalCAS, tmp_path: Path, streamed: bool
) -> None:
    spec = make_spec(f"tamper{streamed}", n_small=10, n_large=1)
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    victim = Digest.of(spec["big/blob0.bin" if streamed else "src/m2/f7.swift"])
    proxy.tamper.add(victim)
    dest = tmp_path / "out"
    with (
        RemoteCAS(proxy.url) as remote,
        RemoteFetcher(remote, cas) as f,
        pytest.raises(DigestMismatchError) as e,
    ):
        materialize(cas, root, dest, fetcher=f)
    assert e.value.expected == victim
    assert e.value.actual != victim
    assert ("big/blob0.bin" if streamed else "src/m2/f7.swift") in str(e.value)
    assert victim not in cas
    assert not os.path.lexists(dest)
    left = [p.name for p in cas.tmp_dir.iterdir() if p.name != "owner.lock"]
    assert left == []  # no half-written temp left
    assert cas.verify().ok


def test_tampered_directory_is_refused(
    buildgrid: BuildGrid, uploader: Uploader, cas: LocalCAS, tmp_path: Path
) -> None:
    spec = make_spec("tamper-dir", n_small=6, n_large=0)
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    sub = next(d for d in directory_digests(root, blobs) if d != root and d.size_bytes)
    p = GrpcProxy(buildgrid.address, unimplemented=frozenset({"GetTree"}))
    p.tamper.add(sub)
    try:
        with (
            RemoteCAS(p.url) as remote,
            RemoteFetcher(remote, cas) as f,
            pytest.raises(DigestMismatchError) as e,
        ):
            materialize(cas, root, tmp_path / "out", fetcher=f)
    finally:
        p.stop()
    assert e.value.expected == sub
    assert sub not in cas
    assert not os.path.lexists(tmp_path / "out")


def test_unreachable_server(cas: LocalCAS, tmp_path: Path) -> None:
    url = f"grpc://127.0.0.1:{free_port()}"
    with (
        RemoteCAS(url, retries=2, backoff_s=0.01) as remote,
        RemoteFetcher(remote, cas) as f,
        pytest.raises(RemoteError, match="UNAVAILABLE"),
    ):
        materialize(cas, Digest.of(b"root"), tmp_path / "out", fetcher=f)
    assert not os.path.lexists(tmp_path / "out")


def test_server_dies_mid_fetch(buildgrid: BuildGrid, tmp_path: Path, cas: LocalCAS) -> None:
    server = BuildGrid(tmp_path / "bgd")  # a server of its own (the fixture: skip if absent)
    server.start()
    up = Uploader(server.address)
    spec = make_spec("dies", n_small=30, n_large=2)
    root, blobs = build_tree(spec)
    up.upload(blobs)
    up.close()
    proxy = GrpcProxy(server.address, delay_s=0.3)
    dest = tmp_path / "out"
    try:
        with (
            RemoteCAS(proxy.url, retries=1, backoff_s=0.01, timeout_s=10) as remote,
            RemoteFetcher(remote, cas, max_inflight=2, batch_bytes=4096) as f,
        ):
            f.fetch_directories(root)  # also learns the batch limit
            server.stop()
            with pytest.raises(RemoteError):
                materialize(cas, root, dest, fetcher=f)
    finally:
        proxy.stop()
        server.stop()
    assert not os.path.lexists(dest)


def test_fetch_and_link_overlap(
    buildgrid: BuildGrid, uploader: Uploader, cas: LocalCAS, tmp_path: Path
) -> None:
    spec = {f"m{i % 4}/f{i}": content("overlap", i, 3000 + i) for i in range(40)}
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    lag = LatencyProxy(buildgrid.port, delay_s=0.02)
    try:
        with (
            RemoteCAS(lag.url) as remote,
            RemoteFetcher(
                remote, cas, max_inflight=2, batch_bytes=8192, stream_threshold_bytes=8192
            ) as f,
        ):
            materialize(cas, root, tmp_path / "out", fetcher=f)
            # the first fetched group was linked before the last fetch completed
            assert f.stats.batches >= 10
            assert f.stats.link_calls >= 2
            assert 0 < f.stats.first_link_ns < f.stats.last_fetch_ns
    finally:
        lag.stop()
    check_tree(tmp_path / "out", spec)


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fastmat.cas import LocalCAS
    from fastmat.digest import Digest
    from fastmat.materialize import materialize
    from fastmat.remote import RemoteCAS, RemoteFetcher
    url, cas_dir, root, dest, go = sys.argv[1:]
    with LocalCAS(cas_dir, fsync=False) as cas, RemoteCAS(url) as remote:
        with RemoteFetcher(remote, cas, max_inflight=4) as f:
            f.fetch_directories(Digest.parse(root))
            print("ready", flush=True)
            while not Path(go).exists():
                time.sleep(0.005)
            materialize(cas, Digest.parse(root), dest, fetcher=f)
            print(f.stats.blobs, f.stats.waited, flush=True)
    """
)


def test_two_processes_fetch_each_blob_once(
    buildgrid: BuildGrid, uploader: Uploader, tmp_path: Path
) -> None:
    spec = make_spec("two-procs", n_small=60, n_large=4)
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    slow = GrpcProxy(buildgrid.address, delay_s=0.1)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = [sys.executable, "-c", _CHILD, slow.url, str(tmp_path / "cas"), str(root)]
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(2):
            procs.append(
                subprocess.Popen(
                    [*child, str(tmp_path / f"out{i}"), str(go)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    text=True,
                )
            )
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready", p.communicate()[1]
        slow.fetches.clear()
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
        outs = [out.split() for out, _ in results]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
        slow.stop()
    files = {d for d in blobs if d not in directory_digests(root, blobs) and d.size_bytes}
    assert set(slow.fetches) == files
    assert max(slow.fetches.values()) == 1  # never twice, across both processes
    fetched = [int(o[0]) for o in outs]
    waited = [int(o[1]) for o in outs]
    assert sum(fetched) == len(files)
    # blobs one process did not fetch it waited for or found present
    assert all(w <= len(files) for w in waited)
    for i in range(2):
        check_tree(tmp_path / f"out{i}", spec)


_LOCK_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from fastmat.digest import Digest
    from fastmat.remote.flight import FetchLocks
    locks = FetchLocks(Path(sys.argv[1]))
    locks._ofd = sys.argv[2] == "1"
    d = Digest.parse(sys.argv[3])
    token = locks.try_lock(d)
    print("held" if token is None else "free")
    if token is not None:
        locks.unlock(d, token)
    """
)


@pytest.mark.parametrize("ofd", [True, False], ids=["ofd", "flock-files"])
def test_fetch_locks_exclude_threads_and_processes(cas: LocalCAS, ofd: bool) -> None:
    from fastmat.remote.flight import FetchLocks

    locks = FetchLocks(cas.root / "locks")
    locks._ofd = ofd and locks._ofd
    d, other = Digest.of(b"a"), Digest.of(b"b")
    token = locks.try_lock(d)
    assert token is not None
    results: list[int | None] = []
    t = threading.Thread(target=lambda: results.append(locks.try_lock(d)))
    t.start()
    t.join()
    assert results == [None]  # another thread of this process
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def child(x: Digest) -> str:
        argv = [sys.executable, "-c", _LOCK_CHILD, str(cas.root / "locks"), str(int(ofd)), str(x)]
        return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout

    assert child(d).strip() == "held"  # another process
    assert child(other).strip() == "free"  # other digests are not blocked
    locks.unlock(d, token)
    assert child(d).strip() == "free"
    if not ofd:
        assert not any((cas.root / "locks").glob("*.fetch"))  # lock files never pile up
    locks.close()


def test_link_failure_cancels_fetches_and_removes_dest(
    uploader: Uploader, proxy: GrpcProxy, cas: LocalCAS, tmp_path: Path
) -> None:
    from fastmat import _binding

    spec = make_spec("link-fails", n_small=20, n_large=1)
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    dest = tmp_path / "out"
    with (
        RemoteCAS(proxy.url) as remote,
        RemoteFetcher(remote, cas) as f,
        _binding.injected("link", errno.ENOSPC),
        pytest.raises(OSError, match="materializing") as e,
    ):
        materialize(cas, root, dest, fetcher=f)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value.filename).startswith(str(dest) + "/")
    assert not os.path.lexists(dest)
    assert cas.verify().ok  # what was fetched is intact


def test_a_remote_cas_makes_a_pipelined_fetcher(cas: LocalCAS) -> None:
    from fastmat.materialize import FetcherSource, PipelinedFetcher

    with RemoteCAS("127.0.0.1:1") as remote:
        assert isinstance(remote, FetcherSource)
        f = remote.fetcher(cas)
        assert isinstance(f, RemoteFetcher)
        assert isinstance(f, PipelinedFetcher)
        assert not isinstance(f, FetcherSource)  # materialize uses it as it is
        assert f.remote is remote
        assert f.cas is cas
        f.close()


@pytest.mark.parametrize("get_tree", [True, False], ids=["get-tree", "level-by-level"])
def test_absent_directory_names_its_path(
    buildgrid: BuildGrid, uploader: Uploader, cas: LocalCAS, tmp_path: Path, get_tree: bool
) -> None:
    spec = {"a/keep/f": b"kept", "b/lost/g": b"lost dir's file", "top": b"t"}
    root, blobs = build_tree(spec)
    lost = next(
        d
        for d in directory_digests(root, blobs)
        if [f.name for f in proto.Directory.FromString(blobs[d]).files] == ["g"]
    )
    uploader.upload({d: b for d, b in blobs.items() if d != lost})
    off = frozenset() if get_tree else frozenset({"GetTree"})
    p = GrpcProxy(buildgrid.address, unimplemented=off)
    try:
        with (
            RemoteCAS(p.url) as remote,
            RemoteFetcher(remote, cas) as f,
            pytest.raises(BlobNotFoundError) as e,
        ):
            materialize(cas, root, tmp_path / "out", fetcher=f)
    finally:
        p.stop()
    assert e.value.digest == lost
    assert e.value.path == "b/lost"
    assert not os.path.lexists(tmp_path / "out")


def test_materialize_with_a_remote(
    uploader: Uploader, proxy: GrpcProxy, cas: LocalCAS, tmp_path: Path
) -> None:
    """``materialize(..., fetcher=RemoteCAS | RemoteFetcher)`` runs the pipeline; the
    bare ``tree.Fetcher`` protocol (``fetch_blobs`` then link) still works too."""
    from fastmat.materialize import check_blobs, materialize, run_plan
    from fastmat.tree import load_plan

    spec = make_spec("protocol", n_small=15, n_large=1)
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    n_files = sum(1 for k, v in spec.items() if not k.endswith("/")) - 2  # minus symlinks
    with RemoteCAS(proxy.url) as remote:
        stats = materialize(cas, root, tmp_path / "a", fetcher=remote)
        check_tree(tmp_path / "a", spec)
        assert stats.files == n_files
        assert max(proxy.fetches.values()) == 1
        with LocalCAS(tmp_path / "cas2", fsync=False) as cas2, RemoteFetcher(remote, cas2) as f:
            stats = materialize(cas2, root, tmp_path / "b", fetcher=f)
            assert f.stats.link_calls >= 1  # pipelined
            check_tree(tmp_path / "b", spec)
        with LocalCAS(tmp_path / "cas3", fsync=False) as cas3, RemoteFetcher(remote, cas3) as f:
            plan = load_plan(cas3, root, fetcher=f)
            check_blobs(cas3, plan, f)  # fetch_blobs, all of them, then link
            run_plan(cas3, plan, tmp_path / "c")
            check_tree(tmp_path / "c", spec)
    assert max(proxy.fetches.values()) == 3  # once per CAS


def test_bound_holds_across_concurrent_calls(
    buildgrid: BuildGrid, uploader: Uploader, cas: LocalCAS
) -> None:
    trees = [
        build_tree({f"f{i}": content(f"conc{t}", i, 200 + i) for i in range(20)}) for t in range(3)
    ]
    for _, blobs in trees:
        uploader.upload(blobs)
    slow = GrpcProxy(buildgrid.address, delay_s=0.05)
    try:
        with (
            RemoteCAS(slow.url) as remote,
            RemoteFetcher(remote, cas, max_inflight=3, stream_threshold_bytes=1) as f,
        ):
            calls = [
                threading.Thread(
                    target=f.fetch_blobs,
                    args=([d for d in blobs if d not in directory_digests(root, blobs)],),
                )
                for root, blobs in trees
            ]
            for t in calls:
                t.start()
            for t in calls:
                t.join()
            info = (dict(slow.calls), slow.peak_inflight, remote.stats, f.stats)
            assert slow.calls["Read"] == 60 + remote.stats.retries, info
            assert slow.calls["GetCapabilities"] == 1, info  # asked once, by one thread
            # one bound per fetcher, not per call: 3 requests hold a slot at a time; the
            # proxy may still count one stream whose client already let its slot go
            assert 1 < f.stats.peak_inflight <= 3, info
            assert slow.peak_inflight <= 4, info
    finally:
        slow.stop()
    for root, blobs in trees:
        assert not cas.missing(d for d in blobs if d not in directory_digests(root, blobs))


def test_named_instance(buildgrid: BuildGrid, tmp_path: Path, cas: LocalCAS) -> None:
    """Every call carries the instance name (ByteStream: ``{instance}/blobs/...``)."""
    server = BuildGrid(tmp_path / "bgd", instance="ci/fastmat")
    server.start()
    try:
        spec = make_spec("instance", n_small=8, n_large=2)
        root, blobs = build_tree(spec)
        up = Uploader(server.address, instance="ci/fastmat")
        up.upload(blobs)
        up.close()
        with (
            RemoteCAS(server.url, "ci/fastmat") as remote,
            RemoteFetcher(remote, cas) as f,
        ):
            assert remote.find_missing(blobs) == []
            materialize(cas, root, tmp_path / "out", fetcher=f)
            assert f.stats.streams == 2
            assert f.stats.get_tree == 1
        with RemoteCAS(server.url, "other") as wrong, pytest.raises(RemoteError):
            wrong.find_missing(blobs)  # an unknown instance is an error, not "all missing"
    finally:
        server.stop()
    check_tree(tmp_path / "out", spec)


def test_remote_fetcher_is_a_pipelined_fetcher_for_mypy(cas: LocalCAS) -> None:
    """A static check as much as a runtime one: mypy verifies the assignment."""
    from fastmat.materialize import PipelinedFetcher

    with RemoteCAS("127.0.0.1:1") as remote, RemoteFetcher(remote, cas) as f:
        as_protocol: PipelinedFetcher = f
        assert isinstance(as_protocol, PipelinedFetcher)
