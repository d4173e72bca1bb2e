"""Bazel builds real projects through ``fastmat worker``: Debian's Bazel 4.2.3, offline,
with ``--remote_executor`` / ``--noremote_accept_cached`` / ``--spawn_strategy=remote``
against the farm of :mod:`tests.buildfarm` (PostgreSQL + BuildGrid 0.9.1 with Bots).

Skipped with the reason where Bazel, PostgreSQL or BuildGrid is missing; ``.ci/run``
installs all three. The kill-and-replace build is ``-m stress``.
"""

from __future__ import annotations

import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from tests.bazel_project import (
    Bazel,
    bazel_problem,
    brotli_workspace,
    checks_workspace,
)
from tests.buildfarm import (
    ExecClient,
    Farm,
    WorkerProc,
    farm,
    instance,
    open_tmpdir,
    pids_alive,
    skip_or_fail,
    started,
    wait_for,
    wdir,
)

pytestmark = [pytest.mark.remote, pytest.mark.bazel]
_ = (farm, instance, wdir)  # fixtures, imported for pytest


@pytest.fixture(scope="session", autouse=True)
def _bazel_here() -> None:
    skip_or_fail(bazel_problem())


@pytest.fixture(scope="session")
def brotli_local() -> Iterator[dict[str, str]]:
    """Every output of a local (``--spawn_strategy=local``) Brotli build, by path."""
    base = open_tmpdir("fastmat-bazel-local-")
    try:
        with Bazel(brotli_workspace(base / "ws"), base / "root") as bz:
            res = bz.run("build", "//:all")
        assert res.returncode == 0, res.stderr[-4000:]
        yield bz.outputs()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def remote_processes(output: str) -> int:
    """How many actions Bazel says ran remotely ("INFO: 95 processes: 13 internal,
    82 remote.")."""
    m = re.search(r"(\d+) remote\b", output)
    return int(m.group(1)) if m else 0


def test_brotli_builds_remotely_with_outputs_identical_to_a_local_build(
    farm: Farm, instance: str, wdir: Path, brotli_local: dict[str, str]
) -> None:
    bz = Bazel(brotli_workspace(wdir / "ws"), wdir / "bazel")
    with bz, started(WorkerProc(farm, instance, wdir / "w", jobs=2)) as w:
        res = bz.run("build", "//:all", remote=farm.url, instance=instance)
        records = w.records()
    assert res.returncode == 0, res.stderr[-4000:]
    n = remote_processes(res.stderr)
    assert n >= 60, res.stderr
    (line,) = re.findall(r"INFO: \d+ processes: .*", res.stderr)[-1:]
    assert "local" not in line  # every action remote: none local, none sandboxed
    assert "sandbox" not in line
    outputs = bz.outputs()
    assert outputs == brotli_local  # every output, byte for byte, executable bits too
    assert outputs["brotli"].endswith("+x")
    assert "libbrotlienc.a" in outputs
    assert (bz.bin_dir() / "verified.txt").read_text() == "identical\n"
    assert len(records) == n
    assert {(r["outcome"], r["exit_code"]) for r in records} == {("ok", 0)}
    assert sum(r["cache"] == "hit" for r in records) > 0  # compiles share input roots


def test_failures_reach_bazel_and_inputs_stay_intact(farm: Farm, instance: str, wdir: Path) -> None:
    ws = checks_workspace(wdir / "ws")
    bz = Bazel(ws, wdir / "bazel")
    w = WorkerProc(farm, instance, wdir / "w", jobs=2)
    with bz, started(w):
        failed = bz.run("build", "//:fails", remote=farm.url, instance=instance)
        slow = bz.run(
            "test", "//:too_slow_test", "--test_timeout=3", "--test_output=errors",
            remote=farm.url, instance=instance,
        )  # fmt: skip
        vandal = bz.run("build", "//:vandal", remote=farm.url, instance=instance)
        records = w.records()
    # a failing action: its exit code and its stderr reach the user
    assert failed.returncode == 1
    assert "(Exit 7)" in failed.stderr
    assert "something went wrong on purpose" in failed.stderr
    # a test over its timeout: TIMEOUT, with what it printed before
    assert slow.returncode == 3, slow.stderr[-3000:]
    assert "TIMEOUT" in slow.stderr
    log = (bz.ws / "bazel-testlogs" / "too_slow_test" / "test.log").read_text()
    assert "slow test started" in log
    assert "timeout" in {r["outcome"] for r in records}
    # an action that writes to its input: whatever it managed in its own view, the
    # source, the CAS and the next action's inputs are intact
    assert vandal.returncode == 0, vandal.stderr[-3000:]
    assert (ws / "precious.txt").read_text() == "precious\n"
    with LocalCAS(wdir / "w" / "cas") as cas:
        d = Digest.of(b"precious\n")
        assert cas.read(d) == b"precious\n"
        report = cas.verify()
    assert report.ok, report.damaged


def test_an_interrupted_build_has_its_actions_cancelled_and_killed(
    farm: Farm, instance: str, wdir: Path
) -> None:
    marks = wdir / "marks"
    marks.mkdir(mode=0o777)
    marks.chmod(0o777)
    ws = checks_workspace(wdir / "ws", sleepers=3, marks=marks)
    bz = Bazel(ws, wdir / "bazel")
    w = WorkerProc(farm, instance, wdir / "w", jobs=3)
    client = ExecClient(farm.url, instance)
    try:
        with bz, started(w):
            with bz.started("build", "//sleep:all", remote=farm.url, instance=instance,
                            log=wdir / "bazel.log") as build:  # fmt: skip
                wait_for(lambda: len(list(marks.iterdir())) == 3, 120, "three running actions")
                pids = [int(p.read_text()) for p in marks.iterdir()]
                build.send_signal(signal.SIGINT)  # Ctrl-C
                assert build.wait(60) == 8  # Bazel: "build interrupted"
            # BuildGrid 0.9.1 does not cancel a job whose client went away; cancelling
            # the build's operations (what `bgd operation cancel` does) cancels the leases
            assert pids_alive(pids) == pids
            cancelled = client.cancel_incomplete()
            assert len(cancelled) == 3
            wait_for(lambda: not pids_alive(pids), 30, "the actions' processes to be killed")
            wait_for(lambda: len(w.records()) == 3, 30, "the worker's log")
            assert {r["outcome"] for r in w.records()} == {"cancelled"}
            # and the worker goes on working
            ok = bz.run("build", "//:vandal", remote=farm.url, instance=instance)
            assert ok.returncode == 0, ok.stderr[-3000:]
    finally:
        client.close()


@pytest.mark.stress
def test_a_worker_killed_mid_build_is_replaced_and_the_build_completes(
    farm: Farm, instance: str, wdir: Path, brotli_local: dict[str, str]
) -> None:
    bz = Bazel(brotli_workspace(wdir / "ws"), wdir / "bazel")
    first = WorkerProc(farm, instance, wdir / "w", jobs=2).start()
    first.wait_session()
    with bz, bz.started("build", "//:all", remote=farm.url, instance=instance,
                    log=wdir / "bazel.log") as build:  # fmt: skip
        wait_for(lambda: len(first.records()) >= 15, 300, "15 actions done")
        first.kill()
        time.sleep(1)
        second = WorkerProc(farm, instance, wdir / "w", jobs=2, name="worker2")
        with started(second):
            assert build.wait(900) == 0, (wdir / "bazel.log").read_text()[-4000:]
    assert bz.outputs() == brotli_local
    assert all(r["outcome"] == "ok" for r in second.records())
