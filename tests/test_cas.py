"""LocalCAS in one process: layout, insertion, lookup, executable variants, verify."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat import EMPTY_DIGEST, BlobNotFoundError, Digest, DigestMismatchError
from fastmat.cas import LocalCAS
from tests.helpers import as_nobody


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas") as c:
        yield c


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if not p.is_dir())


def test_open_creates_layout(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "a" / "b" / "cas") as cas:
        root = tmp_path / "a" / "b" / "cas"
        assert cas.root == root
        for area in ("blobs", "exec"):
            assert sorted(p.name for p in (root / area).iterdir()) == [
                f"{i:02x}" for i in range(256)
            ]
        assert {p.name for p in root.iterdir()} == {
            "blobs",
            "exec",
            "tmp",
            "locks",
            "quarantine",
            "usage",
        }
        assert cas.tmp_dir.parent == root / "tmp"
        assert cas.tmp_dir.name.startswith(f"{os.getpid()}.")
        assert (cas.tmp_dir / "owner.lock").is_file()
        assert stat.S_ISDIR(os.fstat(cas.tmp_fd).st_mode)
    assert not cas.tmp_dir.exists()  # close() removes the instance's temp dir
    with LocalCAS(root) as again:  # reopening an existing CAS
        assert again.tmp_dir != cas.tmp_dir


def test_put_read_path(cas: LocalCAS) -> None:
    d = cas.put(b"hello")
    assert d == Digest.of(b"hello")
    assert d in cas
    assert cas.read(d) == b"hello"
    p = cas.path(d)
    assert p == cas.root / cas.relpath(d)
    assert cas.relpath(d) == f"blobs/{d.hash[:2]}/{d.hash}-5"
    assert cas.exec_relpath(d) == f"exec/{d.hash[:2]}/{d.hash}-5"
    assert stat.S_IMODE(p.stat().st_mode) == 0o444
    ino = p.stat().st_ino
    assert cas.put(b"hello") == d  # already present: nothing rewritten
    assert p.stat().st_ino == ino
    c = cas.counters
    assert (c.blobs_written, c.blobs_present, c.bytes_written) == (1, 1, 5)
    assert os.listdir(cas.tmp_dir) == ["owner.lock"]


def test_put_expected_mismatch_stores_nothing(cas: LocalCAS) -> None:
    wrong = Digest.of(b"other")
    with pytest.raises(DigestMismatchError) as ei:
        cas.put(b"hello", expected=wrong)
    assert ei.value.expected == wrong
    assert ei.value.actual == Digest.of(b"hello")
    assert Digest.of(b"hello") not in cas
    assert files_under(cas.root / "blobs") == []
    assert cas.put(b"hello", expected=Digest.of(b"hello")) == Digest.of(b"hello")


def test_empty_blob_never_touches_disk(cas: LocalCAS) -> None:
    assert cas.put(b"") == EMPTY_DIGEST
    assert EMPTY_DIGEST in cas
    assert cas.read(EMPTY_DIGEST) == b""
    assert cas.missing([EMPTY_DIGEST]) == []
    assert files_under(cas.root / "blobs") == []
    # path()/executable_path() may create read-only empty files under the right names
    p, x = cas.path(EMPTY_DIGEST), cas.executable_path(EMPTY_DIGEST)
    assert p.read_bytes() == x.read_bytes() == b""
    assert stat.S_IMODE(p.stat().st_mode) == 0o444
    assert stat.S_IMODE(x.stat().st_mode) == 0o555
    assert p.stat().st_ino != x.stat().st_ino
    assert cas.path(EMPTY_DIGEST).stat().st_ino == p.stat().st_ino


def test_missing_blob_errors_name_the_digest(cas: LocalCAS) -> None:
    d = Digest.of(b"absent")
    for call in (cas.path, cas.read, cas.executable_path):
        with pytest.raises(BlobNotFoundError, match=d.hash) as ei:
            call(d)
        assert ei.value.digest == d
    assert d not in cas
    assert "not a digest" not in cas


def test_contains_requires_a_regular_file(cas: LocalCAS) -> None:
    d = Digest.of(b"x")
    (cas.root / cas.relpath(d)).symlink_to("/etc/hostname")
    assert d not in cas
    assert cas.missing([d]) == [d]
    d2 = Digest.of(b"y")
    (cas.root / cas.relpath(d2)).mkdir()
    assert d2 not in cas


def test_missing_keeps_order_without_duplicates(cas: LocalCAS) -> None:
    have = cas.put(b"have")
    a, b = Digest.of(b"a"), Digest.of(b"b")
    assert cas.missing([b, have, a, b, EMPTY_DIGEST, a]) == [b, a]


def test_put_file_copies_and_leaves_source_untouched(cas: LocalCAS, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    os.chmod(src, 0o640)
    before = src.stat()
    d = cas.put_file(src)
    after = src.stat()
    assert d == Digest.of(data)
    assert cas.read(d) == data
    assert (after.st_ino, after.st_mode, after.st_size, after.st_nlink) == (
        before.st_ino,
        before.st_mode,
        before.st_size,
        before.st_nlink,
    )
    assert src.read_bytes() == data
    blob = cas.path(d).stat()
    assert blob.st_ino != before.st_ino
    assert stat.S_IMODE(blob.st_mode) == 0o444
    assert cas.counters.copied_files + cas.counters.reflinked_files == 1
    assert os.listdir(cas.tmp_dir) == ["owner.lock"]


def test_put_file_from_read_only_source(cas: LocalCAS, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    src = ro / "f"
    src.write_bytes(b"read-only bytes")
    src.chmod(0o444)
    ro.chmod(0o555)
    assert cas.put_file(src) == Digest.of(b"read-only bytes")
    assert src.read_bytes() == b"read-only bytes"
    assert stat.S_IMODE(src.stat().st_mode) == 0o444


def _put_file_as_nobody(cas_dir: str, src: str) -> tuple[str, int]:
    with LocalCAS(cas_dir) as cas:
        d = cas.put_file(src)
        return str(d), stat.S_IMODE(cas.path(d).stat().st_mode)


def test_put_file_unprivileged_from_a_file_it_cannot_write() -> None:
    top = Path(tempfile.mkdtemp(prefix="fastmat-nobody-"))  # pytest's tmp_path is 0700
    top.chmod(0o755)
    cas_dir = top / "cas"
    LocalCAS(cas_dir).close()
    for p in [cas_dir, *cas_dir.rglob("*")]:
        os.chown(p, 65534, 65534)
    src = top / "root-owned"
    src.write_bytes(b"owned by root, 0444")
    src.chmod(0o444)
    got = as_nobody(_put_file_as_nobody, str(cas_dir), str(src))
    assert got == (str(Digest.of(b"owned by root, 0444")), 0o444)
    assert src.stat().st_uid == 0
    shutil.rmtree(top)


def test_put_file_expected_mismatch_stores_nothing(cas: LocalCAS, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"actual")
    with pytest.raises(DigestMismatchError):
        cas.put_file(src, expected=Digest.of(b"claimed"))
    assert files_under(cas.root / "blobs") == []
    assert os.listdir(cas.tmp_dir) == ["owner.lock"]
    have = cas.put(b"claimed")
    with pytest.raises(DigestMismatchError):  # also when the claimed blob is present
        cas.put_file(src, expected=have)
    assert Digest.of(b"actual") not in cas


def test_put_file_refuses_non_regular(cas: LocalCAS, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    for p in (tmp_path, tmp_path / "fifo"):
        with pytest.raises(OSError, match="regular file"):
            cas.put_file(p)


def test_put_stream(cas: LocalCAS) -> None:
    data = os.urandom(100_000)
    d = Digest.of(data)
    chunks = [data[i : i + 7000] for i in range(0, len(data), 7000)]
    assert cas.put_stream(iter(chunks), d) == d
    assert cas.read(d) == data
    assert cas.put_stream(iter(chunks), d) == d  # present: checked, not rewritten
    assert cas.counters.blobs_written == 1
    bad = Digest(d.hash, d.size_bytes + 1)
    with pytest.raises(DigestMismatchError):
        cas.put_stream(iter(chunks), bad)
    with pytest.raises(DigestMismatchError):
        cas.put_stream(iter([b"evil"] * 3), Digest.of(b"good"))
    assert Digest.of(b"good") not in cas
    assert Digest.of(b"evil" * 3) not in cas
    assert os.listdir(cas.tmp_dir) == ["owner.lock"]
    assert cas.put_stream(iter([]), EMPTY_DIGEST) == EMPTY_DIGEST
    assert files_under(cas.root / "blobs") == [cas.path(d)]


def test_executable_variant(cas: LocalCAS) -> None:
    d = cas.put(b"#!/bin/sh\nexit 0\n")
    blob = cas.path(d)
    x = cas.executable_path(d)
    assert x == cas.root / cas.exec_relpath(d)
    st = x.stat()
    assert stat.S_IMODE(st.st_mode) == 0o555
    assert st.st_ino != blob.stat().st_ino
    assert x.read_bytes() == blob.read_bytes()
    for _ in range(3):
        assert cas.executable_path(d).stat().st_ino == st.st_ino
    cas.ensure_executables([d, d])
    assert cas.executable_path(d).stat().st_ino == st.st_ino
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert blob.stat().st_nlink == 1
    assert cas.counters.exec_variants_built == 1


def test_executable_variant_single_flight_threads(cas: LocalCAS) -> None:
    ds = [cas.put(f"#!/bin/sh\necho {i}\n".encode()) for i in range(20)]
    barrier = threading.Barrier(8)
    inodes: list[dict[Digest, int]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            inodes.append({d: cas.executable_path(d).stat().st_ino for d in ds})
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(m == inodes[0] for m in inodes)
    assert cas.counters.exec_variants_built == len(ds)


def test_ensure_executables_batch(cas: LocalCAS) -> None:
    ds = [cas.put(f"tool {i}".encode()) for i in range(30)]
    cas.ensure_executables([*ds, EMPTY_DIGEST])
    assert cas.counters.exec_variants_built == 30
    for d in ds:
        assert stat.S_IMODE((cas.root / cas.exec_relpath(d)).stat().st_mode) == 0o555
    with pytest.raises(BlobNotFoundError):
        cas.ensure_executables([Digest.of(b"absent"), Digest.of(b"absent2")])


def test_variant_refuses_a_damaged_blob(cas: LocalCAS) -> None:
    d = cas.put(b"original tool")
    blob = cas.path(d)
    blob.chmod(0o644)
    blob.write_bytes(b"tampered tool")
    blob.chmod(0o444)
    with pytest.raises(DigestMismatchError):
        cas.executable_path(d)
    assert not (cas.root / cas.exec_relpath(d)).exists()
    assert os.listdir(cas.tmp_dir) == ["owner.lock"]


def test_threads_put_the_same_blobs(cas: LocalCAS) -> None:
    blobs = [os.urandom(5000) for _ in range(200)]
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for b in blobs:
                cas.put(b)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    c = cas.counters
    assert c.blobs_written == 200
    assert c.blobs_written + c.blobs_present == 6 * 200
    assert len(files_under(cas.root / "blobs")) == 200
    assert os.listdir(cas.tmp_dir) == ["owner.lock"]


def test_reflink_on_xfs(xfs_dir: Path) -> None:
    src = xfs_dir / "big.bin"
    data = os.urandom(64 << 20)
    src.write_bytes(data)
    os.sync()
    with LocalCAS(xfs_dir / "cas") as cas:
        vfs = os.statvfs(xfs_dir)
        free_before = vfs.f_bavail * vfs.f_frsize
        d = cas.put_file(src)
        os.sync()
        vfs = os.statvfs(xfs_dir)
        used = free_before - vfs.f_bavail * vfs.f_frsize
        assert cas.counters.reflinked_files == 1
        assert cas.counters.copied_files == 0
        assert used < 4 << 20, f"a reflink used {used} bytes"  # a copy would use 64 MiB
        st = cas.path(d).stat()
        assert stat.S_IMODE(st.st_mode) == 0o444
        assert st.st_ino != src.stat().st_ino
        assert cas.read(d) == data
        # the executable variant is a reflink too: the mode is set explicitly
        x = cas.executable_path(d)
        os.sync()
        vfs = os.statvfs(xfs_dir)
        assert free_before - vfs.f_bavail * vfs.f_frsize < 8 << 20
        assert stat.S_IMODE(x.stat().st_mode) == 0o555
        assert stat.S_IMODE(src.stat().st_mode) == 0o644


def test_plain_copy_where_reflink_is_unavailable(tmpfs_dir: Path) -> None:
    src = tmpfs_dir / "f.bin"
    data = os.urandom(8 << 20)
    src.write_bytes(data)
    with LocalCAS(tmpfs_dir / "cas") as cas:
        vfs = os.statvfs(tmpfs_dir)
        free_before = vfs.f_bavail * vfs.f_frsize
        d = cas.put_file(src)
        vfs = os.statvfs(tmpfs_dir)
        assert free_before - vfs.f_bavail * vfs.f_frsize >= 8 << 20  # real bytes copied
        assert cas.counters.copied_files == 1
        assert cas.counters.reflinked_files == 0
        assert cas.read(d) == data


def test_put_file_across_filesystems(tmp_path: Path, xfs_dir: Path) -> None:
    src = tmp_path / "on-ext4"
    src.write_bytes(b"x" * 100_000)
    with LocalCAS(xfs_dir / "cas") as cas:  # reflink fails with EXDEV: stream instead
        d = cas.put_file(src)
        assert cas.read(d) == b"x" * 100_000
        assert cas.counters.copied_files == 1


def _damage(cas: LocalCAS) -> dict[Digest, str]:
    """Damages four blobs and one variant the ways an action can; returns digest -> kind."""
    chmodded = cas.put(b"chmod and written through a hardlink")
    truncated = cas.put(b"truncated blob")
    replaced = cas.put(b"replaced blob")
    grown = cas.put(b"grown blob")
    tool = cas.put(b"#!/bin/sh\necho tool\n")
    variant = cas.executable_path(tool)
    link = cas.root.parent / "hardlink-in-a-tree"
    os.link(cas.path(chmodded), link)
    link.chmod(0o644)
    with open(link, "r+b") as f:  # same size, other bytes
        f.write(b"CHMOD")
    with open(cas.path(truncated), "r+b") as f:  # root may write a 0444 file
        f.truncate(3)
    other = cas.root.parent / "other"
    other.write_bytes(b"REPLACED BLOB")  # same size and mode, other bytes, other inode
    other.chmod(0o444)
    os.replace(other, cas.path(replaced))
    with open(cas.path(grown), "ab") as f:
        f.write(b"!")
    variant.chmod(0o755)
    return {chmodded: "blob", truncated: "blob", replaced: "blob", grown: "blob", tool: "exec"}


def test_verify_quarantines_damaged_blobs(cas: LocalCAS, caplog: pytest.LogCaptureFixture) -> None:
    healthy = [cas.put(f"healthy {i}".encode()) for i in range(10)]
    cas.ensure_executables(healthy[:3])
    damaged = _damage(cas)
    with caplog.at_level(logging.INFO, logger="fastmat"):
        report = cas.verify()
    assert {(b.digest, b.kind) for b in report.damaged} == set(damaged.items())
    reasons = {b.digest: b.reason for b in report.damaged}
    assert any("mode 0o644" in r for r in reasons.values())
    assert sum("size" in r for r in reasons.values()) == 2
    assert report.blobs_checked == 15
    assert report.exec_checked == 4
    assert not report.ok
    assert len(report.quarantined) == 5
    assert sorted(p.name for p in (cas.root / "quarantine").iterdir()) == sorted(
        p.name for p in report.quarantined
    )
    for d, kind in damaged.items():
        if kind == "blob":
            assert d not in cas
            with pytest.raises(BlobNotFoundError):
                cas.read(d)
        else:
            assert not (cas.root / cas.exec_relpath(d)).exists()
            assert d in cas  # the blob itself is fine: the variant is rebuilt on demand
            assert stat.S_IMODE(cas.executable_path(d).stat().st_mode) == 0o555
    assert all(d in cas for d in healthy)
    assert len([r for r in caplog.records if r.name == "fastmat"]) == 1
    assert str(next(iter(damaged))) in caplog.text
    # after re-putting, the CAS is whole again
    cas.put(b"truncated blob")
    again = cas.verify()
    assert again.ok
    assert again.blobs_checked == 12


def test_verify_finds_symlinks_and_foreign_files(cas: LocalCAS) -> None:
    d = Digest.of(b"target")
    (cas.root / cas.relpath(d)).symlink_to("/bin/sh")
    (cas.root / "blobs" / "00" / "junk").write_bytes(b"junk")
    report = cas.verify()
    assert [(b.digest, b.kind) for b in report.damaged] == [(d, "blob")]
    assert "symlink" in report.damaged[0].reason
    assert report.unexpected == ["blob/00/junk"]
    assert files_under(cas.root / "blobs") == []


def test_verify_clean_cas(cas: LocalCAS) -> None:
    for i in range(50):
        cas.put(os.urandom(i * 100))
    report = cas.verify()
    assert report.ok
    assert report.blobs_checked == 49  # the empty one is never stored
    assert report.bytes_checked == sum(i * 100 for i in range(50))
    assert list((cas.root / "quarantine").iterdir()) == []


def test_read_checks_nothing_but_returns_bytes(cas: LocalCAS) -> None:
    data = os.urandom(3 << 20)
    d = cas.put(data)
    assert hashlib.sha256(cas.read(d)).hexdigest() == d.hash


def test_close_in_a_forked_child_leaves_the_parents_temp_dir(cas: LocalCAS) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            cas.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (cas.tmp_dir / "owner.lock").is_file()
    with LocalCAS(cas.root) as other:
        assert other.counters.temp_dirs_swept == 0
    assert cas.put(b"still usable") in cas


def _put_file_while_source_changes(root: Path, method: str) -> None:
    src = root / "changing.bin"
    src.write_bytes(os.urandom(1 << 20))
    stop = threading.Event()

    def scribble() -> None:
        fd = os.open(src, os.O_WRONLY | os.O_CLOEXEC)
        try:
            while not stop.is_set():
                os.pwrite(fd, os.urandom(4096), random.randrange(0, (1 << 20) - 4096))
        finally:
            os.close(fd)

    writer = threading.Thread(target=scribble)
    with LocalCAS(root / "cas") as cas:
        writer.start()
        try:
            got = [cas.put_file(src) for _ in range(40)]
        finally:
            stop.set()
            writer.join()
        for d in got:  # whatever bytes were caught, the blob matches its name
            assert Digest.of(cas.read(d)) == d
        assert cas.verify().ok
        c = cas.counters  # a put finding its bytes stored (the writer paused) copies nothing
        assert getattr(c, f"{method}_files") + c.blobs_present == 40
        assert getattr(c, f"{method}_files") >= 1


def test_put_file_of_a_changing_source_copy(tmp_path: Path) -> None:
    _put_file_while_source_changes(tmp_path, "copied")


def test_put_file_of_a_changing_source_reflink(xfs_dir: Path) -> None:
    _put_file_while_source_changes(xfs_dir, "reflinked")


def test_create_false_opens_only_an_existing_cas(tmp_path: Path) -> None:
    """Issue 12, item 7: ``LocalCAS("typo/path")`` silently created an empty CAS."""
    typo = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match="no CAS here") as e:
        LocalCAS(typo, create=False)
    assert e.value.filename == str(typo)
    assert not typo.exists()
    home = tmp_path / "home"  # a directory, but not a CAS: left as it was
    home.mkdir()
    with pytest.raises(FileNotFoundError):
        LocalCAS(home, create=False)
    assert os.listdir(home) == []
    LocalCAS(tmp_path / "cas").close()  # the default creates
    with LocalCAS(tmp_path / "cas", create=False) as cas:
        assert cas.put(b"x") in cas
