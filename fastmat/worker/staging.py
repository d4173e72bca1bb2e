"""Staging an action's input root into its directory.

:class:`FastmatStager` is the worker's: with a directory cache, a workspace of the
cached tree (an overlay mount where the worker may mount, else a hardlinked copy; a miss
builds the entry first, fetching what the local CAS lacks); without one, ``materialize``
straight into the action's directory with the fetch -> link pipeline. Each action gets
its own :class:`~fastmat.remote.RemoteFetcher`, so what it fetched is counted per action
(the cache's fetcher routes each call to the fetcher of the action staging on that
thread: a cache miss is built on the thread of the action that missed).

A :class:`Stager` is anything with ``stage``; the benchmark passes another one (BuildGrid's
own downloader) to the same worker to compare staging alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fastmat import _binding
from fastmat.materialize import materialize
from fastmat.remote import RemoteFetcher

if TYPE_CHECKING:
    from fastmat.cache import DirectoryCache
    from fastmat.cas import LocalCAS
    from fastmat.control import CancelToken
    from fastmat.digest import Digest
    from fastmat.remote import RemoteCAS
    from fastmat.tree import Plan

__all__ = ["FastmatStager", "Staged", "Stager"]


@dataclass(frozen=True)
class Staged:
    """An input root at ``path``: how it was made (``method``: "overlay", "hardlink",
    "materialize", ...), whether a cache held it (``cache``: "hit", "miss" or "none"),
    and what was fetched for it (Directory messages count as blobs)."""

    path: Path
    method: str
    cache: str
    fetched_blobs: int = 0
    fetched_bytes: int = 0


class Stager(Protocol):
    """Puts the tree ``root`` at ``dest`` (which must not exist; its parent does) for the
    ``with`` body and removes it afterwards."""

    name: str

    def stage(
        self, root: Digest, dest: Path, cancel: CancelToken | None = None
    ) -> AbstractContextManager[Staged]: ...

    def close(self) -> None: ...


class _RoutingFetcher:
    """The directory cache's fetcher: each call goes to the fetcher the current thread's
    action set (:meth:`FastmatStager.stage`)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def use(self, fetcher: RemoteFetcher) -> Iterator[None]:
        self._local.fetcher = fetcher
        try:
            yield
        finally:
            self._local.fetcher = None

    def _current(self) -> RemoteFetcher:
        f: RemoteFetcher | None = getattr(self._local, "fetcher", None)
        if f is None:
            raise RuntimeError("cache fetch outside an action's staging")
        return f

    def fetch_directories(self, root: Digest) -> None:
        self._current().fetch_directories(root)

    def fetch_blobs(self, digests: Sequence[Digest]) -> None:
        self._current().fetch_blobs(digests)

    def materialize_plan(self, plan: Plan, dest: str, **options: Any) -> _binding.ExecResult:
        # every option of the PipelinedFetcher protocol, whatever its version, passed on
        return self._current().materialize_plan(plan, dest, **options)


class FastmatStager:
    """fastmat's staging (see the module docstring). With ``cache_dir`` it opens (and
    ``close`` closes) a :class:`~fastmat.cache.DirectoryCache` there, bounded by
    ``cache_max_bytes``; ``overlay=False`` never mounts (hardlinked workspaces)."""

    name = "fastmat"

    def __init__(
        self,
        cas: LocalCAS,
        remote: RemoteCAS,
        *,
        cache_dir: Path | None = None,
        cache_max_bytes: int = 10 << 30,
        overlay: bool | None = None,
        threads: int = 0,
        fsync: bool = True,
    ) -> None:
        from fastmat.cache import DirectoryCache

        self.cas = cas
        self.remote = remote
        self.threads = threads
        self._router = _RoutingFetcher()
        self.cache: DirectoryCache | None = None
        if cache_dir is not None:
            self.cache = DirectoryCache(
                cas, cache_dir, max_bytes=cache_max_bytes, fetcher=self._router,
                threads=threads, fsync=fsync, overlay=overlay,
            )  # fmt: skip

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def can_overlay(self) -> bool:
        return self.cache is not None and self.cache.can_overlay()

    @contextlib.contextmanager
    def stage(
        self, root: Digest, dest: Path, cancel: CancelToken | None = None
    ) -> Iterator[Staged]:
        """``cancel`` set (the lease was cancelled, the worker stops) stops the staging
        between chunks: ``Cancelled``, and nothing is left at ``dest``."""
        with RemoteFetcher(self.remote, self.cas) as fetcher:
            s = fetcher.stats
            if self.cache is None:
                materialize(
                    self.cas, root, dest, fetcher=fetcher, threads=self.threads, cancel=cancel
                )
                try:
                    yield Staged(dest, "materialize", "none", s.blobs + s.directories, s.bytes)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        _binding.remove_tree(dest)
                return
            with self._router.use(fetcher), self.cache.workspace(root, dest, cancel=cancel) as ws:
                cached = "hit" if ws.hit else "miss"
                yield Staged(ws.path, ws.method, cached, s.blobs + s.directories, s.bytes)
