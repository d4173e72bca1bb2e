"""Group commit (fastmat.cas.commit): a published CAS name holds complete, durable bytes.

Three ways to catch a commit that publishes before its data is durable: a sync
failure injected between the sync and the renames (nothing of that blob may be
published), the system calls recorded by strace (every temp's fsync, or the
syncfs, comes before its rename, every rename before its directory's fsync), and a
real power loss simulated on XFS (``xfs_io -x -c shutdown``: nothing dirty is
written after it), which finds the zero-filled files a skipped sync leaves.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat import _binding
from fastmat.cas import LocalCAS, commit
from fastmat.digest import Digest, DigestMismatchError
from tests.helpers import raises_errno, run_cmd

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas") as c:
        yield c


def blob(i: int, size: int = 3000) -> bytes:
    return hashlib.sha256(b"%d" % i).digest() * (size // 32) + b"%d" % i


def temps(cas: LocalCAS) -> list[str]:
    return sorted(n for n in os.listdir(cas.tmp_dir) if n != "owner.lock")


# ---------------------------------------------------------------- injected sync failures


def test_a_blob_whose_sync_failed_is_never_published(cas: LocalCAS) -> None:
    cas._committer.sync_mode = "fsync"
    data = [blob(i) for i in range(20)]
    with _binding.injected("sync", -errno.EIO, 3), raises_errno(errno.EIO), cas.batch() as b:
        for x in data:
            b.put(x)
    present = [Digest.of(x) in cas for x in data]
    assert present.count(False) == 3  # exactly the three whose fsync failed
    assert present.count(True) == 17
    assert temps(cas) == []  # their temps were removed, not left for a later rename
    assert cas.counters.blobs_written == 17
    assert cas.verify().ok


def test_a_failed_syncfs_falls_back_to_each_temps_fsync(cas: LocalCAS) -> None:
    """A syncfs also reports other files' writeback errors: then each temp's own fsync
    decides. Failing the syncfs and every fsync publishes nothing of the group."""
    cas._committer.sync_mode = "syncfs"
    data = [blob(i) for i in range(10)]
    with _binding.injected("sync", -errno.EIO, 1 + 10), raises_errno(errno.EIO), cas.batch() as b:
        for x in data:
            b.put(x)
    assert not any(Digest.of(x) in cas for x in data)
    assert temps(cas) == []
    with _binding.injected("sync", -errno.EIO, 1), cas.batch() as b:  # the syncfs only
        for x in data:
            b.put(x)
    assert all(Digest.of(x) in cas for x in data)
    assert cas._committer.syncfs_calls == 2


def test_auto_takes_syncfs_only_while_little_is_dirty(
    cas: LocalCAS, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = commit.dirty_bytes()
    assert real is None or real >= 0
    cas._committer.sync_mode = "auto"
    monkeypatch.setattr(commit, "dirty_bytes", lambda: 1 << 40)  # a terabyte to write
    cas.put(b"busy machine")
    assert cas._committer.syncfs_calls == 0
    monkeypatch.setattr(commit, "dirty_bytes", lambda: 4096)
    cas.put(b"quiet machine")
    assert cas._committer.syncfs_calls == 1
    monkeypatch.setattr(commit, "dirty_bytes", lambda: None)  # no /proc/meminfo
    cas.put(b"unknown")
    assert cas._committer.syncfs_calls == 1


def test_single_puts_fail_alone(cas: LocalCAS) -> None:
    cas._committer.sync_mode = "fsync"
    with _binding.injected("sync", -errno.ENOSPC, 1), raises_errno(errno.ENOSPC):
        cas.put(b"first")
    assert Digest.of(b"first") not in cas
    assert cas.put(b"first") == Digest.of(b"first")
    with _binding.injected("sync", -errno.EIO, 1), raises_errno(errno.EIO):
        cas.executable_path(Digest.of(b"first"))
    assert not (cas.root / cas.exec_relpath(Digest.of(b"first"))).exists()
    assert temps(cas) == []


def test_waiting_callers_see_a_blob_only_once_published(
    cas: LocalCAS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a group's data sync runs, its blobs are absent for everyone; the put
    returns (and a fetch lock would be released) only after the rename."""
    in_sync, release = threading.Event(), threading.Event()
    real = _binding.sync_batch

    def slow_sync(fd: int, names: list[bytes], mode: _binding.SyncMode, **kw: int) -> object:
        in_sync.set()
        assert release.wait(30)
        return real(fd, names, mode, **kw)

    monkeypatch.setattr(_binding, "sync_batch", slow_sync)
    d = Digest.of(b"slow")
    done: list[Digest] = []
    t = threading.Thread(target=lambda: done.append(cas.put(b"slow")))
    t.start()
    assert in_sync.wait(30)
    assert d not in cas
    assert not list((cas.root / "blobs").rglob(d.key))
    assert done == []
    release.set()
    t.join()
    assert done == [d]
    assert d in cas


