"""materialize on real filesystems: round trip, modes, inode sharing, fallbacks, failures."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import sysconfig
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import fastmat
from fastmat import _binding, proto
from fastmat.cas import LocalCAS
from fastmat.digest import BlobNotFoundError, Digest
from fastmat.materialize import materialize
from fastmat.tree import ingest_tree
from tests.cache_helpers import wide
from tests.helpers import as_nobody


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", fsync=False) as c:
        yield c


def _stdlib_tree(dst: Path) -> Path:
    """Parts of the running interpreter's stdlib plus links of every kind and executables."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ignore = shutil.ignore_patterns("__pycache__")
    for pkg in ("json", "email", "concurrent"):
        shutil.copytree(stdlib / pkg, dst / pkg, symlinks=True, ignore=ignore)
    tools = dst / "tools"
    tools.mkdir()
    shutil.copy(stdlib / "uuid.py", tools / "uuid_tool")
    (tools / "uuid_tool").chmod(0o755)
    shutil.copy(stdlib / "json" / "tool.py", tools / "group_exec")
    (tools / "group_exec").chmod(0o610)  # only a group x bit: still executable
    (tools / "empty_exec").touch(0o755)
    (dst / "empty.txt").touch()
    (dst / "empty_dir" / "nested_empty").mkdir(parents=True)
    (dst / "rel_link").symlink_to("json/__init__.py")
    (dst / "json" / "up_link").symlink_to("../email/utils.py")
    (dst / "abs_link").symlink_to("/usr/bin/env")
    (dst / "dangling").symlink_to("does/not/exist")
    (dst / "dir_link").symlink_to("email")
    (dst / "dir_link_abs").symlink_to(str(stdlib / "json"))
    return dst


def _snapshot(top: Path) -> dict[str, tuple[str, object]]:
    out: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(top))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None)
            else:
                out[rel] = ("file", (p.read_bytes(), bool(st.st_mode & 0o111)))
    return out


def _dirs(top: Path) -> list[Path]:
    dirs = [Path(d, n) for d, ns, _ in os.walk(top) for n in ns]
    return [top, *[d for d in dirs if not d.is_symlink()]]


def _files(top: Path) -> list[Path]:
    return [Path(d, n) for d, _, ns in os.walk(top) for n in ns if not Path(d, n).is_symlink()]


def test_round_trip_of_a_real_tree(cas: LocalCAS, tmp_path: Path) -> None:
    src = _stdlib_tree(tmp_path / "src")
    root = ingest_tree(cas, src)
    dest = tmp_path / "dest"
    stats = materialize(cas, root, dest)
    want = _snapshot(src)
    assert _snapshot(dest) == want
    assert stats.files == sum(1 for v in want.values() if v[0] == "file")
    assert stats.symlinks == sum(1 for v in want.values() if v[0] == "link") == 6
    assert stats.directories == 1 + sum(1 for v in want.values() if v[0] == "dir")
    empty = sum(1 for p in _files(src) if not p.stat().st_size)
    assert empty >= 2
    assert stats.linked == stats.files - empty  # empty files are fresh inodes
    assert stats.copied == stats.reflinked == stats.rotated == stats.cross_device == 0
    assert stats.duration_s >= stats.exec_s > 0


def _open_for_write(path: str) -> str:
    try:
        os.close(os.open(path, os.O_WRONLY))
    except PermissionError as e:
        return f"EACCES {e.errno == errno.EACCES}"
    return "opened"


def test_directories_writable_files_read_only(cas: LocalCAS, tmp_path: Path) -> None:
    src = _stdlib_tree(tmp_path / "src")
    dest = tmp_path / "dest"
    materialize(cas, ingest_tree(cas, src), dest)
    for d in _dirs(dest):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o755
        (d / "action_output.o").write_bytes(b"out")  # as the owner, like an action
        (d / "out_dir" / "nested").mkdir(parents=True)
    files = [f for f in _files(dest) if f.name != "action_output.o"]
    for f in files:
        assert stat.S_IMODE(os.lstat(f).st_mode) in (0o444, 0o555)
    # root bypasses DAC: the write attempt runs as nobody
    os.chmod(tmp_path, 0o755)  # noqa: S103 - nobody must reach dest to be refused by the file
    sample = [*[f for f in files if f.parent == dest / "json"][:3], dest / "empty.txt"]
    for f in sample:
        assert as_nobody(_open_for_write, str(f)) == "EACCES True"


