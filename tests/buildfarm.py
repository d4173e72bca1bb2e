"""A real remote-execution farm for the worker's tests and benchmark: a private
PostgreSQL cluster, a BuildGrid 0.9.1 server with Execution + Bots + CAS + ActionCache
(its SQL scheduler needs PostgreSQL), ``fastmat worker`` processes, and a small REAPI
Execution client.

- ``Postgres``: ``initdb`` in a temp dir (as the ``postgres`` user when root: the server
  refuses to run as root), listening on 127.0.0.1 on a free port, fsync off;
- ``Farm``: ``bgd migrate apply`` then ``bgd server start`` on its own database, with
  the ``INSTANCES`` as instance names (tests take one each, so a test's leftovers never
  reach another test's worker), fast scheduler polling, a short bot keepalive;
- ``WorkerProc``: ``python -m fastmat worker`` as a child process, with its log;
- ``ExecClient``: uploads an action (Command, input tree) and runs it through the
  Execution service, or cancels it through Operations.

``farm_problem()`` says why a farm cannot run here (no PostgreSQL, no BuildGrid), for
skips; ``.ci/run`` installs both, so CI never skips.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from fastmat import proto
from fastmat.digest import Digest
from fastmat.proto import BOOL, INT32, MSG, REPEATED, STRING
from fastmat.remote import RemoteCAS
from fastmat.worker import proto as wproto
from tests.helpers import stop_process
from tests.reapi_server import build_tree, find_bgd, free_port, venv_dir

INSTANCES = tuple(f"t{i}" for i in range(24))
_V2 = ".build.bazel.remote.execution.v2."

_EXEC_MESSAGES: dict[str, list[proto.Field]] = {
    "ExecuteRequest": [
        ("instance_name", 1, STRING),
        ("skip_cache_lookup", 3, BOOL),
        ("action_digest", 6, MSG, _V2 + "Digest"),
    ],
    "ExecuteResponse": [
        ("result", 1, MSG, _V2 + "ActionResult"),
        ("cached_result", 2, BOOL),
        ("status", 3, MSG, ".google.rpc.Status"),
        ("message", 5, STRING),
    ],
    "ExecuteOperationMetadata": [
        ("stage", 1, INT32),
        ("action_digest", 2, MSG, _V2 + "Digest"),
    ],
}
_OPS_MESSAGES: dict[str, list[proto.Field]] = {
    "Operation": [
        ("name", 1, STRING),
        ("metadata", 2, MSG, ".google.protobuf.Any"),
        ("done", 3, BOOL),
        ("error", 4, MSG, ".google.rpc.Status"),
        ("response", 5, MSG, ".google.protobuf.Any"),
    ],
    "CancelOperationRequest": [("name", 1, STRING)],
    "ListOperationsRequest": [
        ("filter", 1, STRING),
        ("page_size", 2, INT32),
        ("page_token", 3, STRING),
        ("name", 4, STRING),
    ],
    "ListOperationsResponse": [
        ("operations", 1, MSG, ".google.longrunning.Operation", REPEATED),
        ("next_page_token", 2, STRING),
    ],
}
_M = {
    **proto.define("tests/exec.proto", "build.bazel.remote.execution.v2", _EXEC_MESSAGES),
    **proto.define("tests/operations.proto", "google.longrunning", _OPS_MESSAGES),
    **proto.define("tests/empty.proto", "google.protobuf", {"Empty": []}),
}
ExecuteRequest: Any = _M["ExecuteRequest"]
ExecuteResponse: Any = _M["ExecuteResponse"]
Operation: Any = _M["Operation"]
CancelOperationRequest: Any = _M["CancelOperationRequest"]
ListOperationsRequest: Any = _M["ListOperationsRequest"]
ListOperationsResponse: Any = _M["ListOperationsResponse"]
Empty: Any = _M["Empty"]


def pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb, if any."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


@functools.cache
def farm_problem() -> str | None:
    """None if a farm can run here, else why not."""
    if find_bgd() is None:
        return f"BuildGrid is not installed in {venv_dir()} (run .ci/install_buildgrid.sh)"
    if pg_bin() is None:
        return "PostgreSQL server binaries are not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


def _pg_user() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    ent = pwd.getpwnam("postgres")
    return ent.pw_uid, ent.pw_gid


class Postgres:
    """A private PostgreSQL cluster under ``base`` (see the module docstring)."""

    def __init__(self, base: Path) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            raise FileNotFoundError("no PostgreSQL server binaries")
        self.bin = bin_dir
        self.base = base
        self.port = 0
        self.user = _pg_user()

    def _run(self, *argv: str, timeout: float = 120) -> None:
        kw: dict[str, Any] = {}
        if self.user is not None:
            kw = {"user": self.user[0], "group": self.user[1], "extra_groups": []}
        res = subprocess.run(
            argv, capture_output=True, text=True, cwd=self.base, timeout=timeout, check=False, **kw
        )
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {res.stdout}{res.stderr}")

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(self.base, *self.user)
        os.chmod(self.base, 0o755)  # noqa: S103 - postgres must traverse it
        data = self.base / "data"
        self._run(
            str(self.bin / "initdb"), "-D", str(data), "-U", "bgd", "--auth=trust",
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        for _ in range(3):
            self.port = free_port()
            opts = (
                f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
            )
            try:
                self._run(
                    str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.base / "log"),
                    "-o", opts, "-w", "-t", "60", "start",
                )  # fmt: skip
                return
            except RuntimeError:
                continue
        raise RuntimeError(f"PostgreSQL did not start: {self.log()}")

    def log(self) -> str:
        p = self.base / "log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def createdb(self, name: str) -> str:
        """Creates database ``name``; returns its connection URL."""
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", "bgd", name)  # fmt: skip
        return f"postgresql://bgd@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.base / "data"), "-m",
                      "immediate", "-w", "stop", timeout=60)  # fmt: skip


_FARM_CONFIG = """\
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
grpc-server-options:
  grpc.max_receive_message_length: 67108864
  grpc.max_send_message_length: 67108864
