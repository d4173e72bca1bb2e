"""``Worker``: the bot. One thread keeps the bot session (:mod:`.session`); up to
``jobs`` threads run leases (:mod:`.lease`).

The session loop sends one ``UpdateBotSession`` at a time carrying every lease it holds
(``ACTIVE`` while running, ``COMPLETED`` with status and result once done) and the
progress of the running ones; it long-polls for ``poll_s`` when idle and for a few
seconds while busy (a cancellation is only seen at the next call), paces itself to
``heartbeat_s`` when the server answers at once (at capacity, draining), and cuts a
poll short when a lease finishes or a signal arrives, so results go out at once.

- A lease missing from the server's answer was cancelled: its process group is killed
  and nothing is reported for it.
- The server unreachable: retried with backoff, running leases keep running and are
  reported when it is back. The session gone (the server forgot it): running leases are
  killed (their jobs were re-queued) and a new session is created.
- ``drain()`` (first SIGTERM / SIGINT): status ``BOT_TERMINATING``, so no new work; a
  lease still arriving is returned ``UNAVAILABLE`` (re-queued at once); running ones get
  ``drain_timeout_s`` to finish, then are killed and returned the same way. ``stop()``
  (the second signal) returns them at once. ``run`` ends once every lease is reported.

On start the worker takes ``<work>/lock`` (one worker per work directory) and clears
what a killed predecessor left in ``<work>/actions``: processes still running in it
(SIGKILL), overlay mounts, directories; before its directory cache is opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc

from fastmat import _binding, proto
from fastmat.errors import FastmatError
from fastmat.remote import RemoteCAS
from fastmat.worker import config, forking, session
from fastmat.worker import proto as wproto
from fastmat.worker.lease import Code, LeaseContext, LeaseOutcome, LeaseRunner
from fastmat.worker.log import ActionLog, ActionRecord
from fastmat.worker.staging import FastmatStager, Stager

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS

__all__ = ["StagerFactory", "Worker", "WorkerError", "run_until_signalled"]

log = logging.getLogger("fastmat.worker")

StagerFactory = Callable[["LocalCAS", RemoteCAS], Stager]
_QUICK_S = 0.5  # an answer faster than this that changed nothing: the server did not wait
_REPORT_GRACE_S = 30.0  # draining, server unreachable: how long results wait to be reported


class WorkerError(FastmatError):
    """The worker cannot start or cannot reach a usable Bots service."""


@dataclass
class _Slot:
    """A lease the worker holds: ``lease`` is what the next update reports."""

    lease: Any
    runner: LeaseRunner | None = None
    future: Future[LeaseOutcome] | None = None
    dropped: bool = False  # cancelled by the server (or the session lost): report nothing
    returning: bool = False  # being given back: report UNAVAILABLE

    @property
    def done(self) -> bool:
        return bool(self.lease.state == wproto.LEASE_COMPLETED)


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo), deepest first."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    prefix = str(root.absolute()).rstrip("/") + "/"
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            mnt = fields[4].encode().decode("unicode_escape")  # \040 for spaces etc.
            if mnt.startswith(prefix):
                out.append(mnt)
    return sorted(out, key=lambda p: p.count("/"), reverse=True)


def _kill_orphans(root: Path) -> int:
    """SIGKILLs processes whose working directory is under ``root``: the actions of a
    worker that was itself killed (they outlive it in their own sessions). Returns how
    many were signalled."""
    prefix = str(root.absolute()).rstrip("/") + "/"
    n = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if (cwd + "/").startswith(prefix):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(d.name), signal.SIGKILL)
                n += 1
    return n


class Worker:
    """A Remote Workers API bot (see the module docstring). ``stager``: how inputs are
    staged (default: :class:`~fastmat.worker.staging.FastmatStager` with the config's
    cache); the benchmark passes another."""

    def __init__(self, cfg: config.WorkerConfig, *, stager: StagerFactory | None = None) -> None:
        if forking.fork_handlers_on():
            raise WorkerError(
                "gRPC's fork handlers are on (GRPC_ENABLE_FORK_SUPPORT, or grpc imported "
                "before fastmat.worker): actions forked by the worker can crash; set "
                "GRPC_ENABLE_FORK_SUPPORT=false in the environment"
            )
        self.cfg = cfg
        self.bot_id = cfg.resolved_bot_id()
        self.user = config.resolve_user(cfg.run_as)
        self._stager_factory = stager
        self._mu = threading.Lock()
        self._wake = threading.Event()
        self._call_event: threading.Event | None = None
        self._slots: dict[str, _Slot] = {}
        self._draining = False
        self._drain_deadline = 0.0
        self._stopping = False
        self._session: Any = None
        self.sessions_created = 0
        self._stack = contextlib.ExitStack()

    # -- control from other threads (signal handlers) ------------------------------

    def drain(self) -> None:
        """Stop taking leases; finish running ones (up to ``drain_timeout_s``), then exit."""
        with self._mu:
            if not self._draining:
                self._draining = True
                self._drain_deadline = time.monotonic() + self.cfg.drain_timeout_s
        self._poke()

    def stop(self) -> None:
        """Return running leases to the server now, then exit."""
        with self._mu:
            self._draining = True
            self._stopping = True
            self._drain_deadline = time.monotonic()
        self._poke()

    @property
    def session_name(self) -> str | None:
        return None if self._session is None else str(self._session.name)

    # -- start-up -------------------------------------------------------------------

    def _open(self) -> None:
        cfg = self.cfg
        st = self._stack
        cfg.work.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(cfg.work / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        st.callback(os.close, lock_fd)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkerError(f"another fastmat worker is using --work {cfg.work}") from None
        self.actions_dir = cfg.work / "actions"
        self._clear_actions()
        self.actions_dir.mkdir(mode=0o755)
        os.chmod(self.actions_dir, 0o755)  # noqa: S103 - actions' users traverse it
        config.check_reachable(self.actions_dir, self.user)
        self.cas = config.open_cas(cfg.cas, max_bytes=cfg.cas_max_bytes, fsync=cfg.fsync)
        st.callback(self.cas.close)
        # Patient retries: a result waiting out a short outage beats running the action
        # again (8 retries from 0.25 s, doubling: about a minute).
        self.remote = RemoteCAS(
            cfg.cas_server or cfg.server, cfg.instance, retries=8, backoff_s=0.25
        )
        st.callback(self.remote.close)
        if self._stager_factory is not None:
            self.stager = self._stager_factory(self.cas, self.remote)
        else:
            self.stager = FastmatStager(
                self.cas, self.remote, cache_dir=cfg.cache, cache_max_bytes=cfg.cache_max_bytes,
                overlay=cfg.overlay, threads=cfg.threads, fsync=cfg.fsync,
            )  # fmt: skip
        st.callback(self.stager.close)
        self._warn_unsafe()
        self.action_log = ActionLog(cfg.json_log)
        st.callback(self.action_log.close)
        self.bots = session.BotsClient(cfg.server, cfg.instance)
        st.callback(self.bots.close)
        self.pool = ThreadPoolExecutor(cfg.jobs, thread_name_prefix="fastmat-lease")
        st.callback(self.pool.shutdown)
        self.ctx = LeaseContext(
            cas=self.cas,
            remote=self.remote,
            stager=self.stager,
            actions_dir=self.actions_dir,
            user=self.user,
            platform=frozenset(cfg.platform),
            worker_name=self.bot_id,
            default_timeout_s=cfg.default_timeout_s,
            log=self.action_log,
        )

    def _clear_actions(self) -> None:
        """Removes a dead predecessor's action directories (unmounting its overlays)."""
        if not self.actions_dir.exists():
            return
        killed = _kill_orphans(self.actions_dir)
        if killed:
            log.warning("killed %d process(es) left running by a previous worker", killed)
        for mnt in _mounts_under(self.actions_dir):
            log.warning("unmounting %s, left by a previous worker", mnt)
            with contextlib.suppress(OSError):
                _binding.umount(mnt, detach=True)
        _binding.remove_tree(self.actions_dir)

    def _warn_unsafe(self) -> None:
        overlay = isinstance(self.stager, FastmatStager) and self.stager.can_overlay()
        if self.user is None and not overlay:
            log.warning(
                "actions run as the worker's own user (uid %d) on hardlinked inputs: an "
                "action can chmod and rewrite an input, and with it the CAS; start the "
                "worker as root (actions then run as --run-as) or with overlay workspaces",
                os.geteuid(),
            )

    # -- the loop -------------------------------------------------------------------

    def run(self) -> None:
        """Runs until drained or stopped. ``WorkerError`` when it cannot start."""
        try:
            self._open()
            self._loop()
        finally:
            with self._mu:
                slots = list(self._slots.values())
            for s in slots:
                if s.runner is not None:
                    s.runner.cancel()
            self._stack.close()

    def _loop(self) -> None:
        backoff = session.Backoff()
        while True:
            self._wake.clear()  # before the request is built: a completion after it wakes
            self._enforce_drain_deadline()
            if self._finished():
                return
            if self._session is None:
                if self._draining:
                    return
                if not self._create(backoff):
                    continue
                backoff.reset()
                continue
            sent, req = self._request()
            t0 = time.monotonic()
            try:
                resp = self._call(self.bots.update(req, self._deadline(), self._progress()))
            except grpc.RpcError as e:
                if self._on_error(e, backoff, "UpdateBotSession"):
                    return
                continue
            if resp is None:
                continue  # cut short: send again with what changed
            backoff.reset()
            changed = self._reconcile(resp, sent)
            if self._finished():
                return
            if time.monotonic() - t0 < _QUICK_S and not changed:
                # the server answered at once (at capacity, draining): don't spin
                self._wake.wait(self.cfg.heartbeat_s)

    def _finished(self) -> bool:
        with self._mu:
            return self._draining and not self._slots and self._session_is_terminating()

    def _session_is_terminating(self) -> bool:
        s = self._session
        return s is None or s.status == wproto.BOT_TERMINATING

    def _enforce_drain_deadline(self) -> None:
        with self._mu:
            if not self._draining or time.monotonic() < self._drain_deadline:
                return
            for slot in self._slots.values():
                if slot.runner is not None and not slot.done and not slot.returning:
                    slot.returning = True
                    slot.runner.cancel()
                    log.warning("returning lease %s to the server", slot.lease.id)

    def _deadline(self) -> float:
        with self._mu:
            busy = bool(self._slots) or self._draining
        if busy:
            return max(session.MIN_LONG_POLL_S + 1, self.cfg.heartbeat_s * 2.5)
        limit = self.cfg.poll_s
        s = self._session
        if s is not None and s.HasField("expire_time"):
            left = s.expire_time.seconds - time.time()
            limit = min(limit, max(session.MIN_LONG_POLL_S + 1, left / 2))
        return limit

    def _poke(self) -> None:
        """Wakes the session loop: a lease finished, or drain / stop was asked."""
        self._wake.set()
        ev = self._call_event
        if ev is not None:
            ev.set()

    def _call(self, future: Any) -> Any:
        """The call's answer, or None when the loop was poked first (the call is then
        cancelled: its answer is not needed, see :mod:`.session`). Only this call's own
        completion or a poke ends the wait: a cancelled call's late callback does not."""
        ev = threading.Event()
        self._call_event = ev
        try:
            if self._wake.is_set():
                ev.set()
            future.add_done_callback(lambda _f: ev.set())
            while not future.done():
                ev.wait()
                ev.clear()
                if not future.done() and self._wake.is_set():
                    future.cancel()
                    return None
            return future.result()
        finally:
            self._call_event = None

    def _on_error(self, e: grpc.RpcError, backoff: session.Backoff, call: str) -> bool:
        """Handles a failed call; True when the worker should exit."""
        code = e.code()
        if code == grpc.StatusCode.CANCELLED:
            return False
        if code in session.LOST and self._session is not None:
            log.warning(
                "bot session %s lost (%s: %s); abandoning its leases, starting a new one "
                "(if this repeats, another worker may be registering bot id %s)",
                self._session.name, code.name, e.details(), self.bot_id,
            )  # fmt: skip
            self._abandon_all()
            self._session = None
            if not self._draining:
                backoff.wait(self._wake)  # a server that keeps forgetting: no hot loop
            return self._draining
        if code in session.RETRY or code in session.LOST:
            if self._draining:
                with self._mu:
                    pending = bool(self._slots)
                if not pending or time.monotonic() > self._drain_deadline + _REPORT_GRACE_S:
                    log.error(
                        "server unreachable while draining (%s); exiting%s", code.name,
                        " with unreported leases (the server re-queues them)" if pending else "",
                    )  # fmt: skip
                    return True
            delay = backoff.wait(self._wake)
            loud = backoff.failures in (1, 5) or backoff.failures % 20 == 0  # ~10 min apart
            level = logging.WARNING if loud else logging.DEBUG
            log.log(level, "%s: %s: %s (retried after %.1f s)", call, code.name, e.details(), delay)
            return False
        if self.sessions_created == 0:
            raise WorkerError(f"{call} on {self.cfg.server}: {code.name}: {e.details()}") from e
        log.error("%s: %s: %s", call, code.name, e.details())
        backoff.wait(self._wake)
        return False

    def _create(self, backoff: session.Backoff) -> bool:
        s = session.new_session(self.bot_id, self.cfg.platform, self.cfg.jobs)
        try:
            # Never cut short (it answers within its few seconds): a session registered
            # by a call this worker gave up on would be given work until it expired.
            resp = self.bots.create(s, session.CREATE_DEADLINE_S).result()
        except grpc.RpcError as e:
            code = e.code()
            if code in session.LOST and self.sessions_created == 0:
                raise WorkerError(
                    f"CreateBotSession on {self.cfg.server} (instance {self.cfg.instance!r}): "
                    f"{code.name}: {e.details()}"
                ) from e
            self._on_error(e, backoff, "CreateBotSession")
            return False
        self._session = resp
        self.sessions_created += 1
        log.info(
            "bot session %s created (bot id %s, %d job(s), platform %s)",
            resp.name, self.bot_id, self.cfg.jobs,
            ", ".join(f"{k}={v}" for k, v in self.cfg.platform) or "none",
        )  # fmt: skip
        self._reconcile(resp, [])
        return True

    def _request(self) -> tuple[list[Any], Any]:
        """What the next update reports: (the leases sent, the session message)."""
        s = wproto.BotSession()
        s.CopyFrom(self._session)
        del s.leases[:]
        with self._mu:
            s.status = wproto.BOT_TERMINATING if self._draining else wproto.BOT_OK
            sent = []
            for slot in self._slots.values():
                if slot.dropped:
                    continue
                lease = wproto.Lease()
                lease.CopyFrom(slot.lease)
                sent.append(lease)
        s.leases.extend(sent)
        return sent, s

    def _progress(self) -> list[tuple[str, bytes]]:
        with self._mu:
            running = [s for s in self._slots.values() if s.runner is not None and not s.done]
        return [
            session.partial_metadata(s.lease.id, s.runner.metadata) for s in running if s.runner
        ]

    def _reconcile(self, resp: Any, sent: list[Any]) -> bool:
        """Applies the server's answer; True if it changed anything (new or cancelled
        leases, or completions acknowledged)."""
        changed = False
        answered = {lease.id: lease for lease in resp.leases}
        reported = {lease.id for lease in sent if lease.state == wproto.LEASE_COMPLETED}
        active = {lease.id for lease in sent if lease.state != wproto.LEASE_COMPLETED}
        session_copy = wproto.BotSession()
        session_copy.CopyFrom(resp)
        del session_copy.leases[:]
        with self._mu:
            self._session = session_copy  # its status: what the server acknowledged
            for lid in reported:
                if self._slots.pop(lid, None) is not None:
                    changed = True
            for lid, slot in list(self._slots.items()):
                gone = lid in active and lid not in answered
                cancelled = lid in answered and answered[lid].state == wproto.LEASE_CANCELLED
                if (gone or cancelled) and not slot.dropped and not slot.done:
                    log.info("lease %s cancelled by the server", lid)
                    slot.dropped = True
                    changed = True
                    if slot.runner is not None:
                        slot.runner.cancel()
                    if slot.future is None or slot.future.done():
                        del self._slots[lid]
            for lid, lease in answered.items():
                if lid in self._slots or lease.state not in (
                    wproto.LEASE_PENDING,
                    wproto.LEASE_ACTIVE,
                ):
                    continue
                changed = True
                self._accept(lease)
        return changed

    def _accept(self, lease: Any) -> None:
        """Starts a new lease (or, when draining, returns it at once). Under ``_mu``."""
        mine = wproto.Lease(id=lease.id, state=wproto.LEASE_ACTIVE)
        slot = _Slot(mine)
        self._slots[lease.id] = slot
        if self._draining:
            self._complete(slot, proto.Status(code=Code.UNAVAILABLE, message="worker draining"))
            self.action_log.write(
                ActionRecord(lease=lease.id, outcome="returned", status="UNAVAILABLE")
            )
            return
        slot.runner = LeaseRunner(self.ctx, lease.id, lease.payload)
        slot.future = self.pool.submit(self._run_lease, slot)

    def _complete(self, slot: _Slot, status: Any, result: Any = None) -> None:
        slot.lease.state = wproto.LEASE_COMPLETED
        slot.lease.status.CopyFrom(status)
        if result is not None:
            slot.lease.result.CopyFrom(wproto.pack(result))

    def _run_lease(self, slot: _Slot) -> LeaseOutcome:
        assert slot.runner is not None
        outcome = slot.runner.run()
        with self._mu:
            if slot.returning:
                outcome.record.outcome = "returned"
                outcome.record.status = "UNAVAILABLE"
                self._complete(slot, proto.Status(code=Code.UNAVAILABLE, message="worker stopping"))
            elif slot.dropped or outcome.result is None:
                self._slots.pop(slot.lease.id, None)
            else:
                self._complete(slot, outcome.status, outcome.result)
        self.action_log.write(outcome.record)
        r = outcome.record
        log.info(
            "lease %s: %s, exit %s, %s/%s staging, %.3f s",
            slot.lease.id, r.outcome, r.exit_code, r.staging or "-", r.cache or "-",
            r.phases_s.get("total", 0.0),
        )  # fmt: skip
        self._poke()
        return outcome

    def _abandon_all(self) -> None:
        with self._mu:
            for lid, slot in list(self._slots.items()):
                slot.dropped = True
                if slot.runner is not None:
                    slot.runner.cancel()
                if slot.future is None or slot.future.done() or slot.done:
                    del self._slots[lid]


def run_until_signalled(worker: Worker) -> None:
    """Runs ``worker`` on a thread while this (the main) thread watches for signals: the
    first SIGTERM / SIGINT drains it, the second returns its running leases at once.

    The handler only records the signal; the main thread acts on it outside the handler
    (a handler that took the worker's locks could deadlock against the code it
    interrupted)."""
    got: list[int] = []
    failure: list[BaseException] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    def body() -> None:
        try:
            worker.run()
        except BaseException as e:
            failure.append(e)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        t = threading.Thread(target=body, name="fastmat-bot")
        t.start()
        handled = 0
        while t.is_alive():
            t.join(0.2)
            while handled < len(got):
                name = signal.Signals(got[handled]).name
                handled += 1
                if handled == 1:
                    log.warning("%s: draining (again to return running leases now)", name)
                    worker.drain()
                else:
                    log.warning("%s: returning running leases now", name)
                    worker.stop()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if failure:
        raise failure[0]
