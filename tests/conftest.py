"""Shared fixtures: a loop-mounted XFS with reflink, and a tmpfs, each mounted once
per session (skipped with the reason where this machine cannot mount); for the C
core's tests, a tiny stand-in CAS directory (``cas``) and a destination (``dest``).

Test modules that work on a LocalCAS define their own ``cas`` fixture, which
overrides this one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run_cmd

XFS_IMAGE_BYTES = 1 << 30  # sparse: only what the tests write uses disk
TMPFS_SIZE = "512m"


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
    """An empty directory tmp_path/dest."""
    d = tmp_path / "dest"
    d.mkdir()
    return d


def _mount_or_skip(*cmd: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    res = run_cmd(*cmd)
    if res.returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(cmd)}): {res.stderr.strip() or res.returncode}")


def _umount(mnt: Path) -> None:
    if run_cmd("umount", str(mnt)).returncode != 0:
        run_cmd("umount", "-l", str(mnt))


@pytest.fixture(scope="session")
def _xfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs (xfsprogs) is not installed")
    base = tmp_path_factory.mktemp("xfs")
    image, mnt = base / "xfs.img", base / "mnt"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(XFS_IMAGE_BYTES)
    res = run_cmd("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image))
    if res.returncode != 0:
        pytest.skip(f"mkfs.xfs -m reflink=1 failed: {res.stderr.strip()}")
    _mount_or_skip("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield mnt
    finally:
        _umount(mnt)
        image.unlink(missing_ok=True)


@pytest.fixture
def xfs_dir(_xfs_mount: Path) -> Path:
    """A fresh empty directory on a loop-mounted XFS made with ``-m reflink=1``."""
    return Path(tempfile.mkdtemp(dir=_xfs_mount, prefix="t-"))


@pytest.fixture(scope="session")
def _tmpfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mnt = tmp_path_factory.mktemp("tmpfs")
    _mount_or_skip("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        _umount(mnt)


@pytest.fixture
def tmpfs_dir(_tmpfs_mount: Path) -> Path:
    """A fresh empty directory on a tmpfs (another filesystem than tmp_path: EXDEV)."""
    return Path(tempfile.mkdtemp(dir=_tmpfs_mount, prefix="t-"))


def pytest_configure(config: pytest.Config) -> None:
    """With FASTMAT_EXPECT_INSTALLED=1 (CI's run against the wheel) the tests must
    import an installed fastmat, not a source tree that happens to be on the path."""
    if os.environ.get("FASTMAT_EXPECT_INSTALLED") == "1":
        import fastmat

        where = Path(fastmat.__file__).resolve()
        if "site-packages" not in where.parts:
            raise pytest.UsageError(f"expected an installed fastmat, imported {where}")
