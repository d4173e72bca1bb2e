"""A CAS on a real full filesystem (issue 12, item 4): an 8 MiB tmpfs.

A write that runs out of space raises the ``OSError`` with errno ``ENOSPC`` naming
the path it wrote and what it was doing; a failed ingest leaves no temp behind
(published blobs stay, and verify); content already stored is never written again,
so re-ingesting a tree on the full filesystem succeeds and allocates nothing."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from fastmat import Digest, LocalCAS, ingest_tree
from fastmat.cas.layout import TMP
from tests.helpers import run_cmd

SIZE = 8 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = run_cmd("mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(mnt))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        if run_cmd("umount", str(mnt)).returncode != 0:
            run_cmd("umount", "-l", str(mnt))


def _tree(top: Path, n: int, size: int, seed: bytes) -> None:
    (top / "d").mkdir(parents=True)
    for i in range(n):
        data = (seed + i.to_bytes(4, "big")) * (size // (len(seed) + 4))
        (top / ("d" if i % 2 else "") / f"f{i}").write_bytes(data)


def _write_until_full(f: BinaryIO, chunk: bytes) -> None:
    while True:
        f.write(chunk)


def _fill(mnt: Path) -> None:
    """Writes a filler file until the filesystem has no byte left."""
    with (mnt / "filler").open("wb", buffering=0) as f:
        for size in (64 << 10, 512):
            with pytest.raises(OSError, match="No space left") as exc:
                _write_until_full(f, b"\0" * size)
            assert exc.value.errno == errno.ENOSPC


def _put_until_full(cas: LocalCAS, stored: list[Digest]) -> None:
    while True:
        stored.append(cas.put(os.urandom(1 << 20)))


def _usage(mnt: Path) -> tuple[int, int]:
    st = os.statvfs(mnt)
    return st.f_bfree, st.f_ffree


def _temps(cas: Path) -> list[str]:
    """Every file in the CAS's temp area but the owners' lock files."""
    out = []
    for dirpath, _, files in os.walk(cas / TMP):
        out += [os.path.join(dirpath, f) for f in files if f != "owner.lock"]
    return out


def test_ingest_that_fills_the_disk(small_fs: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, 24, 512 << 10, b"big")  # 12 MiB: cannot fit in 8
    root = small_fs / "cas"
    with LocalCAS(root) as cas:
        with pytest.raises(OSError, match="No space left") as exc:
            ingest_tree(cas, src)
        e = exc.value
        assert e.errno == errno.ENOSPC
        assert isinstance(e.filename, str)
        assert e.filename.startswith(str(root) + "/"), e.filename
        assert str(e.filename) in str(e) or e.filename in repr(e)
        assert "No space left on device (" in str(e)  # ... and what was being done
        assert _temps(root) == []  # the failed temp and the unfinished group: gone
        report = cas.verify()
        assert report.ok
        assert report.blobs_checked == 0  # one group, unfinished: nothing of it published

        # one put (one group) at a time: those before the failure stay, complete
        stored: list[Digest] = []
        with pytest.raises(OSError, match="No space left") as exc:
            _put_until_full(cas, stored)
        assert exc.value.errno == errno.ENOSPC
        assert str(exc.value.filename).startswith(str(root) + "/")
        assert stored
        assert _temps(root) == []
        report = cas.verify()
        assert report.ok
        assert report.blobs_checked == len(stored)
    assert os.listdir(root / TMP) == []


def test_reingest_on_a_full_disk_writes_nothing(small_fs: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, 6, 4 << 10, b"small")
    (src / "d" / "large").write_bytes(os.urandom(3 << 20))  # hashed, not read into memory
    root = small_fs / "cas"
    with LocalCAS(root) as cas:
        tree = ingest_tree(cas, src)
        blobs = cas.usage().blobs
    _fill(small_fs)
    before = _usage(small_fs)
    with LocalCAS(root) as cas:
        assert ingest_tree(cas, src) == tree
        assert cas.put_file(src / "d" / "large") == Digest.of((src / "d" / "large").read_bytes())
        assert cas.put((src / "f0").read_bytes()) == Digest.of((src / "f0").read_bytes())
        assert cas.counters.blobs_written == 0
        assert cas.counters.copied_files == cas.counters.reflinked_files == 0
        assert os.listdir(root / TMP) == []  # not even a temp dir was made
        assert cas.usage().blobs == blobs
    assert _usage(small_fs) == before

    # new content on the full disk: ENOSPC naming the temp, nothing left behind
    new = tmp_path / "new"
    new.write_bytes(os.urandom(2 << 20))
    with LocalCAS(root) as cas:
        calls: list[Callable[[], Digest]] = [
            lambda: cas.put_file(new),
            lambda: cas.put(os.urandom(100 << 10)),
        ]
        for call in calls:
            with pytest.raises(OSError, match="No space left") as exc:
                call()
            assert exc.value.errno == errno.ENOSPC
            where = str(exc.value.filename)
            assert where.startswith(str(root / TMP) + "/"), where
            assert "blob temp" in str(exc.value)
            assert _temps(root) == []
        assert cas.verify().ok


def test_a_group_that_fails_as_a_whole_leaves_no_temp(tmp_path: Path) -> None:
    """The admission hook failing (a full disk under the use record, say) fails the
    group: every temp of it is removed, nothing is published."""
    root = tmp_path / "cas"
    with LocalCAS(root) as cas:

        def full(staged: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(root / "usage" / "store"))

        cas._committer.admit = full
        batch = cas.batch()
        for i in range(5):
            batch.put(b"blob %d" % i)
        assert len(os.listdir(cas.tmp_dir)) == 6  # owner.lock + 5 staged temps
        with pytest.raises(OSError, match="No space left") as exc:
            batch.commit()
        assert exc.value.errno == errno.ENOSPC
        assert os.listdir(cas.tmp_dir) == ["owner.lock"]
        assert cas.usage().blobs == 0
