"""Deleting trees off the caller's thread: rename into a trash directory (cheap, under
whatever lock the caller holds), then a background thread removes it (invariant 7)."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from fastmat import _binding
from fastmat.fs.owned import unique

log = logging.getLogger("fastmat")


def to_trash(src_dirfd: int, name: str, trash: Path) -> Path | None:
    """Renames ``name`` into the trash under a unique name; None if it is gone."""
    dst = trash / unique(f"{name[:200]}.")  # a whole entry key: see cache.mounts
    try:
        os.rename(name, dst, src_dir_fd=src_dirfd)
    except FileNotFoundError:
        return None
    return dst


class Trasher:
    """A background thread deleting trashed trees with ``remove_tree``, off every lock.

    ``remove_tree`` never chmods a file (only directories it has to empty), so deleting an
    evicted entry can never change the mode of a CAS inode another tree still links.
    """

    def __init__(self) -> None:
        self._q: queue.Queue[Path | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._mu = threading.Lock()
        self.deleted = 0
        self.queued = 0

    def put(self, path: Path) -> None:
        with self._mu:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fastmat-cache-trash", daemon=True
                )
                self._thread.start()
            self.queued += 1
        self._q.put(path)

    def _run(self) -> None:
        while (path := self._q.get()) is not None:
            try:
                _binding.remove_tree(path)
                self.deleted += 1
            except FileNotFoundError:
                pass  # another process sweeping the same trash got there first
            except OSError as e:
                log.warning("trash: cannot remove %s: %s", path, e)
            finally:
                self._q.task_done()

    def drain(
        self,
        *,
        report: Callable[[int, int], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Waits until everything queued so far is deleted; True then. ``report(done,
        total)`` is called now and then (queued items, counted since this trasher
        started); ``stop()`` True ends the wait early (False returned)."""
        if report is None and stop is None:
            self._q.join()
            return True
        q = self._q
        while True:
            with q.all_tasks_done:  # Queue's documented condition and count
                if q.unfinished_tasks:
                    q.all_tasks_done.wait(0.05)
                left = q.unfinished_tasks
            if report is not None:
                report(self.queued - left, self.queued)
            if not left:
                return True
            if stop is not None and stop():
                return False

    def abandon(self) -> int:
        """Drops what is queued and not started (it stays in the trash, where the next
        opener of the cache finds it again); returns how many."""
        n = 0
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._q.get_nowait()
                if item is None:  # close()'s sentinel: keep it
                    self._q.task_done()
                    self._q.put(None)
                    break
                self._q.task_done()
                n += 1
        return n

    def close(self) -> None:
        with self._mu:
            t, self._thread = self._thread, None
        if t is not None:
            self._q.put(None)
            t.join()