def test_inodes_are_shared_with_the_cas(cas: LocalCAS, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "one.txt").write_bytes(b"same bytes\n")
    (src / "a" / "two.txt").write_bytes(b"same bytes\n")
    (src / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "tool").chmod(0o755)
    (src / "e1").touch()
    (src / "a" / "e2").touch()
    dest = tmp_path / "dest"
    materialize(cas, ingest_tree(cas, src), dest)
    blob = Digest.of(b"same bytes\n")
    tool = Digest.of(b"#!/bin/sh\necho hi\n")
    ino = os.stat(cas.path(blob)).st_ino
    assert os.stat(dest / "one.txt").st_ino == ino == os.stat(dest / "a" / "two.txt").st_ino
    assert os.stat(dest / "tool").st_ino == os.stat(cas.executable_path(tool)).st_ino
    assert os.stat(dest / "tool").st_ino != os.stat(cas.path(tool)).st_ino
    assert stat.S_IMODE(os.stat(cas.path(tool)).st_mode) == 0o444  # the blob was not touched
    e1, e2 = os.stat(dest / "e1"), os.stat(dest / "a" / "e2")
    assert e1.st_ino != e2.st_ino
    assert e1.st_nlink == e2.st_nlink == 1
    assert stat.S_IMODE(e1.st_mode) == 0o444


def _one_file_tree(
    cas: LocalCAS, data: bytes, *, mode: int | None = None, mtime: tuple[int, int] | None = None
) -> tuple[Digest, Digest]:
    blob = cas.put(data)
    msg = proto.Directory()
    f = msg.files.add(name="f")
    f.digest.hash, f.digest.size_bytes = blob.hash, blob.size_bytes
    if mode is not None:
        f.node_properties.unix_mode.value = mode
    if mtime is not None:
        f.node_properties.mtime.seconds, f.node_properties.mtime.nanos = mtime
    return cas.put(msg.SerializeToString()), blob


@pytest.mark.parametrize("data", [b"payload\n", b""])
def test_node_properties_get_a_private_inode(cas: LocalCAS, tmp_path: Path, data: bytes) -> None:
    root, blob = _one_file_tree(cas, data, mode=0o640, mtime=(1_600_000_000, 123_456_789))
    blob_path = cas.root / cas.relpath(blob)
    before = os.stat(blob_path) if data else None
    materialize(cas, root, tmp_path / "dest")
    st = os.stat(tmp_path / "dest" / "f")
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert (tmp_path / "dest" / "f").read_bytes() == data
    if before is not None:
        after = os.stat(blob_path)
        assert st.st_ino != after.st_ino
        assert (after.st_mode, after.st_mtime_ns, after.st_nlink) == (
            before.st_mode,
            before.st_mtime_ns,
            before.st_nlink,
        )


def test_dest_must_not_exist_and_parent_must(cas: LocalCAS, tmp_path: Path) -> None:
    root, _ = _one_file_tree(cas, b"x")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError) as e1:
        materialize(cas, root, tmp_path / "taken")
    assert e1.value.filename == str(tmp_path / "taken")
    with pytest.raises(FileNotFoundError) as e2:
        materialize(cas, root, tmp_path / "no" / "dest")
    assert e2.value.filename == str(tmp_path / "no")
    (tmp_path / "dangling").symlink_to("nowhere")
    with pytest.raises(FileExistsError):
        materialize(cas, root, tmp_path / "dangling")


def _nested(cas: LocalCAS, tmp_path: Path, n: int = 40) -> Digest:
    src = tmp_path / "src"
    for i in range(n):
        p = src / f"d{i % 4}" / f"f{i:03d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"file {i}\n".encode())
    return ingest_tree(cas, src)


def test_failure_removes_dest_and_names_the_path(cas: LocalCAS, tmp_path: Path) -> None:
    root = _nested(cas, tmp_path)
    dest = tmp_path / "dest"
    with (
        _binding.injected("link", -errno.EIO, count=1),
        pytest.raises(OSError, match="Input/output error") as info,
    ):
        materialize(cas, root, dest, threads=1)
    assert info.value.errno == errno.EIO
    assert info.value.filename == str(dest / "d0" / "f000")
    assert "materializing 'd0/f000'" in str(info.value)
    assert not os.path.lexists(dest)
    assert sorted(os.listdir(tmp_path)) == ["cas", "src"]