thread-pool-size: 128
maximum-concurrent-rpcs: 1024
connections:
  - !sql-connection &sql
    connection-string: {db}
    pool-size: 16
    max-overflow: 32
storages:
  - !lru-storage &cas
    size: {cas_size}
caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: false
schedulers:
  - !sql-scheduler &sched
    sql: *sql
    storage: *cas
    action-cache: *ac
    bot-session-keepalive-timeout: {keepalive}
    session-expiry-timer-interval: 1
    poll-interval: 0.1
    bot-poll-interval: 0.1
    max-execution-timeout: 3600
    property-set: !dynamic-property-set
      match-property-keys: [fastmat-pool]
      wildcard-property-keys: [container-image]
    assigners:
      - !priority-age-assigner
        count: 2
        interval: 0.05
instances:
  - name: [{instances}]
    services:
      - !action-cache
        cache: *ac
      - !execution
        scheduler: *sched
        operation-stream-keepalive-timeout: 5
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
"""


class Farm:
    """A BuildGrid server with Execution + Bots on a PostgreSQL database."""

    def __init__(
        self,
        workdir: Path,
        pg: Postgres,
        *,
        db: str = "bgd",
        db_url: str = "",
        keepalive_s: int = 20,
        cas_size: str = "4GB",
        instances: Sequence[str] = INSTANCES,
    ) -> None:
        bgd = find_bgd()
        if bgd is None:
            raise FileNotFoundError("BuildGrid is not installed")
        self.bgd = bgd
        self.workdir = workdir
        self.pg = pg
        self.db_name = db
        self.keepalive_s = keepalive_s
        self.cas_size = cas_size
        self.instances = tuple(instances)
        self.db = db_url  # another farm's database: several servers may share one
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.db:
            self.db = self.pg.createdb(self.db_name)
            res = subprocess.run(
                [str(self.bgd), "migrate", "apply", self.db],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            if res.returncode != 0:
                raise RuntimeError(f"bgd migrate apply failed: {res.stdout}{res.stderr}")
        port = self.port or free_port()
        for _ in range(3):
            self.port = port
            cfg = self.workdir / "bgd.yml"
            cfg.write_text(
                _FARM_CONFIG.format(
                    port=port,
                    db=self.db,
                    keepalive=self.keepalive_s,
                    cas_size=self.cas_size,
                    instances=", ".join(f'"{n}"' for n in self.instances),
                )
            )
            with (self.workdir / "bgd.log").open("ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.bgd), "server", "start", str(cfg)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                )  # fmt: skip
            if self._wait_ready(timeout_s):
                return
            self.stop()
            port = free_port()
        raise RuntimeError(f"BuildGrid did not start; log:\n{self.log()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with RemoteCAS(self.url, self.instances[0], timeout_s=2, retries=0) as r:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    return False
                try:
                    r.find_missing([Digest.of(b"ready?")])
                    return True
                except Exception:  # not up yet, whatever the error
                    time.sleep(0.2)
        return False

    def log(self) -> str:
        p = self.workdir / "bgd.log"
        return p.read_text(errors="replace")[-6000:] if p.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)
        self.proc = None


REPO = Path(__file__).resolve().parent.parent


class WorkerProc:
    """``fastmat worker`` as a child process (its stderr in ``log_path``)."""

    def __init__(
        self,
        farm: Farm,
        instance: str,
        base: Path,
        *,
        server: str = "",
        jobs: int = 2,
        cache: bool = True,
        extra: Sequence[str] = (),
        name: str = "worker",
    ) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)  # noqa: S103 - actions' user must traverse it
        self.json_log = base / f"{name}.jsonl"
        self.log_path = base / f"{name}.log"
        self.argv = [
            sys.executable, "-m", "fastmat", "worker",
            "--server", server or farm.url, "--instance", instance,
            "--cas", str(base / "cas"), "--work", str(base / "work"),
            "--jobs", str(jobs), "--json-log", str(self.json_log), "--heartbeat", "1",
            *(["--cache", str(base / "cache")] if cache else []),
            *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProc:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if os.environ.get("FASTMAT_EXPECT_INSTALLED") == "1":
            env.pop("PYTHONPATH")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.base
            )
        return self

    def wait_session(self, timeout_s: float = 60) -> None:
        """Waits until the worker logged its bot session."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "bot session" in self.log():
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the worker did not start a session:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def records(self) -> list[dict[str, Any]]:
        import json

        if not self.json_log.exists():
            return []
        return [json.loads(line) for line in self.json_log.read_text().splitlines() if line]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM (drain), then SIGKILL if it does not end within ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Running:
    """An Execute call in flight: ``name`` once the server named the operation,
    ``response`` (an ``ExecuteResponse``) or ``error`` when it ended."""

    def __init__(self) -> None:
        self.name = ""
        self.named = threading.Event()
        self.done = threading.Event()
        self.response: Any = None
        self.error: Any = None
        self.rpc_error: grpc.RpcError | None = None

    def wait(self, timeout_s: float = 120) -> Any:
        if not self.done.wait(timeout_s):
            raise TimeoutError("the action did not finish")
        if self.rpc_error is not None:
            raise self.rpc_error
        return self.response


