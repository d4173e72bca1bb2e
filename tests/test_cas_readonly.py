"""A CAS on a real read-only filesystem (issue 12, item 2): a loop-mounted ext4 made
read-only by ``mount -o remount,ro`` after a tree was ingested and one blob damaged.
Opening writes nothing; lookups, reads, ``usage()``, ``verify()`` (reporting, not
quarantining), ``materialize`` (executables without a variant become private copies)
and the command's stats / verify / materialize work, as does a directory cache over
it; every write names the CAS and the operation. Also a CAS that is read-only to a
user by permissions: materialize copies what it may not link, and a fetch into it is
refused before any download."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastmat import Digest, LocalCAS, ReadOnlyCASError, ingest_tree, materialize, proto
from fastmat.cache import DirectoryCache
from fastmat.tree import load_plan
from tests.helpers import NOBODY, as_nobody, open_to_all, run_cmd
from tests.reapi_server import free_port

REPO = str(Path(__file__).resolve().parent.parent)
PLAIN = b"plain file\n" * 100
TOOL = b"#!/bin/sh\necho tool\n"  # its variant is never made before the remount
BUILT = b"#!/bin/sh\necho built\n"  # its variant is made before the remount
DAMAGED = b"a blob an action wrote through its hardlink"


def _tree(top: Path) -> None:
    (top / "sub").mkdir(parents=True)
    (top / "plain.txt").write_bytes(PLAIN)
    (top / "sub" / "tool").write_bytes(TOOL)
    (top / "sub" / "tool").chmod(0o755)
    (top / "sub" / "built").write_bytes(BUILT)
    (top / "sub" / "built").chmod(0o755)
    (top / "sub" / "link").symlink_to("../plain.txt")


@dataclass
class ReadOnly:
    root: Path  # the CAS, on the read-only mount
    tree: Digest
    src: Path  # the ingested directory (writable, elsewhere)
    damaged: Digest
    mnt: Path


def _mount(*cmd: str) -> None:
    res = run_cmd(*cmd)
    if res.returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(cmd)}): {res.stderr.strip() or res.returncode}")


@pytest.fixture
def ro(tmp_path: Path) -> Iterator[ReadOnly]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a filesystem and remount it read-only")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    image, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(32 << 20)
    res = run_cmd("mkfs.ext4", "-q", "-F", str(image))
    if res.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {res.stderr.strip()}")
    _mount("mount", "-o", "loop", str(image), str(mnt))
    try:
        src = tmp_path / "src"
        _tree(src)
        with LocalCAS(mnt / "cas") as cas:
            tree = ingest_tree(cas, src)
            cas.executable_path(Digest.of(BUILT))
            damaged = cas.put(DAMAGED)
            blob = cas.path(damaged)
            blob.chmod(0o644)
            blob.write_bytes(DAMAGED.upper())  # same size, other bytes
            blob.chmod(0o444)
        assert os.listdir(mnt / "cas" / "tmp") == []
        _mount("mount", "-o", "remount,ro", str(mnt))
        yield ReadOnly(mnt / "cas", tree, src, damaged, mnt)
    finally:
        if run_cmd("umount", str(mnt)).returncode != 0:
            run_cmd("umount", "-l", str(mnt))


def _listing(root: Path) -> list[tuple[str, int, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.join(dirpath, name), st.st_ino, st.st_mtime_ns))
    return sorted(out)


def test_opening_reads_and_stats_write_nothing(ro: ReadOnly) -> None:
    with pytest.raises(OSError, match="Read-only") as exc:  # the mount really is read-only
        (ro.mnt / "probe").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    before = _listing(ro.root)
    with LocalCAS(ro.root, create=False) as cas:
        assert cas.read_only
        assert cas.read(Digest.of(PLAIN)) == PLAIN
        assert Digest.of(TOOL) in cas
        u = cas.usage()
        assert u.blobs == 6  # 3 files, 2 Directory messages, the damaged blob
        assert u.exec_variants == 1
        assert u.recorded_names == 7  # the use record, read as it is
        assert u.pinned_keys == 0
        with cas.pinned([Digest.of(PLAIN)]) as pin:  # pins nothing, raises nothing
            pin.add(cas.relpath(Digest.of(TOOL)).encode())
    assert _listing(ro.root) == before


def test_materialize_from_a_read_only_cas(ro: ReadOnly, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with LocalCAS(ro.root) as cas:
        stats = materialize(cas, str(ro.tree), out)
        assert not (ro.root / cas.exec_relpath(Digest.of(TOOL))).exists()  # never made
    assert (out / "plain.txt").read_bytes() == PLAIN
    assert (out / "sub" / "tool").read_bytes() == TOOL
    assert (out / "sub" / "built").read_bytes() == BUILT
    assert os.readlink(out / "sub" / "link") == "../plain.txt"
    assert stat.S_IMODE((out / "plain.txt").stat().st_mode) == 0o444
    assert stat.S_IMODE((out / "sub" / "tool").stat().st_mode) == 0o555
    assert stat.S_IMODE((out / "sub" / "built").stat().st_mode) == 0o555
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o755
    # another filesystem: every file is a private copy (EXDEV), the variant-less tool
    # one by the plan itself (a COPY of its plain blob)
    assert stats.files == 3
    assert stats.copied + stats.reflinked == 3
    assert stats.linked == 0
    ran = subprocess.run([out / "sub" / "tool"], capture_output=True, check=True)
    assert ran.stdout == b"tool\n"


def test_directory_cache_over_a_read_only_cas(ro: ReadOnly, tmp_path: Path) -> None:
    """A writable cache over the read-only CAS: a miss builds the entry from it (private
    copies: another filesystem), hits replay the entry, a workspace serves it; the CAS
    is not written (its listing, inodes and mtimes unchanged)."""
    before = _listing(ro.root)
    with LocalCAS(ro.root) as cas, DirectoryCache(cas, tmp_path / "cache") as cache:
        miss = cache.materialize(ro.tree, tmp_path / "a")
        hit = cache.materialize(ro.tree, tmp_path / "b")
        with cache.workspace(ro.tree, tmp_path / "w"):
            assert (tmp_path / "w" / "sub" / "tool").read_bytes() == TOOL
            (tmp_path / "w" / "scratch").write_bytes(b"an action's output")
        stats = cache.stats()
    assert (miss.hit, hit.hit) == (False, True)
    assert (stats.misses, stats.constructions, stats.hits) == (1, 1, 2)
    for d in (tmp_path / "a", tmp_path / "b"):
        assert (d / "plain.txt").read_bytes() == PLAIN
        assert (d / "sub" / "built").read_bytes() == BUILT
        assert stat.S_IMODE((d / "sub" / "tool").stat().st_mode) == 0o555
        assert os.readlink(d / "sub" / "link") == "../plain.txt"
        assert (d / "plain.txt").stat().st_dev != ro.root.stat().st_dev
    assert not (tmp_path / "w").exists()
    assert _listing(ro.root) == before


def test_remote_materialize_from_a_read_only_cas(ro: ReadOnly, tmp_path: Path) -> None:
    """Everything local: the pipelined fetcher links (here: copies) it all, the server
    (down) is never asked, and the missing variant is a private copy there too."""
    from fastmat.remote import RemoteCAS

    with (
        RemoteCAS(f"grpc://127.0.0.1:{free_port()}", retries=0, timeout_s=5) as remote,
        LocalCAS(ro.root) as cas,
    ):
        stats = materialize(cas, ro.tree, tmp_path / "out", fetcher=remote)
    assert stats.files == 3
    assert (tmp_path / "out" / "sub" / "tool").read_bytes() == TOOL
    assert stat.S_IMODE((tmp_path / "out" / "sub" / "tool").stat().st_mode) == 0o555


def test_writes_raise_naming_the_cas_and_the_operation(ro: ReadOnly, tmp_path: Path) -> None:
    new = tmp_path / "new"
    new.write_bytes(b"not in the CAS")
    with LocalCAS(ro.root) as cas:
        for call, what in (
            (lambda: cas.put(b"not in the CAS"), "put"),
            (lambda: cas.put_file(new), "put_file"),
            (lambda: cas.put_stream([b"not ", b"in"], None), "put_stream"),
            (lambda: cas.executable_path(Digest.of(TOOL)), "executable variant"),
            (cas.gc, "gc"),
            (lambda: cas.verify(quarantine=True), "quarantine"),
            (lambda: cas.tmp_dir, "write"),
        ):
            with pytest.raises(ReadOnlyCASError) as exc:
                call()
            assert exc.value.errno == errno.EROFS
            assert exc.value.filename == str(ro.root)
            assert str(ro.root) in str(exc.value)
            assert what in str(exc.value)
        # content already stored needs no write: these succeed
        assert cas.put(PLAIN) == Digest.of(PLAIN)
        assert cas.put_file(ro.src / "plain.txt") == Digest.of(PLAIN)
        assert ingest_tree(cas, ro.src) == ro.tree
        assert cas.executable_path(Digest.of(BUILT)).is_file()
        (ro.src / "extra").write_bytes(b"a new file")
        with pytest.raises(ReadOnlyCASError, match="read-only"):
            ingest_tree(cas, ro.src)
    with pytest.raises(ReadOnlyCASError) as exc:
        LocalCAS(ro.root, read_only=False)
    assert exc.value.errno == errno.EROFS


def test_verify_reports_damage_without_moving_it(ro: ReadOnly) -> None:
    with LocalCAS(ro.root) as cas:
        report = cas.verify()
        assert not report.ok
        assert not report.quarantining
        assert [(b.digest, b.kind) for b in report.damaged] == [(ro.damaged, "blob")]
        assert "content does not hash" in report.damaged[0].reason
        assert report.quarantined == []
        assert report.blobs_checked == 6
        assert report.exec_checked == 1
        assert (ro.root / cas.relpath(ro.damaged)).is_file()  # left in place
    assert os.listdir(ro.root / "quarantine") == []


def test_bounded_cas_opens_read_only_and_evicts_nothing(ro: ReadOnly, tmp_path: Path) -> None:
    with LocalCAS(ro.root, max_bytes=1, max_blobs=1) as cas:
        assert cas.read_only
        materialize(cas, ro.tree, tmp_path / "out")
        u = cas.usage()
        assert (u.max_bytes, u.blobs) == (1, 6)  # far over its bound, and nothing evicted


def _fastmat(*args: str, entry: bool = False) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    cmd = [str(Path(sys.executable).with_name("fastmat"))] if entry else [sys.executable, "-m"]
    if not entry:
        cmd.append("fastmat")
    return subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=120,
        check=False,
    )


def test_command_on_a_read_only_cas(ro: ReadOnly, tmp_path: Path) -> None:
    cas = str(ro.root)
    res = _fastmat("stats", "--cas", cas, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["cas"]["blobs"] == 6

    res = _fastmat("verify", "--cas", cas)
    assert res.returncode == 1, res.stderr
    assert f"damaged blob {ro.damaged}" in res.stdout
    assert "nothing quarantined" in res.stdout
    res = _fastmat("verify", "--cas", cas, "--json")
    payload = json.loads(res.stdout)
    assert (payload["ok"], payload["quarantining"], payload["quarantined"]) == (False, False, [])

    entry = Path(sys.executable).with_name("fastmat").exists()  # the installed command
    out = tmp_path / "out"
    res = _fastmat("materialize", str(ro.tree), str(out), "--cas", cas, entry=entry)
    assert res.returncode == 0, res.stderr
    assert (out / "sub" / "tool").read_bytes() == TOOL

    (ro.src / "extra").write_bytes(b"a new file")
    res = _fastmat("ingest", str(ro.src), "--cas", cas)
    assert res.returncode != 0
    assert f"the CAS {cas} is read-only" in res.stderr
    assert "Read-only file system" in res.stderr


def _roots_cas(tmp_path: Path, prepare: Callable[[LocalCAS, Digest], None] | None = None) -> Digest:
    """root's CAS at tmp_path/cas holding the test tree (``prepare`` may change it
    first), readable by everyone, writable by root only; returns the tree's digest."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a part as another user")
    src = tmp_path / "src"
    _tree(src)
    root = tmp_path / "cas"
    with LocalCAS(root) as cas:
        tree = ingest_tree(cas, src)
        if prepare is not None:
            prepare(cas, tree)
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - everyone may read, only root may write
    open_to_all(root)
    return tree


