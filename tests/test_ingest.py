"""ingest_tree: what ends up in the Directory messages."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastmat import proto
from fastmat.cas import LocalCAS
from fastmat.digest import EMPTY_DIGEST, Digest
from fastmat.errors import InvalidTreeError
from fastmat.tree import ingest_tree


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", fsync=False) as c:
        yield c


def _dir(cas: LocalCAS, d: Digest) -> Any:
    return proto.Directory.FromString(cas.read(d))


def _sub(cas: LocalCAS, msg: Any, name: str) -> Any:
    (node,) = [x for x in msg.directories if x.name == name]
    return _dir(cas, Digest(node.digest.hash, node.digest.size_bytes))


def test_names_sorted_by_utf8_bytes(cas: LocalCAS, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    names = ["b", "a", "Z", "é", "ä", "z~", "\u00ff", "\U0001f600", "a.b", "a-b"]
    for n in names:
        (src / n).write_bytes(n.encode())
    for n in ("dir_b", "dir_a"):
        (src / n).mkdir()
    for n in ("ln_b", "ln_a"):
        (src / n).symlink_to("x")
    msg = _dir(cas, ingest_tree(cas, src))
    assert [f.name for f in msg.files] == sorted(names, key=str.encode)
    assert [d.name for d in msg.directories] == ["dir_a", "dir_b"]
    assert [s.name for s in msg.symlinks] == ["ln_a", "ln_b"]
    for f in msg.files:
        assert cas.read(Digest(f.digest.hash, f.digest.size_bytes)) == f.name.encode()


def test_exec_bit_from_any_x_bit_and_empty_things(cas: LocalCAS, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "empty_dir" / "deeper").mkdir(parents=True)
    for name, mode in [("u", 0o744), ("g", 0o610), ("o", 0o601), ("none", 0o644), ("ro", 0o400)]:
        (src / name).write_bytes(name.encode())
        (src / name).chmod(mode)
    (src / "empty").touch()
    msg = _dir(cas, ingest_tree(cas, src))
    execs = {f.name: f.is_executable for f in msg.files}
    assert execs == {"empty": False, "g": True, "none": False, "o": True, "ro": False, "u": True}
    (empty,) = [f for f in msg.files if f.name == "empty"]
    assert (empty.digest.hash, empty.digest.size_bytes) == (EMPTY_DIGEST.hash, 0)
    empty_dir = _sub(cas, msg, "empty_dir")
    assert [d.name for d in empty_dir.directories] == ["deeper"]
    assert _sub(cas, empty_dir, "deeper").ByteSize() == 0


def test_symlinks_verbatim_never_followed(cas: LocalCAS, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "real").mkdir(parents=True)
    (src / "real" / "f").write_bytes(b"f")
    links = {
        "rel": "real/f",
        "abs": "/etc/passwd",
        "dangling": "no/such",
        "todir": "real",
        "up": "../../outside",
        "self": "self",
    }
    for name, target in links.items():
        (src / name).symlink_to(target)
    msg = _dir(cas, ingest_tree(cas, src))
    assert {s.name: s.target for s in msg.symlinks} == links
    assert [d.name for d in msg.directories] == ["real"]  # the dir link was not recursed
    assert [f.name for f in msg.files] == []


def test_deterministic_and_content_addressed(cas: LocalCAS, tmp_path: Path) -> None:
    for top in ("one", "two"):
        (tmp_path / top / "a").mkdir(parents=True)
        (tmp_path / top / "a" / "x").write_bytes(b"same")
    (tmp_path / "two" / "a" / "x").chmod(0o600)  # non-x mode bits are not part of the tree
    assert ingest_tree(cas, tmp_path / "one") == ingest_tree(cas, tmp_path / "two")
    (tmp_path / "two" / "a" / "x").chmod(0o700)
    assert ingest_tree(cas, tmp_path / "one") != ingest_tree(cas, tmp_path / "two")


def test_fifo_refused_with_its_path(cas: LocalCAS, tmp_path: Path) -> None:
    (tmp_path / "src" / "sub").mkdir(parents=True)
    os.mkfifo(tmp_path / "src" / "sub" / "pipe")
    with pytest.raises(InvalidTreeError, match="a FIFO cannot be stored") as info:
        ingest_tree(cas, tmp_path / "src")
    assert info.value.path == "sub/pipe"


def test_socket_and_device_refused(cas: LocalCAS, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "src" / "sock"))
        with pytest.raises(InvalidTreeError, match="a socket") as info:
            ingest_tree(cas, tmp_path / "src")
        assert info.value.path == "sock"
    finally:
        sock.close()
    os.unlink(tmp_path / "src" / "sock")
    try:
        os.mknod(tmp_path / "src" / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    with pytest.raises(InvalidTreeError, match="a character device"):
        ingest_tree(cas, tmp_path / "src")


def test_non_utf8_name_refused(cas: LocalCAS, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(os.path.join(os.fsencode(src), b"bad\xff"), "wb") as f:
        f.write(b"x")
    with pytest.raises(InvalidTreeError, match="not valid UTF-8") as info:
        ingest_tree(cas, src)
    assert info.value.path == "bad\udcff"
    os.unlink(os.path.join(os.fsencode(src), b"bad\xff"))
    os.symlink(b"target\xfe", os.path.join(os.fsencode(src), b"link"))
    with pytest.raises(InvalidTreeError, match="not valid UTF-8") as info:
        ingest_tree(cas, src)
    assert info.value.path == "link"


def test_source_must_be_a_real_directory(cas: LocalCAS, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to("d")
    with pytest.raises(NotADirectoryError):
        ingest_tree(cas, tmp_path / "link")
    with pytest.raises(FileNotFoundError):
        ingest_tree(cas, tmp_path / "missing")
