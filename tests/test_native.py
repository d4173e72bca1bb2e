"""The C contract (csrc/fastmat.h), function by function, through fastmat._binding."""

from __future__ import annotations

import array
import errno
import os
from pathlib import Path

import pytest

from fastmat import _binding as nb


def _plan(
    dirs: list[tuple[int, str]], entries: list[tuple[int, int, str, str, int]]
) -> nb.PlanArrays:
    """dirs: (parent, name) after the root; entries: (op, dir, name, src, mode)."""
    return nb.PlanArrays(
        dir_parent=array.array("i", [-1] + [p for p, _ in dirs]),
        dir_names=b"\0" + b"".join(n.encode() + b"\0" for _, n in dirs),
        op=bytes(e[0] for e in entries),
        entry_dir=array.array("i", [e[1] for e in entries]),
        mode=array.array("I", [e[4] for e in entries]),
        mtime_ns=None,
        names=b"".join(e[2].encode() + b"\0" for e in entries),
        srcs=b"".join(e[3].encode() + b"\0" for e in entries),
    )


def test_smoke_link_and_exec(tmp_path: Path) -> None:
    (tmp_path / "cas").mkdir()
    blob = tmp_path / "cas" / "blob"
    blob.write_bytes(b"hello")
    dest = tmp_path / "dest"
    dest.mkdir()
    nb.link(nb.AT_FDCWD, blob, nb.AT_FDCWD, tmp_path / "l")
    assert (tmp_path / "l").stat().st_ino == blob.stat().st_ino
    with pytest.raises(FileExistsError):
        nb.link(nb.AT_FDCWD, blob, nb.AT_FDCWD, tmp_path / "l")
    plan = _plan(
        [(0, "d")],
        [
            (nb.FM_OP_LINK, 1, "f", "blob", 0o444),
            (nb.FM_OP_SYMLINK, 1, "s", "../x", 0),
            (nb.FM_OP_EMPTY, 1, "e", "", 0o555),
        ],
    )
    src_fd = os.open(tmp_path / "cas", os.O_RDONLY | os.O_DIRECTORY)
    dst_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        res = nb.exec_plan(dst_fd, src_fd, plan, threads=2)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert res.rc == 0, res
    assert list(res.status) == [0, 0, 0]
    assert (dest / "d" / "f").stat().st_ino == blob.stat().st_ino
    assert os.readlink(dest / "d" / "s") == "../x"
    assert (dest / "d" / "e").stat().st_mode & 0o7777 == 0o555
    assert res.how == bytes([nb.FM_HOW_LINK, nb.FM_HOW_SYMLINK, nb.FM_HOW_CREATE])


def test_remove_tree_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        nb.remove_tree(tmp_path / "nope")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    (tmp_path / "a" / "b").chmod(0o500)
    nb.remove_tree(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert errno.ENOENT == 2


def test_fixtures(xfs_dir: Path, tmpfs_dir: Path) -> None:
    assert nb.probe_reflink(xfs_dir)
    assert not nb.probe_reflink(tmpfs_dir)
