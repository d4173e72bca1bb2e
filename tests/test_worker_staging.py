"""The worker's staging (fastmat/worker/staging.py) on its own: what a lease's cancel
token does to it. Every blob is local, so the remote (nothing listens there) is never
contacted."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import fastmat
from fastmat.worker.staging import FastmatStager


@pytest.mark.parametrize("cache", [False, True], ids=["materialize", "cache"])
def test_a_cancelled_lease_stops_staging_and_leaves_nothing(tmp_path: Path, cache: bool) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(50):
        (src / "d" / f"f{i}").write_bytes(b"x" * i)
    with fastmat.LocalCAS(tmp_path / "cas", fsync=False) as cas:
        root = fastmat.ingest_tree(cas, src)
        remote = fastmat.RemoteCAS("grpc://127.0.0.1:1")
        stager = FastmatStager(
            cas, remote, cache_dir=tmp_path / "cache" if cache else None, overlay=False
        )
        try:
            stop = threading.Event()
            stop.set()
            with pytest.raises(fastmat.Cancelled), stager.stage(root, tmp_path / "a", stop):
                pytest.fail("staged although cancelled")
            assert not (tmp_path / "a").exists()
            with stager.stage(root, tmp_path / "b", threading.Event()) as staged:
                assert (staged.path / "d" / "f49").read_bytes() == b"x" * 49
            assert not (tmp_path / "b").exists()
        finally:
            stager.close()
            remote.close()
