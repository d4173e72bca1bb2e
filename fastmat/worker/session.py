"""The Remote Workers API as BuildGrid 0.9.1 serves it: the two calls, what a bot
session carries, and what each error means for the session.

Read from BuildGrid's source (``server/bots/service.py``, ``server/scheduler/impl.py``):

- **The session.** ``CreateBotSession(parent=instance)`` registers ``bot_id`` and answers
  the session's ``name``; registering a ``bot_id`` that already has a session first
  closes that one and re-queues its leases (so a restarted worker with the same id gets
  its dead predecessor's work re-queued at once). Capacity is the ``Worker.configs``
  entry ``capacity``; platform properties are the first device's ``properties``.
- **Long polling.** Both calls wait for work while the bot has spare capacity, for 0.8 x
  the call's deadline (capped by the server's keepalive timeout); a deadline under 3.75 s
  (``NETWORK_TIMEOUT`` / 0.8) gets no wait at all. A bot at capacity, or not ``OK``, is
  answered at once. An assignment wakes the wait; a cancellation does not.
- **Leases.** New ones arrive ``ACTIVE`` with an ``Any`` payload packing the ``Action``.
  The bot reports a finished one ``COMPLETED`` with ``status`` and ``result`` (an ``Any``
  packing the ``ActionResult``); ``INTERNAL`` and ``UNAVAILABLE`` re-queue the job (up to
  ``max-job-attempts``), any other code completes it. A lease the server cancelled is
  simply missing from the answer. A lost answer is harmless: the next call with the old
  ``version`` gets the leases again, and a ``COMPLETED`` lease reported twice is ignored.
- **Leaving.** There is no call to close a session: a bot that sends status
  ``BOT_TERMINATING`` gets no more work (the scheduler only assigns to ``OK`` bots, but a
  lease assigned just before may still arrive, to be returned ``UNAVAILABLE``); its
  record expires after the keepalive timeout.
- **Errors.** ``INVALID_ARGUMENT`` ("bot does not exist", session mismatch),
  ``DATA_LOSS`` (session closed) and ``NOT_FOUND`` mean the session is gone (its leases
  were or will be re-queued): start a new one. ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
  ``RESOURCE_EXHAUSTED``, ``INTERNAL`` and ``UNKNOWN`` mean "try again later".
"""

from __future__ import annotations

import random
import socket
import threading
from typing import TYPE_CHECKING, Any

import grpc

from fastmat.remote.channel import Channel
from fastmat.worker import proto as wproto

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "LOST",
    "RETRY",
    "Backoff",
    "BotsClient",
    "new_session",
    "partial_metadata",
]

_BOTS = "/google.devtools.remoteworkers.v1test2.Bots/"
# BuildGrid answers a deadline under NETWORK_TIMEOUT / 0.8 = 3.75 s without long polling
MIN_LONG_POLL_S = 4.0
# CreateBotSession answers at once under that: the worker learns its session name now
CREATE_DEADLINE_S = 3.5

LOST = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND}
)
RETRY = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
    }
)


class BotsClient:
    """The Bots service on ``target`` (no retries here: the worker's loop decides)."""

    def __init__(self, target: str, instance: str) -> None:
        self.target = target
        self.instance = instance
        self.channel = Channel(target, retries=0, backoff_s=0.0)
        ch = self.channel
        self._create = ch.unary_method(
            _BOTS + "CreateBotSession", wproto.CreateBotSessionRequest, wproto.BotSession
        )
        self._update = ch.unary_method(
            _BOTS + "UpdateBotSession", wproto.UpdateBotSessionRequest, wproto.BotSession
        )

    def close(self) -> None:
        self.channel.close()

    def create(self, session: Any, timeout_s: float) -> Any:
        """A future of ``CreateBotSession``."""
        req = wproto.CreateBotSessionRequest(parent=self.instance, bot_session=session)
        return self._create.future(req, timeout=timeout_s)

    def update(
        self, session: Any, timeout_s: float, metadata: Sequence[tuple[str, bytes]] = ()
    ) -> Any:
        """A future of ``UpdateBotSession`` for ``session`` (its ``name`` set)."""
        req = wproto.UpdateBotSessionRequest(name=session.name, bot_session=session)
        return self._update.future(req, timeout=timeout_s, metadata=tuple(metadata) or None)


def new_session(
    bot_id: str, platform: Sequence[tuple[str, str]], capacity: int, host: str | None = None
) -> Any:
    """The ``BotSession`` a worker registers: status OK, one device (this host) with
    the platform properties, and its capacity."""
    s = wproto.BotSession(bot_id=bot_id, status=wproto.BOT_OK)
    dev = s.worker.devices.add(handle=host or socket.gethostname())
    for key, value in platform:
        dev.properties.add(key=key, value=value)
        s.worker.properties.add(key=key, value=value)
    s.worker.configs.add(key="capacity", value=str(capacity))
    return s


def partial_metadata(lease_id: str, metadata: Any) -> tuple[str, bytes]:
    """BuildGrid's per-lease progress header on UpdateBotSession: the execution
    metadata so far (``partial-execution-metadata-<job name>-bin``), which it records
    as the job's timestamps while the action still runs."""
    job = lease_id.rsplit("/", 1)[-1]
    return f"partial-execution-metadata-{job}-bin".lower(), metadata.SerializeToString()


class Backoff:
    """Exponential backoff with jitter, ``first_s`` doubling up to ``max_s``; ``wait``
    returns early when ``wake`` is set."""

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def wait(self, wake: threading.Event) -> float:
        delay = min(self.max_s, self.first_s * 2**self.failures)
        delay *= 0.5 + random.random() / 2  # noqa: S311 - jitter, not crypto
        self.failures += 1
        wake.wait(delay)
        return float(delay)
