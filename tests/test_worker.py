"""``fastmat worker`` against a real farm (PostgreSQL + BuildGrid 0.9.1 with Bots), driven
through the REAPI Execution service: what a client of the farm sees.

Bazel builds through the worker are in ``test_worker_bazel.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fastmat.cas import LocalCAS
from fastmat.digest import Digest
from fastmat.worker import proto as wproto
from tests.buildfarm import (
    REPO,
    ExecClient,
    Farm,
    Outage,
    WorkerProc,
    client,
    farm,
    instance,
    open_tmpdir,
    pids_alive,
    started,
    wait_for,
    wdir,
)
from tests.helpers import can_mount

pytestmark = pytest.mark.remote
_ = (farm, instance, wdir, client)  # fixtures, imported for pytest

ROOT = os.geteuid() == 0
SH = "/bin/sh"

DEADLINE_EXCEEDED, FAILED_PRECONDITION, CANCELLED = 4, 9, 1


def ts(t: Any) -> int:
    return int(t.seconds) * 1_000_000_000 + int(t.nanos)


def worker(farm: Farm, instance: str, wdir: Path, **kw: Any) -> WorkerProc:
    return WorkerProc(farm, instance, wdir, **kw)


def marks_dir(wdir: Path) -> Path:
    """A directory every action's user may write its marks (started, pid) into."""
    marks = wdir / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    return marks


def outputs_by_path(client: ExecClient, result: Any) -> dict[str, Any]:
    return {f.path: f for f in result.output_files}


