"""The worker's start-up decisions (fastmat.worker.config) and its wire messages
(fastmat.worker.proto) checked field by field against BuildGrid 0.9.1's generated ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fastmat import proto
from fastmat.worker import config
from fastmat.worker import proto as wproto
from tests.buildfarm import REPO, open_tmpdir, skip_or_fail
from tests.reapi_server import find_bgd, venv_dir

ROOT = os.geteuid() == 0


def test_platform_items_parse_and_dedupe() -> None:
    assert config.parse_platform(["OSFamily=linux", "ISA=x86-64", "OSFamily=linux"]) == (
        ("ISA", "x86-64"),
        ("OSFamily", "linux"),
    )
    assert config.parse_platform(["empty="]) == (("empty", ""),)
    with pytest.raises(config.ConfigError, match="KEY=VALUE"):
        config.parse_platform(["novalue"])


@pytest.mark.skipif(not ROOT, reason="the default user depends on running as root")
def test_as_root_actions_run_as_nobody_and_never_as_root() -> None:
    assert config.resolve_user(None) == (65534, 65534)
    assert config.resolve_user("65534") == (65534, 65534)
    with pytest.raises(config.ConfigError, match="--run-as root"):
        config.resolve_user("root")
    with pytest.raises(config.ConfigError, match="--run-as root"):
        config.resolve_user("0")
    with pytest.raises(config.ConfigError, match="no such user"):
        config.resolve_user("no-such-user-for-sure")


def test_the_work_directory_must_be_reachable_by_the_actions_user() -> None:
    base = open_tmpdir("fastmat-reach-")
    try:
        locked = base / "locked"
        (locked / "work").mkdir(parents=True)
        config.check_reachable(locked / "work", (65534, 65534))
        locked.chmod(0o700)
        if ROOT:
            with pytest.raises(config.ConfigError, match=f"{locked} is mode 700"):
                config.check_reachable(locked / "work", (65534, 65534))
        config.check_reachable(locked / "work", None)  # actions as the worker's user
    finally:
        shutil.rmtree(base)


def test_the_bot_id_is_stable_per_work_directory(tmp_path: Path) -> None:
    a = config.WorkerConfig(server="grpc://x:1", cas=tmp_path / "c", work=tmp_path / "w1")
    b = config.WorkerConfig(server="grpc://x:1", cas=tmp_path / "c", work=tmp_path / "w2")
    assert a.resolved_bot_id() == a.resolved_bot_id() != b.resolved_bot_id()
    c = config.WorkerConfig(server="g", cas=tmp_path, work=tmp_path, bot_id="mine")
    assert c.resolved_bot_id() == "mine"
    with pytest.raises(config.ConfigError, match="--jobs"):
        config.WorkerConfig(server="g", cas=tmp_path, work=tmp_path, jobs=0)


def test_cas_max_bytes_reaches_localcas(tmp_path: Path) -> None:
    with config.open_cas(tmp_path / "c", max_bytes=1 << 30, fsync=False) as cas:
        assert cas.max_bytes == 1 << 30
    with pytest.raises(config.ConfigError, match="--cas-max-bytes must be positive"):
        config.open_cas(tmp_path / "c", max_bytes=0, fsync=False)
    with config.open_cas(tmp_path / "d", max_bytes=None, fsync=False) as cas:
        assert cas.root == tmp_path / "d"
        assert cas.max_bytes is None


def test_the_worker_refuses_to_fork_with_grpcs_fork_handlers_on() -> None:
    from fastmat.worker.forking import fork_handlers_on

    assert not fork_handlers_on(False, None)  # fastmat.worker switched them off first
    assert fork_handlers_on(True, None)  # grpc came first: its default (on) holds
    assert not fork_handlers_on(True, "false")
    assert not fork_handlers_on(True, "0")
    assert fork_handlers_on(False, "true")  # asked for explicitly
    env = {**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "true", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "fastmat", "worker", "--server", "grpc://127.0.0.1:1",
         "--cas", "/nonexistent/c", "--work", "/nonexistent/w"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 1
    assert "GRPC_ENABLE_FORK_SUPPORT=false" in r.stderr


# ---- the wire messages against BuildGrid's generated descriptors -------------------

_DUMP = """
import json, sys
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf import descriptor_pool
import buildgrid._protos.build.bazel.remote.execution.v2.remote_execution_pb2
import buildgrid._protos.google.devtools.remoteworkers.v1test2.bots_pb2
import buildgrid._protos.google.rpc.error_details_pb2
import buildgrid._protos.google.rpc.status_pb2
pool = descriptor_pool.Default()
out = {}
for name in json.loads(sys.argv[1]):
    d = pool.FindMessageTypeByName(name)
    out[name] = {f.name: [f.number, f.type, f.is_repeated] for f in d.fields}
print(json.dumps(out))
"""

_RW = "google.devtools.remoteworkers.v1test2."
# (our flattened name, its full name in the public .proto files)
_OURS: list[tuple[Any, str]] = [
    (wproto.Action, "build.bazel.remote.execution.v2.Action"),
    (wproto.Command, "build.bazel.remote.execution.v2.Command"),
    (wproto.Platform, "build.bazel.remote.execution.v2.Platform"),
    (wproto.ActionResult, "build.bazel.remote.execution.v2.ActionResult"),
    (wproto.OutputFile, "build.bazel.remote.execution.v2.OutputFile"),
    (wproto.OutputSymlink, "build.bazel.remote.execution.v2.OutputSymlink"),
    (wproto.OutputDirectory, "build.bazel.remote.execution.v2.OutputDirectory"),
    (wproto.ExecutedActionMetadata, "build.bazel.remote.execution.v2.ExecutedActionMetadata"),
    (wproto.PreconditionFailure, "google.rpc.PreconditionFailure"),
    (wproto.Worker, "google.devtools.remoteworkers.v1test2.Worker"),
    (wproto.Lease, "google.devtools.remoteworkers.v1test2.Lease"),
    (wproto.BotSession, "google.devtools.remoteworkers.v1test2.BotSession"),
    (
        wproto.CreateBotSessionRequest,
        "google.devtools.remoteworkers.v1test2.CreateBotSessionRequest",
    ),
    (
        wproto.UpdateBotSessionRequest,
        "google.devtools.remoteworkers.v1test2.UpdateBotSessionRequest",
    ),
    (proto.Status, "google.rpc.Status"),
    (proto.Tree, "build.bazel.remote.execution.v2.Tree"),
]
_ENUM, _INT32 = 14, 5  # FieldDescriptor.TYPE_ENUM / TYPE_INT32: the same varint on the wire


def test_every_field_matches_buildgrids_generated_descriptors() -> None:
    if find_bgd() is None:
        skip_or_fail(f"BuildGrid is not installed in {venv_dir()}")
    python = venv_dir() / "bin" / "python"
    names = [full for _, full in _OURS]
    res = subprocess.run(
        [str(python), "-c", _DUMP, json.dumps(names)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    theirs = json.loads(res.stdout)
    checked = 0
    for cls, full in _OURS:
        for f in cls.DESCRIPTOR.fields:
            number, ftype, repeated = theirs[full][f.name]
            assert f.number == number, (full, f.name)
            assert f.is_repeated == repeated, (full, f.name)
            expected = _INT32 if ftype == _ENUM else ftype
            assert f.type == expected, (full, f.name, f.type, ftype)
            checked += 1
    assert checked >= 80
    # enum values as BuildGrid uses them
    assert (wproto.LEASE_ACTIVE, wproto.LEASE_COMPLETED, wproto.BOT_TERMINATING) == (2, 4, 4)