def _nobodys(path: Path) -> Path:
    """A new directory nobody may write."""
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    open_to_all(path)
    return path


def test_cas_read_only_by_permissions(tmp_path: Path) -> None:
    """Another user's CAS, readable but not writable: reads, stats and verify work and
    a put names the CAS (EACCES)."""
    _roots_cas(tmp_path)
    root = tmp_path / "cas"

    def as_reader() -> tuple[bool, int, int, bytes, int, str]:
        with LocalCAS(root, create=False) as c:
            try:
                c.put(b"new bytes")
            except ReadOnlyCASError as e:
                err, msg = e.errno or 0, str(e)
            return (
                c.read_only,
                c.usage().blobs,
                c.verify().blobs_checked,
                c.read(Digest.of(TOOL)),
                err,
                msg,
            )

    read_only, blobs, checked, tool, err, msg = as_nobody(as_reader)
    assert read_only
    assert blobs == checked == 5
    assert tool == TOOL
    assert err == errno.EACCES
    assert f"cannot put: the CAS {root} is read-only" in msg
    assert os.listdir(root / "tmp") == []


def test_materialize_from_another_users_cas_copies_what_it_may_not_link(
    tmp_path: Path,
) -> None:
    """Root's CAS read by nobody on the same filesystem: under fs.protected_hardlinks=1
    (the usual default) linkat of a file one does not own fails with EPERM. Each such
    file becomes a private reflink or copy with the plan's mode, counted in
    ``link_denied``; the tree is exact and shares no inode with the CAS."""
    if Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "1":
        pytest.skip("fs.protected_hardlinks is off here: nobody may link root's blobs")

    def one_variant(cas: LocalCAS, tree: Digest) -> None:
        cas.executable_path(Digest.of(BUILT))  # one variant exists, the other cannot be made

    tree = _roots_cas(tmp_path, one_variant)
    root = tmp_path / "cas"
    with LocalCAS(root) as cas:
        files = load_plan(cas, tree).n_files
    dest = _nobodys(tmp_path / "out") / "tree"

    def as_reader() -> tuple[int, int, int, int]:
        with LocalCAS(root, create=False) as c:
            st = materialize(c, tree, dest)
        return st.linked, st.link_denied, st.reflinked + st.copied, st.cross_device

    linked, denied, copies, xdev = as_nobody(as_reader)
    assert (linked, xdev) == (0, 0)
    assert copies == files  # the variant-less tool is a private copy, not a fallback
    assert denied == files - 1
    assert (dest / "plain.txt").read_bytes() == PLAIN
    assert (dest / "sub" / "tool").read_bytes() == TOOL
    assert (dest / "sub" / "built").read_bytes() == BUILT
    assert os.readlink(dest / "sub" / "link") == "../plain.txt"
    modes = {p: stat.S_IMODE((dest / p).stat().st_mode) for p in ("sub/tool", "sub/built")}
    assert modes == {"sub/tool": 0o555, "sub/built": 0o555}
    assert stat.S_IMODE((dest / "plain.txt").stat().st_mode) == 0o444
    cas_inodes = {os.lstat(os.path.join(d, f)).st_ino for d, _, fs in os.walk(root) for f in fs}
    for name in ("plain.txt", "sub/tool", "sub/built"):
        st = (dest / name).lstat()
        assert st.st_uid == NOBODY
        assert st.st_ino not in cas_inodes


