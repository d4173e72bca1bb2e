"""EMLINK for real: 70,000 links to one blob on ext4 (65,000 links per inode)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fastmat import proto
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.materialize import materialize

pytestmark = pytest.mark.stress

EXT4_LINK_MAX = 65_000


def _fstype(path: Path) -> str:
    out = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _same_content_tree(cas: LocalCAS, data: bytes, dirs: int, per_dir: int) -> Digest:
    blob = cas.put(data)
    leaf = proto.Directory()
    for i in range(per_dir):
        f = leaf.files.add(name=f"f{i:05d}")
        f.digest.hash, f.digest.size_bytes = blob.hash, blob.size_bytes
    sub = cas.put(leaf.SerializeToString())
    root = proto.Directory()
    for j in range(dirs):  # the same Directory digest in every slot
        d = root.directories.add(name=f"d{j:03d}")
        d.digest.hash, d.digest.size_bytes = sub.hash, sub.size_bytes
    return cas.put(root.SerializeToString())


def test_70000_links_to_one_blob_rotate(tmp_path: Path) -> None:
    if _fstype(tmp_path) not in ("ext2/ext3", "ext4"):  # stat(1) calls ext4 "ext2/ext3"
        pytest.skip(f"needs ext4 (65,000 links per inode), {tmp_path} is {_fstype(tmp_path)}")
    data = b"the same header in every translation unit\n"
    with LocalCAS(tmp_path / "cas", fsync=False) as cas:
        root = _same_content_tree(cas, data, dirs=70, per_dir=1000)
        dest = tmp_path / "dest"
        stats = materialize(cas, root, dest)
        assert stats.files == 70_000
        assert stats.rotated >= 1
        assert stats.linked == 70_000
        assert stats.copied == stats.cross_device == 0
        inodes: dict[int, int] = {}
        for j in range(70):
            d = dest / f"d{j:03d}"
            names = os.listdir(d)
            assert len(names) == 1000
            for n in names:
                st = os.lstat(d / n)
                inodes[st.st_ino] = st.st_nlink
                assert st.st_mode & 0o7777 == 0o444
        assert 1 < len(inodes) <= stats.rotated + 1
        assert all(n <= EXT4_LINK_MAX for n in inodes.values())
        assert (dest / "d069" / "f00999").read_bytes() == data
        assert os.stat(cas.path(cas.put(data))).st_mode & 0o7777 == 0o444
