"""fm_mount.c: overlay mounts and umount (gated by a mount probe), clone_tree."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fastmat import _binding as nb
from tests.helpers import as_nobody, can_mount, mode_of, mount_problem, open_to_all, raises_errno


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
