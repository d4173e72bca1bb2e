"""fm_exec.c: the per-file fallbacks of plan entries. LINK: EXDEV or EPERM -> reflink,
else copy; EMLINK -> rotate the source inode, then link again. COPY: reflink, else copy.
Injected at the C call sites and for real (tmpfs, ext4's link limit, a full tmpfs)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from fastmat import _binding as nb
from tests.helpers import (
    Entry,
    can_mount,
    dirfd,
    leftovers,
    make_plan,
    mode_of,
    mount_problem,
    open_fds,
    run_plan,
)


def test_exec_plan_copy_op_reflinks_on_xfs(xfs_dir: Path) -> None:
    (xfs_dir / "cas").mkdir()
    (xfs_dir / "cas" / "blob").write_bytes(os.urandom(100_000))
    (xfs_dir / "dest").mkdir()
    plan = make_plan([], [(nb.FM_OP_COPY, 0, "c", "blob", 0o555)])
    res = run_plan(xfs_dir / "dest", xfs_dir / "cas", plan)
    assert res.rc == 0
    assert res.how == bytes([nb.FM_HOW_REFLINK])
    assert mode_of(xfs_dir / "dest" / "c") == 0o555
    assert (xfs_dir / "dest" / "c").read_bytes() == (xfs_dir / "cas" / "blob").read_bytes()


# ---------------------------------------------------------------- EXDEV, EPERM


@pytest.mark.parametrize(
    ("err", "flag"), [(errno.EXDEV, nb.FM_HOW_XDEV), (errno.EPERM, nb.FM_HOW_DENIED)]
)
def test_exec_plan_link_refused_injected(cas: Path, dest: Path, err: int, flag: int) -> None:
    """EPERM for real (fs.protected_hardlinks) is in test_cas_readonly.py."""
    plan = make_plan(
        [], [(nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444), (nb.FM_OP_LINK, 0, "x", "blobs/x", 0o555)]
    )
    with nb.injected("link", -err, 1):
        res = run_plan(dest, cas, plan, threads=1)
    assert res.rc == 0
    assert res.how == bytes([flag | nb.FM_HOW_COPY, nb.FM_HOW_LINK])
    assert (dest / "a").stat().st_ino != (cas / "blobs/a").stat().st_ino
    assert (dest / "a").read_bytes() == b"alpha\n"
    assert mode_of(dest / "a") == 0o444
    assert (dest / "x").stat().st_ino == (cas / "blobs/x").stat().st_ino


def test_exec_plan_exdev_for_real_onto_tmpfs(cas: Path, tmpfs_dir: Path) -> None:
    plan = make_plan(
        [(0, "bin")],
        [
            (nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444),
            (nb.FM_OP_LINK, 0, "b", "blobs/b", 0o444),
            (nb.FM_OP_LINK, 1, "x", "blobs/x", 0o555),
            (nb.FM_OP_SYMLINK, 1, "s", "x", 0),
        ],
    )
    res = run_plan(tmpfs_dir, cas, plan, threads=2)
    assert res.rc == 0
    xdev_copy = nb.FM_HOW_XDEV | nb.FM_HOW_COPY
    assert res.how == bytes([xdev_copy, xdev_copy, xdev_copy, nb.FM_HOW_SYMLINK])
    assert (tmpfs_dir / "b").read_bytes() == (cas / "blobs/b").read_bytes()
    assert mode_of(tmpfs_dir / "bin" / "x") == 0o555
    assert mode_of(tmpfs_dir / "a") == 0o444


def test_exec_plan_enospc_leaves_no_partial_files(cas: Path, tmp_path: Path) -> None:
    if not can_mount():
        pytest.skip(str(mount_problem()))
    (cas / "blobs" / "big").write_bytes(os.urandom(256 * 1024))
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(tiny)], check=True)
    try:
        plan = make_plan(
            [],
            [
                (nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444),  # EXDEV: a small copy fits
                (nb.FM_OP_LINK, 0, "big", "blobs/big", 0o444),  # does not
                (nb.FM_OP_COPY, 0, "big2", "blobs/big", 0o444),
            ],
        )
        res = run_plan(tiny, cas, plan, threads=1, keep_going=True)
        assert list(res.status) == [0, -errno.ENOSPC, -errno.ENOSPC]
        assert res.rc == -errno.ENOSPC
        assert sorted(os.listdir(tiny)) == ["a"]
        assert (tiny / "a").read_bytes() == b"alpha\n"
    finally:
        subprocess.run(["umount", str(tiny)], check=False)


# ---------------------------------------------------------------- EMLINK


def test_exec_plan_emlink_rotates_the_source(cas: Path, dest: Path, tmp_path: Path) -> None:
    blob = cas / "blobs/x"
    old_ino = blob.stat().st_ino
    os.link(blob, tmp_path / "earlier")  # a tree materialized before
    plan = make_plan(
        [], [(nb.FM_OP_LINK, 0, "x", "blobs/x", 0o555), (nb.FM_OP_LINK, 0, "y", "blobs/x", 0o555)]
    )
    with nb.injected("link", -errno.EMLINK, 1):
        res = run_plan(dest, cas, plan, threads=1)
    assert res.rc == 0
    assert res.how[0] == nb.FM_HOW_LINK | nb.FM_HOW_ROTATED
    assert res.how[1] == nb.FM_HOW_LINK
    new_ino = blob.stat().st_ino
    assert new_ino != old_ino
    assert (tmp_path / "earlier").stat().st_ino == old_ino  # old links keep the old inode
    assert (dest / "x").stat().st_ino == (dest / "y").stat().st_ino == new_ino
    assert mode_of(blob) == 0o555
    assert blob.read_bytes() == (tmp_path / "earlier").read_bytes()
    assert blob.stat().st_mtime_ns == (tmp_path / "earlier").stat().st_mtime_ns
    assert leftovers(cas / "blobs") == []


def test_exec_plan_emlink_rotation_in_tmp_dir(cas: Path, dest: Path) -> None:
    tmp = cas / "tmp"
    tmp.mkdir()
    old_ino = (cas / "blobs/a").stat().st_ino
    plan = make_plan([], [(nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444)])
    with nb.injected("link", -errno.EMLINK, 1), dirfd(tmp) as t:
        res = run_plan(dest, cas, plan, tmp_dirfd=t)
    assert res.rc == 0
    assert res.how[0] == nb.FM_HOW_LINK | nb.FM_HOW_ROTATED
    assert (cas / "blobs/a").stat().st_ino != old_ino
    assert mode_of(cas / "blobs/a") == 0o444
    assert (dest / "a").stat().st_ino == (cas / "blobs/a").stat().st_ino
    assert os.listdir(tmp) == []


def test_exec_plan_rotation_failure_is_reported(cas: Path, dest: Path) -> None:
    plan = make_plan([], [(nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444)])
    with nb.injected("link", -errno.EMLINK, 1), nb.injected("copy", -errno.ENOSPC):
        res = run_plan(dest, cas, plan)
    assert res.rc == -errno.ENOSPC
    assert list(res.status) == [-errno.ENOSPC]
    assert res.how == bytes([nb.FM_HOW_NONE])
    assert (cas / "blobs/a").read_bytes() == b"alpha\n"
    assert leftovers(cas / "blobs") == []


def test_exec_plan_emlink_for_real_on_ext4(tmp_path: Path) -> None:
    """ext4 allows 65,000 links per inode: the 65,000th link rotates the source once."""
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not fstype.startswith("ext"):
        pytest.skip(f"tmp_path is on {fstype or 'an unknown filesystem'}, not ext4")
    (tmp_path / "cas").mkdir()
    blob = tmp_path / "cas" / "blob"
    blob.write_bytes(b"popular")
    blob.chmod(0o444)
    old_ino = blob.stat().st_ino
    n_dirs, per_dir = 65, 1000 + 1  # 65,065 links of one blob
    dirs = [(0, f"d{i}") for i in range(n_dirs)]
    entries = [
        (nb.FM_OP_LINK, d, f"f{j}", "blob", 0o444)
        for d in range(1, n_dirs + 1)
        for j in range(per_dir)
    ]
    dest = tmp_path / "dest"
    dest.mkdir()
    res = run_plan(dest, tmp_path / "cas", make_plan(dirs, entries), threads=4)
    assert res.rc == 0
    assert set(res.status) == {0}
    rotated = [i for i, h in enumerate(res.how) if h & nb.FM_HOW_ROTATED]
    assert len(rotated) == 1  # one rotation, however many threads hit EMLINK
    assert all(h & nb.FM_HOW_METHOD_MASK == nb.FM_HOW_LINK for h in res.how)
    new = blob.stat()
    assert new.st_ino != old_ino
    assert stat.S_IMODE(new.st_mode) == 0o444
    assert blob.read_bytes() == b"popular"
    # Every link went to the old inode or the new one. The old one took 64,999 before
    # its EMLINK (its CAS name was the 65,000th link); a thread whose linkat resolved the
    # name just before the rotation's rename may still add one after the rename freed a
    # slot, so the split is 64,999 or 65,000 to the old inode, never more.
    inodes = [os.lstat(dest / f"d{d - 1}" / f"f{j}").st_ino for d in range(1, n_dirs + 1)
              for j in range(per_dir)]  # fmt: skip
    on_new = inodes.count(new.st_ino)
    assert on_new + inodes.count(old_ino) == len(entries)
    assert new.st_nlink == 1 + on_new
    assert len(entries) - on_new in (65_000 - 1, 65_000)
    nb.remove_tree(dest)


@pytest.mark.stress
def test_stress_exec_plan_100k_entries_with_fallbacks(cas: Path, dest: Path) -> None:
    """100,000 entries in 1,000 directories on 8 threads, with EXDEV and EMLINK injected
    into the middle of the run: every entry made, every fallback counted."""
    dirs = [(0, f"d{i}") for i in range(100)] + [(1 + i % 100, f"s{i}") for i in range(900)]
    entries: list[Entry] = []
    blobs = ["blobs/a", "blobs/b", "blobs/x"]
    for d in range(1, len(dirs) + 1):
        for j in range(98):
            entries.append((nb.FM_OP_LINK, d, f"f{j}", blobs[j % 3], 0o444))
        entries.append((nb.FM_OP_SYMLINK, d, "s", "f0", 0))
        entries.append((nb.FM_OP_EMPTY, d, "e", "", 0o444))
    plan = make_plan(dirs, entries)
    fds = open_fds()
    with nb.injected("link", -errno.EXDEV, 500):
        res = run_plan(dest, cas, plan, threads=8, max_inflight=256)
    assert res.rc == 0
    assert set(res.status) == {0}
    assert open_fds() == fds
    xdev = sum(1 for h in res.how if h & nb.FM_HOW_XDEV)
    assert xdev == 500
    dest2 = dest.parent / "dest2"
    dest2.mkdir()
    with nb.injected("link", -errno.EMLINK, 30):
        res = run_plan(dest2, cas, plan, threads=8, max_inflight=256)
    assert res.rc == 0
    assert sum(1 for h in res.how if h & nb.FM_HOW_ROTATED) == 30
    for b in blobs:
        assert mode_of(cas / b) == (0o555 if b.endswith("x") else 0o444)
    nb.remove_tree(dest)
    nb.remove_tree(dest2)
    assert leftovers(cas / "blobs") == []


def test_fork_while_a_rotation_lock_is_held(tmp_path: Path) -> None:
    """A child forked by one thread while a pool thread holds an EMLINK rotation lock
    (the copy of a large source runs under it) rotates the same source too: the child
    starts with fresh locks (pthread_atfork); before, it waited forever."""
    import threading
    import time

    cas, tmp = tmp_path / "cas", tmp_path / "tmp"
    (cas / "blobs").mkdir(parents=True)
    tmp.mkdir()
    big = cas / "blobs" / "big"
    with big.open("wb") as f:
        f.truncate(256 << 20)
        f.write(b"x")  # a sparse file: a real copy of 256 MiB under the lock
    plan = make_plan([], [(nb.FM_OP_LINK, 0, "big", "blobs/big", 0o444)])
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    result: list[int] = []

    def rotate_in_thread() -> None:
        with (
            dirfd(tmp_path / "d1") as d,
            dirfd(cas) as s,
            dirfd(tmp) as t,
            nb.injected("link", -errno.EMLINK, 1),
            # a byte copy by read/write: a reflink (XFS, btrfs) or an in-kernel copy would
            # finish before the test saw the lock held
            nb.injected("reflink", -errno.EOPNOTSUPP),
            nb.injected("copy", -errno.EINVAL),
        ):
            result.append(nb.exec_plan(d, s, plan, threads=1, tmp_dirfd=t).rc)

    th = threading.Thread(target=rotate_in_thread)
    th.start()
    deadline = time.monotonic() + 30
    while not os.listdir(tmp) and th.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)  # until the copy is under way
    assert os.listdir(tmp), f"the rotation never started (thread done: {not th.is_alive()})"
    pid = os.fork()
    if pid == 0:  # the child: one thread, the parent's rotation lock copied as held
        code = 1
        try:
            nb.inject("link", -errno.EMLINK, 1)
            res = run_plan(tmp_path / "d2", cas, plan, threads=1)
            code = 0 if res.rc == 0 else 2
        finally:
            os._exit(code)
    th.join()
    assert result == [0]
    for _ in range(600):  # up to 60 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on a rotation lock held by its parent")
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "d2" / "big").stat().st_size == (256 << 20)
