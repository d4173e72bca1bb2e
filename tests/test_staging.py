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
