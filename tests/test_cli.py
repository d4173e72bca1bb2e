"""The ``fastmat`` command: verbs end to end on real directories, exit codes, output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmat import Digest
from fastmat.bench.methods import METHODS
from fastmat.bench.seed import tree_digests, upload_tree
from fastmat.cache import workspace as cache_workspace
from fastmat.cas import LocalCAS
from fastmat.cli import main, parse_size
from fastmat.cli.progress import Progress
from fastmat.remote import RemoteCAS
from tests.helpers import mount_problem
from tests.reapi_server import BuildGrid, buildgrid

_ = buildgrid  # the fixture, imported for pytest


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def make_src(root: Path) -> Path:
    src = root / "src"
    (src / "lib" / "deep").mkdir(parents=True)
    (src / "empty_dir").mkdir()
    (src / "a.txt").write_bytes(b"alpha\n")
    (src / "lib" / "b.bin").write_bytes(os.urandom(70_000))
    (src / "lib" / "deep" / "c.txt").write_bytes(b"gamma\n")
    (src / "empty").write_bytes(b"")
    tool = src / "tool.sh"
    tool.write_bytes(b"#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    (src / "link").symlink_to("lib/deep/c.txt")
    return src


@pytest.fixture
def ingested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path, Digest]:
    src = make_src(tmp_path)
    cas = tmp_path / "cas"
    rc, out, err = run(capsys, "ingest", str(src), "--cas", str(cas))
    assert rc == 0, err
    root = Digest.parse(out.strip().splitlines()[-1])
    return src, cas, root


def assert_same_tree(src: Path, dest: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for d in dirnames:
            assert (dest / rel / d).is_dir() or (dest / rel / d).is_symlink()
        for f in filenames:
            s, t = Path(dirpath) / f, dest / rel / f
            if s.is_symlink():
                assert os.readlink(t) == os.readlink(s)
            else:
                assert t.read_bytes() == s.read_bytes()
                assert bool(t.stat().st_mode & 0o111) == bool(s.stat().st_mode & 0o111)
    assert (dest / "empty_dir").is_dir()


def test_parse_size() -> None:
    assert parse_size("123") == 123
    assert parse_size("64K") == 64 * 1024
    assert parse_size("10G") == 10 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2gb") == 2_000_000_000


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for verb in ("ingest", "materialize", "stats", "verify", "gc", "bench"):
        rc, out, _ = run(capsys, verb, "--help")
        assert rc == 0
        assert "--json" in out
    rc, out, _ = run(capsys, "materialize", "--help")
    assert "--workspace" in out
    assert "-- " in out
    rc, out, _ = run(capsys, "bench", "--help")
    for m in METHODS:
        assert m.name in out  # every method is listed
    assert run(capsys)[0] == 2  # no verb
    rc, _, err = run(capsys, "materialize", "nothex/1", "/nonexistent", "--cas", "/tmp")
    assert rc == 2
    assert "hash" in err
    rc, _, err = run(capsys, "gc", "--cas", "/tmp", "--max-bytes", "lots")
    assert rc == 2
    assert "not a size" in err
    rc, _, err = run(capsys, "bench", "--shapes", "no_such_shape")
    assert rc == 2
    assert "no_such_shape" in err


def test_ingest_materialize_roundtrip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ingested: tuple[Path, Path, Digest]
) -> None:
    src, cas, root = ingested
    dest = tmp_path / "out"
    rc, out, err = run(capsys, "materialize", str(root), str(dest), "--cas", str(cas))
    assert rc == 0, err
    assert "5 files" in out  # a.txt, b.bin, c.txt, empty, tool.sh
    assert_same_tree(src, dest)
    assert not os.access(dest / "a.txt", os.W_OK) or os.geteuid() == 0
    assert (dest / "a.txt").stat().st_mode & 0o222 == 0  # inputs are read-only


def test_json_is_exactly_one_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ingested: tuple[Path, Path, Digest]
) -> None:
    src, cas, root = ingested
    rc, out, _ = run(capsys, "ingest", str(src), "--cas", str(cas), "--json")
    assert rc == 0
    obj = json.loads(out)
    assert obj["root"] == str(root)
    assert obj["files"] == 5
    assert obj["symlinks"] == 1
    rc, out, _ = run(
        capsys, "materialize", str(root), str(tmp_path / "j"), "--cas", str(cas), "--json"
    )
    assert rc == 0
    assert json.loads(out)["stats"]["files"] == 5
    rc, out, _ = run(capsys, "stats", "--cas", str(cas), "--json")
    assert rc == 0
    stats = json.loads(out)["cas"]
    assert stats["blobs"] >= 4  # a, b, c, tool + Directory messages
    assert stats["exec_variants"] == 1  # tool.sh's 0555 variant, made by materialize
    rc, out, err = run(capsys, "stats", "--cas", str(tmp_path / "typo"))
    assert rc == 1
    assert "no CAS here" in err
    assert not (tmp_path / "typo").exists()  # a mistyped --cas creates nothing
    (tmp_path / "home").mkdir()  # a directory that is not a CAS is not made one
    rc, out, err = run(capsys, "verify", "--cas", str(tmp_path / "home"), "--json")
    assert rc == 1
    assert "no CAS here" in err
    assert json.loads(out)["ok"] is False
    assert os.listdir(tmp_path / "home") == []
    rc, out, _ = run(capsys, "verify", "--cas", str(cas), "--json")
    assert rc == 0
    assert json.loads(out)["ok"] is True


def test_expected_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ingested: tuple[Path, Path, Digest]
) -> None:
    _, cas, root = ingested
    dest = tmp_path / "taken"
    dest.mkdir()
    rc, out, err = run(capsys, "materialize", str(root), str(dest), "--cas", str(cas))
    assert rc == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("fastmat: error: ")
    assert str(dest) in err
    assert "Traceback" not in err

    unknown = Digest.of(b"not in the CAS")
    rc, out, err = run(
        capsys, "materialize", str(unknown), str(tmp_path / "n"), "--cas", str(cas), "--json"
    )
    assert rc == 1
    assert err.count("\n") == 1
    assert "not found" in err
    assert json.loads(out)["ok"] is False

    rc, _, err = run(
        capsys, "materialize", str(unknown), str(tmp_path / "d"), "--cas", str(cas), "--debug"
    )
    assert rc == 1
    assert "Traceback" in err


def test_verify_reports_damage(
    capsys: pytest.CaptureFixture[str], ingested: tuple[Path, Path, Digest]
) -> None:
    _, cas, _ = ingested
    blob = Digest.of(b"alpha\n")
    path = cas / "blobs" / blob.hash[:2] / blob.key
    path.chmod(0o644)
    path.write_bytes(b"ALPHA\n")  # same size, wrong bytes
    path.chmod(0o444)
    rc, out, _ = run(capsys, "verify", "--cas", str(cas))
    assert rc == 1
    assert blob.hash in out
    assert "DAMAGED" in out
    assert not path.exists()  # quarantined: reads as missing now


def test_cache_stats_and_gc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ingested: tuple[Path, Path, Digest]
) -> None:
    src, cas, root = ingested
    cache = tmp_path / "cache"
    for name in ("c1", "c2"):
        rc, out, err = run(
            capsys, "materialize", str(root), str(tmp_path / name), "--cas", str(cas),
            "--cache", str(cache), "--json",
        )  # fmt: skip
        assert rc == 0, err
        assert_same_tree(src, tmp_path / name)
    assert json.loads(out)["cache"]["hit"] is True  # the second one
    rc, out, _ = run(capsys, "stats", "--cas", str(cas), "--cache", str(cache), "--json")
    assert rc == 0
    assert json.loads(out)["cache"]["entries"] == 1
    rc, out, err = run(
        capsys, "gc", "--cas", str(cas), "--cache", str(cache), "--max-bytes", "0", "--json"
    )
    assert rc == 0, err
    assert json.loads(out)["after"]["entries"] == 0
    rc, out, err = run(capsys, "gc", "--cas", str(cas))
    assert rc == 2
    assert "--max-bytes" in err
    rc, out, err = run(capsys, "gc", "--cas", str(cas), "--cache", str(cache), "--max-blobs", "3")
    assert rc == 2
    assert "without --cache" in err


def test_cas_gc_and_stats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ingested: tuple[Path, Path, Digest]
) -> None:
    src, cas, root = ingested
    rc, out, err = run(capsys, "materialize", str(root), str(tmp_path / "t"), "--cas", str(cas))
    assert rc == 0, err
    rc, out, _ = run(capsys, "stats", "--cas", str(cas), "--json")
    before = json.loads(out)["cas"]
    assert before["bytes_shared"] > 0  # the tree's files are linked to the CAS inodes
    assert before["bytes"] == before["bytes_cas_only"] + before["bytes_shared"]
    assert before["bytes"] == before["blob_bytes"] + before["exec_bytes"]
    assert before["evictions"] == 0
    rc, out, err = run(capsys, "gc", "--cas", str(cas), "--max-bytes", "0", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["evicted"] == before["names"]
    assert (rep["names_after"], rep["bytes_after"]) == (0, 0)
    assert_same_tree(src, tmp_path / "t")  # a tree linked to evicted blobs is unchanged
    rc, out, _ = run(capsys, "stats", "--cas", str(cas))
    assert rc == 0
    assert f"{before['names']:,} names evicted" in out
    rc, out, err = run(capsys, "gc", "--cas", str(cas), "--max-blobs", "5")
    assert rc == 0, err
    assert "evicted 0 of 0 CAS names" in out


def test_workspace_runs_a_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ingested: tuple[Path, Path, Digest]
) -> None:
    _, cas, root = ingested
    dest = tmp_path / "ws"
    script = "test -f lib/deep/c.txt && test -x tool.sh && echo made > new.txt && exit 7"
    rc, _, err = run(
        capsys, "materialize", str(root), str(dest), "--cas", str(cas),
        "--cache", str(tmp_path / "cache"), "--workspace", "--", "sh", "-c", script,
    )  # fmt: skip
    assert rc == 7, err  # the command's status
    assert not (dest / "a.txt").exists()  # released afterwards
    rc, _, err = run(capsys, "materialize", str(root), str(dest), "--cas", str(cas), "--", "true")
    assert rc == 2
    assert "--workspace" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="the warning is for actions running as root")
@pytest.mark.parametrize("overlay", [False, True], ids=["no-overlay", "overlay"])
def test_a_root_workspace_warns_when_it_falls_back_to_hardlinks(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ingested: tuple[Path, Path, Digest],
    monkeypatch: pytest.MonkeyPatch,
    overlay: bool,
) -> None:
    """Issue 10, item 11: as root, a hardlinked workspace lets the action write into
    the CAS; say so on stderr rather than degrade silently."""
    if overlay and mount_problem() is not None:
        pytest.skip(str(mount_problem()))
    if not overlay:  # as where overlays cannot be mounted
        monkeypatch.setattr(cache_workspace, "probe", lambda scratch: False)
    _, cas, root = ingested
    rc, _, err = run(
        capsys, "materialize", str(root), str(tmp_path / "ws"), "--cas", str(cas),
        "--cache", str(tmp_path / "cache"), "--workspace", "--", "test", "-f", "a.txt",
    )  # fmt: skip
    assert rc == 0, err
    if overlay:
        assert "warning" not in err
    else:
        assert "warning: no overlay could be mounted" in err
        assert str(tmp_path / "ws") in err
        assert "as root writes through its read-only inputs into the CAS" in err


def test_python_dash_m(tmp_path: Path) -> None:
    LocalCAS(tmp_path / "cas").close()
    proc = subprocess.run(
        [sys.executable, "-m", "fastmat", "verify", "--cas", str(tmp_path / "cas")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    assert proc.stderr == ""  # not a terminal: no progress bar


def test_progress_draws_only_when_enabled() -> None:
    buf = io.StringIO()
    with Progress("work", 10, enabled=True, stream=buf) as bar:
        for _ in range(10):
            bar.advance()
        bar.set_label("done")
    assert "work" in buf.getvalue() or "done" in buf.getvalue()
    quiet = io.StringIO()
    with Progress("work", 10, stream=quiet) as bar:  # pytest's stdout is not a terminal
        bar.advance(10)
    assert quiet.getvalue() == ""


@pytest.mark.remote
def test_materialize_from_remote(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ingested: tuple[Path, Path, Digest],
    buildgrid: BuildGrid,
) -> None:
    src, cas, root = ingested
    with LocalCAS(cas) as local, RemoteCAS(buildgrid.url) as remote:
        upload_tree(local, remote, root)
        assert remote.find_missing(tree_digests(local, root)) == []
    empty = tmp_path / "empty-cas"
    dest = tmp_path / "fetched"
    rc, out, err = run(
        capsys, "materialize", str(root), str(dest), "--cas", str(empty),
        "--remote", buildgrid.url, "--json",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(out)["stats"]["files"] == 5
    assert_same_tree(src, dest)
    rc, shown = on_a_terminal(  # a bar on a terminal (issue 12, item 6)
        "materialize", str(root), str(tmp_path / "fetched2"), "--cas", str(tmp_path / "cas2"),
        "--remote", buildgrid.url,
    )  # fmt: skip
    assert rc == 0, shown
    assert "materialize [" in shown
    assert "5 files" in shown
    rc, _, err = run(
        capsys, "materialize", str(root), str(tmp_path / "x"), "--cas", str(empty),
        "--remote", "ftp://nowhere",
    )  # fmt: skip
    assert rc == 2
    assert "ftp://nowhere" in err


def on_a_terminal(*argv: str) -> tuple[int, str]:
    """Runs ``fastmat *argv`` with stdout and stderr on a pseudo-terminal; (status,
    everything it drew there)."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastmat", *argv], stdout=slave, stderr=slave, close_fds=True
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait()
    finally:
        os.close(master)
    return rc, b"".join(chunks).decode(errors="replace")


