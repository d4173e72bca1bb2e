"""Staging a tree beside its destination (fastmat.fs.staging): what is left of an
unpublished tree is removed (the sweeps between processes: tests/test_kill.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastmat.fs import staging


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
