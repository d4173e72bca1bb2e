"""Ctrl-C and SIGTERM at the command (issue 12, items 3 and 5): a ``fastmat materialize``
child interrupted while it links a 200,000-file tree exits 128 + the signal well
within a generous bound, with neither the destination nor a staging directory left;
with ``--json`` its stdout is still exactly one JSON object. How fast: the figure is
``benches/bench_cancel.py``'s, not a test's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from tests.cache_helpers import BASIC, ingest, leftovers
from tests.interrupt import big_tree, building, constructing, interrupt, staging

N_FILES = 200_000
BOUND_S = 60.0  # generous: the whole uninterrupted run takes a few seconds


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Digest]:
    base = tmp_path_factory.mktemp("big")
    with LocalCAS(base / "cas", fsync=False) as cas:
        root = big_tree(cas, N_FILES)
    return base / "cas", root


def test_ctrl_c_stops_a_large_materialize_and_leaves_nothing(
    big: tuple[Path, Digest], tmp_path: Path
) -> None:
    cas, root = big
    dest = tmp_path / "dest"
    r = interrupt(
        ["materialize", str(root), str(dest), "--cas", str(cas), "--json"],
        building(tmp_path),
        after_s=0.5,
    )
    assert r.linking, f"finished before it could be interrupted: {r}"
    assert r.rc == 128 + signal.SIGINT, r.stderr
    assert r.exit_s < BOUND_S
    assert not dest.exists()
    assert staging(tmp_path) == []
    obj = json.loads(r.stdout)  # exactly one object
    assert (obj["ok"], obj["signal"]) == (False, "SIGINT")
    assert "interrupted by SIGINT" in r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_stops_a_cache_construction_and_leaves_no_entry(
    big: tuple[Path, Digest], tmp_path: Path
) -> None:
    cas, root = big
    cache = tmp_path / "cache"
    dest = tmp_path / "dest"
    r = interrupt(
        ["materialize", str(root), str(dest), "--cas", str(cas), "--cache", str(cache)],
        constructing(cache),
        after_s=0.3,
        sig=signal.SIGTERM,
    )
    assert r.linking, f"finished before it could be interrupted: {r}"
    assert r.rc == 128 + signal.SIGTERM, r.stderr
    assert r.exit_s < BOUND_S
    assert not dest.exists()
    assert staging(tmp_path) == []
    assert list((cache / "entries").iterdir()) == []
    assert leftovers(cache) == []
    assert list((cache / "tmp").iterdir()) == []  # the instance closed: its scratch too


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Digest]:
    with LocalCAS(tmp_path / "cas") as cas:
        return tmp_path / "cas", ingest(cas, tmp_path / "src", BASIC)


def fastmat(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastmat", *argv], capture_output=True, text=True, check=False
    )


def test_json_with_a_workspace_command_is_one_object(
    small: tuple[Path, Digest], tmp_path: Path
) -> None:
    """The command's own stdout went to stdout before fastmat's JSON object."""
    cas, root = small
    p = fastmat(
        "materialize", str(root), str(tmp_path / "ws"), "--cas", str(cas),
        "--cache", str(tmp_path / "cache"), "--workspace", "--json",
        "--", "sh", "-c", "echo from the command; cat a.txt",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    obj = json.loads(p.stdout)
    assert (obj["returncode"], obj["method"] in ("overlay", "hardlink")) == (0, True)
    assert "from the command\nalpha\n" in p.stderr


def test_a_signal_reaches_the_workspace_command(small: tuple[Path, Digest], tmp_path: Path) -> None:
    cas, root = small
    ws = tmp_path / "ws"
    r = interrupt(
        ["materialize", str(root), str(ws), "--cas", str(cas), "--cache", str(tmp_path / "c"),
         "--workspace", "--json", "--", "sh", "-c", "touch started; exec sleep 60"],
        (ws / "started").exists,
        after_s=0.0,
    )  # fmt: skip
    assert r.linking
    assert r.rc == 128 + signal.SIGINT, r.stderr  # the command's status: killed by SIGINT
    assert r.exit_s < BOUND_S
    obj = json.loads(r.stdout)
    assert (obj["returncode"], obj["interrupted"]) == (130, "SIGINT")
    assert not (ws / "a.txt").exists()  # released


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_held_workspace_is_released_by_a_signal(
    small: tuple[Path, Digest], tmp_path: Path, sig: int
) -> None:
    cas, root = small
    ws = tmp_path / "ws"
    r = interrupt(
        ["materialize", str(root), str(ws), "--cas", str(cas), "--cache", str(tmp_path / "c"),
         "--workspace", "--json"],
        (ws / "a.txt").exists,
        after_s=0.1,
        sig=sig,
    )  # fmt: skip
    assert r.linking
    assert r.rc == 0, r.stderr
    assert json.loads(r.stdout)["released"] is True
    assert not (ws / "a.txt").exists()
