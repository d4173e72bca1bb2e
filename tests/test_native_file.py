"""fm_file.c: link, copy, reflink, and the durable private-copy / write / publish recipe.

Real filesystems: ext4 (tmp_path), a loop-mounted XFS with reflink (xfs_dir),
tmpfs (tmpfs_dir, another device for EXDEV). Fallbacks are exercised both by
injecting errors at the C call sites and for real (seccomp denies a syscall)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from fastmat import _binding as nb
from tests.helpers import (
    MiB,
    as_nobody,
    deny_syscall,
    dirfd,
    in_child,
    leftovers,
    mode_of,
    open_to_all,
    raises_errno,
)

# ---------------------------------------------------------------- link


def test_link_shares_inode_relative_to_dirfds(cas: Path, dest: Path) -> None:
    with dirfd(cas) as s, dirfd(dest) as d:
        nb.link(s, "blobs/a", d, "a")
    assert (dest / "a").stat().st_ino == (cas / "blobs/a").stat().st_ino
    assert (cas / "blobs/a").stat().st_nlink == 2


def test_link_errors(cas: Path, dest: Path, tmpfs_dir: Path) -> None:
    nb.link(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, dest / "a")
    with pytest.raises(FileExistsError) as e:
        nb.link(nb.AT_FDCWD, cas / "blobs/b", nb.AT_FDCWD, dest / "a")
    assert e.value.filename == str(cas / "blobs/b")
    assert e.value.filename2 == str(dest / "a")
    assert (dest / "a").read_bytes() == b"alpha\n"
    with pytest.raises(FileNotFoundError):
        nb.link(nb.AT_FDCWD, cas / "blobs/missing", nb.AT_FDCWD, dest / "m")
    with raises_errno(errno.EXDEV):
        nb.link(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, tmpfs_dir / "a")


def test_link_does_not_follow_a_symlink_source(cas: Path, dest: Path) -> None:
    (cas / "sl").symlink_to(cas / "blobs/a")
    nb.link(nb.AT_FDCWD, cas / "sl", nb.AT_FDCWD, dest / "l")
    assert (dest / "l").is_symlink()


def test_link_permission_denied_as_nobody(cas: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    open_to_all(cas / "blobs")
    with pytest.raises(PermissionError):
        as_nobody(nb.link, nb.AT_FDCWD, str(cas / "blobs/a"), nb.AT_FDCWD, str(locked / "a"))
    assert not (locked / "a").exists()


# ---------------------------------------------------------------- copy


def test_copy_new_inode_exact_mode(cas: Path, dest: Path) -> None:
    big = cas / "big"
    big.write_bytes(os.urandom(3 * MiB + 17))
    for mode in (0o444, 0o555, 0o600, 0o4755):
        dst = dest / f"c{mode:o}"
        nb.copy(nb.AT_FDCWD, big, nb.AT_FDCWD, dst, mode)
        assert dst.read_bytes() == big.read_bytes()
        assert mode_of(dst) == mode
        assert dst.stat().st_ino != big.stat().st_ino


def test_copy_falls_back_to_read_write(cas: Path, dest: Path) -> None:
    big = cas / "big"
    big.write_bytes(os.urandom(MiB + 5))
    for err in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP):
        with nb.injected("copy", -err):
            nb.copy(nb.AT_FDCWD, big, nb.AT_FDCWD, dest / f"rw{err}", 0o444)
        assert (dest / f"rw{err}").read_bytes() == big.read_bytes()


def test_copy_errors_remove_dst(cas: Path, dest: Path) -> None:
    with nb.injected("copy", -errno.EIO), raises_errno(errno.EIO):
        nb.copy(nb.AT_FDCWD, cas / "blobs/b", nb.AT_FDCWD, dest / "c", 0o444)
    assert not (dest / "c").exists()
    (dest / "taken").write_text("mine")
    with pytest.raises(FileExistsError):
        nb.copy(nb.AT_FDCWD, cas / "blobs/b", nb.AT_FDCWD, dest / "taken", 0o444)
    assert (dest / "taken").read_text() == "mine"
    with pytest.raises(FileNotFoundError):
        nb.copy(nb.AT_FDCWD, cas / "nope", nb.AT_FDCWD, dest / "c", 0o444)
    with pytest.raises(IsADirectoryError):
        nb.copy(nb.AT_FDCWD, cas / "blobs", nb.AT_FDCWD, dest / "c", 0o444)
    (cas / "sl").symlink_to(cas / "blobs/a")
    with raises_errno(errno.ELOOP):
        nb.copy(nb.AT_FDCWD, cas / "sl", nb.AT_FDCWD, dest / "c", 0o444)
    assert not (dest / "c").exists()


def test_copy_to_tmpfs(cas: Path, tmpfs_dir: Path) -> None:
    nb.copy(nb.AT_FDCWD, cas / "blobs/b", nb.AT_FDCWD, tmpfs_dir / "b", 0o555)
    assert (tmpfs_dir / "b").read_bytes() == (cas / "blobs/b").read_bytes()
    assert mode_of(tmpfs_dir / "b") == 0o555


# ---------------------------------------------------------------- reflink


def _free_bytes(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def test_reflink_shares_extents_on_xfs(xfs_dir: Path) -> None:
    src = xfs_dir / "src"
    src.write_bytes(os.urandom(16 * MiB))
    src.chmod(0o444)
    before = _free_bytes(xfs_dir)
    nb.reflink(nb.AT_FDCWD, src, nb.AT_FDCWD, xfs_dir / "r", 0o640)
    after = _free_bytes(xfs_dir)
    assert before - after < 2 * MiB  # a copy would take 16 MiB
    assert (xfs_dir / "r").read_bytes() == src.read_bytes()
    assert mode_of(xfs_dir / "r") == 0o640  # FICLONE does not carry it: set explicitly
    assert mode_of(src) == 0o444
    assert (xfs_dir / "r").stat().st_ino != src.stat().st_ino
    # and a byte copy really does use the space (the measurement is meaningful);
    # copy_file_range itself may reflink on XFS, so force read/write
    with nb.injected("copy", -errno.ENOSYS):
        nb.copy(nb.AT_FDCWD, src, nb.AT_FDCWD, xfs_dir / "c", 0o640)
    assert after - _free_bytes(xfs_dir) >= 15 * MiB


def test_reflink_shared_extent_flag(xfs_dir: Path) -> None:
    src = xfs_dir / "src"
    src.write_bytes(os.urandom(MiB))
    nb.reflink(nb.AT_FDCWD, src, nb.AT_FDCWD, xfs_dir / "r", 0o444)
    res = subprocess.run(
        ["filefrag", "-v", str(xfs_dir / "r")], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        pytest.skip(f"filefrag unavailable: {res.stderr.strip()}")
    assert "shared" in res.stdout


def test_reflink_unsupported_on_tmpfs_and_ext4(tmpfs_dir: Path, tmp_path: Path) -> None:
    for d in (tmpfs_dir, tmp_path):
        (d / "s").write_bytes(b"data")
        with raises_errno(errno.ENOTSUP):
            nb.reflink(nb.AT_FDCWD, d / "s", nb.AT_FDCWD, d / "r", 0o444)
        assert not (d / "r").exists()


def test_reflink_errors(xfs_dir: Path, tmpfs_dir: Path) -> None:
    (xfs_dir / "s").write_bytes(b"data")
    with raises_errno(errno.EXDEV, errno.ENOTSUP):
        nb.reflink(nb.AT_FDCWD, xfs_dir / "s", nb.AT_FDCWD, tmpfs_dir / "r", 0o444)
    assert not (tmpfs_dir / "r").exists()
    (xfs_dir / "taken").write_text("mine")
    with pytest.raises(FileExistsError):
        nb.reflink(nb.AT_FDCWD, xfs_dir / "s", nb.AT_FDCWD, xfs_dir / "taken", 0o444)
    assert (xfs_dir / "taken").read_text() == "mine"
    with pytest.raises(FileNotFoundError):
        nb.reflink(nb.AT_FDCWD, xfs_dir / "nope", nb.AT_FDCWD, xfs_dir / "r", 0o444)
    with nb.injected("reflink", -errno.EOPNOTSUPP), raises_errno(errno.ENOTSUP):
        nb.reflink(nb.AT_FDCWD, xfs_dir / "s", nb.AT_FDCWD, xfs_dir / "r", 0o444)
    assert not (xfs_dir / "r").exists()


# ---------------------------------------------------------------- private_copy


def test_private_copy_methods(cas: Path, xfs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert nb.private_copy(nb.AT_FDCWD, cas / "blobs/x", nb.AT_FDCWD, out / "x", 0o555) == "copy"
    assert (out / "x").read_bytes() == (cas / "blobs/x").read_bytes()
    assert mode_of(out / "x") == 0o555
    assert (out / "x").stat().st_ino != (cas / "blobs/x").stat().st_ino
    (xfs_dir / "s").write_bytes(b"s" * 10000)
    assert nb.private_copy(nb.AT_FDCWD, xfs_dir / "s", nb.AT_FDCWD, xfs_dir / "r", 0o444) == (
        "reflink"
    )
    assert mode_of(xfs_dir / "r") == 0o444
    got = nb.private_copy(
        nb.AT_FDCWD, xfs_dir / "s", nb.AT_FDCWD, xfs_dir / "c", 0o444, reflink=False
    )
    assert got == "copy"
    got = nb.private_copy(
        nb.AT_FDCWD, xfs_dir / "s", nb.AT_FDCWD, xfs_dir / "f", 0o444, reflink=True, fsync=False
    )
    assert got == "reflink"
    assert leftovers(xfs_dir) == []
    assert leftovers(out) == []


def test_private_copy_reflink_force_on_ext4(cas: Path, dest: Path) -> None:
    with raises_errno(errno.ENOTSUP):
        nb.private_copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, dest / "a", 0o444, reflink=True)
    assert os.listdir(dest) == []


def test_private_copy_noreplace(cas: Path, dest: Path) -> None:
    (dest / "a").write_text("mine")
    with pytest.raises(FileExistsError):
        nb.private_copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, dest / "a", 0o444)
    assert (dest / "a").read_text() == "mine"
    assert leftovers(dest) == []
    nb.private_copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, dest / "a", 0o444, noreplace=False)
    assert (dest / "a").read_bytes() == b"alpha\n"
    assert leftovers(dest) == []


def test_private_copy_out_param_untouched_on_error(cas: Path, dest: Path) -> None:
    how = nb.ffi.new("uint8_t *", 77)
    flags = nb.lib.FM_F_NOREPLACE | nb.lib.FM_F_FSYNC
    (dest / "a").write_text("mine")
    rc = nb.lib.fm_private_copy(
        nb.AT_FDCWD, bytes(cas / "blobs/a"), nb.AT_FDCWD, bytes(dest / "a"), 0o444, flags, how
    )
    assert rc == -errno.EEXIST
    assert how[0] == 77
    rc = nb.lib.fm_private_copy(
        nb.AT_FDCWD, bytes(cas / "nope"), nb.AT_FDCWD, bytes(dest / "b"), 0o444, flags, how
    )
    assert rc == -errno.ENOENT
    assert how[0] == 77
    rc = nb.lib.fm_private_copy(
        nb.AT_FDCWD, bytes(cas / "blobs/a"), nb.AT_FDCWD, bytes(dest / "b"), 0o444, flags, how
    )
    assert rc == 0
    assert how[0] == nb.FM_HOW_COPY
    rc = nb.lib.fm_private_copy(
        nb.AT_FDCWD,
        bytes(cas / "blobs/a"),
        nb.AT_FDCWD,
        bytes(dest / "c"),
        0o444,
        flags,
        nb.ffi.NULL,
    )
    assert rc == 0


def test_private_copy_failed_rename_leaves_no_temp(cas: Path, dest: Path) -> None:
    with nb.injected("rename", -errno.EIO), raises_errno(errno.EIO):
        nb.private_copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, dest / "a", 0o444)
    assert os.listdir(dest) == []
    with nb.injected("copy", -errno.ENOSPC), raises_errno(errno.ENOSPC):
        nb.private_copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, dest / "a", 0o444)
    assert os.listdir(dest) == []


def test_private_copy_paths_relative_to_dirfds(cas: Path, dest: Path) -> None:
    (dest / "sub").mkdir()
    with dirfd(cas) as s, dirfd(dest) as d:
        nb.private_copy(s, "blobs/b", d, "sub/b", 0o444)
    assert (dest / "sub" / "b").read_bytes() == (cas / "blobs/b").read_bytes()
    assert leftovers(dest / "sub") == []


# ---------------------------------------------------------------- durable_write / publish


def test_durable_write(dest: Path) -> None:
    data = os.urandom(300_000)
    with dirfd(dest) as d:
        nb.durable_write(d, "f", data, 0o444)
        with pytest.raises(FileExistsError):
            nb.durable_write(d, "f", b"other", 0o444)
        assert (dest / "f").read_bytes() == data
        nb.durable_write(d, "f", b"other", 0o600, noreplace=False, fsync=False)
        nb.durable_write(d, "empty", b"", 0o444)
    assert (dest / "f").read_bytes() == b"other"
    assert mode_of(dest / "f") == 0o600
    assert (dest / "empty").stat().st_size == 0
    assert mode_of(dest / "empty") == 0o444
    assert leftovers(dest) == []


def test_durable_write_errors_leave_no_temp(dest: Path) -> None:
    with nb.injected("rename", -errno.ENOSPC), raises_errno(errno.ENOSPC):
        nb.durable_write(nb.AT_FDCWD, dest / "f", b"x", 0o444)
    assert os.listdir(dest) == []
    with pytest.raises(FileNotFoundError):
        nb.durable_write(nb.AT_FDCWD, dest / "no" / "f", b"x", 0o444)


def test_durable_write_permission_denied(dest: Path) -> None:
    open_to_all(dest)
    with pytest.raises(PermissionError):
        as_nobody(nb.durable_write, nb.AT_FDCWD, str(dest / "f"), b"x", 0o444)
    assert os.listdir(dest) == []


def test_publish(dest: Path) -> None:
    (dest / "t1").write_text("one")
    (dest / "t2").write_text("two")
    (dest / "t3").write_text("three")
    nb.publish(nb.AT_FDCWD, dest / "t1", nb.AT_FDCWD, dest / "final", fsync=True)
    assert (dest / "final").read_text() == "one"
    assert not (dest / "t1").exists()
    with pytest.raises(FileExistsError):
        nb.publish(nb.AT_FDCWD, dest / "t2", nb.AT_FDCWD, dest / "final")
    assert (dest / "final").read_text() == "one"
    assert (dest / "t2").read_text() == "two"
    nb.publish(nb.AT_FDCWD, dest / "t3", nb.AT_FDCWD, dest / "final", noreplace=False)
    assert (dest / "final").read_text() == "three"
    with pytest.raises(FileNotFoundError):
        nb.publish(nb.AT_FDCWD, dest / "t1", nb.AT_FDCWD, dest / "other")


def test_publish_and_copy_without_renameat2_or_copy_file_range(tmp_path: Path) -> None:
    """Old kernels: RENAME_NOREPLACE falls back to link + unlink, copies to read/write."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(300_000))
    (tmp_path / "taken").write_text("mine")

    def run() -> list[str]:
        deny_syscall("renameat2")
        deny_syscall("copy_file_range")
        out: list[object] = []
        nb.private_copy(nb.AT_FDCWD, str(src), nb.AT_FDCWD, str(tmp_path / "p"), 0o444)
        out.append((tmp_path / "p").read_bytes() == src.read_bytes())
        try:
            nb.durable_write(nb.AT_FDCWD, str(tmp_path / "taken"), b"x", 0o444)
        except FileExistsError:
            out.append("exists")
        (tmp_path / "t").write_text("t")
        nb.publish(nb.AT_FDCWD, str(tmp_path / "t"), nb.AT_FDCWD, str(tmp_path / "u"))
        out.append((tmp_path / "u").read_text())
        out.append(not (tmp_path / "t").exists())
        return [str(x) for x in out]

    try:
        got = in_child(run)
    except NotImplementedError as e:
        pytest.skip(str(e))
    assert got == ["True", "exists", "t", "True"]
    assert (tmp_path / "taken").read_text() == "mine"
    assert leftovers(tmp_path) == []
