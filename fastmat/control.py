"""Progress reports and cancellation, shared by every long operation.

A caller passes ``progress=`` (a callable taking a :class:`Progress`) and/or
``cancel=`` (anything with ``is_set()``, e.g. a ``threading.Event``). Reports are
made from Python at a bounded rate (:class:`Reporter`: at most every
``interval_s``, plus a last one at the end), never once per file from the C core:
the executor only bumps a counter that a watcher thread reads
(:func:`watching`). A cancelled operation raises :class:`Cancelled` and leaves
what a failure leaves: nothing at the destination.

A progress callback may itself raise (:class:`Cancelled`, say) to abort the operation
reporting to it: :func:`stopping` makes such a callback from a cancel token, for the
operations that take no ``cancel=`` (``ingest_tree``, ``LocalCAS.verify``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from fastmat.errors import FastmatError

__all__ = [
    "CancelToken",
    "Cancelled",
    "Progress",
    "ProgressFn",
    "Reporter",
    "check_cancel",
    "stopping",
    "watching",
]

_INTERVAL_S = 0.1
_WATCH_S = 0.02  # how often a watcher looks at the cancel token


@dataclass(frozen=True)
class Progress:
    """Where an operation is: ``done`` of ``total`` (None: not known) ``unit``
    ("entries", "bytes", "files", "items") in phase ``what``: "materialize" (entries
    linked, also a cache miss's construction), "replay" (a cache hit's copy, entries),
    "ingest" (files stored), "verify" (CAS bytes hashed), "verify entries" (cache
    entries checked), "gc" (trashed trees deleted)."""

    what: str
    done: int
    total: int | None
    unit: str

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.done / self.total)


ProgressFn = Callable[[Progress], None]


class CancelToken(Protocol):
    """What ``cancel=`` takes: ``threading.Event`` is one."""

    def is_set(self) -> bool: ...


class Cancelled(FastmatError):
    """The operation was cancelled through its ``cancel`` token; nothing half-done
    was left behind."""


def check_cancel(cancel: CancelToken | None, what: str) -> None:
    """Raises :class:`Cancelled` when ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled")


def stopping(progress: ProgressFn | None, cancel: CancelToken | None) -> ProgressFn | None:
    """A progress callback that raises :class:`Cancelled` once ``cancel`` is set, then
    passes the report on to ``progress``: cancels an operation at its next report
    (every 0.1 s at most) through its ``progress=`` alone."""
    if cancel is None:
        return progress

    def report(p: Progress) -> None:
        check_cancel(cancel, p.what)
        if progress is not None:
            progress(p)

    return report


class Reporter:
    """Calls ``fn`` with :class:`Progress` at most every ``interval_s`` (thread-safe)."""

    def __init__(
        self,
        fn: ProgressFn | None,
        what: str,
        total: int | None,
        unit: str,
        *,
        interval_s: float = _INTERVAL_S,
    ) -> None:
        self.fn, self.what, self.total, self.unit = fn, what, total, unit
        self.interval_s = interval_s
        self.done = 0
        self._last = 0.0
        self._mu = threading.Lock()

    def add(self, n: int) -> None:
        """``n`` more done; reports if the interval has passed."""
        with self._mu:
            self.done += n
        self._maybe()

    def set(self, done: int) -> None:
        with self._mu:
            self.done = done
        self._maybe()

    def finish(self) -> None:
        """The last report (always made, at ``done``)."""
        if self.fn is not None:
            self.fn(Progress(self.what, self.done, self.total, self.unit))

    def _maybe(self) -> None:
        if self.fn is None:
            return
        now = time.monotonic()
        with self._mu:
            if now - self._last < self.interval_s:
                return
            self._last = now
            report = Progress(self.what, self.done, self.total, self.unit)
        self.fn(report)


@contextlib.contextmanager
def watching(
    poll: Callable[[], int],
    stop: Callable[[], None],
    reporter: Reporter | None,
    cancel: CancelToken | None,
) -> Iterator[None]:
    """For the duration of a blocking native call: a thread that reports
    ``poll()`` through ``reporter`` and calls ``stop()`` once ``cancel`` is set.
    A progress callback that raises stops the call too, and its exception is raised
    here, in the caller's thread, once the call has returned. No thread when there is
    nothing to watch."""
    if (reporter is None or reporter.fn is None) and cancel is None:
        yield
        return
    finished = threading.Event()
    failed: list[BaseException] = []

    def watch() -> None:
        while not finished.wait(_WATCH_S):
            if cancel is not None and cancel.is_set():
                stop()
            if reporter is not None:
                try:
                    reporter.set(poll())
                except BaseException as e:  # the callback's: the caller gets it
                    failed.append(e)
                    stop()
                    return

    t = threading.Thread(target=watch, name="fastmat-watch", daemon=True)
    t.start()
    try:
        yield
    except BaseException:
        finished.set()
        t.join()
        if failed:
            raise failed[0] from None  # what stopped the call, rather than its Cancelled
        raise
    finished.set()
    t.join()
    if failed:
        raise failed[0]
