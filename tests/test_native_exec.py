"""fm_exec.c: the plan executor (ops, directories, failures, FM_EXEC_CHECK_SRCS,
malformed plans, symlinked directories, threads) and the benchmark floor.

The per-file fallbacks of LINK / COPY entries (EXDEV, EMLINK, ENOSPC) are in
test_native_exec_fallbacks.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fastmat import _binding as nb
from tests.helpers import (
    Entry,
    as_nobody,
    deny_syscall,
    dirfd,
    in_child,
    make_plan,
    mode_of,
    open_fds,
    open_to_all,
    raises_errno,
    run_plan,
)


def test_exec_plan_links_symlinks_empties(cas: Path, dest: Path) -> None:
    plan = make_plan(
        [(0, "d"), (1, "e"), (0, "empty_dir")],
        [
            (nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444),
            (nb.FM_OP_SYMLINK, 0, "s_abs", "/etc/passwd", 0),
            (nb.FM_OP_SYMLINK, 0, "s_up", "../../outside/x", 0),
            (nb.FM_OP_LINK, 1, "b", "blobs/b", 0o444),
            (nb.FM_OP_LINK, 1, "x", "blobs/x", 0o555),
            (nb.FM_OP_EMPTY, 2, "e1", "", 0o444),
            (nb.FM_OP_EMPTY, 2, "e2", "", 0o555),
        ],
    )
    res = run_plan(dest, cas, plan, threads=3, max_inflight=3)
    assert res.rc == 0
    assert list(res.status) == [0] * 7
    assert list(res.dir_status) == [0, 0, 0, 0]
    assert res.how == bytes(
        [nb.FM_HOW_LINK, nb.FM_HOW_SYMLINK, nb.FM_HOW_SYMLINK, nb.FM_HOW_LINK, nb.FM_HOW_LINK]
        + [nb.FM_HOW_CREATE] * 2
    )
    assert (dest / "a").stat().st_ino == (cas / "blobs/a").stat().st_ino
    assert (dest / "d" / "b").stat().st_ino == (cas / "blobs/b").stat().st_ino
    assert (dest / "d" / "x").stat().st_ino == (cas / "blobs/x").stat().st_ino
    assert os.readlink(dest / "s_abs") == "/etc/passwd"
    assert os.readlink(dest / "s_up") == "../../outside/x"
    e1, e2 = dest / "d" / "e" / "e1", dest / "d" / "e" / "e2"
    assert e1.stat().st_size == e2.stat().st_size == 0
    assert e1.stat().st_ino != e2.stat().st_ino
    assert e1.stat().st_nlink == 1
    assert (mode_of(e1), mode_of(e2)) == (0o444, 0o555)
    assert (dest / "empty_dir").is_dir()
    assert os.listdir(dest / "empty_dir") == []
    assert mode_of(cas / "blobs/a") == 0o444  # the blob is never chmod'ed


def test_exec_plan_dir_mode_despite_hostile_umask(cas: Path, dest: Path) -> None:
    plan = make_plan([(0, "a"), (1, "b"), (0, "c")], [(nb.FM_OP_EMPTY, 2, "e", "", 0o444)])

    def run() -> list[int]:
        os.umask(0o077)
        res = run_plan(dest, cas, plan)
        assert res.rc == 0
        return [mode_of(dest / p) for p in ("a", "a/b", "c", "a/b/e")]

    assert in_child(run) == [0o755, 0o755, 0o755, 0o444]


def test_exec_plan_custom_dir_mode(cas: Path, dest: Path) -> None:
    plan = make_plan([(0, "a"), (1, "b")], [])
    plan.dir_mode = 0o700
    assert run_plan(dest, cas, plan).rc == 0
    assert mode_of(dest / "a") == mode_of(dest / "a" / "b") == 0o700


def test_exec_plan_copy_op_mode_and_mtime(cas: Path, dest: Path) -> None:
    mtime = 1_600_000_000_123_456_789
    plan = make_plan(
        [],
        [
            (nb.FM_OP_COPY, 0, "c", "blobs/b", 0o755),
            (nb.FM_OP_COPY, 0, "k", "blobs/a", 0o400),
            (nb.FM_OP_EMPTY, 0, "e", "", 0o444),
        ],
        mtimes=[mtime, -1, mtime],
    )
    res = run_plan(dest, cas, plan)
    assert res.rc == 0
    assert res.how == bytes([nb.FM_HOW_COPY, nb.FM_HOW_COPY, nb.FM_HOW_CREATE])
    c = dest / "c"
    assert c.read_bytes() == (cas / "blobs/b").read_bytes()
    assert c.stat().st_ino != (cas / "blobs/b").stat().st_ino
    assert mode_of(c) == 0o755
    assert c.stat().st_mtime_ns == mtime
    assert (dest / "e").stat().st_mtime_ns == mtime
    assert mode_of(dest / "k") == 0o400
    assert (dest / "k").stat().st_mtime_ns != mtime
    assert (cas / "blobs/b").stat().st_mtime_ns != mtime


def test_exec_plan_first_failure_cancels_the_rest(cas: Path, dest: Path) -> None:
    entries: list[Entry] = [(nb.FM_OP_LINK, 0, "ok", "blobs/a", 0o444)]
    entries.append((nb.FM_OP_LINK, 0, "bad", "blobs/missing", 0o444))
    entries += [(nb.FM_OP_LINK, 0, f"n{i}", "blobs/b", 0o444) for i in range(20)]
    plan = make_plan([], entries)
    res = run_plan(dest, cas, plan, threads=1, max_inflight=1)
    assert res.rc == -errno.ENOENT
    assert list(res.status) == [0, -errno.ENOENT] + [-errno.ECANCELED] * 20
    assert res.how[1:] == bytes(21)
    assert sorted(os.listdir(dest)) == ["ok"]


def test_exec_plan_keep_going(cas: Path, dest: Path) -> None:
    plan = make_plan(
        [],
        [
            (nb.FM_OP_LINK, 0, "bad", "blobs/missing", 0o444),
            (nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444),
            (nb.FM_OP_SYMLINK, 0, "s", "t", 0),
        ],
    )
    (dest / "s").write_text("taken")
    res = run_plan(dest, cas, plan, threads=1, keep_going=True)
    assert res.rc == -errno.ENOENT  # the first failure in plan order
    assert list(res.status) == [-errno.ENOENT, 0, -errno.EEXIST]


# ---------------------------------------------------------------- FM_EXEC_CHECK_SRCS


def _odd_srcs(cas: Path) -> None:
    """blobs/sym (a symlink to a), blobs/dir (a directory), blobs/fifo."""
    (cas / "blobs" / "sym").symlink_to("a")
    (cas / "blobs" / "dir").mkdir()
    os.mkfifo(cas / "blobs" / "fifo")


def _check_srcs_plan() -> nb.PlanArrays:
    return make_plan(
        [(0, "d"), (1, "e")],
        [
            (nb.FM_OP_LINK, 0, "ok", "blobs/a", 0o444),
            (nb.FM_OP_SYMLINK, 0, "s", "blobs/missing", 0),  # a target: never checked
            (nb.FM_OP_EMPTY, 0, "empty", "", 0o444),
            (nb.FM_OP_LINK, 1, "gone", "blobs/missing", 0o444),
            (nb.FM_OP_COPY, 1, "gone2", "blobs/nope", 0o644),
            (nb.FM_OP_LINK, 2, "sym", "blobs/sym", 0o444),
            (nb.FM_OP_COPY, 2, "dir", "blobs/dir", 0o444),
            (nb.FM_OP_LINK, 2, "fifo", "blobs/fifo", 0o444),
            (nb.FM_OP_LINK, 2, "notdir", "blobs/a/x", 0o444),
            (nb.FM_OP_LINK, 2, "b", "blobs/b", 0o444),
        ],
    )


_CHECK_SRCS_STATUS = [
    -errno.ECANCELED,
    -errno.ECANCELED,
    -errno.ECANCELED,
    -errno.ENOENT,
    -errno.ENOENT,
    -errno.ELOOP,
    -errno.EISDIR,
    -errno.EINVAL,
    -errno.ENOTDIR,
    -errno.ECANCELED,
]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("keep_going", [False, True])
def test_exec_plan_check_srcs_creates_nothing(
    cas: Path, dest: Path, threads: int, keep_going: bool
) -> None:
    _odd_srcs(cas)
    res = run_plan(
        dest,
        cas,
        _check_srcs_plan(),
        threads=threads,
        max_inflight=1,
        check_srcs=True,
        keep_going=keep_going,
    )
    assert res.rc == -errno.ENOENT  # the first failing entry in plan order
    assert list(res.status) == _CHECK_SRCS_STATUS  # every failing entry, whatever the thread
    assert res.how == bytes(10)
    assert list(res.dir_status) == [0, -errno.ECANCELED, -errno.ECANCELED]
    assert os.listdir(dest) == []
    assert sorted(os.listdir(cas / "blobs")) == ["a", "b", "dir", "fifo", "sym", "x"]


def test_exec_plan_check_srcs_with_existing_dirs(cas: Path, dest: Path) -> None:
    _odd_srcs(cas)
    (dest / "d" / "e").mkdir(parents=True)
    res = run_plan(dest, cas, _check_srcs_plan(), check_srcs=True, dirs_exist=True)
    assert res.rc == -errno.ENOENT
    assert list(res.status) == _CHECK_SRCS_STATUS
    assert list(res.dir_status) == [0, 0, 0]
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["d", "d/e"]


def test_exec_plan_check_srcs_first_error_is_in_plan_order(cas: Path, dest: Path) -> None:
    _odd_srcs(cas)
    entries: list[Entry] = [(nb.FM_OP_LINK, 0, f"n{i}", "blobs/a", 0o444) for i in range(500)]
    entries[7] = (nb.FM_OP_LINK, 0, "n7", "blobs/sym", 0o444)
    entries[400] = (nb.FM_OP_LINK, 0, "n400", "blobs/missing", 0o444)
    res = run_plan(dest, cas, make_plan([], entries), threads=4, max_inflight=8, check_srcs=True)
    assert res.rc == -errno.ELOOP
    expect = [-errno.ECANCELED] * 500
    expect[7], expect[400] = -errno.ELOOP, -errno.ENOENT
    assert list(res.status) == expect
    assert os.listdir(dest) == []


def test_exec_plan_check_srcs_when_all_present_is_a_normal_run(cas: Path, tmp_path: Path) -> None:
    dirs = [(0, "d"), (1, "e"), (0, "f")]
    entries: list[Entry] = []
    for d in range(4):
        entries += [(nb.FM_OP_LINK, d, f"l{i}", "blobs/a", 0o444) for i in range(30)]
        entries += [
            (nb.FM_OP_COPY, d, "c", "blobs/b", 0o640),
            (nb.FM_OP_SYMLINK, d, "s", "l0", 0),
            (nb.FM_OP_EMPTY, d, "z", "", 0o444),
        ]
    plan = make_plan(dirs, entries)
    results, trees = [], []
    for check in (False, True):
        out = tmp_path / f"out{check}"
        out.mkdir()
        res = run_plan(out, cas, plan, threads=3, max_inflight=6, check_srcs=check)
        results.append((res.rc, list(res.status), res.how, list(res.dir_status)))
        trees.append(
            sorted(
                (str(p.relative_to(out)), mode_of(p), os.readlink(p) if p.is_symlink() else "")
                for p in out.rglob("*")
            )
        )
    assert results[0] == results[1]
    assert results[1][0] == 0
    assert set(results[1][1]) == {0}
    assert trees[0] == trees[1]
    assert len(trees[1]) == 3 + 4 * 33
    assert os.stat(cas / "blobs" / "a").st_nlink == 1 + 2 * 4 * 30


# ---------------------------------------------------------------- directories


def test_exec_plan_mkdir_failure(cas: Path, dest: Path) -> None:
    plan = make_plan(
        [(0, "a"), (1, "b"), (0, "c")],
        [
            (nb.FM_OP_LINK, 0, "top", "blobs/a", 0o444),
            (nb.FM_OP_LINK, 2, "in_b", "blobs/a", 0o444),
            (nb.FM_OP_LINK, 3, "in_c", "blobs/a", 0o444),
        ],
    )
    with nb.injected("mkdir", -errno.EACCES, 1):
        res = run_plan(dest, cas, plan, keep_going=True)
    assert res.rc == -errno.EACCES
    assert list(res.dir_status) == [0, -errno.EACCES, -errno.ECANCELED, 0]
    assert list(res.status) == [0, -errno.ECANCELED, 0]
    with nb.injected("mkdir", -errno.EACCES, 1):
        res = run_plan(dest / "c", cas, plan)
    assert list(res.dir_status) == [0, -errno.EACCES, -errno.ECANCELED, -errno.ECANCELED]
    assert list(res.status) == [-errno.ECANCELED] * 3


def test_exec_plan_existing_directory_fails(cas: Path, dest: Path) -> None:
    (dest / "a").mkdir()
    plan = make_plan([(0, "a")], [(nb.FM_OP_EMPTY, 1, "e", "", 0o444)])
    res = run_plan(dest, cas, plan)
    assert res.rc == -errno.EEXIST
    assert list(res.status) == [-errno.ECANCELED]
    res = run_plan(dest, cas, plan, dirs_exist=True)
    assert res.rc == 0
    assert (dest / "a" / "e").exists()


def test_exec_plan_never_creates_outside_through_symlinked_dirs(
    cas: Path, dest: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "a").symlink_to(outside)
    (dest / "b").mkdir()
    (dest / "b" / "c").symlink_to(outside)
    plan = make_plan(
        [(0, "a"), (0, "b"), (2, "c")],
        [
            (nb.FM_OP_LINK, 1, "f", "blobs/a", 0o444),
            (nb.FM_OP_EMPTY, 3, "g", "", 0o444),
            (nb.FM_OP_LINK, 0, "ok", "blobs/a", 0o444),
        ],
    )
    res = run_plan(dest, cas, plan, dirs_exist=True, keep_going=True)
    assert res.status[0] in (-errno.ELOOP, -errno.ENOTDIR, -errno.EXDEV)
    assert res.status[1] in (-errno.ELOOP, -errno.ENOTDIR, -errno.EXDEV)
    assert res.status[2] == 0
    assert os.listdir(outside) == []


@pytest.mark.skipif(not nb.HAS_OPENAT2, reason="openat2 missing: the fallback runs everywhere")
def test_exec_plan_component_wise_fallback_without_openat2(
    cas: Path, dest: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "evil").symlink_to(outside)
    plan = make_plan(
        [(0, "a"), (1, "b"), (2, "c")],
        [
            (nb.FM_OP_LINK, 3, "deep", "blobs/a", 0o444),
            (nb.FM_OP_EMPTY, 2, "e", "", 0o444),
        ],
    )
    hostile = make_plan([(0, "evil"), (1, "x")], [(nb.FM_OP_EMPTY, 1, "f", "", 0o444)])

    def run() -> tuple[int, int, list[int], list[int]]:
        deny_syscall("openat2")
        caps = nb.lib.fm_capabilities()
        ok = run_plan(dest, cas, plan, threads=2)
        bad = run_plan(dest, cas, hostile, dirs_exist=True)
        return caps & nb.lib.FM_CAP_OPENAT2, ok.rc, list(ok.status), list(bad.status)

    has_openat2, rc, status, hostile_status = in_child(run)
    assert has_openat2 == 0  # the filter works: the executor had to fall back
    assert rc == 0
    assert status == [0, 0]
    assert (dest / "a" / "b" / "c" / "deep").stat().st_ino == (cas / "blobs/a").stat().st_ino
    assert hostile_status[0] in (-errno.ELOOP, -errno.ENOTDIR)
    assert os.listdir(outside) == []


# ---------------------------------------------------------------- plans, outputs, defaults


def test_exec_plan_status_untouched_outputs_on_malformed(cas: Path, dest: Path) -> None:
    plan = make_plan([(0, "a")], [(nb.FM_OP_LINK, 1, "f", "blobs/a", 0o444)])
    plan.entry_dir[0] = 5  # out of range: rejected by the C core
    with raises_errno(errno.EINVAL):
        run_plan(dest, cas, plan)
    c = nb._CPlan.__new__(nb._CPlan)  # the raw C call too, outputs untouched
    plan.entry_dir[0] = 1
    c.__init__(plan)  # type: ignore[misc]
    c.c.entry_dir[0] = 5
    status = nb.ffi.new("int32_t[]", [77])
    how = nb.ffi.new("uint8_t[]", [77])
    dstat = nb.ffi.new("int32_t[]", [77, 77])
    with dirfd(dest) as d, dirfd(cas) as s:
        rc = nb.lib.fm_plan_exec(d, s, c.c, nb.ffi.NULL, status, how, dstat)
    assert rc == -errno.EINVAL
    assert (status[0], how[0], dstat[0], dstat[1]) == (77, 77, 77, 77)
    assert os.listdir(dest) == []


@pytest.mark.parametrize(
    "breakage",
    [
        "entry_dir_out_of_range",
        "negative_entry_dir",
        "names_count",
        "srcs_count",
        "dir_names_count",
        "parent_after_child",
        "root_parent",
        "slash_in_name",
        "dotdot_name",
        "dot_dir_name",
        "non_contiguous",
        "bad_op",
        "mode_array_length",
        "empty_link_src",
    ],
)
def test_exec_plan_malformed_is_einval(cas: Path, dest: Path, breakage: str) -> None:
    plan = make_plan(
        [(0, "a"), (1, "b")],
        [
            (nb.FM_OP_LINK, 1, "f", "blobs/a", 0o444),
            (nb.FM_OP_LINK, 2, "g", "blobs/a", 0o444),
            (nb.FM_OP_LINK, 1, "h", "blobs/a", 0o444),
        ],
    )
    if breakage == "non_contiguous":
        pass  # entries of directory 1 are split by directory 2 already
    else:
        plan.entry_dir[2] = 2
        if breakage == "entry_dir_out_of_range":
            plan.entry_dir[1] = 3
        elif breakage == "negative_entry_dir":
            plan.entry_dir[1] = -1
        elif breakage == "names_count":
            plan.names += b"extra\0"
        elif breakage == "srcs_count":
            plan.srcs = plan.srcs[: -len(b"blobs/a\0")]
        elif breakage == "dir_names_count":
            plan.dir_names += b"c\0"
        elif breakage == "parent_after_child":
            plan.dir_parent[1] = 2
        elif breakage == "root_parent":
            plan.dir_parent[0] = 0
        elif breakage == "slash_in_name":
            plan.names = plan.names.replace(b"g\0", b"../g\0")
        elif breakage == "dotdot_name":
            plan.names = plan.names.replace(b"g\0", b"..\0")
        elif breakage == "dot_dir_name":
            plan.dir_names = b"\0.\0b\0"
        elif breakage == "bad_op":
            plan.op = bytes([1, 9, 1])
        elif breakage == "mode_array_length":
            plan.mode.append(0o444)
        elif breakage == "empty_link_src":
            plan.srcs = b"blobs/a\0\0blobs/a\0"
    with raises_errno(errno.EINVAL) as e:
        run_plan(dest, cas, plan)
    assert "malformed plan" in str(e.value)
    assert os.listdir(dest) == []


def test_exec_plan_many_entries_many_threads(cas: Path, dest: Path) -> None:
    dirs = [(0, f"d{i}") for i in range(40)] + [(i + 1, "sub") for i in range(40)]
    entries: list[Entry] = []
    for d in range(1, 81):
        entries += [(nb.FM_OP_LINK, d, f"f{j}", "blobs/b", 0o444) for j in range(30)]
        entries.append((nb.FM_OP_SYMLINK, d, "s", "f0", 0))
        entries.append((nb.FM_OP_EMPTY, d, "e", "", 0o444))
    plan = make_plan(dirs, entries)
    fds = open_fds()
    res = run_plan(dest, cas, plan, threads=8, max_inflight=32)
    assert open_fds() == fds
    assert res.rc == 0
    assert set(res.status) == {0}
    assert (cas / "blobs/b").stat().st_nlink == 1 + 80 * 30
    assert (dest / "d39" / "sub" / "f29").stat().st_ino == (cas / "blobs/b").stat().st_ino
    assert os.readlink(dest / "d7" / "s") == "f0"


def test_exec_plan_empty_plan(cas: Path, dest: Path) -> None:
    res = run_plan(dest, cas, make_plan([], []))
    assert res.rc == 0
    assert res.how == b""
    assert list(res.dir_status) == [0]


def test_exec_plan_defaults_null_opts(cas: Path, dest: Path) -> None:
    plan = make_plan([(0, "d")], [(nb.FM_OP_LINK, 1, "a", "blobs/a", 0o444)])
    cplan = nb._CPlan(plan)
    status = nb.ffi.new("int32_t[]", 1)
    how = nb.ffi.new("uint8_t[]", 1)
    dstat = nb.ffi.new("int32_t[]", 2)
    with dirfd(dest) as d, dirfd(cas) as s:
        rc = nb.lib.fm_plan_exec(d, s, cplan.c, nb.ffi.NULL, status, how, dstat)
    assert (rc, status[0], how[0], dstat[0], dstat[1]) == (0, 0, nb.FM_HOW_LINK, 0, 0)
    res = run_plan(
        dest / "d",
        cas,
        make_plan([], [(nb.FM_OP_LINK, 0, "b", "blobs/b", 0o444)]),
        threads=0,
        max_inflight=0,
    )
    assert res.rc == 0


def test_exec_plan_permission_denied_as_nobody(cas: Path, dest: Path) -> None:
    open_to_all(dest)
    open_to_all(cas / "blobs")
    plan = make_plan([(0, "d")], [(nb.FM_OP_SYMLINK, 0, "s", "t", 0)])

    def run() -> tuple[int, list[int], list[int]]:
        res = run_plan(dest, cas, plan, keep_going=True)
        return res.rc, list(res.dir_status), list(res.status)

    assert as_nobody(run) == (-errno.EACCES, [0, -errno.EACCES], [-errno.EACCES])


# ---------------------------------------------------------------- the floor


def test_floor_exec(cas: Path, dest: Path) -> None:
    plan = make_plan(
        [(0, "a"), (1, "b")],
        [
            (nb.FM_OP_LINK, 1, "f", "blobs/a", 0o444),
            (nb.FM_OP_SYMLINK, 1, "s", "t", 0),
            (nb.FM_OP_LINK, 2, "g", "blobs/b", 0o444),
        ],
    )
    with dirfd(dest) as d, dirfd(cas) as s:
        ns = nb.floor_exec(d, s, plan, 2)
        assert ns > 0
        assert (dest / "a" / "b" / "g").stat().st_ino == (cas / "blobs/b").stat().st_ino
        assert not (dest / "a" / "s").is_symlink()  # only LINK entries
        with pytest.raises(FileExistsError):
            nb.floor_exec(d, s, plan, 2)


def test_floor_exec_out_param_untouched_on_error(cas: Path, dest: Path) -> None:
    plan = make_plan([], [(nb.FM_OP_LINK, 0, "m", "blobs/missing", 0o444)])
    cplan = nb._CPlan(plan)
    elapsed = nb.ffi.new("uint64_t *", 12345)
    with dirfd(dest) as d, dirfd(cas) as s:
        assert nb.lib.fm_floor_exec(d, s, cplan.c, 1, elapsed) == -errno.ENOENT
    assert elapsed[0] == 12345


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_link_check_refuses_a_src_that_is_not_a_regular_file(
    kind: str, cas: Path, dest: Path
) -> None:
    """A CAS name replaced by a symlink (or a FIFO) after any presence check: linkat
    links that inode itself, so the tree would hold a symlink to an arbitrary file.
    The link check finds it (one getdents per directory) and fails the entry; before,
    the entry succeeded and dest/evil was a symlink to /etc/passwd."""
    if kind == "symlink":
        (cas / "blobs" / "evil").symlink_to("/etc/passwd")
    else:
        os.mkfifo(cas / "blobs" / "evil")
    plan = make_plan(
        [(0, "d")],
        [
            (nb.FM_OP_LINK, 0, "a", "blobs/a", 0o444),
            (nb.FM_OP_SYMLINK, 0, "s", "/etc/passwd", 0),  # a real symlink entry is fine
            (nb.FM_OP_LINK, 1, "b", "blobs/b", 0o444),
            (nb.FM_OP_LINK, 1, "evil", "blobs/evil", 0o444),
        ],
    )
    res = run_plan(dest, cas, plan, threads=2)
    bad = -errno.ELOOP if kind == "symlink" else -errno.EINVAL
    assert res.rc == bad
    assert list(res.status) == [0, 0, 0, bad]
    assert res.how[3] == nb.FM_HOW_NONE


def test_link_check_reads_each_directory_once_not_each_file(cas: Path, dest: Path) -> None:
    """Thousands of links in a few directories all pass the check (the common case)."""
    entries: list[Entry] = [
        (nb.FM_OP_LINK, d, f"f{i}", "blobs/a" if i % 2 else "blobs/b", 0o444)
        for d in range(3)
        for i in range(2000)
    ]
    res = run_plan(dest, cas, make_plan([(0, "d1"), (0, "d2")], entries), threads=4)
    assert res.rc == 0
    assert len(os.listdir(dest / "d2")) == 2000


def test_cancel_before_the_call_creates_nothing(cas: Path, dest: Path) -> None:
    ctl = nb.ExecControl()
    ctl.cancel()
    plan = make_plan([(0, "d")], [(nb.FM_OP_LINK, 1, "a", "blobs/a", 0o444)])
    res = run_plan(dest, cas, plan, ctl=ctl)
    assert ctl.done == 0
    assert res.rc == -errno.ECANCELED
    assert list(res.status) == [-errno.ECANCELED]
    assert os.listdir(dest) == []


def test_cancel_from_another_thread_stops_between_chunks(cas: Path, dest: Path) -> None:
    """Cancelled while the pool runs: the call returns early, -ECANCELED, most entries
    never attempted (each chunk is at most 64 entries); ``done`` counts the rest."""
    import threading

    n = 60_000
    entries: list[Entry] = [(nb.FM_OP_LINK, 0, f"f{i}", "blobs/a", 0o444) for i in range(n)]
    plan = make_plan([], entries)
    ctl = nb.ExecControl()
    seen: list[int] = []

    def cancel_soon() -> None:
        while ctl.done < 128:  # the progress counter moves, chunk by chunk
            pass
        seen.append(ctl.done)
        ctl.cancel()

    t = threading.Thread(target=cancel_soon)
    t.start()
    res = run_plan(dest, cas, plan, threads=2, max_inflight=64, ctl=ctl)
    t.join()
    assert res.rc == -errno.ECANCELED
    done = sum(1 for s in res.status if s == 0)
    assert seen[0] >= 128
    assert seen[0] <= done < n
    assert ctl.done == done
    assert all(s in (0, -errno.ECANCELED) for s in res.status)
    assert len(os.listdir(dest)) == done


def test_plan_memory_is_linear_in_the_names_not_the_paths(cas: Path, dest: Path) -> None:
    """600 nested directories with 250-byte names: 150 KB of names, 45 MB of paths.
    The executor used to build every directory's full path up front; now it rebuilds
    one when it needs it (and a path past PATH_MAX fails that directory)."""
    depth = 600
    dirs = [(d, "n" * 249 + "x") for d in range(depth)]
    plan = make_plan(dirs, [(nb.FM_OP_EMPTY, depth, "deep", "", 0o444)])

    def peak_growth_kib() -> tuple[int, int]:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = run_plan(dest, cas, plan, threads=1)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, res.rc

    grown, rc = in_child(peak_growth_kib)
    assert rc == -errno.ENAMETOOLONG
    assert grown < 8 * 1024, f"{grown} KiB"
