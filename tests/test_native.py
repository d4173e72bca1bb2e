"""The C contract (csrc/fastmat.h), function by function, through fastmat._binding.

Real filesystems: ext4 (tmp_path), a loop-mounted XFS with reflink (xfs_dir),
tmpfs (tmpfs_dir, another device for EXDEV). Fallbacks are exercised both by
injecting errors at the C call sites and for real where the machine allows.
"""

from __future__ import annotations

import array
import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fastmat import _binding as nb
from fastmat.errors import NativeBuildError
from tests.helpers import as_nobody, can_mount, in_child, mount_problem, open_to_all

MiB = 1 << 20


@contextmanager
def dirfd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def raises_errno(*errs: int) -> Iterator[pytest.ExceptionInfo[OSError]]:
    """pytest.raises(OSError) for exactly these errno values."""
    with pytest.raises(OSError, match=r"^\[Errno \d+\]") as info:
        yield info
    assert info.value.errno in errs, f"{info.value!r}: expected errno {errs}"


def mode_of(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def leftovers(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(".fm-tmp"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


Entry = tuple[int, int, str, str, int]  # op, dir, name, src, mode


def make_plan(
    dirs: list[tuple[int, str]], entries: list[Entry], mtimes: list[int] | None = None
) -> nb.PlanArrays:
    """dirs: (parent, name) of directories 1..n; entries: (op, dir, name, src, mode)."""
    return nb.PlanArrays(
        dir_parent=array.array("i", [-1] + [p for p, _ in dirs]),
        dir_names=b"\0" + b"".join(n.encode() + b"\0" for _, n in dirs),
        op=bytes(e[0] for e in entries),
        entry_dir=array.array("i", [e[1] for e in entries]),
        mode=array.array("I", [e[4] for e in entries]),
        mtime_ns=None if mtimes is None else array.array("q", mtimes),
        names=b"".join(e[2].encode() + b"\0" for e in entries),
        srcs=b"".join(e[3].encode() + b"\0" for e in entries),
    )


def run_plan(dest: Path, src: Path, plan: nb.PlanArrays, **kw: object) -> nb.ExecResult:
    with dirfd(dest) as d, dirfd(src) as s:
        return nb.exec_plan(d, s, plan, **kw)  # type: ignore[arg-type]


@pytest.fixture
def cas(tmp_path: Path) -> Path:
    """A tiny stand-in CAS: blobs/a (0444), blobs/b (0444), blobs/x (0555)."""
    root = tmp_path / "cas"
    (root / "blobs").mkdir(parents=True)
    for name, data, mode in (("a", b"alpha\n", 0o444), ("b", b"bravo" * 1000, 0o444)):
        (root / "blobs" / name).write_bytes(data)
        (root / "blobs" / name).chmod(mode)
    (root / "blobs" / "x").write_bytes(b"#!/bin/sh\necho x\n")
    (root / "blobs" / "x").chmod(0o555)
    return root


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


def hostile_tree(root: Path, outside: Path) -> None:
    """root/{f, sub/g, sub/deeper/h, lfile -> outside/file, ldir -> outside/dir, dangling}."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "f").write_text("f")
    (root / "sub" / "g").write_text("g")
    (root / "sub" / "deeper" / "h").write_text("h")
    (outside / "dir").mkdir(parents=True)
    (outside / "dir" / "inner").write_text("inner")
    (outside / "file").write_text("file")
    (outside / "dir").chmod(0o700)
    (outside / "dir" / "inner").chmod(0o600)
    (outside / "file").chmod(0o600)
    (root / "lfile").symlink_to(outside / "file")
    (root / "sub" / "ldir").symlink_to(outside / "dir")
    (root / "sub" / "dangling").symlink_to(outside / "nowhere")


# ---------------------------------------------------------------- basics


def test_abi_and_capabilities() -> None:
    assert nb.lib.fm_abi_version() == nb.ABI_VERSION == nb.lib.FM_ABI_VERSION
    if sys.platform.startswith("linux"):
        assert nb.HAS_FICLONE
        assert nb.HAS_OVERLAY
        assert not nb.HAS_CLONEFILE


def test_stale_build_is_reported() -> None:
    code = (
        "import sys, types\n"
        "m = types.ModuleType('fastmat._native')\n"
        "class L:\n"
        "    @staticmethod\n"
        "    def fm_abi_version(): return 1\n"
        "m.lib = L(); m.ffi = None\n"
        "sys.modules['fastmat._native'] = m\n"
        "import fastmat._binding\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode != 0
    assert NativeBuildError.__name__ in res.stderr
    assert "stale" in res.stderr
    assert "reinstall" in res.stderr


def test_check_maps_errno_to_oserror_subclasses() -> None:
    nb.check(0)
    nb.check(7)
    with pytest.raises(FileNotFoundError) as e:
        nb.check(-errno.ENOENT, "a", "b")
    assert (e.value.errno, e.value.filename, e.value.filename2) == (errno.ENOENT, "a", "b")
    with pytest.raises(FileExistsError):
        nb.check(-errno.EEXIST)
    with pytest.raises(PermissionError):
        nb.check(-errno.EACCES)


def test_injected_clears_on_exit(cas: Path, tmp_path: Path) -> None:
    with nb.injected("copy", -errno.ENOSPC), raises_errno(errno.ENOSPC):
        nb.copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, tmp_path / "c1", 0o444)
    nb.copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, tmp_path / "c1", 0o444)
    assert (tmp_path / "c1").read_bytes() == b"alpha\n"


def test_inject_count_is_exact(cas: Path, tmp_path: Path) -> None:
    nb.inject("copy", errno.ENOSPC, 2)  # a positive errno is negated
    try:
        for i in range(2):
            with raises_errno(errno.ENOSPC):
                nb.copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, tmp_path / f"c{i}", 0o444)
        nb.copy(nb.AT_FDCWD, cas / "blobs/a", nb.AT_FDCWD, tmp_path / "c2", 0o444)
    finally:
        nb.inject("copy", 0, 0)


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


def test_probe_reflink(xfs_dir: Path, tmpfs_dir: Path, tmp_path: Path) -> None:
    assert nb.probe_reflink(xfs_dir) is True
    assert nb.probe_reflink(tmpfs_dir) is False
    assert nb.probe_reflink(tmp_path) is False  # ext4
    assert os.listdir(xfs_dir) == []
    assert os.listdir(tmpfs_dir) == []
    with pytest.raises(FileNotFoundError):
        nb.probe_reflink(tmp_path / "missing")


def test_probe_reflink_unwritable_dir_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir(mode=0o755)
    open_to_all(d)
    with pytest.raises(PermissionError):
        as_nobody(nb.probe_reflink, str(d))


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


# ---------------------------------------------------------------- walks


def deep_tree(root: Path, depth: int, dir_mode: int = 0o755) -> Path:
    """A chain of `depth` directories below root, each with one file, each directory
    (root too) then set to dir_mode; returns root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        ffd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(ffd, b"x")
        os.close(ffd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.fchmod(fd, dir_mode)
        os.close(fd)
        fd = nfd
    os.fchmod(fd, dir_mode)
    os.close(fd)
    return root


def test_remove_tree_holds_few_fds_on_deep_trees(tmp_path: Path) -> None:
    root = tmp_path / "deep"
    root.mkdir()
    deep_tree(root, 600, 0o555)  # deeper than PATH_MAX allows by name, and than 512 fds

    def remove_with_few_fds() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        nb.remove_tree(str(root))  # makes each read-only directory writable on the way

    before = open_fds()
    in_child(remove_with_few_fds)
    assert not root.exists()
    assert open_fds() == before


def test_remove_tree_never_chmods_files_nor_follows(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    hostile_tree(root, outside)
    keep = tmp_path / "keep"
    keep.write_text("shared")
    keep.chmod(0o444)
    os.link(keep, root / "sub" / "deeper" / "hard")  # same inode inside the tree
    for d in (root / "sub" / "deeper", root / "sub", root):
        d.chmod(0o555)  # read-only directories
    (outside / "dir").chmod(0o500)
    nb.remove_tree(root)
    assert not root.exists()
    assert mode_of(keep) == 0o444  # the file's inode was never chmod'ed
    assert keep.read_text() == "shared"
    assert mode_of(outside / "dir") == 0o500
    assert (outside / "dir" / "inner").read_text() == "inner"
    assert mode_of(outside / "file") == 0o600


def test_remove_tree_symlink_and_file_roots(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "d")
    nb.remove_tree(tmp_path / "link")
    assert not (tmp_path / "link").is_symlink()
    assert (tmp_path / "d" / "f").read_text() == "x"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    nb.remove_tree("dangling", dirfd=os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC))
    assert not (tmp_path / "dangling").is_symlink()
    (tmp_path / "file").write_text("x")
    nb.remove_tree(tmp_path / "file")
    assert not (tmp_path / "file").exists()
    with pytest.raises(FileNotFoundError):
        nb.remove_tree(tmp_path / "missing")


def test_remove_tree_relative_to_dirfd(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c").write_text("x")
    (tmp_path / "a" / "b").chmod(0)
    with dirfd(tmp_path) as d:
        nb.remove_tree("a", d)
    assert os.listdir(tmp_path) == []


def test_remove_tree_as_nobody_makes_dirs_writable(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "x" / "y").mkdir(parents=True)
    (root / "x" / "y" / "f").write_text("x")
    for p in (root, root / "x", root / "x" / "y", root / "x" / "y" / "f"):
        os.chown(p, 65534, 65534)
    (root / "x" / "y" / "f").chmod(0o444)
    (root / "x" / "y").chmod(0o000)
    (root / "x").chmod(0o500)
    os.chown(tmp_path, 65534, 65534)
    open_to_all(tmp_path)
    as_nobody(nb.remove_tree, str(root))
    assert not root.exists()


def test_remove_tree_refuses_mount_points(tmp_path: Path) -> None:
    if not can_mount():
        pytest.skip(str(mount_problem()))
    root = tmp_path / "r"
    mnt = root / "mnt"
    mnt.mkdir(parents=True)
    (root / "f").write_text("x")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "precious").write_text("keep")
        with raises_errno(errno.EBUSY):
            nb.remove_tree(root)
        assert (mnt / "precious").read_text() == "keep"
        with raises_errno(errno.EBUSY):
            nb.remove_tree(mnt)
        assert (mnt / "precious").read_text() == "keep"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    nb.remove_tree(root)
    assert not root.exists()


# ---------------------------------------------------------------- exec_plan


def test_exec_plan_links_symlinks_empties(cas: Path, dest: Path) -> None:
    plan = make_plan(
        [(0, "d"), (1, "e"), (0, "empty_dir")],
        [
            (nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444),
            (nb.FM_OP_SYMLINK, 0, "s_abs", "/etc/passwd", 0),
            (nb.FM_OP_SYMLINK, 0, "s_up", "../../outside/x", 0),
            (nb.FM_OP_LINK, 1, "b", "blobs/b", 0o444),
            (nb.FM_OP_LINK, 1, "x", "blobs/x", 0o555),
            (nb.FM_OP_EMPTY, 2, "e1", "", 0o444),
            (nb.FM_OP_EMPTY, 2, "e2", "", 0o555),
        ],
    )
    res = run_plan(dest, cas, plan, threads=3, max_inflight=3)
    assert res.rc == 0
    assert list(res.status) == [0] * 7
    assert list(res.dir_status) == [0, 0, 0, 0]
    assert res.how == bytes(
        [nb.FM_HOW_LINK, nb.FM_HOW_SYMLINK, nb.FM_HOW_SYMLINK, nb.FM_HOW_LINK, nb.FM_HOW_LINK]
        + [nb.FM_HOW_CREATE] * 2
    )
    assert (dest / "a").stat().st_ino == (cas / "blobs/a").stat().st_ino
    assert (dest / "d" / "b").stat().st_ino == (cas / "blobs/b").stat().st_ino
    assert (dest / "d" / "x").stat().st_ino == (cas / "blobs/x").stat().st_ino
    assert os.readlink(dest / "s_abs") == "/etc/passwd"
    assert os.readlink(dest / "s_up") == "../../outside/x"
    e1, e2 = dest / "d" / "e" / "e1", dest / "d" / "e" / "e2"
    assert e1.stat().st_size == e2.stat().st_size == 0
    assert e1.stat().st_ino != e2.stat().st_ino
    assert e1.stat().st_nlink == 1
    assert (mode_of(e1), mode_of(e2)) == (0o444, 0o555)
    assert (dest / "empty_dir").is_dir()
    assert os.listdir(dest / "empty_dir") == []
    assert mode_of(cas / "blobs/a") == 0o444  # the blob is never chmod'ed


def test_exec_plan_dir_mode_despite_hostile_umask(cas: Path, dest: Path) -> None:
    plan = make_plan([(0, "a"), (1, "b"), (0, "c")], [(nb.FM_OP_EMPTY, 2, "e", "", 0o444)])

    def run() -> list[int]:
        os.umask(0o077)
        res = run_plan(dest, cas, plan)
        assert res.rc == 0
        return [mode_of(dest / p) for p in ("a", "a/b", "c", "a/b/e")]

    assert in_child(run) == [0o755, 0o755, 0o755, 0o444]


def test_exec_plan_custom_dir_mode(cas: Path, dest: Path) -> None:
    plan = make_plan([(0, "a"), (1, "b")], [])
    plan.dir_mode = 0o700
    assert run_plan(dest, cas, plan).rc == 0
    assert mode_of(dest / "a") == mode_of(dest / "a" / "b") == 0o700


def test_exec_plan_copy_op_mode_and_mtime(cas: Path, dest: Path) -> None:
    mtime = 1_600_000_000_123_456_789
    plan = make_plan(
        [],
        [
            (nb.FM_OP_COPY, 0, "c", "blobs/b", 0o755),
            (nb.FM_OP_COPY, 0, "k", "blobs/a", 0o400),
            (nb.FM_OP_EMPTY, 0, "e", "", 0o444),
        ],
        mtimes=[mtime, -1, mtime],
    )
    res = run_plan(dest, cas, plan)
    assert res.rc == 0
    assert res.how == bytes([nb.FM_HOW_COPY, nb.FM_HOW_COPY, nb.FM_HOW_CREATE])
    c = dest / "c"
    assert c.read_bytes() == (cas / "blobs/b").read_bytes()
    assert c.stat().st_ino != (cas / "blobs/b").stat().st_ino
    assert mode_of(c) == 0o755
    assert c.stat().st_mtime_ns == mtime
    assert (dest / "e").stat().st_mtime_ns == mtime
    assert mode_of(dest / "k") == 0o400
    assert (dest / "k").stat().st_mtime_ns != mtime
    assert (cas / "blobs/b").stat().st_mtime_ns != mtime


def test_exec_plan_copy_op_reflinks_on_xfs(xfs_dir: Path) -> None:
    (xfs_dir / "cas").mkdir()
    (xfs_dir / "cas" / "blob").write_bytes(os.urandom(100_000))
    (xfs_dir / "dest").mkdir()
    plan = make_plan([], [(nb.FM_OP_COPY, 0, "c", "blob", 0o555)])
    res = run_plan(xfs_dir / "dest", xfs_dir / "cas", plan)
    assert res.rc == 0
    assert res.how == bytes([nb.FM_HOW_REFLINK])
    assert mode_of(xfs_dir / "dest" / "c") == 0o555
    assert (xfs_dir / "dest" / "c").read_bytes() == (xfs_dir / "cas" / "blob").read_bytes()


def test_exec_plan_exdev_injected(cas: Path, dest: Path) -> None:
    plan = make_plan(
        [], [(nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444), (nb.FM_OP_LINK, 0, "x", "blobs/x", 0o555)]
    )
    with nb.injected("link", -errno.EXDEV, 1):
        res = run_plan(dest, cas, plan, threads=1)
    assert res.rc == 0
    assert res.how == bytes([nb.FM_HOW_XDEV | nb.FM_HOW_COPY, nb.FM_HOW_LINK])
    assert (dest / "a").stat().st_ino != (cas / "blobs/a").stat().st_ino
    assert (dest / "a").read_bytes() == b"alpha\n"
    assert mode_of(dest / "a") == 0o444
    assert (dest / "x").stat().st_ino == (cas / "blobs/x").stat().st_ino


def test_exec_plan_exdev_for_real_onto_tmpfs(cas: Path, tmpfs_dir: Path) -> None:
    plan = make_plan(
        [(0, "bin")],
        [
            (nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444),
            (nb.FM_OP_LINK, 0, "b", "blobs/b", 0o444),
            (nb.FM_OP_LINK, 1, "x", "blobs/x", 0o555),
            (nb.FM_OP_SYMLINK, 1, "s", "x", 0),
        ],
    )
    res = run_plan(tmpfs_dir, cas, plan, threads=2)
    assert res.rc == 0
    xdev_copy = nb.FM_HOW_XDEV | nb.FM_HOW_COPY
    assert res.how == bytes([xdev_copy, xdev_copy, xdev_copy, nb.FM_HOW_SYMLINK])
    assert (tmpfs_dir / "b").read_bytes() == (cas / "blobs/b").read_bytes()
    assert mode_of(tmpfs_dir / "bin" / "x") == 0o555
    assert mode_of(tmpfs_dir / "a") == 0o444


def test_exec_plan_emlink_rotates_the_source(cas: Path, dest: Path, tmp_path: Path) -> None:
    blob = cas / "blobs/x"
    old_ino = blob.stat().st_ino
    os.link(blob, tmp_path / "earlier")  # a tree materialized before
    plan = make_plan(
        [], [(nb.FM_OP_LINK, 0, "x", "blobs/x", 0o555), (nb.FM_OP_LINK, 0, "y", "blobs/x", 0o555)]
    )
    with nb.injected("link", -errno.EMLINK, 1):
        res = run_plan(dest, cas, plan, threads=1)
    assert res.rc == 0
    assert res.how[0] == nb.FM_HOW_LINK | nb.FM_HOW_ROTATED
    assert res.how[1] == nb.FM_HOW_LINK
    new_ino = blob.stat().st_ino
    assert new_ino != old_ino
    assert (tmp_path / "earlier").stat().st_ino == old_ino  # old links keep the old inode
    assert (dest / "x").stat().st_ino == (dest / "y").stat().st_ino == new_ino
    assert mode_of(blob) == 0o555
    assert blob.read_bytes() == (tmp_path / "earlier").read_bytes()
    assert blob.stat().st_mtime_ns == (tmp_path / "earlier").stat().st_mtime_ns
    assert leftovers(cas / "blobs") == []


def test_exec_plan_emlink_rotation_in_tmp_dir(cas: Path, dest: Path) -> None:
    tmp = cas / "tmp"
    tmp.mkdir()
    old_ino = (cas / "blobs/a").stat().st_ino
    plan = make_plan([], [(nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444)])
    with nb.injected("link", -errno.EMLINK, 1), dirfd(tmp) as t:
        res = run_plan(dest, cas, plan, tmp_dirfd=t)
    assert res.rc == 0
    assert res.how[0] == nb.FM_HOW_LINK | nb.FM_HOW_ROTATED
    assert (cas / "blobs/a").stat().st_ino != old_ino
    assert mode_of(cas / "blobs/a") == 0o444
    assert (dest / "a").stat().st_ino == (cas / "blobs/a").stat().st_ino
    assert os.listdir(tmp) == []


def test_exec_plan_rotation_failure_is_reported(cas: Path, dest: Path) -> None:
    plan = make_plan([], [(nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444)])
    with nb.injected("link", -errno.EMLINK, 1), nb.injected("copy", -errno.ENOSPC):
        res = run_plan(dest, cas, plan)
    assert res.rc == -errno.ENOSPC
    assert list(res.status) == [-errno.ENOSPC]
    assert res.how == bytes([nb.FM_HOW_NONE])
    assert (cas / "blobs/a").read_bytes() == b"alpha\n"
    assert leftovers(cas / "blobs") == []


def test_exec_plan_first_failure_cancels_the_rest(cas: Path, dest: Path) -> None:
    entries: list[Entry] = [(nb.FM_OP_LINK, 0, "ok", "blobs/a", 0o444)]
    entries.append((nb.FM_OP_LINK, 0, "bad", "blobs/missing", 0o444))
    entries += [(nb.FM_OP_LINK, 0, f"n{i}", "blobs/b", 0o444) for i in range(20)]
    plan = make_plan([], entries)
    res = run_plan(dest, cas, plan, threads=1, max_inflight=1)
    assert res.rc == -errno.ENOENT
    assert list(res.status) == [0, -errno.ENOENT] + [-errno.ECANCELED] * 20
    assert res.how[1:] == bytes(21)
    assert sorted(os.listdir(dest)) == ["ok"]


def test_exec_plan_keep_going(cas: Path, dest: Path) -> None:
    plan = make_plan(
        [],
        [
            (nb.FM_OP_LINK, 0, "bad", "blobs/missing", 0o444),
            (nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444),
            (nb.FM_OP_SYMLINK, 0, "s", "t", 0),
        ],
    )
    (dest / "s").write_text("taken")
    res = run_plan(dest, cas, plan, threads=1, keep_going=True)
    assert res.rc == -errno.ENOENT  # the first failure in plan order
    assert list(res.status) == [-errno.ENOENT, 0, -errno.EEXIST]


def _odd_srcs(cas: Path) -> None:
    """blobs/sym (a symlink to a), blobs/dir (a directory), blobs/fifo."""
    (cas / "blobs" / "sym").symlink_to("a")
    (cas / "blobs" / "dir").mkdir()
    os.mkfifo(cas / "blobs" / "fifo")


def _check_srcs_plan() -> nb.PlanArrays:
    return make_plan(
        [(0, "d"), (1, "e")],
        [
            (nb.FM_OP_LINK, 0, "ok", "blobs/a", 0o444),
            (nb.FM_OP_SYMLINK, 0, "s", "blobs/missing", 0),  # a target: never checked
            (nb.FM_OP_EMPTY, 0, "empty", "", 0o444),
            (nb.FM_OP_LINK, 1, "gone", "blobs/missing", 0o444),
            (nb.FM_OP_COPY, 1, "gone2", "blobs/nope", 0o644),
            (nb.FM_OP_LINK, 2, "sym", "blobs/sym", 0o444),
            (nb.FM_OP_COPY, 2, "dir", "blobs/dir", 0o444),
            (nb.FM_OP_LINK, 2, "fifo", "blobs/fifo", 0o444),
            (nb.FM_OP_LINK, 2, "notdir", "blobs/a/x", 0o444),
            (nb.FM_OP_LINK, 2, "b", "blobs/b", 0o444),
        ],
    )


_CHECK_SRCS_STATUS = [
    -errno.ECANCELED,
    -errno.ECANCELED,
    -errno.ECANCELED,
    -errno.ENOENT,
    -errno.ENOENT,
    -errno.ELOOP,
    -errno.EISDIR,
    -errno.EINVAL,
    -errno.ENOTDIR,
    -errno.ECANCELED,
]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("keep_going", [False, True])
def test_exec_plan_check_srcs_creates_nothing(
    cas: Path, dest: Path, threads: int, keep_going: bool
) -> None:
    _odd_srcs(cas)
    res = run_plan(
        dest,
        cas,
        _check_srcs_plan(),
        threads=threads,
        max_inflight=1,
        check_srcs=True,
        keep_going=keep_going,
    )
    assert res.rc == -errno.ENOENT  # the first failing entry in plan order
    assert list(res.status) == _CHECK_SRCS_STATUS  # every failing entry, whatever the thread
    assert res.how == bytes(10)
    assert list(res.dir_status) == [0, -errno.ECANCELED, -errno.ECANCELED]
    assert os.listdir(dest) == []
    assert sorted(os.listdir(cas / "blobs")) == ["a", "b", "dir", "fifo", "sym", "x"]


def test_exec_plan_check_srcs_with_existing_dirs(cas: Path, dest: Path) -> None:
    _odd_srcs(cas)
    (dest / "d" / "e").mkdir(parents=True)
    res = run_plan(dest, cas, _check_srcs_plan(), check_srcs=True, dirs_exist=True)
    assert res.rc == -errno.ENOENT
    assert list(res.status) == _CHECK_SRCS_STATUS
    assert list(res.dir_status) == [0, 0, 0]
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["d", "d/e"]


def test_exec_plan_check_srcs_first_error_is_in_plan_order(cas: Path, dest: Path) -> None:
    _odd_srcs(cas)
    entries: list[Entry] = [(nb.FM_OP_LINK, 0, f"n{i}", "blobs/a", 0o444) for i in range(500)]
    entries[7] = (nb.FM_OP_LINK, 0, "n7", "blobs/sym", 0o444)
    entries[400] = (nb.FM_OP_LINK, 0, "n400", "blobs/missing", 0o444)
    res = run_plan(dest, cas, make_plan([], entries), threads=4, max_inflight=8, check_srcs=True)
    assert res.rc == -errno.ELOOP
    expect = [-errno.ECANCELED] * 500
    expect[7], expect[400] = -errno.ELOOP, -errno.ENOENT
    assert list(res.status) == expect
    assert os.listdir(dest) == []


def test_exec_plan_check_srcs_when_all_present_is_a_normal_run(cas: Path, tmp_path: Path) -> None:
    dirs = [(0, "d"), (1, "e"), (0, "f")]
    entries: list[Entry] = []
    for d in range(4):
        entries += [(nb.FM_OP_LINK, d, f"l{i}", "blobs/a", 0o444) for i in range(30)]
        entries += [
            (nb.FM_OP_COPY, d, "c", "blobs/b", 0o640),
            (nb.FM_OP_SYMLINK, d, "s", "l0", 0),
            (nb.FM_OP_EMPTY, d, "z", "", 0o444),
        ]
    plan = make_plan(dirs, entries)
    results, trees = [], []
    for check in (False, True):
        out = tmp_path / f"out{check}"
        out.mkdir()
        res = run_plan(out, cas, plan, threads=3, max_inflight=6, check_srcs=check)
        results.append((res.rc, list(res.status), res.how, list(res.dir_status)))
        trees.append(
            sorted(
                (str(p.relative_to(out)), mode_of(p), os.readlink(p) if p.is_symlink() else "")
                for p in out.rglob("*")
            )
        )
    assert results[0] == results[1]
    assert results[1][0] == 0
    assert set(results[1][1]) == {0}
    assert trees[0] == trees[1]
    assert len(trees[1]) == 3 + 4 * 33
    assert os.stat(cas / "blobs" / "a").st_nlink == 1 + 2 * 4 * 30


def test_exec_plan_mkdir_failure(cas: Path, dest: Path) -> None:
    plan = make_plan(
        [(0, "a"), (1, "b"), (0, "c")],
        [
            (nb.FM_OP_LINK, 0, "top", "blobs/a", 0o444),
            (nb.FM_OP_LINK, 2, "in_b", "blobs/a", 0o444),
            (nb.FM_OP_LINK, 3, "in_c", "blobs/a", 0o444),
        ],
    )
    with nb.injected("mkdir", -errno.EACCES, 1):
        res = run_plan(dest, cas, plan, keep_going=True)
    assert res.rc == -errno.EACCES
    assert list(res.dir_status) == [0, -errno.EACCES, -errno.ECANCELED, 0]
    assert list(res.status) == [0, -errno.ECANCELED, 0]
    with nb.injected("mkdir", -errno.EACCES, 1):
        res = run_plan(dest / "c", cas, plan)
    assert list(res.dir_status) == [0, -errno.EACCES, -errno.ECANCELED, -errno.ECANCELED]
    assert list(res.status) == [-errno.ECANCELED] * 3


def test_exec_plan_existing_directory_fails(cas: Path, dest: Path) -> None:
    (dest / "a").mkdir()
    plan = make_plan([(0, "a")], [(nb.FM_OP_EMPTY, 1, "e", "", 0o444)])
    res = run_plan(dest, cas, plan)
    assert res.rc == -errno.EEXIST
    assert list(res.status) == [-errno.ECANCELED]
    res = run_plan(dest, cas, plan, dirs_exist=True)
    assert res.rc == 0
    assert (dest / "a" / "e").exists()


def test_exec_plan_never_creates_outside_through_symlinked_dirs(
    cas: Path, dest: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "a").symlink_to(outside)
    (dest / "b").mkdir()
    (dest / "b" / "c").symlink_to(outside)
    plan = make_plan(
        [(0, "a"), (0, "b"), (2, "c")],
        [
            (nb.FM_OP_LINK, 1, "f", "blobs/a", 0o444),
            (nb.FM_OP_EMPTY, 3, "g", "", 0o444),
            (nb.FM_OP_LINK, 0, "ok", "blobs/a", 0o444),
        ],
    )
    res = run_plan(dest, cas, plan, dirs_exist=True, keep_going=True)
    assert res.status[0] in (-errno.ELOOP, -errno.ENOTDIR, -errno.EXDEV)
    assert res.status[1] in (-errno.ELOOP, -errno.ENOTDIR, -errno.EXDEV)
    assert res.status[2] == 0
    assert os.listdir(outside) == []


def test_exec_plan_status_untouched_outputs_on_malformed(cas: Path, dest: Path) -> None:
    plan = make_plan([(0, "a")], [(nb.FM_OP_LINK, 1, "f", "blobs/a", 0o444)])
    plan.entry_dir[0] = 5  # out of range: rejected by the C core
    with raises_errno(errno.EINVAL):
        run_plan(dest, cas, plan)
    c = nb._CPlan.__new__(nb._CPlan)  # the raw C call too, outputs untouched
    plan.entry_dir[0] = 1
    c.__init__(plan)  # type: ignore[misc]
    c.c.entry_dir[0] = 5
    status = nb.ffi.new("int32_t[]", [77])
    how = nb.ffi.new("uint8_t[]", [77])
    dstat = nb.ffi.new("int32_t[]", [77, 77])
    with dirfd(dest) as d, dirfd(cas) as s:
        rc = nb.lib.fm_plan_exec(d, s, c.c, nb.ffi.NULL, status, how, dstat)
    assert rc == -errno.EINVAL
    assert (status[0], how[0], dstat[0], dstat[1]) == (77, 77, 77, 77)
    assert os.listdir(dest) == []


@pytest.mark.parametrize(
    "breakage",
    [
        "entry_dir_out_of_range",
        "negative_entry_dir",
        "names_count",
        "srcs_count",
        "dir_names_count",
        "parent_after_child",
        "root_parent",
        "slash_in_name",
        "dotdot_name",
        "dot_dir_name",
        "non_contiguous",
        "bad_op",
        "mode_array_length",
        "empty_link_src",
    ],
)
def test_exec_plan_malformed_is_einval(cas: Path, dest: Path, breakage: str) -> None:
    plan = make_plan(
        [(0, "a"), (1, "b")],
        [
            (nb.FM_OP_LINK, 1, "f", "blobs/a", 0o444),
            (nb.FM_OP_LINK, 2, "g", "blobs/a", 0o444),
            (nb.FM_OP_LINK, 1, "h", "blobs/a", 0o444),
        ],
    )
    if breakage == "non_contiguous":
        pass  # entries of directory 1 are split by directory 2 already
    else:
        plan.entry_dir[2] = 2
        if breakage == "entry_dir_out_of_range":
            plan.entry_dir[1] = 3
        elif breakage == "negative_entry_dir":
            plan.entry_dir[1] = -1
        elif breakage == "names_count":
            plan.names += b"extra\0"
        elif breakage == "srcs_count":
            plan.srcs = plan.srcs[: -len(b"blobs/a\0")]
        elif breakage == "dir_names_count":
            plan.dir_names += b"c\0"
        elif breakage == "parent_after_child":
            plan.dir_parent[1] = 2
        elif breakage == "root_parent":
            plan.dir_parent[0] = 0
        elif breakage == "slash_in_name":
            plan.names = plan.names.replace(b"g\0", b"../g\0")
        elif breakage == "dotdot_name":
            plan.names = plan.names.replace(b"g\0", b"..\0")
        elif breakage == "dot_dir_name":
            plan.dir_names = b"\0.\0b\0"
        elif breakage == "bad_op":
            plan.op = bytes([1, 9, 1])
        elif breakage == "mode_array_length":
            plan.mode.append(0o444)
        elif breakage == "empty_link_src":
            plan.srcs = b"blobs/a\0\0blobs/a\0"
    with raises_errno(errno.EINVAL) as e:
        run_plan(dest, cas, plan)
    assert "malformed plan" in str(e.value)
    assert os.listdir(dest) == []


def test_exec_plan_many_entries_many_threads(cas: Path, dest: Path) -> None:
    dirs = [(0, f"d{i}") for i in range(40)] + [(i + 1, "sub") for i in range(40)]
    entries: list[Entry] = []
    for d in range(1, 81):
        entries += [(nb.FM_OP_LINK, d, f"f{j}", "blobs/b", 0o444) for j in range(30)]
        entries.append((nb.FM_OP_SYMLINK, d, "s", "f0", 0))
        entries.append((nb.FM_OP_EMPTY, d, "e", "", 0o444))
    plan = make_plan(dirs, entries)
    fds = open_fds()
    res = run_plan(dest, cas, plan, threads=8, max_inflight=32)
    assert open_fds() == fds
    assert res.rc == 0
    assert set(res.status) == {0}
    assert (cas / "blobs/b").stat().st_nlink == 1 + 80 * 30
    assert (dest / "d39" / "sub" / "f29").stat().st_ino == (cas / "blobs/b").stat().st_ino
    assert os.readlink(dest / "d7" / "s") == "f0"


def test_exec_plan_empty_plan(cas: Path, dest: Path) -> None:
    res = run_plan(dest, cas, make_plan([], []))
    assert res.rc == 0
    assert res.how == b""
    assert list(res.dir_status) == [0]


def test_exec_plan_permission_denied_as_nobody(cas: Path, dest: Path) -> None:
    open_to_all(dest)
    open_to_all(cas / "blobs")
    plan = make_plan([(0, "d")], [(nb.FM_OP_SYMLINK, 0, "s", "t", 0)])

    def run() -> tuple[int, list[int], list[int]]:
        res = run_plan(dest, cas, plan, keep_going=True)
        return res.rc, list(res.dir_status), list(res.status)

    assert as_nobody(run) == (-errno.EACCES, [0, -errno.EACCES], [-errno.EACCES])


def test_floor_exec(cas: Path, dest: Path) -> None:
    plan = make_plan(
        [(0, "a"), (1, "b")],
        [
            (nb.FM_OP_LINK, 1, "f", "blobs/a", 0o444),
            (nb.FM_OP_SYMLINK, 1, "s", "t", 0),
            (nb.FM_OP_LINK, 2, "g", "blobs/b", 0o444),
        ],
    )
    with dirfd(dest) as d, dirfd(cas) as s:
        ns = nb.floor_exec(d, s, plan, 2)
        assert ns > 0
        assert (dest / "a" / "b" / "g").stat().st_ino == (cas / "blobs/b").stat().st_ino
        assert not (dest / "a" / "s").is_symlink()  # only LINK entries
        with pytest.raises(FileExistsError):
            nb.floor_exec(d, s, plan, 2)


# ---------------------------------------------------------------- mounts


def test_overlay_mount_and_umount(tmp_path: Path) -> None:
    if not can_mount():
        pytest.skip(str(mount_problem()))
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "f").write_text("lower")
    (lower / "f").chmod(0o444)
    nb.mount_overlay(lower, upper, work, merged)
    try:
        assert (merged / "f").read_text() == "lower"
        (merged / "f").chmod(0o644)
        (merged / "f").write_text("changed")
        assert (lower / "f").read_text() == "lower"
        assert mode_of(lower / "f") == 0o444
        assert (upper / "f").read_text() == "changed"
        opts = next(
            line.split()[3]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1] == str(merged)
        )
        assert "nosuid" in opts.split(",")
        assert "nodev" in opts.split(",")
    finally:
        nb.umount(merged)
    assert os.listdir(merged) == []
    with raises_errno(errno.EINVAL):
        nb.umount(merged)


def test_overlay_lazy_umount(tmp_path: Path) -> None:
    if not can_mount():
        pytest.skip(str(mount_problem()))
    dirs = [tmp_path / n for n in ("lower", "upper", "work", "merged")]
    for d in dirs:
        d.mkdir()
    nb.mount_overlay(*dirs)
    fd = os.open(dirs[3], os.O_RDONLY)  # busy
    try:
        nb.umount(dirs[3], detach=True)
    finally:
        os.close(fd)
    assert not os.path.ismount(dirs[3])


def test_overlay_errors(tmp_path: Path) -> None:
    dirs = [tmp_path / n for n in ("lower", "upper", "work", "merged")]
    for d in dirs:
        d.mkdir()
    with raises_errno(errno.EINVAL):
        nb.mount_overlay(tmp_path / "a,b", dirs[1], dirs[2], dirs[3])
    open_to_all(tmp_path)
    with pytest.raises(PermissionError):
        as_nobody(nb.mount_overlay, *map(str, dirs))
    with pytest.raises(PermissionError):
        as_nobody(nb.umount, "/")
    if can_mount():
        with pytest.raises(FileNotFoundError):
            nb.mount_overlay(tmp_path / "missing", dirs[1], dirs[2], dirs[3])


def test_clone_tree_is_macos_only(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    if nb.HAS_CLONEFILE:
        pytest.skip("macOS: clone_tree really clones")
    with raises_errno(errno.ENOTSUP):
        nb.clone_tree(nb.AT_FDCWD, tmp_path / "src", nb.AT_FDCWD, tmp_path / "dst")


# ---------------------------------------------------------------- ETXTBSY


def _child_holds_writable_fd_under(prefix: str) -> bool:
    """In a just-forked child: does any inherited fd open for writing point under prefix?"""
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            with open(f"/proc/self/fdinfo/{name}") as f:
                flags = int(next(ln for ln in f if ln.startswith("flags:")).split()[1], 8)
        except (OSError, StopIteration):
            continue
        if target.startswith(prefix) and flags & os.O_ACCMODE != os.O_RDONLY:
            return True
    return False


def test_children_forked_meanwhile_never_inherit_writable_fds(cas: Path, dest: Path) -> None:
    """Executables are written by threads with a private fd table: a child forked by
    another thread at any moment holds no writable fd to them (exec would be ETXTBSY)."""
    import threading

    big = cas / "big"
    big.write_bytes(os.urandom(4 * MiB))
    stop = threading.Event()
    leaks: list[int] = []
    forks = [0]

    def forker() -> None:
        while not stop.is_set():
            pid = os.fork()
            if pid == 0:
                os._exit(1 if _child_holds_writable_fd_under(str(dest)) else 0)
            _, status = os.waitpid(pid, 0)
            forks[0] += 1
            if os.waitstatus_to_exitcode(status) != 0:
                leaks.append(status)

    t = threading.Thread(target=forker)
    t.start()
    try:
        for i in range(15):
            with nb.injected("copy", -errno.ENOSYS):  # the slow read/write loop
                nb.private_copy(nb.AT_FDCWD, big, nb.AT_FDCWD, dest / f"x{i}", 0o555)
            nb.durable_write(nb.AT_FDCWD, dest / f"w{i}", b"#!/bin/sh\n" * 100_000, 0o755)
            plan = make_plan([], [(nb.FM_OP_COPY, 0, f"c{i}", "big", 0o555)])
            with nb.injected("copy", -errno.ENOSYS):
                assert run_plan(dest, cas, plan).rc == 0
    finally:
        stop.set()
        t.join()
    assert forks[0] > 0
    assert leaks == []


def test_concurrent_removers_of_one_tree(tmp_path: Path) -> None:
    import threading

    root = tmp_path / "big"
    for i in range(40):
        d = root / f"d{i}" / "sub"
        d.mkdir(parents=True)
        for j in range(40):
            (d / f"f{j}").write_text("x")
    outcomes: list[str] = []
    barrier = threading.Barrier(3)

    def remove() -> None:
        barrier.wait()
        try:
            nb.remove_tree(root)
        except OSError as e:
            outcomes.append(errno.errorcode.get(e.errno or 0, str(e.errno)))
        else:
            outcomes.append("ok")

    threads = [threading.Thread(target=remove) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not root.exists()
    assert "ok" in outcomes
    assert set(outcomes) <= {"ok", "ENOENT"}


def _threads_blocked_opening_a_fifo(before: set[str]) -> bool:
    for tid in set(os.listdir("/proc/self/task")) - before:
        try:
            wchan = Path(f"/proc/self/task/{tid}/wchan").read_text()
        except OSError:
            continue
        if "partner" in wchan or "fifo" in wchan:
            return True
    return False


def test_pool_threads_hold_no_copies_of_other_fds(tmp_path: Path) -> None:
    """A pool thread keeps only the plan's dirfds: a pipe this thread closes while a
    plan runs is really closed (a copy would keep it, and a writable file, open)."""
    import select
    import threading

    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    os.mkfifo(tmp_path / "src" / "fifo")  # opening it blocks the worker until we write
    plan = make_plan([], [(nb.FM_OP_COPY, 0, "c", "fifo", 0o444)])
    r, w = os.pipe()
    before = set(os.listdir("/proc/self/task"))
    results: list[nb.ExecResult] = []
    t = threading.Thread(
        target=lambda: results.append(run_plan(tmp_path / "dst", tmp_path / "src", plan))
    )
    t.start()
    try:
        for _ in range(500):
            if _threads_blocked_opening_a_fifo(before):
                break
            t.join(0.01)
        else:
            pytest.skip("cannot see the worker block (no /proc/*/wchan)")
        os.close(w)
        readable, _, _ = select.select([r], [], [], 5.0)
        assert readable == [r], "a pool thread still holds the pipe's write end"
        assert os.read(r, 1) == b""
    finally:
        os.close(os.open(tmp_path / "src" / "fifo", os.O_WRONLY))  # release the worker
        t.join()
        os.close(r)
    assert list(results[0].status) == [-errno.EINVAL]  # a FIFO is not a regular file


# Syscall numbers for the seccomp filters below, by machine.
_SYSCALLS = {
    "x86_64": {"openat2": 437, "renameat2": 316, "copy_file_range": 326},
    "aarch64": {"openat2": 437, "renameat2": 276, "copy_file_range": 285},
}


def _deny(name: str) -> None:
    """Installs a seccomp filter: syscall `name` fails with ENOSYS (an older kernel)."""
    import ctypes
    import platform

    nr = _SYSCALLS.get(platform.machine(), {}).get(name)
    if nr is None:
        raise NotImplementedError(f"no syscall number for {name} on {platform.machine()}")

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [
            ("len", ctypes.c_uint16),
            ("filter", ctypes.POINTER(SockFilter)),
        ]

    prog = (SockFilter * 4)(
        SockFilter(0x20, 0, 0, 0),  # BPF_LD|BPF_W|BPF_ABS: A = seccomp_data.nr
        SockFilter(0x15, 0, 1, nr),  # BPF_JMP|BPF_JEQ|BPF_K
        SockFilter(0x06, 0, 0, 0x00050000 | errno.ENOSYS),  # SECCOMP_RET_ERRNO
        SockFilter(0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    )
    fprog = SockFprog(4, prog)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def _deny_openat2() -> None:
    _deny("openat2")


@pytest.mark.skipif(not nb.HAS_OPENAT2, reason="openat2 missing: the fallback runs everywhere")
def test_exec_plan_component_wise_fallback_without_openat2(
    cas: Path, dest: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "evil").symlink_to(outside)
    plan = make_plan(
        [(0, "a"), (1, "b"), (2, "c")],
        [
            (nb.FM_OP_LINK, 3, "deep", "blobs/a", 0o444),
            (nb.FM_OP_EMPTY, 2, "e", "", 0o444),
        ],
    )
    hostile = make_plan([(0, "evil"), (1, "x")], [(nb.FM_OP_EMPTY, 1, "f", "", 0o444)])

    def run() -> tuple[int, int, list[int], list[int]]:
        _deny_openat2()
        caps = nb.lib.fm_capabilities()
        ok = run_plan(dest, cas, plan, threads=2)
        bad = run_plan(dest, cas, hostile, dirs_exist=True)
        return caps & nb.lib.FM_CAP_OPENAT2, ok.rc, list(ok.status), list(bad.status)

    has_openat2, rc, status, hostile_status = in_child(run)
    assert has_openat2 == 0  # the filter works: the executor had to fall back
    assert rc == 0
    assert status == [0, 0]
    assert (dest / "a" / "b" / "c" / "deep").stat().st_ino == (cas / "blobs/a").stat().st_ino
    assert hostile_status[0] in (-errno.ELOOP, -errno.ENOTDIR)
    assert os.listdir(outside) == []


def test_floor_exec_out_param_untouched_on_error(cas: Path, dest: Path) -> None:
    plan = make_plan([], [(nb.FM_OP_LINK, 0, "m", "blobs/missing", 0o444)])
    cplan = nb._CPlan(plan)
    elapsed = nb.ffi.new("uint64_t *", 12345)
    with dirfd(dest) as d, dirfd(cas) as s:
        assert nb.lib.fm_floor_exec(d, s, cplan.c, 1, elapsed) == -errno.ENOENT
    assert elapsed[0] == 12345


def test_exec_plan_defaults_null_opts(cas: Path, dest: Path) -> None:
    plan = make_plan([(0, "d")], [(nb.FM_OP_LINK, 1, "a", "blobs/a", 0o444)])
    cplan = nb._CPlan(plan)
    status = nb.ffi.new("int32_t[]", 1)
    how = nb.ffi.new("uint8_t[]", 1)
    dstat = nb.ffi.new("int32_t[]", 2)
    with dirfd(dest) as d, dirfd(cas) as s:
        rc = nb.lib.fm_plan_exec(d, s, cplan.c, nb.ffi.NULL, status, how, dstat)
    assert (rc, status[0], how[0], dstat[0], dstat[1]) == (0, 0, nb.FM_HOW_LINK, 0, 0)
    res = run_plan(
        dest / "d",
        cas,
        make_plan([], [(nb.FM_OP_LINK, 0, "b", "blobs/b", 0o444)]),
        threads=0,
        max_inflight=0,
    )
    assert res.rc == 0


def test_exec_plan_emlink_for_real_on_ext4(tmp_path: Path) -> None:
    """ext4 allows 65,000 links per inode: the 65,000th link rotates the source once."""
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not fstype.startswith("ext"):
        pytest.skip(f"tmp_path is on {fstype or 'an unknown filesystem'}, not ext4")
    (tmp_path / "cas").mkdir()
    blob = tmp_path / "cas" / "blob"
    blob.write_bytes(b"popular")
    blob.chmod(0o444)
    old_ino = blob.stat().st_ino
    n_dirs, per_dir = 65, 1000 + 1  # 65,065 links of one blob
    dirs = [(0, f"d{i}") for i in range(n_dirs)]
    entries = [
        (nb.FM_OP_LINK, d, f"f{j}", "blob", 0o444)
        for d in range(1, n_dirs + 1)
        for j in range(per_dir)
    ]
    dest = tmp_path / "dest"
    dest.mkdir()
    res = run_plan(dest, tmp_path / "cas", make_plan(dirs, entries), threads=4)
    assert res.rc == 0
    assert set(res.status) == {0}
    rotated = [i for i, h in enumerate(res.how) if h & nb.FM_HOW_ROTATED]
    assert len(rotated) == 1  # one rotation, however many threads hit EMLINK
    assert all(h & nb.FM_HOW_METHOD_MASK == nb.FM_HOW_LINK for h in res.how)
    new = blob.stat()
    assert new.st_ino != old_ino
    assert stat.S_IMODE(new.st_mode) == 0o444
    assert blob.read_bytes() == b"popular"
    moved_on = len(entries) - (65_000 - 1)  # links beyond the old inode's limit
    assert new.st_nlink == 1 + moved_on
    nb.remove_tree(dest)


@pytest.mark.stress
def test_stress_exec_plan_100k_entries_with_fallbacks(cas: Path, dest: Path) -> None:
    """100,000 entries in 1,000 directories on 8 threads, with EXDEV and EMLINK injected
    into the middle of the run: every entry made, every fallback counted."""
    dirs = [(0, f"d{i}") for i in range(100)] + [(1 + i % 100, f"s{i}") for i in range(900)]
    entries: list[Entry] = []
    blobs = ["blobs/a", "blobs/b", "blobs/x"]
    for d in range(1, len(dirs) + 1):
        for j in range(98):
            entries.append((nb.FM_OP_LINK, d, f"f{j}", blobs[j % 3], 0o444))
        entries.append((nb.FM_OP_SYMLINK, d, "s", "f0", 0))
        entries.append((nb.FM_OP_EMPTY, d, "e", "", 0o444))
    plan = make_plan(dirs, entries)
    fds = open_fds()
    with nb.injected("link", -errno.EXDEV, 500):
        res = run_plan(dest, cas, plan, threads=8, max_inflight=256)
    assert res.rc == 0
    assert set(res.status) == {0}
    assert open_fds() == fds
    xdev = sum(1 for h in res.how if h & nb.FM_HOW_XDEV)
    assert xdev == 500
    dest2 = dest.parent / "dest2"
    dest2.mkdir()
    with nb.injected("link", -errno.EMLINK, 30):
        res = run_plan(dest2, cas, plan, threads=8, max_inflight=256)
    assert res.rc == 0
    assert sum(1 for h in res.how if h & nb.FM_HOW_ROTATED) == 30
    for b in blobs:
        assert mode_of(cas / b) == (0o555 if b.endswith("x") else 0o444)
    nb.remove_tree(dest)
    nb.remove_tree(dest2)
    assert leftovers(cas / "blobs") == []


def test_publish_and_copy_without_renameat2_or_copy_file_range(tmp_path: Path) -> None:
    """Old kernels: RENAME_NOREPLACE falls back to link + unlink, copies to read/write."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(300_000))
    (tmp_path / "taken").write_text("mine")

    def run() -> list[str]:
        _deny("renameat2")
        _deny("copy_file_range")
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


def test_exec_plan_enospc_leaves_no_partial_files(cas: Path, tmp_path: Path) -> None:
    if not can_mount():
        pytest.skip(str(mount_problem()))
    (cas / "blobs" / "big").write_bytes(os.urandom(256 * 1024))
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(tiny)], check=True)
    try:
        plan = make_plan(
            [],
            [
                (nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444),  # EXDEV: a small copy fits
                (nb.FM_OP_LINK, 0, "big", "blobs/big", 0o444),  # does not
                (nb.FM_OP_COPY, 0, "big2", "blobs/big", 0o444),
            ],
        )
        res = run_plan(tiny, cas, plan, threads=1, keep_going=True)
        assert list(res.status) == [0, -errno.ENOSPC, -errno.ENOSPC]
        assert res.rc == -errno.ENOSPC
        assert sorted(os.listdir(tiny)) == ["a"]
        assert (tiny / "a").read_bytes() == b"alpha\n"
    finally:
        subprocess.run(["umount", str(tiny)], check=False)
