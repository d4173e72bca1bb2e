"""A cache never serves bytes verify found bad, and verifies its own entries
(fastmat.cache.verify, issue 10, item 9)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat import proto
from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.cli import main
from fastmat.digest import BlobNotFoundError, Digest
from tests.cache_helpers import Spec, ingest, shape, snapshot, write_tree
from tests.helpers import mount_problem

GOOD = b"the one good copy of this header\n" * 20
BAD = b"THE ONE GOOD COPY OF THIS HEADER\n" * 20  # same size


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas") as c:
        yield c


def rewrite_in_place(path: Path, data: bytes) -> None:
    """What a root action writing through a hardlink does to the shared inode; size and
    mtime kept, so the cache's sampled lstat check at a hit cannot tell."""
    st = path.stat()
    path.chmod(0o644)
    path.write_bytes(data)
    path.chmod(st.st_mode & 0o777)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def tree(cas: LocalCAS, tmp_path: Path) -> tuple[Digest, Path]:
    spec = {**shape(40, 7), "inc/shared.h": GOOD}
    return ingest(cas, tmp_path / "src", spec), tmp_path / "src"


@pytest.mark.parametrize("reopen", [False, True], ids=["same-instance", "reopened"])
@pytest.mark.parametrize("blob", ["gone", "back"])
def test_a_hit_never_serves_a_blob_the_cas_verify_quarantined(
    cas: LocalCAS, tmp_path: Path, reopen: bool, blob: str
) -> None:
    root, src = tree(cas, tmp_path)
    cache = DirectoryCache(cas, tmp_path / "cache")
    try:
        cache.materialize(root, tmp_path / "d1")
        rewrite_in_place(cas.path(Digest.of(GOOD)), BAD)  # the entry links this inode
        report = cas.verify()  # only the CAS is verified
        assert [b.digest for b in report.damaged] == [Digest.of(GOOD)]
        if reopen:
            cache.close()
            cache = DirectoryCache(cas, tmp_path / "cache")
        if blob == "gone":
            with pytest.raises(BlobNotFoundError, match=Digest.of(GOOD).hash):
                cache.materialize(root, tmp_path / "d2")
            assert not (tmp_path / "d2").exists()
            cas.put(GOOD)  # fetched again, say
        else:
            cas.put(GOOD)
        res = cache.materialize(root, tmp_path / "d3")
        assert (res.hit, res.rebuilt) == (False, blob == "back")
        assert (tmp_path / "d3" / "inc" / "shared.h").read_bytes() == GOOD
        assert snapshot(tmp_path / "d3") == snapshot(src)
        assert cache.materialize(root, tmp_path / "d4").hit  # the rebuilt entry is served
        assert (tmp_path / "d4" / "inc" / "shared.h").read_bytes() == GOOD
    finally:
        cache.close()


def test_an_unrelated_quarantined_blob_invalidates_nothing(cas: LocalCAS, tmp_path: Path) -> None:
    root, _ = tree(cas, tmp_path)
    ingest(cas, tmp_path / "other", {"x": b"not in the cached tree\n"})
    write_tree(tmp_path / "keep", {})
    os.link(cas.path(Digest.of(b"not in the cached tree\n")), tmp_path / "keep" / "x")
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
        x = cas.path(Digest.of(b"not in the cached tree\n"))
        rewrite_in_place(x, b"NOT IN THE CACHED TREE\n")
        assert not cas.verify().ok  # quarantined; still linked (keep/x): the entry is checked
        assert cache.materialize(root, tmp_path / "d2").hit
        assert cache.materialize(root, tmp_path / "d3").hit
        assert cache.stats().damaged == 0


def nodeprops_tree(cas: LocalCAS) -> tuple[Digest, Digest]:
    """A plain file, an empty file and a NodeProperties copy (private inodes)."""
    blob = cas.put(b"props\n")
    plain = cas.put(GOOD)
    msg = proto.Directory()
    for name, d in (("e", Digest.of(b"")), ("p.txt", blob), ("plain.h", plain)):
        f = msg.files.add(name=name)
        f.digest.hash, f.digest.size_bytes = d.hash, d.size_bytes
        if name == "p.txt":
            f.node_properties.mtime.seconds = 1_000_000
    return cas.put(msg.SerializeToString(deterministic=True)), blob


