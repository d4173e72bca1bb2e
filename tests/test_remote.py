"""RemoteCAS against a real BuildGrid server (and a real gRPC proxy in front of it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fastmat import proto
from fastmat.digest import BlobNotFoundError, Digest
from fastmat.errors import RemoteError
from fastmat.remote import RemoteCAS, split_get_tree_response
from tests.reapi_server import (
    MAX_MESSAGE,
    BuildGrid,
    GrpcProxy,
    Uploader,
    build_tree,
    buildgrid,
    directory_digests,
    free_port,
)

pytestmark = pytest.mark.remote
_ = buildgrid  # the fixture, imported for pytest


@pytest.fixture
def remote(buildgrid: BuildGrid) -> Iterator[RemoteCAS]:
    with RemoteCAS(buildgrid.url, timeout_s=30) as r:
        yield r


@pytest.fixture
def uploader(buildgrid: BuildGrid) -> Iterator[Uploader]:
    up = Uploader(buildgrid.address)
    yield up
    up.close()


def blobs_of(tag: str, sizes: list[int]) -> dict[Digest, bytes]:
    out = {}
    for i, n in enumerate(sizes):
        data = (f"{tag}-{i}-".encode() * (n // 8 + 2))[:n]
        out[Digest.of(data)] = data
    return out


def test_capabilities_give_the_batch_limit(remote: RemoteCAS) -> None:
    # BuildGrid announces 4 MiB minus its own margin.
    assert 0 < remote.max_batch_bytes <= MAX_MESSAGE
    assert remote.stats.calls["GetCapabilities"] == 1
    assert remote.max_batch_bytes == remote.max_batch_bytes  # cached
    assert remote.stats.calls["GetCapabilities"] == 1
    caps = remote.capabilities()
    assert list(caps.cache_capabilities.digest_functions) == [1]  # SHA256
    assert remote.stats.calls["GetCapabilities"] == 1


def test_upload_batches_small_blobs_and_streams_large_ones(remote: RemoteCAS) -> None:
    limit = remote.max_batch_bytes
    third = limit // 3
    blobs = blobs_of("upload", [10, 1000, third, third, third, limit // 2 + 1, limit + 7])
    assert remote.find_missing(blobs) == list(blobs)  # nothing there yet
    assert remote.upload(blobs.items()) == len(blobs)
    assert remote.find_missing(blobs) == []
    # the two blobs above limit/2 were streamed; the five others did not fit one batch
    assert remote.stats.calls["Write"] == 2
    assert remote.stats.calls["BatchUpdateBlobs"] == 2
    got = dict(remote.read_blobs(list(blobs)))
    assert got == blobs


def test_capabilities_unimplemented_default_to_4_mib(buildgrid: BuildGrid) -> None:
    proxy = GrpcProxy(buildgrid.address, unimplemented=frozenset({"GetCapabilities"}))
    try:
        with RemoteCAS(proxy.url) as r:
            assert r.capabilities() is None
            assert r.max_batch_bytes == MAX_MESSAGE
    finally:
        proxy.stop()


def test_find_missing_reports_exactly_the_absent(remote: RemoteCAS, uploader: Uploader) -> None:
    present = blobs_of("fm-present", [10, 2000, 0])
    absent = blobs_of("fm-absent", [10, 300])
    uploader.upload(present)
    missing = remote.find_missing([*present, *absent, *absent])
    assert set(missing) == set(absent)


def test_find_missing_splits_huge_requests(remote: RemoteCAS) -> None:
    # 30,000 digests (~2.4 MB of request) would pass in one message, but the client
    # chunks at 10,000 so a 100k-file tree never crosses the 4 MiB server limit.
    digests = [Digest.of(f"absent-{i}".encode()) for i in range(30_000)]
    assert remote.find_missing(digests) == digests
    assert remote.stats.calls["FindMissingBlobs"] == 3


def test_read_blobs_batches_under_the_limit(remote: RemoteCAS, uploader: Uploader) -> None:
    blobs = blobs_of("batch", [700_000] * 14 + [1, 5, 0])  # ~9.8 MB: at least 3 batches
    uploader.upload(blobs)
    got = dict(remote.read_blobs(blobs))
    assert got == blobs
    batches = list(remote.batches(blobs))
    assert len(batches) >= 3
    for b in batches:
        assert sum(d.size_bytes + 100 for d in b) <= remote.max_batch_bytes
    assert remote.stats.calls["BatchReadBlobs"] == len(batches)


def test_read_stream_large_blob(remote: RemoteCAS, uploader: Uploader) -> None:
    big = blobs_of("stream", [9 * 1024 * 1024 + 17])
    uploader.upload(big)
    (d,) = big
    chunks = list(remote.read_stream(d))
    assert len(chunks) > 1
    assert b"".join(chunks) == big[d]
    # read_blobs streams what cannot fit a batch
    assert dict(remote.read_blobs([d])) == big


def test_absent_blob_is_blob_not_found(remote: RemoteCAS) -> None:
    d = Digest.of(b"never uploaded")
    with pytest.raises(BlobNotFoundError) as e:
        remote.read_batch([d])
    assert e.value.digest == d
    with pytest.raises(BlobNotFoundError):
        list(remote.read_stream(d))


def test_get_tree_returns_every_directory_verbatim(remote: RemoteCAS, uploader: Uploader) -> None:
    spec: dict[str, bytes | None] = {
        f"d{i}/sub{j}/f": f"{i}.{j}".encode() for i in range(5) for j in range(4)
    }
    spec["empty/"] = None
    spec["top"] = b"top"
    root, blobs = build_tree(spec)
    uploader.upload(blobs)
    dirs = remote.get_tree(root)
    assert dirs is not None
    # every message hashes to a Directory of the tree: the exact bytes are kept
    want = directory_digests(root, blobs)
    assert len(want) == 1 + 5 + 20 + 1  # root, d0..d4, the subs, empty
    assert {Digest.of(raw) for raw in dirs} == want
    paged = remote.get_tree(root, page_size=4)  # several pages, however the server sends them
    assert paged is not None
    assert sorted(paged) == sorted(dirs)


def test_get_tree_unimplemented_is_none(buildgrid: BuildGrid) -> None:
    proxy = GrpcProxy(buildgrid.address, unimplemented=frozenset({"GetTree"}))
    try:
        with RemoteCAS(proxy.url) as r:
            assert r.get_tree(Digest.of(b"x")) is None
    finally:
        proxy.stop()


def test_split_get_tree_response_keeps_raw_bytes() -> None:
    a = proto.Directory(files=[proto.FileNode(name="a")]).SerializeToString()
    msg = proto.GetTreeResponse(
        directories=[proto.Directory.FromString(a)],
        next_page_token="tok",  # noqa: S106 - a page token
    ).SerializeToString()
    assert split_get_tree_response(msg) == ([a], "tok")


def test_unreachable_server_is_remote_error_after_retries() -> None:
    port = free_port()  # nothing listens there
    with RemoteCAS(f"grpc://127.0.0.1:{port}", timeout_s=5, retries=2, backoff_s=0.01) as r:
        with pytest.raises(RemoteError, match=r"after 3 attempt\(s\): UNAVAILABLE"):
            r.find_missing([Digest.of(b"x")])
        assert r.stats.retries == 2
        assert r.stats.calls["FindMissingBlobs"] == 3


@pytest.mark.parametrize(
    ("target", "ok"),
    [
        ("grpc://127.0.0.1:1", True),
        ("127.0.0.1:1", True),
        ("grpcs://127.0.0.1:1", True),
        ("http://127.0.0.1:1", False),
        ("grpc://", False),
    ],
)
def test_targets(target: str, ok: bool) -> None:
    if ok:
        RemoteCAS(target).close()
    else:
        with pytest.raises(ValueError, match="target"):
            RemoteCAS(target)


def test_tls_files_need_grpcs(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"")
    with pytest.raises(ValueError, match="grpcs"):
        RemoteCAS("grpc://127.0.0.1:1", tls_ca_cert=ca)


def test_instance_name_in_resource_names() -> None:
    d = Digest.of(b"x")
    with RemoteCAS("127.0.0.1:1", "main/inst") as r:
        assert r.resource_name(d) == f"main/inst/blobs/{d.hash}/1"
    with RemoteCAS("127.0.0.1:1") as r:
        assert r.resource_name(d) == f"blobs/{d.hash}/1"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_grpcs_with_a_private_ca(buildgrid: BuildGrid, uploader: Uploader, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    blobs = blobs_of("tls", [100])
    uploader.upload(blobs)
    proxy = GrpcProxy(buildgrid.address, tls=(key.read_bytes(), cert.read_bytes()))
    try:
        with RemoteCAS(proxy.url, tls_ca_cert=cert, timeout_s=10) as r:
            assert dict(r.read_blobs(blobs)) == blobs
        with (
            RemoteCAS(proxy.url, timeout_s=3, retries=0) as r,  # system CAs: refused
            pytest.raises(RemoteError, match="UNAVAILABLE"),
        ):
            r.find_missing(blobs)
    finally:
        proxy.stop()
    assert os.path.exists(cert)


def test_retries_unavailable_and_resource_exhausted(
    buildgrid: BuildGrid, uploader: Uploader
) -> None:
    blobs = blobs_of("retry", [100, 200])
    uploader.upload(blobs)
    proxy = GrpcProxy(buildgrid.address)
    try:
        with RemoteCAS(proxy.url, retries=3, backoff_s=0.01) as r:
            assert r.max_batch_bytes > 0
            proxy.fail_next = [
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.UNAVAILABLE,
            ]
            assert dict(r.read_blobs(blobs)) == blobs
            assert r.stats.retries == 2
            assert proxy.calls["BatchReadBlobs"] == 3
            (d,) = blobs_of("retry-stream", [300])
            proxy.fail_next = [grpc.StatusCode.UNAVAILABLE]
            with pytest.raises(BlobNotFoundError):  # retried, then the real answer
                list(r.read_stream(d))
            assert r.stats.retries == 3
            proxy.fail_next = [grpc.StatusCode.INTERNAL]  # not retryable
            with pytest.raises(RemoteError, match="INTERNAL"):
                r.find_missing(blobs)
            assert r.stats.retries == 3
    finally:
        proxy.stop()


def test_broken_stream_resumes_at_its_offset(buildgrid: BuildGrid, uploader: Uploader) -> None:
    big = blobs_of("resume", [5 * 1024 * 1024 + 3])
    uploader.upload(big)
    (d,) = big
    proxy = GrpcProxy(buildgrid.address)
    try:
        with RemoteCAS(proxy.url, backoff_s=0.01) as r:
            proxy.break_streams = 1
            assert b"".join(r.read_stream(d)) == big[d]
            assert r.stats.retries == 1
            assert proxy.read_offsets[0] == 0
            assert 0 < proxy.read_offsets[1] < d.size_bytes  # resumed, not restarted
    finally:
        proxy.stop()