def test_bars_on_a_terminal_for_ingest_verify_materialize_gc(tmp_path: Path) -> None:
    """Issue 12, item 6: real bars (done/total), on a terminal only, never with --json."""
    src = make_src(tmp_path)
    cas, cache = str(tmp_path / "cas"), str(tmp_path / "cache")
    rc, shown = on_a_terminal("ingest", str(src), "--cas", cas)
    assert rc == 0, shown
    assert "ingesting" in shown
    assert "ingest [" in shown
    assert "5/5" in shown  # the files, counted first
    root = shown.strip().splitlines()[-1]
    rc, shown = on_a_terminal("verify", "--cas", cas)
    assert rc == 0, shown
    assert "verify [" in shown
    assert "KiB/" in shown  # bytes, in binary units
    rc, shown = on_a_terminal(
        "materialize", root, str(tmp_path / "d"), "--cas", cas, "--cache", cache
    )
    assert rc == 0, shown
    assert "materialize [" in shown
    assert "replay [" in shown
    rc, shown = on_a_terminal("gc", "--cas", cas, "--cache", cache, "--max-bytes", "0")
    assert rc == 0, shown
    assert "gc [" in shown
    rc, shown = on_a_terminal("verify", "--cas", cas, "--json")
    assert rc == 0
    assert "\x1b" not in shown  # no bar drawn
    assert json.loads(shown)["ok"] is True


def test_json_even_for_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12, item 5: --json prints exactly one JSON object on stdout in every case."""
    for argv in (
        ["materialize", "nothex/1", str(tmp_path / "d"), "--cas", str(tmp_path), "--json"],
        ["gc", "--cas", str(tmp_path), "--json"],  # needs --cache
        ["stats", "--cas", str(tmp_path), "--json", "--", "x"],
    ):
        rc, out, err = run(capsys, *argv)
        assert rc == 2, argv
        obj = json.loads(out)
        assert (obj["ok"], obj["type"]) == (False, "UsageError")
        assert err
