"""The streaming fetch -> link pipeline.

:func:`run_pipelined` is :func:`fastmat.materialize.run_plan` with fetching overlapped:
directories and already-present files are linked first, then each fetched
group is linked (``exec_plan(dirs_exist=True)`` on a sub-plan) while the
other fetches continue.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
import time
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from fastmat import _binding
from fastmat.cas.layout import digest_of_rel
from fastmat.control import Cancelled, CancelToken, Reporter, check_cancel, watching
from fastmat.digest import BlobNotFoundError, Digest, DigestMismatchError
from fastmat.fs.staging import staged
from fastmat.materialize import failure
from fastmat.remote.flight import OnReady
from fastmat.tree.node import OP_COPY, OP_LINK

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS
    from fastmat.remote.stats import FetchStats
    from fastmat.tree import Plan

__all__ = ["StreamingFetcher", "run_pipelined"]


class StreamingFetcher(Protocol):
    """What the pipeline needs from its fetcher (``RemoteFetcher`` is one)."""

    stats: FetchStats

    def fetch_blobs(
        self,
        digests: Sequence[Digest],
        *,
        on_ready: OnReady | None = None,
        cancel: threading.Event | None = None,
    ) -> None: ...


log = logging.getLogger("fastmat")


class _Linker:
    """Links the entries of a plan group by group as their blobs arrive."""

    def __init__(
        self, cas: LocalCAS, plan: Plan, dest: str, dest_fd: int, *, threads: int, inflight: int
    ) -> None:
        self.dest = dest
        self.ctl = _binding.ExecControl()  # shared by every link call: done accumulates
        self.cas = cas
        self.plan = plan
        self.dest_fd = dest_fd
        self.threads = threads
        self.inflight = inflight
        a = plan.arrays
        n = len(a.op)
        self.names = [x + b"\0" for x in a.names.split(b"\0")[:n]]
        srcs = a.srcs.split(b"\0")[:n]
        self.srcs = [x + b"\0" for x in srcs]
        self.dir_names = [x + b"\0" for x in a.dir_names.split(b"\0")[: len(a.dir_parent)]]
        self.by_digest: dict[Digest, list[int]] = {}
        self.exec_digests = set(plan.exec_digests)
        self.no_blob: list[int] = []
        for i, op in enumerate(a.op):
            if op in (OP_LINK, OP_COPY) and srcs[i]:
                self.by_digest.setdefault(digest_of_rel(srcs[i]), []).append(i)
            else:
                self.no_blob.append(i)
        self.status = array("i", [-errno.ECANCELED]) * n
        self.how = bytearray(n)
        self.dir_status = array("i", [0]) * len(a.dir_parent)
        self.rc = 0

    def sub_arrays(self, idx: list[int], all_dirs: bool) -> _binding.PlanArrays:
        """Entries ``idx`` (sorted) with the directories they need (all when first)."""
        a = self.plan.arrays
        if all_dirs:
            dirs = list(range(len(a.dir_parent)))
        else:
            need: set[int] = {0}
            for i in idx:
                d = a.entry_dir[i]
                while d not in need:
                    need.add(d)
                    d = a.dir_parent[d]
            dirs = sorted(need)
        remap = {d: k for k, d in enumerate(dirs)}
        return _binding.PlanArrays(
            dir_parent=array("i", [-1] + [remap[a.dir_parent[d]] for d in dirs[1:]]),
            dir_names=b"".join(self.dir_names[d] for d in dirs),
            op=bytes(a.op[i] for i in idx),
            entry_dir=array("i", [remap[a.entry_dir[i]] for i in idx]),
            mode=array("I", [a.mode[i] for i in idx]),
            mtime_ns=None if a.mtime_ns is None else array("q", [a.mtime_ns[i] for i in idx]),
            names=b"".join(self.names[i] for i in idx),
            srcs=b"".join(self.srcs[i] for i in idx),
            dir_mode=a.dir_mode,
        )

    def link(self, idx: list[int], first: bool) -> None:
        idx.sort()
        sub = self.sub_arrays(idx, first)
        res = _binding.exec_plan(
            self.dest_fd,
            self.cas.root_fd,
            sub,
            threads=self.threads,
            max_inflight=self.inflight,
            dirs_exist=not first,
            tmp_dirfd=self.cas.rotation_fd,
            ctl=self.ctl,
        )
        if res.rc == -errno.ECANCELED and self.ctl.cancelled:
            raise Cancelled(f"materialize of {self.plan.root} at {self.dest} cancelled")
        if first:
            self.dir_status = res.dir_status
        for k, i in enumerate(idx):
            self.status[i] = res.status[k]
            self.how[i] = res.how[k]
        if res.rc != 0:
            self.rc = res.rc
            raise failure(self.plan, self.dest, res, idx)

    def result(self) -> _binding.ExecResult:
        return _binding.ExecResult(
            rc=self.rc, status=self.status, how=bytes(self.how), dir_status=self.dir_status
        )


def run_pipelined(
    cas: LocalCAS,
    plan: Plan,
    dest: str | os.PathLike[str],
    fetcher: StreamingFetcher,
    *,
    threads: int = 0,
    max_inflight: int = 64,
    reporter: Reporter | None = None,
    cancel: CancelToken | None = None,
) -> _binding.ExecResult:
    """``fastmat.materialize.run_plan`` with the missing blobs fetched while linking.

    Builds beside ``dest`` (0755; it must not exist) and publishes it by one rename
    (:mod:`fastmat.fs.staging`): links every directory and every entry whose blob
    is already local, then links each group of fetched blobs as it lands. On any
    failure the fetches are cancelled, ``dest`` never appears and the error is
    raised: ``BlobNotFoundError`` / ``DigestMismatchError`` naming the digest and
    its path in the tree, ``RemoteError``, or the ``OSError`` of the first entry
    that failed. ``reporter`` is told the entries linked; ``cancel`` stops the
    fetches and the links (:class:`~fastmat.control.Cancelled`). Returns the merged
    per-entry result.
    """
    path = os.fspath(dest)
    stop = threading.Event()  # ends the fetches: on a failure, or when cancelled
    fetch_thread: threading.Thread | None = None
    try:
        # Pinned before looking: no process evicts a blob of the plan until the tree is
        # published (one evicted before the pin is missing here, so fetched again).
        with cas.pinned(plan.blobs), staged(path) as st, contextlib.ExitStack() as watch:
            linker = _Linker(cas, plan, path, st.fd, threads=threads, inflight=max_inflight)

            def stop_all() -> None:
                stop.set()
                linker.ctl.cancel()

            watch.enter_context(watching(lambda: linker.ctl.done, stop_all, reporter, cancel))
            missing = set(cas.missing(linker.by_digest))
            ready_q: queue.SimpleQueue[list[Digest] | None] = queue.SimpleQueue()
            errors: list[BaseException] = []

            def on_ready(ds: list[Digest]) -> None:  # runs on the fetch workers
                fetcher.stats.last_fetch_ns = time.monotonic_ns()
                # executable variants made here, in parallel, not on the linker thread
                cas.ensure_executables(d for d in ds if d in linker.exec_digests)
                ready_q.put(ds)

            def fetch() -> None:
                try:
                    fetcher.fetch_blobs(sorted(missing, key=str), on_ready=on_ready, cancel=stop)
                except Cancelled:
                    pass
                except BaseException as e:  # re-raised below
                    errors.append(e)
                finally:
                    ready_q.put(None)

            if missing:  # else the server is not contacted at all
                fetch_thread = threading.Thread(target=fetch, name="fastmat-fetcher", daemon=True)
                fetch_thread.start()
            else:
                ready_q.put(None)
            present = [d for d in linker.by_digest if d not in missing]
            cas.ensure_executables(d for d in present if d in linker.exec_digests)
            idx = list(linker.no_blob)
            for d in present:
                idx.extend(linker.by_digest[d])
            linker.link(idx, first=True)
            first_fetched = True
            while (ds := ready_q.get()) is not None:
                batch = list(ds)
                with contextlib.suppress(queue.Empty):
                    while True:  # coalesce what arrived while the last call ran
                        more = ready_q.get_nowait()
                        if more is None:
                            ready_q.put(None)
                            break
                        batch.extend(more)
                idx = [i for d in batch for i in linker.by_digest[d]]
                linker.link(idx, first=False)
                fetcher.stats.link_calls += 1
                if first_fetched:
                    fetcher.stats.first_link_ns = time.monotonic_ns()
                    first_fetched = False
            if fetch_thread is not None:
                fetch_thread.join()
            watch.close()  # the watcher thread ends here
            check_cancel(cancel, f"materialize of {plan.root} at {path}")
            if errors:
                raise _with_path(errors[0], plan, linker) from errors[0]
            st.publish()
            log.debug(
                "pipelined %s: %d blobs fetched, %d link calls",
                plan.root,
                len(missing),
                fetcher.stats.link_calls,
            )
    except BaseException:
        stop.set()
        if fetch_thread is not None:
            fetch_thread.join()
        raise
    return linker.result()


def _with_path(e: BaseException, plan: Plan, linker: _Linker) -> BaseException:
    """The error with the tree path of its digest, when it names one."""
    if isinstance(e, BlobNotFoundError) and e.path is None and e.digest in linker.by_digest:
        where = plan.path_of_entry(linker.by_digest[e.digest][0])
        return BlobNotFoundError(e.digest, where)
    if isinstance(e, DigestMismatchError) and e.expected in linker.by_digest:
        where = plan.path_of_entry(linker.by_digest[e.expected][0])
        return DigestMismatchError(e.expected, e.actual, f"{e.where}, needed at {where!r}")
    return e