@pytest.mark.parametrize("missing", ["blob", "Directory"])
def test_a_fetch_into_a_read_only_cas_is_refused_before_any_download(
    tmp_path: Path, missing: str
) -> None:
    """nobody's materialize with a remote from root's CAS that lacks a blob (or a
    Directory): ``ReadOnlyCASError`` naming the missing digest and its tree path, before
    the server is contacted (nothing listens there: a contact would fail otherwise)."""
    gone: list[Digest] = []

    def remove_one(cas: LocalCAS, tree: Digest) -> None:
        if missing == "blob":
            gone.append(Digest.of(PLAIN))
        else:
            sub = proto.Directory.FromString(cas.read(tree)).directories[0]
            assert sub.name == "sub"
            gone.append(Digest(sub.digest.hash, sub.digest.size_bytes))
        cas.path(gone[0]).unlink()

    tree = _roots_cas(tmp_path, remove_one)
    root = tmp_path / "cas"
    out = _nobodys(tmp_path / "out")
    url = f"grpc://127.0.0.1:{free_port()}"

    def as_reader() -> str:
        from fastmat.remote import RemoteCAS
        from fastmat.tree.nodecache import node_cache

        node_cache.clear()  # the same tree, loaded by an earlier test of this process
        with RemoteCAS(url, retries=0, timeout_s=5) as remote, LocalCAS(root) as c:
            try:
                materialize(c, tree, out / "t", fetcher=remote)
            except ReadOnlyCASError as e:
                return str(e)
        return "materialized"

    what = (
        f"fetch 1 missing blob(s) into it (the first: {gone[0]} at 'plain.txt')"
        if missing == "blob"
        else f"fetch Directory {gone[0]} (at 'sub')"
    )
    assert as_nobody(as_reader) == f"cannot {what}: the CAS {root} is read-only (Permission denied)"
    assert os.listdir(out) == []
