"""Running an action's command (fastmat.worker.process): environment, process group,
user, timeout, cancellation, spawn errors; no server needed."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from fastmat.worker.process import ProcessSpec, run
from tests.buildfarm import open_tmpdir, pids_alive, wait_for

SH = "/bin/sh"


def spec(tmp: Path, script: str, **kw: object) -> ProcessSpec:
    return ProcessSpec(
        argv=[SH, "-c", script],
        env=kw.pop("env", {"ONLY": "this"}),  # type: ignore[arg-type]
        cwd=tmp,
        stdout=tmp / "out",
        stderr=tmp / "err",
        **kw,  # type: ignore[arg-type]
    )


def test_the_command_gets_its_environment_only_and_its_own_session(tmp_path: Path) -> None:
    os.environ["FASTMAT_LEAK_CHECK"] = "leaked"
    try:
        ex = run(
            spec(tmp_path, "env; cut -d' ' -f6 /proc/$$/stat; echo err >&2; exit 4"),
            threading.Event(),
        )
    finally:
        del os.environ["FASTMAT_LEAK_CHECK"]
    out = (tmp_path / "out").read_text()
    assert ex.exit_code == 4
    assert not ex.timed_out
    assert not ex.cancelled
    assert "ONLY=this" in out
    assert "FASTMAT_LEAK_CHECK" not in out
    sid = int(out.strip().splitlines()[-1])
    assert sid != os.getsid(0)  # its own session, hence its own process group
    assert (tmp_path / "err").read_text() == "err\n"


def test_a_signal_is_reported_as_128_plus_its_number(tmp_path: Path) -> None:
    ex = run(spec(tmp_path, "kill -USR1 $$"), threading.Event())  # (SEGV would dump core)
    assert (ex.exit_code, ex.signal) == (128 + 10, 10)


def test_a_timeout_keeps_partial_output_and_kills_the_whole_group(tmp_path: Path) -> None:
    script = "echo before; sleep 60 & echo $! > child; sleep 60; echo never"
    t0 = time.monotonic()
    ex = run(spec(tmp_path, script, timeout_s=0.5), threading.Event(), grace_s=0.5)
    assert ex.timed_out
    assert ex.exit_code == 128 + 15
    assert time.monotonic() - t0 < 30
    assert (tmp_path / "out").read_text() == "before\n"
    child = int((tmp_path / "child").read_text())
    wait_for(lambda: not pids_alive([child]), 10, "the background child to die")


def test_a_timeout_escalates_to_sigkill(tmp_path: Path) -> None:
    ex = run(
        spec(tmp_path, "trap '' TERM; sleep 60", timeout_s=0.3), threading.Event(), grace_s=0.3
    )
    assert ex.timed_out
    assert ex.exit_code == 128 + 9


def test_stragglers_die_with_the_command(tmp_path: Path) -> None:
    ex = run(spec(tmp_path, "sleep 60 & echo $! > child"), threading.Event())
    assert ex.exit_code == 0
    child = int((tmp_path / "child").read_text())
    wait_for(lambda: not pids_alive([child]), 10, "the straggler to die")


def test_cancel_kills_at_once(tmp_path: Path) -> None:
    cancel = threading.Event()
    result = []
    t = threading.Thread(
        target=lambda: result.append(run(spec(tmp_path, "echo $$ > pid; sleep 60"), cancel))
    )
    t.start()
    wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(), 30, "pid")
    cancel.set()
    t.join(30)
    (ex,) = result
    assert ex.cancelled
    assert ex.exit_code == 128 + 9
    pid = int((tmp_path / "pid").read_text())
    wait_for(lambda: not pids_alive([pid]), 10, "the command to die")


def test_a_missing_executable_is_127_with_the_reason_in_stderr(tmp_path: Path) -> None:
    s = ProcessSpec(["./nope"], {}, tmp_path, tmp_path / "out", tmp_path / "err")
    ex = run(s, threading.Event())
    assert ex.exit_code == 127
    assert ex.spawn_error
    assert "nope" in (tmp_path / "err").read_text()


def test_a_relative_argv0_runs_from_the_working_directory(tmp_path: Path) -> None:
    tool = tmp_path / "bin" / "tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    s = ProcessSpec(["bin/tool"], {}, tmp_path, tmp_path / "out", tmp_path / "err")
    assert run(s, threading.Event()).exit_code == 0
    assert (tmp_path / "out").read_text() == "tool ran\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_it_runs_as_the_given_user_with_no_extra_groups() -> None:
    d = open_tmpdir("fastmat-proc-")
    try:
        ex = run(spec(d, "id -u; id -g; id -G", user=(65534, 65534)), threading.Event())
        assert ex.exit_code == 0
        assert (d / "out").read_text().split() == ["65534", "65534", "65534"]
    finally:
        shutil.rmtree(d)
