"""Collecting an action's outputs (fastmat.worker.outputs) and the path rules behind it
(fastmat.worker.paths), on a real directory and a real local CAS; no server needed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat import proto
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.worker import paths
from fastmat.worker import proto as wproto
from fastmat.worker.outputs import OutputError, collect


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", fsync=False) as c:
        yield c


@pytest.fixture
def wd(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    d = tmp_path / "wd"
    d.mkdir()
    fd = os.open(d, paths.O_DIR)
    yield d, fd
    os.close(fd)


def cmd(**kw: object) -> object:
    return wproto.Command(arguments=["true"], **kw)


def test_output_paths_report_files_directories_and_symlinks(
    cas: LocalCAS, wd: tuple[Path, int]
) -> None:
    d, fd = wd
    (d / "out").mkdir()
    (d / "out" / "exe").write_bytes(b"#!/bin/sh\n")
    (d / "out" / "exe").chmod(0o755)
    (d / "out" / "data").write_bytes(b"data")
    tree = d / "tree"
    (tree / "b" / "c").mkdir(parents=True)
    (tree / "a").write_bytes(b"a")
    (tree / "b" / "c" / "deep").write_bytes(b"deep")
    (tree / "b" / "same").write_bytes(b"a")  # same content: one blob
    (tree / "b" / "c" / "x").mkdir()
    (tree / "e").mkdir()  # empty directory, kept
    (tree / "link").symlink_to("/outside/anything")  # verbatim, never followed
    (d / "lnk").symlink_to("out/data")
    c = cmd(output_paths=["out/exe", "out/data", "tree", "lnk", "missing/file"])
    out = collect(cas, fd, c)
    r = out.result
    files = {f.path: f for f in r.output_files}
    assert set(files) == {"out/exe", "out/data"}
    assert files["out/exe"].is_executable
    assert not files["out/data"].is_executable
    assert cas.read(Digest(files["out/data"].digest.hash, 4)) == b"data"
    assert [(s.path, s.target) for s in r.output_symlinks] == [("lnk", "out/data")]
    (od,) = r.output_directories
    assert od.is_topologically_sorted
    assert not od.root_directory_digest.hash
    t = proto.Tree.FromString(out.blobs[Digest(od.tree_digest.hash, od.tree_digest.size_bytes)])
    assert [f.name for f in t.root.files] == ["a"]
    assert [n.name for n in t.root.directories] == ["b", "e"]
    assert [(s.name, s.target) for s in t.root.symlinks] == [("link", "/outside/anything")]
    # children: each directory before its own children, each distinct one once (the
    # empty directories e and b/c/x are the same message)
    names = [sorted(n.name for n in c.directories) for c in t.children]
    assert names == [["c"], [], ["x"]]
    assert out.files == 5
    assert out.bytes == len(b"#!/bin/sh\n") + 4 + 1 + 4 + 1
    # every referenced blob is in the local CAS (files) or among the blobs (messages)
    for dd, data in out.blobs.items():
        assert data is not None or dd in cas


def test_older_fields_put_symlinks_where_v2_0_clients_look(
    cas: LocalCAS, wd: tuple[Path, int]
) -> None:
    d, fd = wd
    (d / "f").write_bytes(b"f")
    (d / "flink").symlink_to("f")
    (d / "dir").mkdir()
    (d / "dlink").symlink_to("dir")
    c = cmd(output_files=["f", "flink"], output_directories=["dir", "dlink"])
    r = collect(cas, fd, c).result
    assert [f.path for f in r.output_files] == ["f"]
    assert [s.path for s in r.output_file_symlinks] == ["flink"]
    assert [s.path for s in r.output_directory_symlinks] == ["dlink"]
    assert not r.output_symlinks
    assert [o.path for o in r.output_directories] == ["dir"]


def test_directory_only_format_gives_the_root_directory_digest(
    cas: LocalCAS, wd: tuple[Path, int]
) -> None:
    d, fd = wd
    (d / "o" / "s").mkdir(parents=True)
    (d / "o" / "s" / "f").write_bytes(b"x")
    out = collect(cas, fd, cmd(output_paths=["o"], output_directory_format=wproto.DIRECTORY_ONLY))
    (od,) = out.result.output_directories
    assert not od.tree_digest.hash
    root_d = Digest(od.root_directory_digest.hash, od.root_directory_digest.size_bytes)
    root = proto.Directory.FromString(out.blobs[root_d])
    (sub,) = root.directories
    sub_d = Digest(sub.digest.hash, sub.digest.size_bytes)
    assert proto.Directory.FromString(out.blobs[sub_d]).files[0].name == "f"
    assert root_d in cas
    assert sub_d in cas


def test_outputs_of_the_wrong_kind_are_refused(cas: LocalCAS, wd: tuple[Path, int]) -> None:
    d, fd = wd
    (d / "adir").mkdir()
    (d / "afile").write_bytes(b"")
    os.mkfifo(d / "fifo")
    (d / "withfifo").mkdir()
    os.mkfifo(d / "withfifo" / "p")
    for c, words in (
        (cmd(output_files=["adir"]), "'adir' is a directory"),
        (cmd(output_directories=["afile"]), "'afile' is not a directory"),
        (cmd(output_paths=["fifo"]), "neither a file nor a directory"),
        (cmd(output_paths=["withfifo"]), "withfifo/p"),
    ):
        with pytest.raises(OutputError, match=words):
            collect(cas, fd, c)


def test_a_symlinked_parent_is_never_followed(
    cas: LocalCAS, wd: tuple[Path, int], tmp_path: Path
) -> None:
    d, fd = wd
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_bytes(b"do not upload")
    (d / "out").symlink_to(secret)
    out = collect(cas, fd, cmd(output_paths=["out/key"], output_files=[]))
    assert not out.result.output_files
    assert not out.blobs
    with pytest.raises(OSError):  # noqa: PT011 - ELOOP or ENOTDIR, either is right
        paths.make_dirs(fd, ["out", "sub"], None)
    assert not (secret / "sub").exists()


@pytest.mark.parametrize("bad", ["/abs", "a/../b", "a//b", "./a", "a/", "", "a/\0b", ".."])
def test_command_paths_must_be_normalized_and_relative(bad: str) -> None:
    with pytest.raises(paths.BadPathError, match="output"):
        paths.split(bad, "output path")


def test_make_dirs_creates_0755_dirs_owned_as_asked(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        fd0 = os.open(tmp_path, paths.O_DIR)
        try:
            os.close(paths.make_dirs(fd0, ["x", "y"], None))
        finally:
            os.close(fd0)
    finally:
        os.umask(old)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "x" / "y").stat().st_mode & 0o777 == 0o755
    if os.geteuid() == 0:
        fd0 = os.open(tmp_path, paths.O_DIR)
        try:
            os.close(paths.make_dirs(fd0, ["x", "z"], (65534, 65534)))
        finally:
            os.close(fd0)
        assert (tmp_path / "x" / "z").stat().st_uid == 65534
        assert (tmp_path / "x").stat().st_uid == 0  # existing, not the last: untouched
