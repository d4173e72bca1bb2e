"""Staging a tree beside its destination (fastmat.fs.staging): a sweeper in another
process never makes a builder fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastmat.fs import staging


def test_a_sweep_between_mkdir_and_lock_is_survived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's first staging in the same parent sweeps the dead staging
    directories it can flock, and a fresh one is flock-able until its builder locks it:
    four processes replaying a cache entry side by side failed with FileNotFoundError
    on their own staging directory (seen in tests/test_cache_processes.py)."""
    real_mkdir = os.mkdir
    swept: list[int] = []

    def mkdir_then_sweep(path: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        if dir_fd is not None and str(path).startswith(staging.PREFIX) and not swept:
            swept.append(staging._sweep(dir_fd))  # the other process, at the worst moment

    monkeypatch.setattr(os, "mkdir", mkdir_then_sweep)
    with staging.staged(tmp_path / "dest") as st:
        os.mkdir("sub", dir_fd=st.fd)
        st.publish()
    assert swept == [1]  # it did take the first one
    assert os.listdir(tmp_path) == ["dest"]
    assert os.listdir(tmp_path / "dest") == ["sub"]


def test_an_unpublished_tree_is_removed_in_parallel_without_following_links(
    tmp_path: Path,
) -> None:
    """A failed (or cancelled) build is removed subtree by subtree on several threads,
    from the first level with enough directories (here one level down); a symlink to a
    directory outside is removed, never entered."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep\n")

    class Boom(Exception):
        pass

    def build_and_fail() -> None:
        with staging.staged(tmp_path / "dest") as st:
            top = tmp_path / st.tmp / "top"
            for i in range(12):
                d = top / f"d{i}" / "deeper"
                d.mkdir(parents=True)
                for j in range(20):
                    (d / f"f{j}").write_text(f"{i}.{j}\n")
                (top / f"d{i}" / "out").symlink_to(outside)
            (tmp_path / st.tmp / "file").write_text("x\n")
            subs, opened = staging._subtrees(st.fd, 4)
            for fd in opened:
                os.close(fd)
            assert sorted(n for _, n in subs) == sorted(f"d{i}" for i in range(12))
            raise Boom

    with pytest.raises(Boom):
        build_and_fail()
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert (outside / "keep").read_text() == "keep\n"
