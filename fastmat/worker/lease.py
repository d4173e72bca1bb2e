"""One lease, from payload to result: the Action and Command read, the platform
checked, the input root staged, the command run, the outputs collected and uploaded,
and every phase stamped in ``ExecutedActionMetadata`` as it happens.

BuildGrid 0.9.1 (``JobEntry.to_lease_proto``) hands a lease a ``google.protobuf.Any``
payload packing the ``Action`` itself (or, for jobs stored without one, the Action's
``Digest``: both are accepted), and takes back ``lease.result``: an ``Any`` packing the
``ActionResult`` (``Scheduler._complete_job`` unpacks it only if it holds one) with
``lease.status`` (``INTERNAL`` / ``UNAVAILABLE`` are retried on another bot; any other
code completes the job with it, ``OK`` included).

Status codes this module reports, as REAPI asks: ``OK`` with the result whatever the
exit code; ``DEADLINE_EXCEEDED`` with the partial result (stdout/stderr so far) on
timeout; ``FAILED_PRECONDITION`` for a missing input blob (with a ``PreconditionFailure``
naming it, so the client re-uploads), a platform mismatch, or an output of the wrong
kind; ``INVALID_ARGUMENT`` for a malformed Action / Command; ``INTERNAL`` when the worker
itself failed (the server then retries elsewhere).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastmat import _binding, proto
from fastmat.digest import BlobNotFoundError, Digest, DigestMismatchError
from fastmat.errors import FastmatError, InvalidTreeError, RemoteError
from fastmat.worker import outputs, paths, process
from fastmat.worker import proto as wproto
from fastmat.worker.log import ActionLog, ActionRecord

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS
    from fastmat.remote import RemoteCAS
    from fastmat.worker.staging import Stager

__all__ = ["Code", "LeaseContext", "LeaseOutcome", "LeaseRunner"]

log = logging.getLogger("fastmat.worker")


class Code:
    """google.rpc.Code values used here."""

    OK = 0
    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14
    NAMES = {  # noqa: RUF012 - a constant table
        0: "OK",
        1: "CANCELLED",
        3: "INVALID_ARGUMENT",
        4: "DEADLINE_EXCEEDED",
        9: "FAILED_PRECONDITION",
        13: "INTERNAL",
        14: "UNAVAILABLE",
    }


class _Refused(FastmatError):
    """The lease cannot be run here; ``code`` says how to report it."""

    def __init__(self, code: int, message: str, missing: Digest | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.missing = missing


@dataclass
class LeaseContext:
    """What every lease of one worker shares."""

    cas: LocalCAS
    remote: RemoteCAS
    stager: Stager
    actions_dir: Path
    user: tuple[int, int] | None
    platform: frozenset[tuple[str, str]]
    worker_name: str
    default_timeout_s: float
    log: ActionLog


@dataclass
class LeaseOutcome:
    """The lease's ``status`` and ``result`` (None: nothing to report, it was
    cancelled) and its log record."""

    status: Any
    result: Any
    record: ActionRecord


def _now(ts: Any) -> None:
    t = time.time_ns()
    ts.seconds, ts.nanos = divmod(t, 1_000_000_000)


def _pb(d: Digest) -> Any:
    return proto.Digest(hash=d.hash, size_bytes=d.size_bytes)


def _digest(msg: Any, what: str) -> Digest:
    try:
        return Digest(msg.hash, msg.size_bytes)
    except FastmatError as e:
        raise _Refused(Code.INVALID_ARGUMENT, f"{what}: {e}") from None


_seq = itertools.count(1)


class LeaseRunner:
    """Runs one lease (``run``, on a worker thread); ``cancel`` from any thread."""

    def __init__(self, ctx: LeaseContext, lease_id: str, payload: Any) -> None:
        self.ctx = ctx
        self.lease_id = lease_id
        self.payload = payload
        self.metadata = wproto.ExecutedActionMetadata(worker=ctx.worker_name)
        _now(self.metadata.worker_start_timestamp)
        self._cancel = threading.Event()
        self.record = ActionRecord(lease=lease_id)

    def cancel(self) -> None:
        """Stops the lease: kills its processes if they run; ``run`` then reports
        nothing (``LeaseOutcome.result`` None, status CANCELLED)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- reading the lease ---------------------------------------------------------

    def _blob(self, d: Digest, what: str) -> bytes:
        if d in self.ctx.cas:
            return self.ctx.cas.read(d)
        try:
            for got, data in self.ctx.remote.read_blobs([d]):
                if Digest.of(data) != got or got != d:
                    raise DigestMismatchError(d, Digest.of(data), what)
                return data
        except BlobNotFoundError:
            pass
        raise _Refused(Code.FAILED_PRECONDITION, f"{what} {d} is not in the CAS", missing=d)

    def _action(self) -> Any:
        kind = wproto.full_name(self.payload)
        if kind == "build.bazel.remote.execution.v2.Action":
            data = bytes(self.payload.value)
        elif kind == "build.bazel.remote.execution.v2.Digest":
            d = _digest(proto.Digest.FromString(self.payload.value), "lease payload")
            data = self._blob(d, "Action")
        else:
            raise _Refused(Code.INVALID_ARGUMENT, f"unsupported lease payload {kind!r}")
        self.record.action = str(Digest.of(data))
        try:
            return wproto.Action.FromString(data)
        except proto.DecodeError:
            raise _Refused(Code.INVALID_ARGUMENT, "undecodable Action") from None

    def _command(self, action: Any) -> Any:
        d = _digest(action.command_digest, "Action.command_digest")
        try:
            cmd = wproto.Command.FromString(self._blob(d, "Command"))
        except proto.DecodeError:
            raise _Refused(Code.INVALID_ARGUMENT, f"undecodable Command {d}") from None
        if not cmd.arguments:
            raise _Refused(Code.INVALID_ARGUMENT, "the Command has no arguments")
        return cmd

    def _check_platform(self, action: Any, command: Any) -> None:
        props = action.platform.properties or command.platform.properties
        wanted = {(p.name, p.value) for p in props}
        if not wanted <= self.ctx.platform:
            missing = ", ".join(f"{k}={v}" for k, v in sorted(wanted - self.ctx.platform))
            offered = ", ".join(f"{k}={v}" for k, v in sorted(self.ctx.platform)) or "none"
            raise _Refused(
                Code.FAILED_PRECONDITION,
                f"platform mismatch: the action requires {missing}; this worker offers {offered}",
            )

    def _timeout_s(self, action: Any) -> float:
        if action.HasField("timeout"):
            t = action.timeout.seconds + action.timeout.nanos / 1e9
            if t > 0:
                return float(t)
        return self.ctx.default_timeout_s

    # -- the run ----------------------------------------------------------------------

    def run(self) -> LeaseOutcome:
        """Runs the lease to its end; never raises (a failure is reported, not thrown)."""
        t0 = time.monotonic()
        phases = self.record.phases_s
        result = wproto.ActionResult()
        status = proto.Status(code=Code.OK)
        try:
            action = self._action()
            command = self._command(action)
            self._check_platform(action, command)
            phases["fetch_action"] = time.monotonic() - t0
            self._execute(action, command, result, status)
        except _Refused as e:
            status = self._status(e.code, str(e), e.missing)
            self.record.outcome = "refused"
        except paths.BadPathError as e:
            status = self._status(Code.INVALID_ARGUMENT, str(e))
            self.record.outcome = "refused"
        except outputs.OutputError as e:
            status = self._status(Code.FAILED_PRECONDITION, str(e))
            self.record.outcome = "error"
        except BlobNotFoundError as e:
            status = self._status(Code.FAILED_PRECONDITION, f"input {e}", e.digest)
            self.record.outcome = "refused"
        except InvalidTreeError as e:
            status = self._status(Code.INVALID_ARGUMENT, f"input root: {e}")
            self.record.outcome = "refused"
        except Exception as e:  # the worker failed, not the action: the server retries
            if self.cancelled:
                status = self._status(Code.CANCELLED, "cancelled")
            else:
                log.error("lease %s failed: %s\n%s", self.lease_id, e, traceback.format_exc())
                status = self._status(Code.INTERNAL, f"worker error: {_describe(e)}")
                self.record.outcome = "error"
        phases["total"] = time.monotonic() - t0
        _now(self.metadata.worker_completed_timestamp)
        result.execution_metadata.CopyFrom(self.metadata)
        if self.cancelled:
            self.record.outcome = "cancelled"
            self.record.status = "CANCELLED"
            return LeaseOutcome(proto.Status(code=Code.CANCELLED), None, self.record)
        self.record.status = Code.NAMES.get(status.code, str(status.code))
        self.record.message = status.message
        return LeaseOutcome(status, result, self.record)

    def _status(self, code: int, message: str, missing: Digest | None = None) -> Any:
        st = proto.Status(code=code, message=message)
        if missing is not None:
            pf = wproto.PreconditionFailure()
            pf.violations.add(
                type="MISSING",
                # REAPI's subject for a missing blob (a wire name, not the CAS layout)
                subject="/".join(("blobs", missing.hash, str(missing.size_bytes))),
                description=message,
            )
            st.details.add().CopyFrom(wproto.pack(pf))
        return st

    def _execute(self, action: Any, command: Any, result: Any, status: Any) -> None:
        ctx = self.ctx
        rec = self.record
        phases = rec.phases_s
        root = _digest(action.input_root_digest, "Action.input_root_digest")
        wd_parts = paths.split(command.working_directory, "working_directory", empty_ok=True)
        job = self.lease_id.rsplit("/", 1)[-1]
        adir = ctx.actions_dir / f"{next(_seq):06d}-{job[:12] or 'lease'}"
        os.mkdir(adir, 0o755)
        os.chmod(adir, 0o755)  # noqa: S103 - the action's user must traverse it
        try:
            t = time.monotonic()
            _now(self.metadata.input_fetch_start_timestamp)
            with ctx.stager.stage(root, adir / "root", self._cancel) as staged:
                _now(self.metadata.input_fetch_completed_timestamp)
                phases["stage"] = time.monotonic() - t
                rec.staging, rec.cache = staged.method, staged.cache
                rec.fetched = {"blobs": staged.fetched_blobs, "bytes": staged.fetched_bytes}
                root_fd = os.open(staged.path, paths.O_DIR)
                try:
                    self._run_in(
                        root_fd, wd_parts, action=action, command=command, adir=adir,
                        result=result, status=status,
                    )  # fmt: skip
                finally:
                    os.close(root_fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                _binding.remove_tree(adir)

    def _run_in(
        self,
        root_fd: int,
        wd_parts: list[str],
        *,
        action: Any,
        command: Any,
        adir: Path,
        result: Any,
        status: Any,
    ) -> None:
        ctx = self.ctx
        rec = self.record
        phases = rec.phases_s
        try:
            wd_fd = paths.dir_fd(root_fd, wd_parts)
        except OSError:
            raise _Refused(
                Code.FAILED_PRECONDITION,
                f"working directory {command.working_directory!r} is not a directory "
                "of the input root",
            ) from None
        try:
            _make_output_dirs(wd_fd, command, ctx.user)
            if self.cancelled:
                return
            spec = process.ProcessSpec(
                argv=list(command.arguments),
                env={e.name: e.value for e in command.environment_variables},
                cwd=adir.joinpath("root", *wd_parts),
                stdout=adir / "stdout",
                stderr=adir / "stderr",
                user=ctx.user,
                timeout_s=self._timeout_s(action),
            )
            t = time.monotonic()
            _now(self.metadata.execution_start_timestamp)
            ex = process.run(spec, self._cancel)
            _now(self.metadata.execution_completed_timestamp)
            phases["execute"] = time.monotonic() - t
            if ex.cancelled:
                return
            rec.exit_code = result.exit_code = ex.exit_code
            t = time.monotonic()
            _now(self.metadata.output_upload_start_timestamp)
            outs = outputs.collect(ctx.cas, wd_fd, command)
            result.MergeFrom(outs.result)
            for name, field_ in (("stdout", "stdout_digest"), ("stderr", "stderr_digest")):
                fd = os.open(adir, paths.O_DIR)
                try:
                    got = outputs.store_file(ctx.cas, fd, name)
                finally:
                    os.close(fd)
                if got is not None and got[0].size_bytes:
                    getattr(result, field_).CopyFrom(_pb(got[0]))
                    outs.blobs.setdefault(got[0], None)
            n, nbytes = outputs.upload(ctx.remote, ctx.cas, outs.blobs)
            _now(self.metadata.output_upload_completed_timestamp)
            phases["upload"] = time.monotonic() - t
            rec.uploaded = {"blobs": n, "bytes": nbytes}
            rec.outputs = {"files": outs.files, "bytes": outs.bytes}
            if ex.timed_out:
                status.code = Code.DEADLINE_EXCEEDED
                status.message = f"the action timed out after {spec.timeout_s:g} s"
                rec.outcome = "timeout"
            elif ex.spawn_error:
                rec.outcome = "ok"
                rec.message = ex.spawn_error
            else:
                rec.outcome = "ok"
        finally:
            os.close(wd_fd)


def _make_output_dirs(wd_fd: int, command: Any, user: tuple[int, int] | None) -> None:
    """Creates, before the command runs, the parents of every output and the output
    directories themselves (Bazel's tree artifacts expect them, as they do locally),
    owned by the action's user along with the working directory: the action can create
    (and replace) its outputs there, while the input files stay read-only to it."""
    dirs: set[tuple[str, ...]] = {()}
    if command.output_paths:
        dirs |= {tuple(paths.split(p, "output path")[:-1]) for p in command.output_paths}
    else:
        dirs |= {tuple(paths.split(p, "output file")[:-1]) for p in command.output_files}
        for p in command.output_directories:
            parts = tuple(paths.split(p, "output directory"))
            dirs |= {parts, parts[:-1]}
    for parts in sorted(dirs):
        try:
            fd = paths.make_dirs(wd_fd, list(parts), user)
        except OSError as e:
            raise _Refused(
                Code.FAILED_PRECONDITION,
                f"cannot create output directory {'/'.join(parts)!r}: {e.strerror}",
            ) from None
        os.close(fd)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f": {os.fsdecode(e.filename)}" if e.filename is not None else ""
        return f"{e.strerror}{where}"
    if isinstance(e, RemoteError):
        return str(e)
    return f"{type(e).__name__}: {e}"
