"""fm_walk.c: fm_remove_tree (lstat semantics, O(1) fds at any depth, mount points,
concurrent removers)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import subprocess
from pathlib import Path

import pytest

from fastmat import _binding as nb
from tests.helpers import (
    as_nobody,
    attacker,
    can_mount,
    dirfd,
    exchange,
    in_child,
    mode_of,
    mount_problem,
    open_fds,
    open_to_all,
    raises_errno,
)


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


@pytest.mark.parametrize(
    "tries", [pytest.param(600, id="600"), pytest.param(5000, id="5000", marks=pytest.mark.stress)]
)
def test_remove_tree_never_chmods_through_a_swapped_name(tries: int, tmp_path: Path) -> None:
    """A directory without u+rwx is made writable before it is entered. Before the
    fix that chmod went by name after an lstat: a RENAME_EXCHANGE loop swapping the
    directory with a symlink to a 0600 file outside the tree made that file 0777."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret\n")
    outside.chmod(0o600)
    for i in range(tries):
        root = tmp_path / f"t{i}"
        (root / "d").mkdir(parents=True)
        (root / "d" / "f").write_bytes(b"x")
        (root / "d").chmod(0o077)  # no u+rwx: remove_tree must chmod it
        (root / "s").symlink_to(outside)
        swap = functools.partial(exchange, root / "d", root / "s")
        with attacker(swap), contextlib.suppress(OSError):
            nb.remove_tree(root)  # a swap can make it fail (ENOTDIR, ESTALE...), no more
        assert mode_of(outside) == 0o600, f"chmod reached outside after {i} tries"
        assert outside.read_bytes() == b"secret\n"
        if root.exists():
            root.chmod(0o700)
            nb.remove_tree(root)


def test_remove_tree_with_stdin_closed(tmp_path: Path) -> None:
    """fd 0 is a valid directory fd when stdin is closed (it was taken for 'no fd':
    the walk leaked it and failed with ENOTEMPTY)."""
    (tmp_path / "t" / "a" / "b").mkdir(parents=True)
    (tmp_path / "t" / "a" / "b" / "f").write_bytes(b"f")

    def closed_stdin() -> tuple[bool, int]:
        os.close(0)
        before = open_fds()
        nb.remove_tree(tmp_path / "t")
        return os.path.exists(tmp_path / "t"), open_fds() - before

    assert in_child(closed_stdin) == (False, 0)
