"""fm_probe.c: the ABI number (and the binding's stale-build check at import),
capabilities, the reflink probe, the filesystem type; and the binding's errno ->
OSError mapping."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmat import _binding as nb
from fastmat.errors import NativeBuildError
from tests.helpers import as_nobody, dirfd, open_to_all

XFS, TMPFS = 0x58465342, 0x01021994


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


# ---------------------------------------------------------------- probe_reflink


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


# ---------------------------------------------------------------- fm_fs_magic


def test_fs_magic(tmp_path: Path, tmpfs_dir: Path, xfs_dir: Path) -> None:
    for where, magic in ((tmpfs_dir, TMPFS), (xfs_dir, XFS)):
        with dirfd(where) as d:
            assert nb.fs_magic(d) == magic
    with dirfd(tmp_path) as d:
        assert nb.fs_magic(d) > 0  # ext4 on CI (0xEF53); whatever holds tmp elsewhere


def test_fs_magic_bad_fd_leaves_out_param() -> None:
    out = nb.ffi.new("uint64_t *", 77)
    assert nb.lib.fm_fs_magic(-1, out) == -errno.EBADF
    assert out[0] == 77
