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
from fastmat.fs import owned
from fastmat.fs.owned import OwnedDir
from tests.cache_helpers import BASIC, ingest
from tests.helpers import in_child


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


class _SweepFirst:
    """Stands in for a module (``os``, ``fcntl``) in fastmat.fs.owned: before each of
    ``calls`` it runs a sweep of ``tmp`` in a forked child, as another process opening
    the cache at the worst instant would."""

    def __init__(self, real: object, calls: set[str], sweep: Callable[[], int]) -> None:
        self._real, self._calls, self._sweep = real, calls, sweep
        self.pid = os.getpid()

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._real, name)
        if name not in self._calls or os.getpid() != self.pid:
            return attr

        def sweep_then(*args: object, **kwargs: object) -> object:
            self._sweep()
            return attr(*args, **kwargs)

        return sweep_then


def test_a_concurrent_sweep_never_trashes_a_live_caches_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10, item 10: the cache created owner.lock and only then locked it, so a sweep
    in between took the lock and trashed a live instance's scratch. OwnedDir locks it
    under a temp name and renames it into place: a sweep at every step finds nothing."""
    with LocalCAS(tmp_path / "cas") as cas:
        root = ingest(cas, tmp_path / "src", BASIC)
        DirectoryCache(cas, tmp_path / "cache").close()
        tmp = tmp_path / "cache" / "tmp"
        swept: list[int] = []

        def sweep() -> int:
            def in_other_process() -> int:
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    return owned.sweep_dead(fd, keep="")
                finally:
                    os.close(fd)

            n = in_child(in_other_process)
            swept.append(n)
            return n

        steps = {"mkdir", "open", "rename", "stat", "flock"}
        monkeypatch.setattr("fastmat.fs.owned.os", _SweepFirst(os, steps, sweep))
        monkeypatch.setattr("fastmat.fs.owned.fcntl", _SweepFirst(fcntl, steps, sweep))
        cache = DirectoryCache(cas, tmp_path / "cache")
        monkeypatch.undo()
        with cache:
            assert len(swept) >= 5  # a sweep before each step of claiming the scratch
            assert swept == [0] * len(swept)
            scratch = cache.path / "tmp" / os.listdir(tmp)[0]
            assert (scratch / "owner.lock").is_file()
            assert not cache.materialize(root, tmp_path / "d").hit  # built in the scratch
            assert cache.materialize(root, tmp_path / "d2").hit