class ExecClient:
    """Uploads actions and runs them through the Execution service of ``url``."""

    def __init__(self, url: str, instance: str) -> None:
        self.instance = instance
        self.cas = RemoteCAS(url, instance, timeout_s=60)
        self._channel = grpc.insecure_channel(url.removeprefix("grpc://"))
        self._execute = self._channel.unary_stream(
            "/build.bazel.remote.execution.v2.Execution/Execute",
            request_serializer=ExecuteRequest.SerializeToString,
            response_deserializer=Operation.FromString,
        )
        self._cancel = self._channel.unary_unary(
            "/google.longrunning.Operations/CancelOperation",
            request_serializer=CancelOperationRequest.SerializeToString,
            response_deserializer=Empty.FromString,
        )

        self._list = self._channel.unary_unary(
            "/google.longrunning.Operations/ListOperations",
            request_serializer=ListOperationsRequest.SerializeToString,
            response_deserializer=ListOperationsResponse.FromString,
        )

    def close(self) -> None:
        self.cas.close()
        self._channel.close()

    def incomplete(self) -> list[str]:
        """The names of this instance's operations not yet done (BuildGrid's default
        ListOperations filter)."""
        resp = self._list(ListOperationsRequest(name=self.instance), timeout=30)
        return [op.name for op in resp.operations if not op.done]

    def cancel_incomplete(self) -> list[str]:
        """Cancels every operation of this instance not yet done, as ``bgd operation
        cancel`` would; returns their names."""
        names = self.incomplete()
        for name in names:
            self.cancel(name)
        return names

    def upload(self, blobs: Mapping[Digest, bytes]) -> None:
        self.cas.upload(blobs.items())

    def action(
        self,
        argv: Sequence[str],
        inputs: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        outputs: Sequence[str] = (),
        output_files: Sequence[str] = (),
        output_directories: Sequence[str] = (),
        working_directory: str = "",
        timeout_s: float = 0,
        platform: Mapping[str, str] | None = None,
        salt: bytes = b"",
        upload: bool = True,
        output_directory_format: int = 0,
    ) -> tuple[Digest, dict[Digest, bytes]]:
        """Builds (and uploads) an Action; returns its digest and every blob."""
        root, blobs = build_tree(inputs or {})
        cmd = wproto.Command(
            arguments=list(argv),
            output_paths=list(outputs),
            output_files=list(output_files),
            output_directories=list(output_directories),
            working_directory=working_directory,
            output_directory_format=output_directory_format,
        )
        for k, v in sorted((env or {}).items()):
            cmd.environment_variables.add(name=k, value=v)
        act = wproto.Action(salt=salt, do_not_cache=True)
        for k, v in sorted((platform or {}).items()):
            cmd.platform.properties.add(name=k, value=v)
            act.platform.properties.add(name=k, value=v)
        cmd_bytes = cmd.SerializeToString(deterministic=True)
        cmd_d = Digest.of(cmd_bytes)
        blobs[cmd_d] = cmd_bytes
        act.command_digest.CopyFrom(proto.Digest(hash=cmd_d.hash, size_bytes=cmd_d.size_bytes))
        act.input_root_digest.CopyFrom(proto.Digest(hash=root.hash, size_bytes=root.size_bytes))
        if timeout_s:
            act.timeout.seconds = int(timeout_s)
            act.timeout.nanos = int((timeout_s % 1) * 1e9)
        act_bytes = act.SerializeToString(deterministic=True)
        act_d = Digest.of(act_bytes)
        blobs[act_d] = act_bytes
        if upload:
            self.upload(blobs)
        return act_d, blobs

    def start(self, action: Digest) -> Running:
        """Starts executing ``action`` on a thread; see :class:`Running`."""
        run = Running()
        req = ExecuteRequest(
            instance_name=self.instance,
            skip_cache_lookup=True,
            action_digest=proto.Digest(hash=action.hash, size_bytes=action.size_bytes),
        )

        def body() -> None:
            try:
                for op in self._execute(req, timeout=600):
                    if op.name and not run.name:
                        run.name = op.name
                        run.named.set()
                    if op.done:
                        if op.HasField("error") and op.error.code:
                            run.error = op.error
                        if op.HasField("response"):
                            run.response = ExecuteResponse.FromString(op.response.value)
                        break
            except grpc.RpcError as e:
                run.rpc_error = e
            finally:
                run.named.set()
                run.done.set()

        threading.Thread(target=body, daemon=True).start()
        return run

    def execute(self, action: Digest, timeout_s: float = 120) -> Any:
        """Runs ``action`` and returns its ``ExecuteResponse``."""
        return self.start(action).wait(timeout_s)

    def cancel(self, name: str) -> None:
        self._cancel(CancelOperationRequest(name=name), timeout=30)

    def read(self, d: Any) -> bytes:
        """The bytes of blob ``d`` (a Digest message or value)."""
        dd = d if isinstance(d, Digest) else Digest(d.hash, d.size_bytes)
        if dd.size_bytes == 0:
            return b""
        return b"".join(data for _, data in self.cas.read_blobs([dd]))


