"""Progress bars for the command line: drawn on stderr, only when stdout is a terminal.

A run whose output is piped or captured (scripts, CI, ``--json``) stays silent, so
progress never mixes with machine-readable output.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from fastmat.control import Progress as Report

_REDRAW_S = 0.1
_BAR_WIDTH = 28


def enabled_by_default() -> bool:
    """True when stdout and stderr are terminals (an interactive session)."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class Progress:
    """A counted bar (``total`` known) or a spinner with elapsed time (``total=None``).

    Use as a context manager; ``advance()`` is cheap (redraws at most every 0.1 s)
    and thread-safe. A spinner redraws from a background thread so long calls that
    report nothing still show that work is going on. :meth:`report` is a library
    ``progress=`` callback: it shows the phase and counts in the report's unit.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        enabled: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.label = self.base = label
        self.total = total
        self.unit = ""
        self.done = 0
        self.enabled = enabled_by_default() if enabled is None else enabled
        self._stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        if self.enabled:
            self._draw(force=True)
            self._thread = threading.Thread(target=self._tick, name="fastmat-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def set_label(self, label: str) -> None:
        with self._lock:
            self.label = label
        self._draw(force=True)

    def update(self, label: str, done: int, total: int | None) -> None:
        """Sets the label and the count (a callback for library progress reports)."""
        with self._lock:
            changed = label != self.label
            self.label, self.done, self.total = label, done, total
        self._draw(force=changed)

    def report(self, p: Report) -> None:
        """A ``progress=`` callback: the bar shows ``p``'s phase, count and total (the
        bar's own total when the report has none, e.g. files counted beforehand)."""
        with self._lock:
            label = f"{self.base}: {p.what}"
            changed = label != self.label
            self.label, self.done, self.unit = label, p.done, p.unit
            if p.total is not None:
                self.total = p.total
            last = bool(self.total) and self.done >= (self.total or 0)
        self._draw(force=changed or last)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
        self._draw()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.enabled:
            with self._lock:
                self._stream.write("\r\x1b[2K")
                self._stream.flush()
            self.enabled = False

    def _tick(self) -> None:
        while not self._stop.wait(_REDRAW_S * 2):
            self._draw(force=True)

    def _draw(self, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_draw < _REDRAW_S:
                return
            self._last_draw = now
            elapsed = now - self._start
            done = _count(self.done, self.unit)
            if self.total:
                frac = min(1.0, self.done / self.total)
                filled = int(frac * _BAR_WIDTH)
                bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
                total = _count(self.total, self.unit)
                line = f"{self.label} [{bar}] {done}/{total} {elapsed:5.1f}s"
            else:
                spin = "|/-\\"[int(elapsed / _REDRAW_S) % 4]
                count = f" {done}" if self.done else ""
                line = f"{self.label} {spin}{count} {elapsed:5.1f}s"
            self._stream.write("\r\x1b[2K" + line)
            self._stream.flush()


def _count(n: int, unit: str) -> str:
    """``n`` for a bar: bytes in binary units, anything else with thousands separators."""
    if unit != "bytes":
        return f"{n:,}"
    size = float(n)
    for u in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {u}" if u == "B" else f"{size:.1f} {u}"
        size /= 1024
    return f"{size:.1f} TiB"
