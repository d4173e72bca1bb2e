"""fm_durable.c: fm_sync_batch and fm_publish_batch (group commit)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fastmat import _binding as nb
from tests.helpers import as_nobody, dirfd, leftovers, open_to_all, raises_errno


def make_files(d: Path, n: int, size: int = 5000) -> list[bytes]:
    names = []
    for i in range(n):
        (d / f"t{i}").write_bytes(bytes([i % 251]) * size)
        names.append(f"t{i}".encode())
    return names


def raw_sync(fd: int, names: bytes, n: int, flags: int, threads: int = 4) -> tuple[int, list[int]]:
    status = nb.ffi.new("int32_t[]", max(n, 1))
    for i in range(max(n, 1)):
        status[i] = 12345
    rc = nb.lib.fm_sync_batch(fd, names, n, flags, threads, status)
    return rc, [status[i] for i in range(n)]


# ---------------------------------------------------------------- fm_sync_batch


@pytest.mark.parametrize("mode", ["fsync", "syncfs", "writeback"])
@pytest.mark.parametrize("threads", [1, 8])
def test_sync_batch_success(dest: Path, mode: nb.SyncMode, threads: int) -> None:
    names = make_files(dest, 40)
    with dirfd(dest) as d:
        status = nb.sync_batch(d, names, mode, threads=threads)
    assert list(status) == [0] * 40
    assert sorted(os.listdir(dest)) == sorted(n.decode() for n in names)  # nothing renamed


def test_sync_batch_empty(dest: Path) -> None:
    with dirfd(dest) as d:
        assert len(nb.sync_batch(d, [], "fsync")) == 0
        assert raw_sync(d, b"", 0, nb.lib.FM_SYNC_SYNCFS) == (0, [])


def test_sync_batch_missing_and_symlink_per_file(dest: Path) -> None:
    names = make_files(dest, 3)
    os.symlink("t0", dest / "link")
    with dirfd(dest) as d:
        status = nb.sync_batch(d, [names[0], b"absent", b"link", names[2]], "fsync", threads=2)
        assert list(status) == [0, -errno.ENOENT, -errno.ELOOP, 0]
        rc, _ = raw_sync(d, b"t0\0absent\0", 2, nb.lib.FM_SYNC_FSYNC)
        assert rc == -errno.ENOENT  # the first failure in index order


def test_sync_batch_writeback_reports_open_errors(dest: Path) -> None:
    make_files(dest, 1)
    with dirfd(dest) as d:
        assert list(nb.sync_batch(d, [b"t0", b"absent"], "writeback")) == [0, -errno.ENOENT]


@pytest.mark.parametrize("flags", [0, 3, 5, 6, 7, 8])
def test_sync_batch_needs_exactly_one_mode(dest: Path, flags: int) -> None:
    make_files(dest, 1)
    with dirfd(dest) as d:
        rc, status = raw_sync(d, b"t0\0", 1, flags)
    assert rc == -errno.EINVAL
    assert status == [12345]  # untouched
    with dirfd(dest) as d, raises_errno(errno.EINVAL):
        nb.check(nb.lib.fm_sync_batch(d, b"t0\0", 1, flags, 1, nb.ffi.new("int32_t[]", 1)))


def test_sync_batch_syncfs_bad_fd() -> None:
    rc, status = raw_sync(-1, b"x\0y\0", 2, nb.lib.FM_SYNC_SYNCFS)
    assert rc == -errno.EBADF
    assert status == [-errno.EBADF, -errno.EBADF]


def test_sync_batch_injected_failure_is_per_file(dest: Path) -> None:
    names = make_files(dest, 10)
    with dirfd(dest) as d:
        with nb.injected("sync", -errno.EIO, 3):
            status = nb.sync_batch(d, names, "fsync", threads=4)
        assert sorted(status) == [-errno.EIO] * 3 + [0] * 7
        with nb.injected("sync", -errno.EIO, 1):
            status = nb.sync_batch(d, names, "syncfs")
        assert list(status) == [-errno.EIO] * 10  # one syncfs: one result for all
        with nb.injected("sync", -errno.EIO, 1):  # writeback is no sync: never injected
            assert list(nb.sync_batch(d, names, "writeback")) == [0] * 10
        assert list(nb.sync_batch(d, names, "fsync")) == [0] * 10  # the count was used up


# ---------------------------------------------------------------- fm_publish_batch


def test_publish_batch_renames_and_discards_losers(dest: Path) -> None:
    src = dest / "tmp"
    src.mkdir()
    for shard in ("aa", "bb"):
        (dest / shard).mkdir()
    names = make_files(src, 5)
    (dest / "bb" / "taken").write_bytes(b"winner")
    dsts = [b"aa/x0", b"aa/x1", b"bb/x2", b"bb/taken", b"top"]
    with dirfd(src) as s, dirfd(dest) as d:
        rc, status = nb.publish_batch(s, names, d, dsts, threads=4)
    assert rc == 0
    assert list(status) == [0, 0, 0, -errno.EEXIST, 0]
    assert (dest / "aa" / "x1").read_bytes() == bytes([1]) * 5000
    assert (dest / "top").read_bytes() == bytes([4]) * 5000
    assert (dest / "bb" / "taken").read_bytes() == b"winner"  # never replaced
    assert os.listdir(src) == []  # published or, for the loser, unlinked


def test_publish_batch_failure_unlinks_temp_and_goes_on(dest: Path) -> None:
    src = dest / "tmp"
    src.mkdir()
    (dest / "aa").mkdir()
    names = make_files(src, 3)
    with dirfd(src) as s, dirfd(dest) as d:
        rc, status = nb.publish_batch(s, names, d, [b"aa/x", b"nodir/y", b"aa/z"])
    assert rc == -errno.ENOENT
    assert list(status) == [0, -errno.ENOENT, 0]
    assert sorted(os.listdir(dest / "aa")) == ["x", "z"]
    assert os.listdir(src) == []


def test_publish_batch_injected_rename_failure(dest: Path) -> None:
    src = dest / "tmp"
    src.mkdir()
    names = make_files(src, 4)
    with dirfd(src) as s, dirfd(dest) as d, nb.injected("rename", -errno.ENOSPC, 1):
        rc, status = nb.publish_batch(s, names, d, [b"a", b"b", b"c", b"d"], fsync=False)
    assert rc == -errno.ENOSPC
    assert list(status) == [-errno.ENOSPC, 0, 0, 0]
    assert sorted(os.listdir(dest)) == ["b", "c", "d", "tmp"]
    assert leftovers(src) == []


def test_publish_batch_replace_when_asked(dest: Path) -> None:
    src = dest / "tmp"
    src.mkdir()
    names = make_files(src, 1)
    (dest / "f").write_bytes(b"old")
    with dirfd(src) as s, dirfd(dest) as d:
        rc, status = nb.publish_batch(s, names, d, [b"f"], noreplace=False)
    assert (rc, list(status)) == (0, [0])
    assert (dest / "f").read_bytes() == bytes([0]) * 5000


def test_publish_batch_dir_fsync_failure_is_reported(dest: Path) -> None:
    """A directory its writer may enter and write but not read (0333): the renames
    into it work, opening it for the fsync fails (EACCES): the names are published,
    the failure is returned."""
    src = dest / "tmp"
    src.mkdir(mode=0o777)
    src.chmod(0o777)
    (dest / "wx").mkdir()
    (dest / "wx").chmod(0o333)
    names = make_files(src, 2)
    open_to_all(dest)

    def run() -> tuple[int, list[int]]:
        with dirfd(src) as s, dirfd(dest) as d:
            rc, status = nb.publish_batch(s, names, d, [b"wx/a", b"wx/b"])
        return rc, list(status)

    assert as_nobody(run) == (-errno.EACCES, [0, 0])
    assert (dest / "wx" / "b").read_bytes() == bytes([1]) * 5000


def test_publish_batch_empty_and_mismatched() -> None:
    assert nb.publish_batch(-1, [], -1, []) == (0, nb.sync_batch(-1, [], "fsync"))
    with pytest.raises(ValueError, match="differ in length"):
        nb.publish_batch(-1, [b"a"], -1, [])
    with pytest.raises(ValueError, match="NUL"):
        nb.publish_batch(-1, [b"a\0b"], -1, [b"c"])