class Outage:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port`` that can go away
    (``down``: listener and every connection closed) and come back on the same port
    (``up``): the server unreachable, as a worker sees it, without restarting it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._sock: socket.socket | None = None
        self.accepted = 0  # connections proxied so far
        self.up()

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # wakes the accept() blocked on it
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self._conns = []

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                client, _ = s.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.accepted += 1
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def pids_alive(pids: Sequence[int]) -> list[int]:
    """The pids of ``pids`` that still name a live (non-zombie) process."""
    alive = []
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if text.rsplit(")", 1)[-1].split()[0] != "Z":
            alive.append(pid)
    return alive


def wait_for(cond: Any, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


@contextlib.contextmanager
def started(w: WorkerProc) -> Iterator[WorkerProc]:
    """A worker for the ``with`` body, stopped (drained) afterwards."""
    w.start()
    try:
        w.wait_session()
        yield w
    finally:
        w.stop()


def skip_or_fail(problem: str | None) -> None:
    """Skips with ``problem`` (None: nothing to do); with ``FASTMAT_NO_SKIP=1`` (CI,
    which installs everything) fails instead, so a broken install cannot pass as a skip."""
    if problem is None:
        return
    if os.environ.get("FASTMAT_NO_SKIP") == "1":
        pytest.fail(f"{problem} (FASTMAT_NO_SKIP=1: CI installs it)")
    pytest.skip(problem)


def open_tmpdir(prefix: str) -> Path:
    """A new directory under the system temp dir that every user may traverse (0755):
    PostgreSQL runs as ``postgres`` and actions as ``nobody``."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


@pytest.fixture(scope="session")
def farm() -> Iterator[Farm]:
    """PostgreSQL + BuildGrid (Execution, Bots, CAS, ActionCache) for the session;
    skipped with the reason where either is missing."""
    skip_or_fail(farm_problem())
    base = open_tmpdir("fastmat-farm-")
    pg = Postgres(base / "pg")
    pg.start()
    f = Farm(base / "bgd", pg, keepalive_s=60)
    try:
        f.start()
        yield f
    finally:
        f.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


_instances = itertools.count()


@pytest.fixture
def instance(farm: Farm) -> str:
    """A farm instance name no other test uses (its queue is this test's alone)."""
    return INSTANCES[next(_instances) % len(INSTANCES)]


@pytest.fixture
def wdir() -> Iterator[Path]:
    """A per-test directory that the actions' user may traverse."""
    d = open_tmpdir("fastmat-wt-")
    yield d
    for mnt in _mounts_under(d):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def _mounts_under(d: Path) -> list[str]:
    prefix = str(d) + "/"
    text = Path("/proc/self/mountinfo").read_text()
    return [f.split()[4] for f in text.splitlines() if f.split()[4].startswith(prefix)]


@pytest.fixture
def client(farm: Farm, instance: str) -> Iterator[ExecClient]:
    c = ExecClient(farm.url, instance)
    yield c
    c.close()