def test_threads_committing_at_once_share_groups(cas: LocalCAS) -> None:
    n = 24
    barrier = threading.Barrier(n)
    out: list[Digest] = []

    def put(i: int) -> None:
        barrier.wait()
        out.append(cas.put(blob(i, 50_000)))

    groups = cas._committer.groups
    threads = [threading.Thread(target=put, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out, key=str) == sorted((Digest.of(blob(i, 50_000)) for i in range(n)), key=str)
    assert all(d in cas for d in out)
    assert cas._committer.groups - groups < n  # some threads waited and went together


def test_fsync_false_syncs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = _binding.sync_batch

    def spy(fd: int, names: list[bytes], mode: _binding.SyncMode, **kw: int) -> object:
        calls.append(mode)
        return real(fd, names, mode, **kw)

    monkeypatch.setattr(_binding, "sync_batch", spy)
    with LocalCAS(tmp_path / "fast", fsync=False) as fast:
        with fast.batch() as b:
            for i in range(5):
                b.put(blob(i, 10 << 20 if i == 0 else 100))
        fast.executable_path(Digest.of(blob(1, 100)))
    assert calls == []
    with LocalCAS(tmp_path / "durable") as durable:
        durable.put(b"x")
    assert calls[0] == "writeback"  # started while a leader syncs
    assert calls[1] in ("fsync", "syncfs")
    assert len(calls) == 2


# ---------------------------------------------------------------- Batch


def test_batch_publishes_at_the_end_and_dedupes(cas: LocalCAS) -> None:
    with cas.batch() as b:
        d1 = b.put(b"one")
        assert b.put(b"one") == d1
        assert b.put(b"one", expected=d1) == d1
        with pytest.raises(DigestMismatchError):
            b.put(b"two", expected=d1)
        d2 = b.put_stream(iter([b"tw", b"o"]), None)
        assert len(b) == 2
        assert d1 not in cas
        assert d2 not in cas
    assert d1 in cas
    assert d2 in cas
    assert cas.counters.blobs_written == 2
    assert temps(cas) == []


def test_batch_left_by_an_exception_publishes_nothing(cas: LocalCAS) -> None:
    class Boom(Exception):
        pass

    def fail() -> None:
        with cas.batch() as b:
            b.put(b"one")
            b.put(b"two" * 10_000)
            raise Boom

    with pytest.raises(Boom):
        fail()
    assert Digest.of(b"one") not in cas
    assert temps(cas) == []


def test_batch_commits_when_full(cas: LocalCAS) -> None:
    with cas.batch(max_blobs=10, max_bytes=1 << 40) as b:
        ds = [b.put(blob(i)) for i in range(25)]
        assert sum(d in cas for d in ds) == 20  # two full groups published already
    assert all(d in cas for d in ds)
    with cas.batch(max_blobs=1000, max_bytes=100_000) as b:
        big = [b.put(blob(i, 40_000)) for i in range(100, 103)]
        assert sum(d in cas for d in big) == 3  # 120,000 bytes >= the bound


# ---------------------------------------------------------------- recorded order


_STRACE_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from fastmat.cas import LocalCAS, commit
    cas = LocalCAS(sys.argv[1], fsync=sys.argv[2] == "1")
    cas._committer.sync_mode = sys.argv[3]
    print("TMP", cas.tmp_dir, flush=True)
    with cas.batch() as b:
        for i in range(40):
            b.put(b"strace %d " % i * (100 + i))
    cas.close()
    """
)

_LINE = re.compile(r"^(\d+) +(.*)$")
_START = re.compile(r"^(\w+)\((.*?)(?: <unfinished \.\.\.>|\) += (-?\d+).*)$")
_RESUMED = re.compile(r"^<\.\.\. \w+ resumed>.*?\) += (-?\d+)")
_FDS = re.compile(r"\d+<([^>]*)>")
_PATHS = re.compile(r'"([^"]*)"')


def parse_strace(text: str) -> list[tuple[str, str]]:
    """(call, path) in the order the calls *completed*: fsync/syncfs of an fd's path,
    ``rename`` of "src -> dst" (absolute, from the -y fd annotations)."""
    pending: dict[str, tuple[str, str]] = {}
    calls = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        pid, rest = m.groups()
        if rest.startswith("<..."):
            r = _RESUMED.match(rest)
            if pid not in pending or r is None:
                continue
            name, args = pending.pop(pid)
            rc = int(r.group(1))
        else:
            s = _START.match(rest)
            if s is None:
                continue
            if s.group(3) is None:
                pending[pid] = (s.group(1), s.group(2))
                continue
            name, args, rc = s.group(1), s.group(2), int(s.group(3))
        if rc < 0:
            continue
        fds, paths = _FDS.findall(args), _PATHS.findall(args)
        if name in ("fsync", "fdatasync", "syncfs"):
            calls.append((name, fds[0] if fds else "?"))
        elif name in ("renameat", "renameat2"):
            src, dst = os.path.join(fds[0], paths[0]), os.path.join(fds[1], paths[1])
            calls.append(("rename", f"{src} -> {dst}"))
        elif name == "rename":
            calls.append(("rename", f"{paths[0]} -> {paths[1]}"))
    return calls


def strace_calls(cas_dir: Path, fsync: bool, mode: str) -> tuple[list[tuple[str, str]], str]:
    """The recorded calls of a child that commits a batch of 40 blobs, and its temp dir."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    log_path = cas_dir.parent / "strace.log"
    child = _STRACE_CHILD.format(repo=str(REPO))
    LocalCAS(cas_dir).close()  # the layout's own fsyncs happen outside the recording
    trace = "trace=fsync,fdatasync,syncfs,rename,renameat,renameat2"
    args = [str(cas_dir), "1" if fsync else "0", mode]
    res = subprocess.run(
        ["strace", "-f", "-y", "-qq", "-e", trace, "-o", str(log_path), sys.executable, "-c",
         child, *args],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    if res.returncode != 0 and "ptrace" in res.stderr:
        pytest.skip(f"strace cannot trace here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    tmp = res.stdout.split("TMP", 1)[1].split()[0]
    return parse_strace(log_path.read_text()), tmp


@pytest.mark.parametrize("mode", ["fsync", "syncfs"])
def test_recorded_order_sync_then_rename_then_directory(tmp_path: Path, mode: str) -> None:
    cas_dir = tmp_path / "cas"
    calls, tmp = strace_calls(cas_dir, True, mode)
    renames = [(i, c[1].split(" -> ")) for i, c in enumerate(calls) if c[0] == "rename"]
    published = [(i, src, dst) for i, (src, dst) in renames if "/blobs/" in dst]
    assert len(published) == 40
    first_rename = min(i for i, _, _ in published)
    for i, src, dst in published:
        assert src.startswith(tmp)
        if mode == "fsync":  # this temp's own fsync, before any rename of the group
            synced = [k for k, c in enumerate(calls) if c == ("fsync", src)]
            assert synced, f"{src} published without an fsync"
            assert max(synced) < first_rename
        else:
            assert any(c[0] == "syncfs" for c in calls[:first_rename])
        shard = os.path.dirname(dst)
        after = [k for k, c in enumerate(calls) if c == ("fsync", shard) and k > i]
        assert after, f"{shard} not fsync'ed after {dst} appeared"
    shards = {os.path.dirname(dst) for _, _, dst in published}
    dir_syncs = [c for c in calls if c[0] == "fsync" and c[1] in shards]
    assert len(dir_syncs) == len(shards)  # each touched directory once
    data_syncs = [c for c in calls if c[0] == "fsync" and c[1].startswith(tmp)]
    assert len(data_syncs) == (40 if mode == "fsync" else 0)


def test_recorded_order_fsync_false_syncs_nothing(tmp_path: Path) -> None:
    calls, _ = strace_calls(tmp_path / "cas", False, "fsync")
    assert [c for c in calls if c[0] != "rename"] == []
    assert sum(1 for c in calls if "/blobs/" in c[1]) == 40


# ---------------------------------------------------------------- power loss


_CRASH_CHILD = textwrap.dedent(
    """
    import array, os, subprocess, sys
    sys.path.insert(0, {repo!r})
    from fastmat import _binding
    from fastmat.cas import LocalCAS, commit
    mnt, skip, mode = sys.argv[1], sys.argv[2] == "skip", sys.argv[3]
    if skip:  # the bug this test must catch: publishing without the data sync
        _binding.sync_batch = lambda fd, names, mode, **kw: array.array("i", [0] * len(names))
    cas = LocalCAS(os.path.join(mnt, "cas"))
    cas._committer.sync_mode = mode
    with cas.batch() as b:
        for i in range(300):
            b.put(os.urandom(2000 + 37 * i))
        d = b.put(os.urandom(5000))
    cas.executable_path(d)  # a variant too
    print("published", flush=True)
    subprocess.run(["xfs_io", "-x", "-c", "shutdown", mnt], check=True)
    os._exit(0)
    """
)


def _power_loss(base: Path, how: str, mode: str = "auto") -> tuple[int, int]:
    """Writes a CAS on a fresh XFS, cuts it off (shutdown: nothing dirty is written
    after that), remounts; returns (whole, damaged) published names."""
    image, mnt = base / f"{how}.img", base / f"{how}.mnt"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(512 << 20)  # sparse; mkfs.xfs wants > 300 MB
    if run_cmd("mkfs.xfs", "-q", "-f", str(image)).returncode != 0:
        pytest.skip("mkfs.xfs failed")
    if run_cmd("mount", "-o", "loop", str(image), str(mnt)).returncode != 0:
        pytest.skip("cannot mount a loop device here")
    try:
        res = subprocess.run(
            [sys.executable, "-c", _CRASH_CHILD.format(repo=str(REPO)), str(mnt), how, mode],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert run_cmd("umount", str(mnt)).returncode == 0
        assert run_cmd("mount", "-o", "loop", str(image), str(mnt)).returncode == 0
        whole = damaged = 0
        for area in ("blobs", "exec"):
            for p in (mnt / "cas" / area).rglob("*"):
                if p.is_file():
                    h, size = p.name.split("-")
                    data = p.read_bytes()
                    if len(data) == int(size) and hashlib.sha256(data).hexdigest() == h:
                        whole += 1
                    else:
                        damaged += 1
        return whole, damaged
    finally:
        run_cmd("umount", str(mnt))
        image.unlink(missing_ok=True)


@pytest.mark.parametrize("mode", ["fsync", "syncfs"])
def test_power_loss_leaves_published_blobs_whole(tmp_path: Path, mode: str) -> None:
    if os.geteuid() != 0 or shutil.which("xfs_io") is None or shutil.which("mkfs.xfs") is None:
        pytest.skip("needs root and xfsprogs (mkfs.xfs, xfs_io)")
    whole, damaged = _power_loss(tmp_path, "durable", mode)
    assert damaged == 0
    assert whole == 302  # every published blob and the variant survived


def test_power_loss_check_catches_a_skipped_sync(tmp_path: Path) -> None:
    """The same run with the data sync left out: the check above must see damage
    (renamed names whose data never reached the disk). A global sync(2) by another
    process in the instant before the shutdown can save the data: three tries."""
    if os.geteuid() != 0 or shutil.which("xfs_io") is None or shutil.which("mkfs.xfs") is None:
        pytest.skip("needs root and xfsprogs (mkfs.xfs, xfs_io)")
    results = []
    for attempt in range(3):
        base = tmp_path / f"try{attempt}"
        base.mkdir()
        whole, damaged = _power_loss(base, "skip")
        results.append((whole, damaged))
        if damaged:
            break
    assert any(damaged for _, damaged in results), results