def test_verify_checks_private_inodes_and_invalidates_damage(cas: LocalCAS, tmp_path: Path) -> None:
    root, _ = nodeprops_tree(cas)
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
        clean = cache.verify()
        assert clean.ok
        assert (clean.entries_checked, clean.files_checked, clean.files_hashed) == (1, 3, 2)
        entry = cache.entry_path(root)
        assert entry is not None
        rewrite_in_place(entry / "p.txt", b"PROPS\n")  # a private inode: no CAS verify sees it
        report = cache.verify()
        assert report.cas.ok
        assert not report.ok
        assert [(k, why.split(":")[0]) for k, why in report.invalidated] == [(root.key, "p.txt")]
        assert not (tmp_path / "cache" / "entries" / root.key).exists()
        res = cache.materialize(root, tmp_path / "d2")
        assert not res.hit
        assert (tmp_path / "d2" / "p.txt").read_bytes() == b"props\n"
        assert cache.verify().ok


def test_verify_hashes_entries_copied_across_filesystems(
    cas: LocalCAS, tmp_path: Path, tmpfs_dir: Path
) -> None:
    root, _ = tree(cas, tmp_path)
    with DirectoryCache(cas, tmpfs_dir / "cache") as cache:  # entries: copies (EXDEV)
        cache.materialize(root, tmpfs_dir / "d1")
        entry = cache.entry_path(root)
        assert entry is not None
        assert cache.verify().files_hashed == 41
        rewrite_in_place(entry / "inc" / "shared.h", BAD)
        report = cache.verify()
        assert [k for k, _ in report.invalidated] == [root.key]
        assert "does not hash" in report.invalidated[0][1]
        cache.materialize(root, tmpfs_dir / "d2")
        assert (tmpfs_dir / "d2" / "inc" / "shared.h").read_bytes() == GOOD


def test_verify_invalidates_entries_linking_quarantined_blobs(
    cas: LocalCAS, tmp_path: Path
) -> None:
    root, _ = tree(cas, tmp_path)
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
        rewrite_in_place(cas.path(Digest.of(GOOD)), BAD)
        report = cache.verify()
        assert [b.digest for b in report.cas.damaged] == [Digest.of(GOOD)]
        assert report.invalidated == [(root.key, "inc/shared.h: links a blob verify quarantined")]
        assert cache.stats().entries == 0
        with pytest.raises(BlobNotFoundError):
            cache.materialize(root, tmp_path / "d2")


@pytest.mark.skipif(mount_problem() is not None, reason=str(mount_problem()))
def test_a_bad_entry_in_use_is_reported_busy(cas: LocalCAS, tmp_path: Path) -> None:
    root, _ = nodeprops_tree(cas)
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        with cache.workspace(root, tmp_path / "ws") as ws:  # the overlay pins the entry
            assert ws.method == "overlay"
            entry = cache.entry_path(root)
            assert entry is not None
            rewrite_in_place(entry / "p.txt", b"PROPS\n")
            report = cache.verify()
            assert [k for k, _ in report.busy] == [root.key]
            assert report.invalidated == []
            assert not report.ok
        assert [k for k, _ in cache.verify().invalidated] == [root.key]


def test_cli_verify_with_a_cache(
    cas: LocalCAS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = tree(cas, tmp_path)
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
    rewrite_in_place(cas.path(Digest.of(GOOD)), BAD)
    argv = ["verify", "--cas", str(cas.root), "--cache", str(tmp_path / "cache")]
    assert main([*argv, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert [d["digest"] for d in out["damaged"]] == [str(Digest.of(GOOD))]
    assert [e["key"] for e in out["cache"]["invalidated"]] == [root.key]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "checked 0 cache entries" in text  # the entry is gone: nothing left
    assert text.rstrip().endswith("OK")


def test_verify_passes_an_intact_entry_with_symlinks(cas: LocalCAS, tmp_path: Path) -> None:
    """An entry's symlinks were looked up by their targets (the replay's sources), so
    every intact entry with a symlink was invalidated by ``verify``."""
    spec: Spec = {"a": b"x\n", "sub/up": ("l", "../a"), "dangling": ("l", "no/where")}
    root = ingest(cas, tmp_path / "src", spec)
    with DirectoryCache(cas, tmp_path / "cache") as cache:
        cache.materialize(root, tmp_path / "d1")
        report = cache.verify()
        assert report.ok, report.invalidated
        assert cache.materialize(root, tmp_path / "d2").hit
        os.unlink(tmp_path / "cache" / "entries" / root.key / "sub" / "up")
        os.symlink("../elsewhere", tmp_path / "cache" / "entries" / root.key / "sub" / "up")
        bad = cache.verify()
    assert [k for k, _ in bad.invalidated] == [root.key]
    assert "sub/up: not the symlink the tree has" in bad.invalidated[0][1]