@pytest.mark.parametrize("threads", [1, 2])
def test_missing_blobs_create_nothing(cas: LocalCAS, tmp_path: Path, threads: int) -> None:
    """Optimistic linking meets missing blobs: no dest, and the digest and tree path of
    the first missing file in the tree's order, whichever thread met which first."""
    root = _nested(cas, tmp_path)
    gone = {7: Digest.of(b"file 7\n"), 30: Digest.of(b"file 30\n")}
    for d in gone.values():
        os.unlink(cas.path(d))
    dest = tmp_path / "out" / "dest"
    dest.parent.mkdir()
    with pytest.raises(BlobNotFoundError) as info:
        materialize(cas, root, dest, threads=threads)
    assert info.value.digest == gone[30]  # d2/f030: directory d2 before d3 (f007) in the plan
    assert info.value.path == "d2/f030"
    assert os.listdir(dest.parent) == []


def test_non_regular_blob_fails_and_leaves_nothing(cas: LocalCAS, tmp_path: Path) -> None:
    """A CAS blob replaced by a symlink: the link check refuses the entry (it would link
    the symlink itself), the error names the CAS file and the tree path, nothing
    appears at dest."""
    root = _nested(cas, tmp_path)
    blob = cas.path(Digest.of(b"file 5\n"))
    os.unlink(blob)
    os.symlink("/etc/passwd", blob)
    dest = tmp_path / "out" / "dest"
    dest.parent.mkdir()
    with pytest.raises(OSError, match=r"not a regular file \(needed at 'd1/f005'") as info:
        materialize(cas, root, dest)
    assert info.value.errno == errno.ELOOP
    assert info.value.filename == str(blob)
    assert os.listdir(dest.parent) == []


def test_mkdir_failure_removes_dest(cas: LocalCAS, tmp_path: Path) -> None:
    root = _nested(cas, tmp_path)
    dest = tmp_path / "dest"
    with (
        _binding.injected("mkdir", -errno.ENOSPC, count=1),
        pytest.raises(OSError, match="space") as info,
    ):
        materialize(cas, root, dest)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(dest / "d0")
    assert not os.path.lexists(dest)


@pytest.mark.parametrize(
    ("err", "field"), [(errno.EXDEV, "cross_device"), (errno.EMLINK, "rotated")]
)
def test_injected_fallbacks_are_counted_per_file(
    cas: LocalCAS, tmp_path: Path, err: int, field: str
) -> None:
    root = _nested(cas, tmp_path)
    with _binding.injected("link", -err, count=3):
        stats = materialize(cas, root, tmp_path / "dest")
    assert getattr(stats, field) == 3
    assert stats.files == 40
    assert _snapshot(tmp_path / "dest") == _snapshot(tmp_path / "src")


def test_exdev_for_real_copies_and_counts(cas: LocalCAS, tmp_path: Path, tmpfs_dir: Path) -> None:
    src = _stdlib_tree(tmp_path / "src")
    root = ingest_tree(cas, src)
    assert os.stat(cas.root).st_dev != os.stat(tmpfs_dir).st_dev
    dest = tmpfs_dir / "dest"
    stats = materialize(cas, root, dest)
    assert _snapshot(dest) == _snapshot(src)
    non_empty = [f for f in _files(dest) if f.stat().st_size]
    assert stats.cross_device == len(non_empty) == stats.copied + stats.reflinked
    assert stats.linked == 0
    for f in non_empty:
        st = os.stat(f)
        assert st.st_nlink == 1
        assert stat.S_IMODE(st.st_mode) in (0o444, 0o555)


def test_fetcher_supplies_missing_directories_and_blobs(tmp_path: Path) -> None:
    with (
        LocalCAS(tmp_path / "remote", fsync=False) as remote,
        LocalCAS(tmp_path / "local", fsync=False) as local,
    ):
        root = _nested(remote, tmp_path, n=12)
        calls: list[str] = []

        class Copier:
            def fetch_directories(self, root: Digest) -> None:
                calls.append("dirs")
                todo = [root]
                while todo:
                    d = todo.pop()
                    data = remote.read(d)
                    local.put(data, expected=d)
                    m = proto.Directory.FromString(data)
                    todo += [Digest(x.digest.hash, x.digest.size_bytes) for x in m.directories]

            def fetch_blobs(self, digests: Sequence[Digest]) -> None:
                calls.append(f"blobs {len(digests)}")
                for d in digests:
                    local.put(remote.read(d), expected=d)

        with pytest.raises(BlobNotFoundError):
            materialize(local, root, tmp_path / "no_fetcher")
        stats = materialize(local, root, tmp_path / "dest", fetcher=Copier())
        assert calls == ["dirs", "blobs 12"]
        assert stats.files == 12
        assert _snapshot(tmp_path / "dest") == _snapshot(tmp_path / "src")


