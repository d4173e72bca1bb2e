"""Hostile neighbours (invariant 13): a process that can write next to a destination or
inside a tree being removed races fastmat with renames; nothing outside what fastmat
was given may be created, deleted or chmod'ed.

Each test runs an attacker thread swapping names with ``renameat2(RENAME_EXCHANGE)``
while fastmat works, then checks the bystander files and directories."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest

from fastmat import BlobNotFoundError, proto
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.materialize import materialize
from tests.helpers import attacker, exchange


def _tree(cas: LocalCAS, files: int, *, missing: bool = False) -> Digest:
    d = proto.Directory()
    for i in range(files):
        data = f"file {i}\n".encode()
        blob = Digest.of(data) if missing and i == files - 1 else cas.put(data)
        f = d.files.add(name=f"f{i:04d}")
        f.digest.hash, f.digest.size_bytes = blob.hash, blob.size_bytes
    return cas.put(d.SerializeToString())


def _bystander(outside: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """(type+mode, ino, content) of everything under ``outside``."""
    out = {}
    for p in [outside, *outside.rglob("*")]:
        st = p.lstat()
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(p.relative_to(outside))] = (st.st_mode, st.st_ino, data)
    return out


@pytest.mark.parametrize(
    "n", [pytest.param(300, id="300"), pytest.param(3000, id="3000", marks=pytest.mark.stress)]
)
def test_parent_swapped_for_a_symlink_never_reaches_outside(n: int, tmp_path: Path) -> None:
    """The destination's parent is swapped with a symlink to another directory while
    materializes (half of them failing on a missing blob) run: trees land complete in
    the directory the parent was when the call resolved it, cleanup never deletes or
    chmods anything in the other directory (before the fix: the parent was looked up
    by path three times)."""
    cas = LocalCAS(tmp_path / "cas", fsync=False)
    good, bad = _tree(cas, 256), _tree(cas, 256, missing=True)
    work, outside = tmp_path / "work", tmp_path / "outside"
    parent, link = work / "parent", work / "link"
    parent.mkdir(parents=True)
    outside.mkdir()
    link.symlink_to(outside)
    for i in range(n):  # what a careless cleanup would remove or chmod
        victim = outside / f"d{i}"
        victim.mkdir(mode=0o700)
        (victim / "keep").write_bytes(b"precious\n")
    before = _bystander(outside)
    with attacker(lambda: exchange(parent, link)):
        for i in range(n):
            dest = parent / f"d{i}"
            expected = (BlobNotFoundError, FileExistsError, FileNotFoundError, NotADirectoryError)
            with contextlib.suppress(*expected):
                # the missing blob is found by its link, after the others were linked
                materialize(cas, bad if i % 2 else good, dest, check_blobs_first=False)
    assert _bystander(outside) == before  # nothing outside touched, failures included
    real = parent if parent.is_dir() and not parent.is_symlink() else link
    landed = sorted(p.name for p in real.iterdir()) if real.is_dir() else []
    for name in landed:
        assert len(os.listdir(real / name)) == 256  # complete, or absent
    cas.close()