def test_an_action_runs_as_its_command_says(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    script = (
        "set -e\n"
        "echo out:$(cat in/data.txt)\n"
        "echo err:$GREETING >&2\n"
        "env | sort > env.txt\n"
        "id -u > uid.txt\n"
        "printf '#!/bin/sh\\necho hi\\n' > out/bin/tool && chmod 755 out/bin/tool\n"
        "mkdir -p out/tree/sub && echo leaf > out/tree/sub/leaf && ln -s sub/leaf out/tree/link\n"
        "ln -s ../env.txt out/link\n"
    )
    action, _ = client.action(
        [SH, "-c", script],
        {"wd/in/data.txt": b"payload", "wd/script_unused": b"x"},
        env={"GREETING": "hello", "PATH": "/bin:/usr/bin"},
        working_directory="wd",
        outputs=["env.txt", "uid.txt", "out/bin/tool", "out/tree", "out/link", "absent"],
    )
    with started(worker(farm, instance, wdir)) as w:
        resp = client.execute(action)
        records = w.records()
    assert resp.status.code == 0, resp.status.message
    r = resp.result
    assert r.exit_code == 0
    assert client.read(r.stdout_digest) == b"out:payload\n"
    assert client.read(r.stderr_digest) == b"err:hello\n"
    files = outputs_by_path(client, r)
    assert set(files) == {"env.txt", "uid.txt", "out/bin/tool"}  # "absent" is not an error
    env = client.read(files["env.txt"].digest).decode().splitlines()
    # exactly the Command's variables (plus what the shell itself sets), nothing inherited
    inherited = {line.split("=", 1)[0] for line in env} - {"GREETING", "PATH", "PWD", "SHLVL"}
    assert inherited <= {"_", "OLDPWD"}, env
    assert "GREETING=hello" in env
    if ROOT:
        assert client.read(files["uid.txt"].digest) == b"65534\n"  # nobody, not root
    assert files["out/bin/tool"].is_executable
    assert not files["env.txt"].is_executable
    assert [(s.path, s.target) for s in r.output_symlinks] == [("out/link", "../env.txt")]
    (od,) = r.output_directories
    assert od.path == "out/tree"
    assert od.is_topologically_sorted
    tree = wproto_tree(client, od.tree_digest)
    assert [f.name for f in tree.root.files] == []
    assert [(s.name, s.target) for s in tree.root.symlinks] == [("link", "sub/leaf")]
    (sub,) = tree.children
    assert client.read(sub.files[0].digest) == b"leaf\n"
    # every phase stamped, in order
    md = r.execution_metadata
    stamps = [
        md.worker_start_timestamp,
        md.input_fetch_start_timestamp,
        md.input_fetch_completed_timestamp,
        md.execution_start_timestamp,
        md.execution_completed_timestamp,
        md.output_upload_start_timestamp,
        md.output_upload_completed_timestamp,
        md.worker_completed_timestamp,
    ]
    assert all(ts(t) > 0 for t in stamps)
    assert [ts(t) for t in stamps[1:-1]] == sorted(ts(t) for t in stamps[1:-1])
    assert md.worker
    # the action log has the line
    (rec,) = records
    assert rec["outcome"] == "ok"
    assert rec["exit_code"] == 0
    assert rec["status"] == "OK"
    assert rec["cache"] == "miss"
    assert rec["fetched"]["bytes"] >= len(b"payload")
    assert set(rec["phases_s"]) >= {"fetch_action", "stage", "execute", "upload", "total"}
    assert rec["uploaded"]["blobs"] >= 4
    assert rec["outputs"]["files"] == 4


def wproto_tree(client: ExecClient, d: Any) -> Any:
    from fastmat import proto

    return proto.Tree.FromString(client.read(d))


def test_older_output_fields_and_directory_formats(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    # output directories exist before the command runs (Bazel's tree artifacts expect
    # it, as they do locally): d/pre needs no mkdir; dlink must be removed to be a link
    script = (
        "echo f > a/b/file; ln -s file a/b/flink; touch d/pre; mkdir -p d/e && echo x > d/e/x; "
        "rmdir dlink && ln -s d dlink; mkdir wrong"
    )
    action, _ = client.action(
        [SH, "-c", script],
        output_files=["a/b/file", "a/b/flink"],
        output_directories=["d", "dlink"],
        output_directory_format=wproto.TREE_AND_DIRECTORY,
    )
    bad, _ = client.action([SH, "-c", script], output_files=["wrong"], salt=b"bad")
    with started(worker(farm, instance, wdir)):
        resp = client.execute(action)
        bad_resp = client.execute(bad)
    r = resp.result
    assert resp.status.code == 0, resp.status.message
    assert [f.path for f in r.output_files] == ["a/b/file"]  # parents were made beforehand
    assert [(s.path, s.target) for s in r.output_file_symlinks] == [("a/b/flink", "file")]
    assert [(s.path, s.target) for s in r.output_directory_symlinks] == [("dlink", "d")]
    assert not r.output_symlinks  # v2.1's field only answers output_paths
    (od,) = r.output_directories
    assert od.root_directory_digest.hash
    assert od.tree_digest.hash
    root = wproto_tree(client, od.tree_digest).root
    from fastmat import proto

    assert proto.Directory.FromString(client.read(od.root_directory_digest)) == root
    # a directory where a file was asked for: FAILED_PRECONDITION, saying which
    assert bad_resp.status.code == FAILED_PRECONDITION
    assert "'wrong'" in bad_resp.status.message


def test_a_failing_action_reports_its_exit_code_and_stderr(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    action, _ = client.action([SH, "-c", "echo partial; echo 'it broke' >&2; exit 3"])
    missing, _ = client.action(["/no/such/tool", "x"])
    # (the CAS reached through its own option: here the same server behind a proxy)
    outage = Outage(farm.port)
    w = worker(farm, instance, wdir, extra=["--cas-server", outage.url])
    with started(w):
        resp = client.execute(action)
        resp2 = client.execute(missing)
    assert resp.status.code == 0  # the action ran: its failure is its exit code
    assert resp.result.exit_code == 3
    assert client.read(resp.result.stderr_digest) == b"it broke\n"
    assert client.read(resp.result.stdout_digest) == b"partial\n"
    assert resp2.result.exit_code == 127
    assert b"/no/such/tool" in client.read(resp2.result.stderr_digest)
    outage.down()
    assert outage.accepted >= 1  # inputs and outputs went through --cas-server


def test_a_timeout_gives_deadline_exceeded_with_partial_output_and_kills_the_group(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    pids = wdir / "pids"
    pids.mkdir(mode=0o777)
    pids.chmod(0o777)
    script = f"echo started; sleep 60 & echo $! > {pids}/child; echo $$ > {pids}/main; wait"
    action, _ = client.action([SH, "-c", script], timeout_s=1.5)
    with started(worker(farm, instance, wdir)) as w:
        t0 = time.monotonic()
        resp = client.execute(action)
        took = time.monotonic() - t0
        records = w.records()
    assert resp.status.code == DEADLINE_EXCEEDED
    assert "timed out" in resp.status.message
    assert client.read(resp.result.stdout_digest) == b"started\n"
    assert took < 40
    procs = [int((pids / n).read_text()) for n in ("main", "child")]
    assert pids_alive(procs) == []  # the background child went with its group
    assert records[-1]["outcome"] == "timeout"


def test_a_cancelled_action_is_killed_and_reported_cancelled(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    pids = wdir / "pids"
    pids.mkdir(mode=0o777)
    pids.chmod(0o777)
    script = f"sleep 120 & echo $! > {pids}/child; echo $$ > {pids}/main; wait"
    action, _ = client.action([SH, "-c", script])
    with started(worker(farm, instance, wdir)) as w:
        run = client.start(action)
        wait_for(lambda: (pids / "main").exists() and (pids / "child").exists(), 60, "action")
        procs = [int((pids / n).read_text()) for n in ("main", "child")]
        assert pids_alive(procs) == procs
        assert run.named.wait(30)
        assert run.name
        client.cancel(run.name)
        wait_for(lambda: not pids_alive(procs), 30, "the action's processes to die")
        wait_for(lambda: any(r["outcome"] == "cancelled" for r in w.records()), 30, "log")
    assert run.done.wait(30), "the Execute stream did not end"
    # BuildGrid answers a cancelled operation with an ExecuteResponse saying so
    assert run.response is not None
    assert run.response.status.code == CANCELLED


def test_platform_properties_are_advertised_and_mismatches_refused(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    ok, _ = client.action([SH, "-c", "echo fine"], platform={"fastmat-pool": "blue"})
    # BuildGrid does not match on its wildcard keys: the worker itself must refuse this
    bad, _ = client.action(
        [SH, "-c", "echo never"], platform={"fastmat-pool": "blue", "container-image": "x"}
    )
    w = worker(farm, instance, wdir, extra=["--platform", "fastmat-pool=blue"])
    with started(w):
        resp = client.execute(ok)
        bad_resp = client.execute(bad)
    assert resp.status.code == 0
    assert client.read(resp.result.stdout_digest) == b"fine\n"
    assert bad_resp.status.code == FAILED_PRECONDITION
    assert "container-image=x" in bad_resp.status.message
    assert "fastmat-pool=blue" in bad_resp.status.message  # what it offers
    assert [r["outcome"] for r in w.records()] == ["ok", "refused"]


def test_a_missing_input_is_named_for_the_client_to_upload(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    action, blobs = client.action([SH, "-c", "cat x"], {"x": b"never uploaded"}, upload=False)
    client.upload({d: b for d, b in blobs.items() if b != b"never uploaded"})
    with started(worker(farm, instance, wdir)):
        resp = client.execute(action)
    assert resp.status.code == FAILED_PRECONDITION
    from fastmat import proto
    from fastmat.worker.proto import PreconditionFailure

    (detail,) = resp.status.details
    assert detail.type_url.endswith("google.rpc.PreconditionFailure")
    (v,) = PreconditionFailure.FromString(detail.value).violations
    d = Digest.of(b"never uploaded")
    assert (v.type, v.subject) == ("MISSING", f"blobs/{d.hash}/{d.size_bytes}")
    _ = proto


@pytest.mark.parametrize("mode", ["overlay", "hardlink", "materialize"])
def test_an_action_writing_its_inputs_leaves_the_cas_intact(
    farm: Farm, instance: str, wdir: Path, client: ExecClient, mode: str
) -> None:
    if mode == "overlay" and not can_mount():
        pytest.skip("overlay workspaces need a process that can mount")
    script = (
        "chmod u+w in.txt 2>/dev/null; echo evil > in.txt 2>/dev/null; "
        "echo more >> in.txt 2>/dev/null; chmod 777 in.txt 2>/dev/null; cat in.txt"
    )
    vandal, _ = client.action([SH, "-c", script], {"in.txt": b"original\n"})
    reader, _ = client.action([SH, "-c", "cat in.txt"], {"in.txt": b"original\n"}, salt=b"r")
    extra = {"overlay": [], "hardlink": ["--no-overlay"], "materialize": []}[mode]
    w = worker(farm, instance, wdir, extra=extra, cache=mode != "materialize")
    with started(w):
        client.execute(vandal)
        resp = client.execute(reader)
        records = w.records()
    assert [r["staging"] for r in records] == [mode, mode] or not ROOT
    assert client.read(resp.result.stdout_digest) == b"original\n"
    with LocalCAS(wdir / "cas") as cas:
        report = cas.verify()
        d = Digest.of(b"original\n")
        assert cas.read(d) == b"original\n"
        assert (cas.path(d).stat().st_mode & 0o777) == 0o444
    assert report.ok
    assert not report.damaged


def test_a_cache_hit_fetches_nothing(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    tree = {f"src/f{i}.txt": f"file {i}\n".encode() * 50 for i in range(30)}
    a1, _ = client.action([SH, "-c", "cat src/f1.txt"], tree)
    a2, _ = client.action([SH, "-c", "cat src/f2.txt"], tree)
    w = worker(farm, instance, wdir, jobs=1)
    with started(w):
        r1, r2 = client.execute(a1), client.execute(a2)
        records = w.records()
    assert client.read(r2.result.stdout_digest) == b"file 2\n" * 50
    assert [r["cache"] for r in records] == ["miss", "hit"]
    stats = _fastmat("stats", "--cas", str(wdir / "cas"), "--cache", str(wdir / "cache"), "--json")
    assert stats.returncode == 0, stats.stderr
    payload = json.loads(stats.stdout)
    assert payload["cas"]["blobs"] >= 30  # the inputs, the outputs
    assert payload["cache"]["entries"] == 1
    assert records[0]["fetched"]["blobs"] >= 30
    assert records[1]["fetched"]["blobs"] == 0
    assert r1.status.code == 0


def test_a_bounded_cas_evicts_between_actions_and_every_action_gets_its_inputs(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    """``--cas-max-bytes`` reaches the CAS: four actions whose inputs together are
    about three times the budget all read the right bytes, and the CAS evicted."""
    budget = 64 << 10
    actions = []
    for a in range(4):
        tree = {f"in/f{i}": bytes([65 + a]) * 1024 + str(i).encode() for i in range(48)}
        action, _ = client.action([SH, "-c", "cat in/f7 in/f40 | wc -c; head -c 2 in/f3"], tree)
        actions.append(action)
    w = worker(farm, instance, wdir, jobs=1, cache=False, extra=["--cas-max-bytes", str(budget)])
    with started(w):
        results = [client.execute(a) for a in actions]
    for a, r in enumerate(results):
        assert r.status.code == 0, r.status.message
        assert r.result.exit_code == 0
        letter = chr(65 + a)
        assert client.read(r.result.stdout_digest) == f"2051\n{letter * 2}".encode()
    stats = _fastmat("stats", "--cas", str(wdir / "cas"), "--json")
    assert stats.returncode == 0, stats.stderr
    cas = json.loads(stats.stdout)["cas"]
    assert cas["evictions"] > 0
    assert cas["bytes"] <= budget + (50 << 10)  # the budget, plus at most one action's fetch


def test_sigterm_drains_and_the_stopped_worker_gets_no_more_work(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    marks = marks_dir(wdir)
    slow, _ = client.action([SH, "-c", f"touch {marks}/started; sleep 3; echo finished"])
    later, _ = client.action([SH, "-c", "echo later"])
    w1 = worker(farm, instance, wdir / "w1", jobs=1).start()
    w1.wait_session()
    run = client.start(slow)
    wait_for((marks / "started").exists, 60, "the slow action to start")
    w1.signal(signal.SIGTERM)
    assert w1.wait(60) == 0  # it finished the running action first
    resp = run.wait(30)
    assert resp.status.code == 0
    assert client.read(resp.result.stdout_digest) == b"finished\n"
    assert [r["outcome"] for r in w1.records()] == ["ok"]
    # the next action must go to the next worker at once, not to the drained session
    later_run = client.start(later)
    with started(worker(farm, instance, wdir / "w2", jobs=1)) as w2:
        t0 = time.monotonic()
        resp2 = later_run.wait(50)  # the drained session's keepalive is 60 s
        assert time.monotonic() - t0 < 50
        assert [r["outcome"] for r in w2.records()] == ["ok"]
    assert client.read(resp2.result.stdout_digest) == b"later\n"


def test_a_second_signal_returns_the_running_lease_to_the_server(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    marks = marks_dir(wdir)
    slow, _ = client.action([SH, "-c", f"touch {marks}/started.$$; sleep 4; echo done"])
    w1 = worker(farm, instance, wdir / "w1", jobs=1).start()
    w1.wait_session()
    run = client.start(slow)
    wait_for(lambda: any(marks.iterdir()), 60, "the action to start")
    w1.signal(signal.SIGTERM)
    time.sleep(0.3)
    w1.signal(signal.SIGTERM)
    assert w1.wait(30) == 0
    assert not run.done.is_set()  # returned, not failed
    assert [r["outcome"] for r in w1.records()] == ["returned"]
    with started(worker(farm, instance, wdir / "w2", jobs=1)) as w2:
        resp = run.wait(60)
        assert [r["outcome"] for r in w2.records()] == ["ok"]
    assert resp.status.code == 0
    assert client.read(resp.result.stdout_digest) == b"done\n"


def test_a_killed_worker_is_replaced_and_its_leftovers_cleared(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    marks = marks_dir(wdir)
    script = f"echo $$ > {marks}/pid.$$; sleep 5; echo done"
    action, _ = client.action([SH, "-c", script])
    w1 = worker(farm, instance, wdir / "w", jobs=1).start()
    w1.wait_session()
    run = client.start(action)
    wait_for(lambda: any(marks.iterdir()), 60, "the action to start")
    first = [int(p.read_text()) for p in marks.iterdir()]
    w1.kill()
    assert pids_alive(first) == first  # orphaned: still running in the work directory
    # same --work, same bot id: the new session replaces the dead one, whose lease the
    # server re-queues at once; the new worker kills the orphans and clears their mounts
    w2 = worker(farm, instance, wdir / "w", jobs=1, name="worker2")
    with started(w2):
        resp = run.wait(60)
        assert pids_alive(first) == []
        assert "previous worker" in w2.log()
    assert resp.status.code == 0
    assert client.read(resp.result.stdout_digest) == b"done\n"
    leftover = [m for m in Path("/proc/self/mountinfo").read_text().split() if str(wdir) in m]
    assert leftover == []


def test_the_worker_keeps_its_leases_through_an_outage(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    outage = Outage(farm.port)
    marks = marks_dir(wdir)
    action, _ = client.action([SH, "-c", f"touch {marks}/started; sleep 3; echo survived"])
    w = worker(farm, instance, wdir, server=outage.url, jobs=1)
    try:
        with started(w):
            run = client.start(action)  # the client talks to the farm directly
            wait_for((marks / "started").exists, 60, "the action to start")
            outage.down()
            time.sleep(4)  # the action ends meanwhile; its result cannot be reported
            outage.up()
            resp = run.wait(60)  # reported after the worker reconnected
            records = w.records()
    finally:
        outage.down()
    assert resp.status.code == 0
    assert client.read(resp.result.stdout_digest) == b"survived\n"
    assert [r["outcome"] for r in records] == ["ok"]
    assert "UNAVAILABLE" in w.log(), w.log()


def test_a_lost_session_is_replaced(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    # a short long poll: the worker learns of the loss at its next call
    w = worker(farm, instance, wdir, jobs=1, extra=["--bot-id", f"lost-{instance}", "--poll", "5"])
    with started(w):
        # Registering the same bot id again makes the server close the worker's session
        # (what a restarted worker does to its dead predecessor's).
        from fastmat.worker import session

        bots = session.BotsClient(farm.url, instance)
        try:
            s = session.new_session(f"lost-{instance}", [], 1)
            s.status = wproto.BOT_TERMINATING  # no work for this impostor
            bots.create(s, session.CREATE_DEADLINE_S).result()
        finally:
            bots.close()
        wait_for(lambda: "lost" in w.log(), 60, "the worker to notice")
        action, _ = client.action([SH, "-c", "echo still working"])
        resp = client.execute(action, 60)
    assert client.read(resp.result.stdout_digest) == b"still working\n"
    assert w.log().count("bot session") >= 2  # created again


@pytest.mark.stress
def test_the_worker_reconnects_when_the_server_restarts(wdir: Path, farm: Farm) -> None:
    # a second server on the session farm's database (BuildGrid servers may share one)
    pg_farm = Farm(open_tmpdir("fastmat-farm2-"), farm.pg, db_url=farm.db, instances=["r"])
    pg_farm.start()
    try:
        with started(worker(pg_farm, "r", wdir, jobs=1)) as w:
            c = ExecClient(pg_farm.url, "r")
            try:
                a1, _ = c.action([SH, "-c", "echo one"])
                assert c.read(c.execute(a1).result.stdout_digest) == b"one\n"
                pg_farm.stop()
                time.sleep(3)  # the worker's calls fail meanwhile
                pg_farm.start()  # same port, same database; an empty in-memory CAS
            finally:
                c.close()
            c = ExecClient(pg_farm.url, "r")
            try:
                a2, _ = c.action([SH, "-c", "echo two"])
                assert c.read(c.execute(a2, 90).result.stdout_digest) == b"two\n"
            finally:
                c.close()
            assert "UNAVAILABLE" in w.log()
    finally:
        pg_farm.stop()


def _fastmat(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fastmat", *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip


def test_bad_configurations_are_refused_clearly(farm: Farm, wdir: Path) -> None:
    base = ["worker", "--server", farm.url, "--cas", str(wdir / "c"), "--work", str(wdir / "w")]
    if ROOT:
        r = _fastmat(*base, "--run-as", "root")
        assert r.returncode == 2
        assert "--run-as root" in r.stderr
    r = _fastmat(*base, "--run-as", "no-such-user-xyz")
    assert r.returncode == 2
    assert "no such user" in r.stderr
    r = _fastmat(*base, "--platform", "novalue")
    assert r.returncode == 2
    assert "KEY=VALUE" in r.stderr
    r = _fastmat(*base, "--instance", "no-such-instance")
    assert r.returncode == 1
    assert "no-such-instance" in r.stderr
    r = _fastmat(*base, "--cas-max-bytes", "0")
    assert r.returncode == 2
    assert "--cas-max-bytes must be positive" in r.stderr


def test_one_worker_per_work_directory(
    farm: Farm, instance: str, wdir: Path, client: ExecClient
) -> None:
    with started(worker(farm, instance, wdir)):
        r = _fastmat(
            "worker", "--server", farm.url, "--instance", instance,
            "--cas", str(wdir / "cas"), "--work", str(wdir / "work"),
        )  # fmt: skip
    assert r.returncode == 1
    assert "another fastmat worker" in r.stderr
