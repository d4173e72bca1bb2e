"""A configured remote that is down breaks nothing that needs nothing from it (issue 12,
item 1): the server is contacted only when something is missing, through the API and
the command, with and without a directory cache. No server runs here: the target is a
closed port, so any call would fail (after its retries) with ``RemoteError``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat import Digest, DirectoryCache, LocalCAS, RemoteError, materialize
from fastmat.cli import main
from fastmat.remote import RemoteCAS, RemoteFetcher
from fastmat.tree import ingest_tree
from tests.reapi_server import free_port


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", fsync=False) as c:
        yield c


@pytest.fixture
def down() -> Iterator[RemoteCAS]:
    """A client of a server that is not there (one attempt per call: fails fast)."""
    with RemoteCAS(f"grpc://127.0.0.1:{free_port()}", retries=0, timeout_s=5) as r:
        yield r


def make_tree(cas: LocalCAS, base: Path) -> Digest:
    src = base / "src"
    (src / "lib").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha\n")
    (src / "lib" / "b.bin").write_bytes(os.urandom(10_000))
    (src / "empty").write_bytes(b"")
    tool = src / "tool.sh"
    tool.write_bytes(b"#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    (src / "link").symlink_to("a.txt")
    return ingest_tree(cas, src)


def test_materialize_with_every_blob_local_calls_nobody(
    cas: LocalCAS, down: RemoteCAS, tmp_path: Path
) -> None:
    root = make_tree(cas, tmp_path)
    st = materialize(cas, root, tmp_path / "d1", fetcher=down)  # a FetcherSource
    assert st.files == 4
    with RemoteFetcher(down, cas) as f:  # a PipelinedFetcher
        materialize(cas, root, tmp_path / "d2", fetcher=f)
    assert (tmp_path / "d2" / "lib" / "b.bin").read_bytes() == (
        tmp_path / "src" / "lib" / "b.bin"
    ).read_bytes()
    assert down.stats.calls == {}


def test_a_cache_miss_and_hit_with_every_blob_local_call_nobody(
    cas: LocalCAS, down: RemoteCAS, tmp_path: Path
) -> None:
    root = make_tree(cas, tmp_path)
    with (
        RemoteFetcher(down, cas) as f,
        DirectoryCache(cas, tmp_path / "cache", fetcher=f, fsync=False) as cache,
    ):
        assert not cache.materialize(root, tmp_path / "d1").hit
        assert cache.materialize(root, tmp_path / "d2").hit
    assert down.stats.calls == {}


def test_asking_for_nothing_asks_nothing(cas: LocalCAS, down: RemoteCAS, tmp_path: Path) -> None:
    root = make_tree(cas, tmp_path)
    with RemoteFetcher(down, cas) as f:
        f.fetch_blobs([])
        f.fetch_blobs([Digest.of(b"")])  # the empty blob is never fetched
        f.fetch_directories(root)  # every Directory is local
    assert list(down.read_blobs([])) == []
    assert down.find_missing([]) == []
    assert down.upload([]) == 0
    assert down.stats.calls == {}


def test_something_missing_does_ask_and_says_which_server(
    cas: LocalCAS, down: RemoteCAS, tmp_path: Path
) -> None:
    absent = Digest.of(b"not here")
    with RemoteFetcher(down, cas) as f, pytest.raises(RemoteError, match=down.target):
        f.fetch_blobs([absent])
    assert down.stats.calls  # it did try


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cache"])
def test_the_command_with_a_down_remote_and_every_blob_local(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cached: bool
) -> None:
    with LocalCAS(tmp_path / "cas") as c:
        root = make_tree(c, tmp_path)
    url = f"grpc://127.0.0.1:{free_port()}"
    extra = ["--cache", str(tmp_path / "cache")] if cached else []
    for dest in ("d1", "d2"):  # with a cache: a miss, then a hit
        rc = main(
            ["materialize", str(root), str(tmp_path / dest), "--cas", str(tmp_path / "cas"),
             "--remote", url, *extra]
        )  # fmt: skip
        _, err = capsys.readouterr()
        assert rc == 0, err
        assert (tmp_path / dest / "a.txt").read_bytes() == b"alpha\n"
