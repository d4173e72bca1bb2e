"""OwnedDir (fastmat.fs.owned): temp dirs owned by a live process through an flock,
and the sweep of dead owners' ones, also from a DirectoryCache's point of view."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fastmat.cache import DirectoryCache
from fastmat.cache import protocol as cache_protocol
from fastmat.cas import LocalCAS
from fastmat.fs.owned import OwnedDir


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _fail(err: int) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(err, os.strerror(err))

    return fail


@pytest.mark.parametrize(("where", "err"), [("rename", errno.EIO), ("flock", errno.ENOLCK)])
def test_owned_dir_create_leaks_nothing_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, err: int
) -> None:
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        before = open_fds()
        monkeypatch.setattr(os if where == "rename" else fcntl, where, _fail(err))
        with pytest.raises(OSError, match=os.strerror(err)) as info:
            OwnedDir.create(parent)
        monkeypatch.undo()
        assert info.value.errno == err
        assert open_fds() == before
        assert os.listdir(tmp_path) == []  # nor a half-made directory
    finally:
        os.close(parent)


def test_directory_cache_init_leaks_nothing_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalCAS(tmp_path / "cas") as cas:
        DirectoryCache(cas, tmp_path / "cache").close()
        (tmp_path / "cache" / "trash" / "old").mkdir()  # wakes the background deleter
        before = open_fds()

        def broken(*args: object) -> None:
            raise RuntimeError("adoption failed")

        monkeypatch.setattr(cache_protocol, "adopt_all", broken)
        with pytest.raises(RuntimeError, match="adoption failed"):
            DirectoryCache(cas, tmp_path / "cache")
        monkeypatch.undo()
        assert open_fds() == before
        assert os.listdir(tmp_path / "cache" / "tmp") == []  # its owned dir is gone too
        with DirectoryCache(cas, tmp_path / "cache") as cache:
            assert cache.stats().entries == 0
