"""Who may use a CAS or a cache (fastmat.fs.access): a new root is private and lock files
are 0600, so an unprivileged user can no longer flock (and so block) anything; with
``group=`` the members of one group share them (issue 10, item 4)."""

from __future__ import annotations

import fcntl
import grp
import os
import stat
from pathlib import Path

import pytest

from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.fs.access import Access
from fastmat.remote.flight import FetchLocks
from tests.cache_helpers import BASIC, ingest, snapshot
from tests.helpers import NOBODY, as_nobody, open_to_all

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _try_flock(path: str) -> str:
    """What an unprivileged user gets trying to share-lock ``path``: LOCK_SH alone holds
    off an eviction or a rebuild, and on owner.lock makes a dead owner look alive."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except PermissionError:
        return "denied"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return "locked"
    except BlockingIOError:
        return "held"
    finally:
        os.close(fd)


def _lock_files(tmp_path: Path, cas: LocalCAS, root: Digest) -> list[Path]:
    fetch = FetchLocks(cas.root / "locks", mode=cas.access.lock_mode)
    token = fetch.try_lock(root)
    assert token is not None
    fetch.unlock(root, token)
    fetch.close()
    return [
        tmp_path / "cache" / "locks" / f"{root.key}.lock",
        *(tmp_path / "cache" / "tmp").glob("*/owner.lock"),
        *(tmp_path / "cas" / "tmp").glob("*/owner.lock"),
        tmp_path / "cas" / "locks" / "fetch.ofd",
    ]


def test_new_roots_are_private_and_nobody_else_can_lock(tmp_path: Path) -> None:
    open_to_all(tmp_path)
    with LocalCAS(tmp_path / "cas") as cas, DirectoryCache(cas, tmp_path / "cache") as cache:
        root = ingest(cas, tmp_path / "src", BASIC)
        cache.materialize(root, tmp_path / "d")
        assert _mode(tmp_path / "cas") == 0o700
        assert _mode(tmp_path / "cache") == 0o700
        files = _lock_files(tmp_path, cas, root)
        assert len(files) == 4
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
        assert [as_nobody(_try_flock, str(p)) for p in files] == ["denied"] * 4


def test_lock_files_are_private_in_an_existing_open_root(tmp_path: Path) -> None:
    """A root made by an older fastmat (or by hand) keeps its 0755; the lock files in it
    are private anyway, so nobody can hold a pin, a construction or a dead owner's
    scratch. Before: 0644, and nobody's LOCK_SH blocked root indefinitely."""
    open_to_all(tmp_path)
    for d in ("cas", "cache", "cas/locks"):
        (tmp_path / d).mkdir(mode=0o755)
    legacy = tmp_path / "cas" / "locks" / "fetch.ofd"
    legacy.touch(mode=0o644)  # outlives every process: brought to 0600 when used
    with LocalCAS(tmp_path / "cas") as cas, DirectoryCache(cas, tmp_path / "cache") as cache:
        root = ingest(cas, tmp_path / "src", BASIC)
        cache.materialize(root, tmp_path / "d")
        assert _mode(tmp_path / "cas") == 0o755  # not ours to change
        files = _lock_files(tmp_path, cas, root)
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
        assert [as_nobody(_try_flock, str(p)) for p in files] == ["denied"] * 4


def _build_as_member(cas_dir: str, cache_dir: str, src: str, dest: str) -> str:
    with LocalCAS(cas_dir, group=NOBODY) as cas, DirectoryCache(cas, cache_dir, group=NOBODY) as c:
        root = ingest(cas, Path(src), BASIC)
        assert not c.materialize(root, dest).hit
        return str(root)


def test_a_group_shares_the_cas_and_the_cache(tmp_path: Path) -> None:
    open_to_all(tmp_path)
    group = grp.getgrgid(NOBODY).gr_name
    with LocalCAS(tmp_path / "cas", group=group) as cas:
        DirectoryCache(cas, tmp_path / "cache", group=group).close()
        for d in ("cas", "cas/tmp", "cas/blobs/ff", "cas/quarantine", "cache", "cache/locks"):
            st = (tmp_path / d).stat()
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2770, NOBODY), d
        # a member (nobody's primary group), with umask 022, builds a tree and an entry
        work = tmp_path / "member"
        work.mkdir()
        os.chown(work, NOBODY, NOBODY)
        got = as_nobody(_build_as_member, str(cas.root), str(tmp_path / "cache"),
                        str(work / "src"), str(work / "d"))  # fmt: skip
        root = Digest.parse(got)
        lock = tmp_path / "cache" / "locks" / f"{root.key}.lock"
        assert (_mode(lock), lock.stat().st_gid, lock.stat().st_uid) == (0o660, NOBODY, NOBODY)
        for owner in (tmp_path / "cas" / "tmp").glob("*/owner.lock"):
            assert _mode(owner) == 0o660
        # and the root-owned worker hits the entry the member built
        with DirectoryCache(cas, tmp_path / "cache", group=group) as cache:
            assert cache.materialize(root, tmp_path / "d").hit
        assert snapshot(tmp_path / "d") == snapshot(work / "src")


def test_sharing_an_existing_cas_makes_every_directory_shared(tmp_path: Path) -> None:
    LocalCAS(tmp_path / "cas").close()
    assert _mode(tmp_path / "cas") == 0o700
    LocalCAS(tmp_path / "cas", group=NOBODY).close()
    for d in ("cas", "cas/locks", "cas/exec/00"):
        st = (tmp_path / d).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2770, NOBODY), d


def test_group_names_and_gids() -> None:
    assert Access.of(None) == Access()
    assert Access.of(NOBODY).gid == NOBODY
    assert Access.of(grp.getgrgid(NOBODY).gr_name).gid == NOBODY
    with pytest.raises(ValueError, match="no group named"):
        Access.of("no-such-group-here")
    assert (Access().dir_mode, Access().lock_mode) == (0o700, 0o600)
    assert (Access(7).dir_mode, Access(7).lock_mode) == (0o2770, 0o660)