def test_logs_once_at_debug(
    cas: LocalCAS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _nested(cas, tmp_path)
    with caplog.at_level(logging.DEBUG, logger="fastmat"):
        materialize(cas, root, tmp_path / "dest")
    mine = [r for r in caplog.records if r.getMessage().startswith("materialized")]
    assert len(mine) == 1
    assert "files=40" in mine[0].getMessage()


def test_executable_with_only_an_mtime_is_a_private_0555_inode(
    cas: LocalCAS, tmp_path: Path
) -> None:
    blob = cas.put(b"#!/bin/sh\n")
    msg = proto.Directory()
    f = msg.files.add(name="tool", is_executable=True)
    f.digest.hash, f.digest.size_bytes = blob.hash, blob.size_bytes
    f.node_properties.mtime.seconds = 1_000_000_000
    materialize(cas, cas.put(msg.SerializeToString()), tmp_path / "dest")
    st = os.stat(tmp_path / "dest" / "tool")
    assert stat.S_IMODE(st.st_mode) == 0o555
    assert st.st_mtime_ns == 1_000_000_000 * 10**9
    assert st.st_nlink == 1
    assert st.st_ino != os.stat(cas.executable_path(blob)).st_ino


def test_concurrency_bounds_are_configurable_and_checked(cas: LocalCAS, tmp_path: Path) -> None:
    root = _nested(cas, tmp_path)
    stats = materialize(cas, root, tmp_path / "one", threads=1, max_inflight=1)
    assert stats.linked == 40
    for bad in ({"threads": -1}, {"max_inflight": 0}):
        with pytest.raises(ValueError, match="threads must be"):
            materialize(cas, root, tmp_path / "dest", **bad)  # type: ignore[arg-type]
    assert not os.path.lexists(tmp_path / "dest")


@pytest.mark.remote
def test_remote_cas_as_fetcher_against_a_real_server(tmp_path: Path) -> None:
    """README's ``materialize(cas, root, dest, fetcher=RemoteCAS(url))``: fetched, verified,
    linked; the second call needs nothing from the server."""
    from fastmat.remote import RemoteCAS
    from tests.reapi_server import Uploader, build_tree, shared_buildgrid

    server = shared_buildgrid()
    spec: dict[str, bytes | None] = {
        f"d{i % 3}/f{i:02d}": f"remote {i}\n".encode() for i in range(20)
    }
    spec["empty/"] = None
    root, blobs = build_tree(spec)
    up = Uploader(server.address)
    try:
        up.upload(blobs)
    finally:
        up.close()
    with LocalCAS(tmp_path / "cas", fsync=False) as cas, RemoteCAS(server.url) as remote:
        stats = materialize(cas, root, tmp_path / "dest", fetcher=remote)
        assert stats.files == 20
        assert (tmp_path / "dest" / "d1" / "f04").read_bytes() == b"remote 4\n"
        assert (tmp_path / "dest" / "empty").is_dir()
        again = materialize(cas, root, tmp_path / "again")  # everything is local now
        assert again.linked == 20


def test_node_properties_on_xfs_are_counted_reflinks(xfs_dir: Path) -> None:
    with LocalCAS(xfs_dir / "cas", fsync=False) as cas:
        root, blob = _one_file_tree(cas, b"r" * 100_000, mode=0o600)
        stats = materialize(cas, root, xfs_dir / "dest")
        assert (stats.reflinked, stats.copied, stats.linked) == (1, 0, 0)
        st = os.stat(xfs_dir / "dest" / "f")
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_ino != os.stat(cas.path(blob)).st_ino
        assert (xfs_dir / "dest" / "f").read_bytes() == b"r" * 100_000


def test_concurrent_calls_share_variants_and_nodes(cas: LocalCAS, tmp_path: Path) -> None:
    """Eight threads, one tree with executables: every tree complete, one variant each."""
    src = tmp_path / "src"
    for i in range(30):
        p = src / f"d{i % 3}" / f"t{i:02d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"#!/bin/sh\necho {i}\n".encode())
        p.chmod(0o755 if i % 2 else 0o644)
    root = ingest_tree(cas, src)
    barrier = threading.Barrier(8)
    results: list[object] = [None] * 8

    def run(k: int) -> None:
        barrier.wait()
        try:
            results[k] = materialize(cas, root, tmp_path / f"dest{k}", threads=2)
        except BaseException as e:  # reported below
            results[k] = e

    workers = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    want = _snapshot(src)
    for k in range(8):
        assert not isinstance(results[k], BaseException), results[k]
        assert _snapshot(tmp_path / f"dest{k}") == want
    assert cas.counters.exec_variants_built == 15
    tool = tmp_path / "dest0" / "d1" / "t01"
    assert os.stat(tool).st_nlink == 1 + 8  # the variant + one link per tree


def test_progress_is_reported_at_a_bounded_rate_and_ends_at_the_total(
    cas: LocalCAS, tmp_path: Path
) -> None:
    root = wide(cas, 3000)
    reports: list[fastmat.Progress] = []
    stats = materialize(cas, root, tmp_path / "dest", progress=reports.append)
    assert reports, "at least the final report"
    assert reports[-1] == fastmat.Progress("materialize", 3000, 3000, "entries")
    assert [r.done for r in reports] == sorted(r.done for r in reports)
    assert len(reports) <= 2 + stats.duration_s / 0.1  # never per file
    assert all(r.total == 3000 and r.unit == "entries" for r in reports)


def test_cancel_before_anything_leaves_nothing(cas: LocalCAS, tmp_path: Path) -> None:
    root = wide(cas, 10)
    stop = threading.Event()
    stop.set()
    with pytest.raises(fastmat.Cancelled):
        materialize(cas, root, tmp_path / "dest", cancel=stop)
    assert os.listdir(tmp_path) == ["cas"]


def test_cancel_while_linking_stops_soon_and_leaves_nothing(cas: LocalCAS, tmp_path: Path) -> None:
    """A ``threading.Event`` set while the native call runs: the executor stops between
    chunks, ``Cancelled`` is raised and neither dest nor a staging dir remains."""
    root = wide(cas, 20_000)
    stop = threading.Event()
    seen: list[int] = []

    def on_progress(p: fastmat.Progress) -> None:
        seen.append(p.done)
        if p.done > 0:
            stop.set()  # cancel once the links have begun

    dest = tmp_path / "work" / "dest"
    dest.parent.mkdir()
    with pytest.raises(fastmat.Cancelled):
        materialize(cas, root, dest, progress=on_progress, cancel=stop, threads=1)
    assert seen
    assert seen[-1] < 20_000
    assert os.listdir(dest.parent) == []


def test_every_call_taking_a_root_takes_its_text_too(cas: LocalCAS, tmp_path: Path) -> None:
    """Issue 12, item 7: ``materialize(cas, "hash/size", dest)`` failed with
    ``AttributeError: 'str' object has no attribute 'key'``."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"text\n")
    text = str(ingest_tree(cas, src))
    assert materialize(cas, text, tmp_path / "m").files == 1
    assert fastmat.tree.load_plan(cas, text).n_files == 1
    with fastmat.DirectoryCache(cas, tmp_path / "cache", fsync=False) as cache:
        assert not cache.materialize(text, tmp_path / "c1").hit
        assert cache.entry_path(text) is not None
        with cache.workspace(text, tmp_path / "ws") as ws:
            assert (ws.path / "d" / "f").read_bytes() == b"text\n"
    with pytest.raises(fastmat.InvalidDigestError):
        materialize(cas, "nonsense", tmp_path / "bad")


def test_a_progress_callback_that_raises_stops_the_call_with_its_exception(
    cas: LocalCAS, tmp_path: Path
) -> None:
    """The callback runs on the watcher thread during the native call: its exception
    was lost there (and the call ran to its end); now it stops the call, ``dest`` never
    appears, and the caller gets the callback's exception."""
    root = wide(cas, 20_000)

    class Enough(Exception):
        pass

    def on_progress(p: fastmat.Progress) -> None:
        if p.done > 0:
            raise Enough(p.done)

    dest = tmp_path / "work" / "dest"
    dest.parent.mkdir()
    with pytest.raises(Enough):
        materialize(cas, root, dest, progress=on_progress, threads=1)
    assert os.listdir(dest.parent) == []
