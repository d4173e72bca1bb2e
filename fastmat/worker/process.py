"""Running an action's command: a clean environment, its own process group (session),
another user, a deadline, and nothing left behind.

The child gets exactly the Command's environment variables, ``stdin`` from /dev/null,
``stdout`` / ``stderr`` into files the worker owns, umask 022, and no other fd. It runs
as ``uid:gid`` (no supplementary groups) when the worker can switch users. On timeout
its process group gets SIGTERM, then SIGKILL after ``grace_s``; on cancellation SIGKILL
at once. After the command exits its group is killed too, before the leader is reaped
(so the group id cannot have been reused), so no straggler outlives its action.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Exit", "ProcessSpec", "run"]

GRACE_S = 2.0
_POLL_S = 0.5  # where pidfds are missing: how often the exit is polled


@dataclass(frozen=True)
class ProcessSpec:
    """What to run: ``argv`` in ``cwd`` with exactly ``env``, output to two files,
    as ``user`` (uid, gid) or as the worker's own user (None); ``timeout_s`` 0: none."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    stdout: Path
    stderr: Path
    user: tuple[int, int] | None = None
    timeout_s: float = 0.0


@dataclass(frozen=True)
class Exit:
    """How it ended: ``exit_code`` as REAPI reports it (a signal N gives 128 + N),
    ``timed_out`` / ``cancelled``, or ``spawn_error`` (it never started: no such
    executable, not executable...), then ``exit_code`` is 127 or 126 like a shell's."""

    exit_code: int
    timed_out: bool = False
    cancelled: bool = False
    signal: int = 0
    spawn_error: str = ""


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float, cancel: threading.Event) -> str:
    """Waits until the child exits (left unreaped), ``timeout_s`` passes or ``cancel``
    is set; returns "exit", "timeout" or "cancel"."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    pidfd = -1
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            pidfd = -1
    try:
        while True:
            if cancel.is_set():
                return "cancel"
            left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if left <= 0:
                return "timeout"
            if pidfd >= 0:
                ready, _, _ = select.select([pidfd], [], [], left)
                if ready:
                    return "exit"
            else:
                try:
                    res = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    return "exit"
                if res is not None:
                    return "exit"
                cancel.wait(left)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def run(spec: ProcessSpec, cancel: threading.Event, *, grace_s: float = GRACE_S) -> Exit:
    """Runs ``spec`` to its end (see the module docstring). ``cancel`` kills it."""
    kwargs: dict[str, object] = {}
    if spec.user is not None:
        kwargs = {"user": spec.user[0], "group": spec.user[1], "extra_groups": []}
    with open(spec.stdout, "xb") as out, open(spec.stderr, "xb") as err:
        try:
            proc = subprocess.Popen(
                spec.argv,
                cwd=spec.cwd,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                close_fds=True,
                start_new_session=True,  # its own session and process group
                umask=0o022,
                **kwargs,  # type: ignore[call-overload]
            )
        except OSError as e:
            msg = f"cannot run {spec.argv[0]!r}: {e.strerror or e}"
            err.write(f"fastmat worker: {msg}\n".encode())
            code = 127 if e.errno == errno.ENOENT else 126
            return Exit(code, spawn_error=msg)
    pgid = proc.pid
    try:
        why = _wait_exit(proc, spec.timeout_s, cancel)
        if why == "timeout":
            _kill_group(pgid, signal.SIGTERM)
            _wait_exit(proc, grace_s, cancel)  # then SIGKILL below, exited or not
        elif why == "cancel":
            _kill_group(pgid, signal.SIGKILL)
    finally:
        # The leader is a zombie (or about to be killed) and keeps the group id
        # reserved until reaped: kill whatever else is in its group, then reap it.
        _kill_group(pgid, signal.SIGKILL)
        proc.wait()
    rc = proc.returncode
    sig = -rc if rc < 0 else 0
    code = 128 + sig if sig else rc
    return Exit(code, timed_out=why == "timeout", cancelled=why == "cancel", signal=sig)
