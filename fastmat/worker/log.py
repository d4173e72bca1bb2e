"""The worker's per-action log: one JSON object per line, one line per lease handled.

Fields of each line (``ActionRecord``): ``time`` (UTC, ISO 8601, when it ended),
``lease``, ``action`` (``hash/size``), ``outcome`` ("ok": ran and reported, whatever its
exit code; "timeout", "cancelled", "refused": platform mismatch or a bad Command,
"returned": given back to the server at shutdown, "error": the worker failed),
``exit_code``, ``status`` (the gRPC code name reported with the lease), ``message``,
``staging`` ("overlay", "hardlink", "materialize", ...), ``cache`` ("hit", "miss",
"none"), ``phases_s`` (``fetch_action``, ``stage``, ``execute``, ``upload``, ``total``),
``fetched`` / ``uploaded`` (``blobs``, ``bytes``) and ``outputs`` (files, bytes).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

__all__ = ["ActionLog", "ActionRecord"]


@dataclass
class ActionRecord:
    """One line of the log (see the module docstring)."""

    lease: str
    action: str = ""
    outcome: str = "error"
    exit_code: int | None = None
    status: str = "OK"
    message: str = ""
    staging: str = ""
    cache: str = ""
    phases_s: dict[str, float] = field(default_factory=dict)
    fetched: dict[str, int] = field(default_factory=lambda: {"blobs": 0, "bytes": 0})
    uploaded: dict[str, int] = field(default_factory=lambda: {"blobs": 0, "bytes": 0})
    outputs: dict[str, int] = field(default_factory=lambda: {"files": 0, "bytes": 0})

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases_s"] = {k: round(v, 6) for k, v in self.phases_s.items()}
        return {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **d}


class ActionLog:
    """Appends records to ``path`` ("-": standard output), a line at a time (each line
    written whole, under a lock, and flushed); None keeps nothing."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._f: IO[str] | None = None
        self._own = False
        if path is not None and str(path) == "-":
            import sys

            self._f = sys.stdout
        elif path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            self._f = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
            self._own = True

    def write(self, rec: ActionRecord) -> None:
        if self._f is None:
            return
        line = json.dumps(rec.to_json(), separators=(",", ":")) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()

    def close(self) -> None:
        if self._own and self._f is not None:
            self._f.close()
        self._f = None
