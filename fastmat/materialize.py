"""Materializing a validated tree from the local CAS into a new directory.

``materialize`` validates the tree and limits first, then creates ``dest``
(0755) and runs the whole plan in one native call, which checks every blob's
presence before creating anything inside ``dest`` (``check_srcs``). On any
failure ``dest`` is removed entirely and the first failing entry's
``OSError`` (or ``BlobNotFoundError``) is raised with its path
(invariants 10-12, docs/design.md).

A fetcher is anything with the :class:`~fastmat.tree.Fetcher` methods. Two optional
protocols let a remote client do better without this module knowing it: a
:class:`FetcherSource` (``RemoteCAS``) makes a fetcher bound to the local CAS, and a
:class:`PipelinedFetcher` (``RemoteFetcher``) links files while their blobs arrive.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fastmat import _binding
from fastmat.cas.layout import digest_of_rel
from fastmat.control import Cancelled, CancelToken, ProgressFn, Reporter, check_cancel, watching
from fastmat.digest import BlobNotFoundError, Digest
from fastmat.fs.staging import staged
from fastmat.tree import Fetcher, Plan, TreeLimits, load_plan

if TYPE_CHECKING:
    from fastmat.cas import LocalCAS

__all__ = [
    "FetcherSource",
    "MaterializeStats",
    "PipelinedFetcher",
    "check_blobs",
    "failure",
    "materialize",
    "run_plan",
]


@runtime_checkable
class PipelinedFetcher(Fetcher, Protocol):
    """A fetcher that builds the tree itself, linking files as their blobs land."""

    def materialize_plan(
        self,
        plan: Plan,
        dest: str,
        *,
        threads: int,
        max_inflight: int,
        reporter: Reporter | None = None,
        cancel: CancelToken | None = None,
    ) -> _binding.ExecResult:
        """Creates ``dest`` and executes ``plan`` into it, fetching what is missing
        meanwhile; ``dest`` never appears on failure (see :func:`run_plan`)."""


@runtime_checkable
class FetcherSource(Protocol):
    """A remote store that makes a fetcher into a given local CAS (``RemoteCAS``)."""

    def fetcher(self, cas: LocalCAS) -> ClosingFetcher:
        """A fetcher storing into ``cas``; ``materialize`` closes it when done."""


class ClosingFetcher(Fetcher, Protocol):
    def close(self) -> None:
        """Releases what the fetcher holds (lock fds)."""


log = logging.getLogger("fastmat")

_H = _binding


@dataclass
class MaterializeStats:
    """What one ``materialize`` call did.

    ``files`` counts regular files (links, copies, empty files), ``directories``
    includes ``dest`` itself, ``bytes`` is the tree's file bytes. ``linked`` /
    ``reflinked`` / ``copied`` say how each file was made (NodeProperties
    files are private reflinks or copies; empty files are none of these);
    ``rotated`` counts EMLINK inode rotations, ``cross_device`` EXDEV
    fallbacks, ``link_denied`` EPERM ones (a CAS file another user owns under
    ``fs.protected_hardlinks``): each a private reflink or copy. ``plan_s`` is
    the Python side (load, validate, checks), ``exec_s`` the native call.
    """

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    linked: int = 0
    reflinked: int = 0
    copied: int = 0
    rotated: int = 0
    cross_device: int = 0
    link_denied: int = 0
    duration_s: float = 0.0
    plan_s: float = 0.0
    exec_s: float = 0.0


_FLAGS = (_H.FM_HOW_ROTATED, _H.FM_HOW_XDEV, _H.FM_HOW_DENIED)
# every combination of the flags
_FLAG_SETS = tuple(sum(f for k, f in enumerate(_FLAGS) if bits >> k & 1) for bits in range(8))


def _histogram(how: bytes) -> dict[int, int]:
    """FM_HOW_* value -> count (methods 0-5 with any of the ROTATED / XDEV / DENIED
    flags)."""
    out = {}
    for method in range(_H.FM_HOW_CREATE + 1):
        for flag in _FLAG_SETS:
            n = how.count(method | flag)
            if n:
                out[method | flag] = n
    return out


def _missing(cas: LocalCAS, blobs: list[bytes]) -> list[bytes]:
    fd = cas.root_fd
    return [b for b in blobs if not os.access(b, os.F_OK, dir_fd=fd, follow_symlinks=False)]


def _not_found(plan: Plan, blob: bytes) -> BlobNotFoundError:
    return BlobNotFoundError(digest_of_rel(blob), plan.path_of_entry(plan.entry_of_blob(blob)))


def _private_executables(cas: LocalCAS, plan: Plan) -> Plan:
    """On a read-only CAS (which cannot make variants): ``plan`` with the executables
    whose variant is absent as private 0555 copies of their blobs."""
    lacking = cas.missing_variants(plan.exec_digests) if plan.exec_digests else []
    if not lacking:
        return plan
    log.info(
        "read-only CAS %s lacks %d executable variant(s): private copies in the tree",
        cas.root,
        len(lacking),
    )
    return plan.with_private_executables({cas.exec_relpath(d).encode() for d in lacking})


def _fetch_impossible(cas: LocalCAS, plan: Plan) -> None:
    """On a read-only CAS, which cannot store what a fetcher brings: raises
    ``ReadOnlyCASError`` (naming the first missing blob and its tree path) before
    anything is downloaded, if a blob is missing."""
    absent = _missing(cas, plan.blob_list())
    if absent:
        first = _not_found(plan, absent[0])
        cas.require_writable(
            f"fetch {len(absent)} missing blob(s) into it (the first: {first.digest} "
            f"at {first.path!r})"
        )


def check_blobs(
    cas: LocalCAS, plan: Plan, fetcher: Fetcher | None = None, *, presence: bool = True
) -> Plan:
    """Raises ``BlobNotFoundError`` (digest, tree path) unless every blob the plan
    reads is in the local CAS, asking ``fetcher`` once for the missing ones; then
    makes the executable variants the plan links. ``presence=False`` skips the
    presence check (one ``faccessat`` per distinct blob) and only makes the variants.

    Returns the plan to run: ``plan``, or on a read-only CAS lacking some variants
    (it cannot make them) the plan with those executables as private 0555 copies of
    their blobs in the destination (counted as copies in ``MaterializeStats``)."""
    absent = _missing(cas, plan.blob_list()) if presence else []
    if absent and fetcher is not None:
        fetcher.fetch_blobs([digest_of_rel(b) for b in absent])
        absent = _missing(cas, absent)
    if absent:
        raise _not_found(plan, absent[0])
    if cas.read_only:
        plan = _private_executables(cas, plan)
    elif plan.exec_digests:
        try:
            cas.ensure_executables(plan.exec_digests)
        except BlobNotFoundError as e:
            raise _not_found(plan, cas.relpath(e.digest).encode()) from None
    return plan


def _blob_failure(cas: LocalCAS, plan: Plan, res: _binding.ExecResult) -> Exception | None:
    """The error about the CAS when the first failing entry is a LINK / COPY whose CAS
    file is the cause: ``BlobNotFoundError`` (digest, tree path) when it is absent, an
    ``OSError`` naming it when it is not a regular file (replaced by a symlink or
    something else after any check: the link check refused it)."""
    i = _first_failure(res.status)
    if i is None or plan.arrays.op[i] not in (_H.FM_OP_LINK, _H.FM_OP_COPY):
        return None
    rc = res.status[i]
    src = plan.arrays.srcs.split(b"\0")[i]
    if rc in (-errno.ELOOP, -errno.EINVAL) and plan.arrays.op[i] == _H.FM_OP_LINK:
        where = os.path.join(cas.root, os.fsdecode(src))
        why = f"CAS file is not a regular file (needed at {plan.path_of_entry(i)!r}); run verify"
        return OSError(-rc, f"{os.strerror(-rc)}: {why}", where)
    if rc != -errno.ENOENT or os.access(src, os.F_OK, dir_fd=cas.root_fd, follow_symlinks=False):
        return None  # ENOENT for another reason (the destination vanished)
    return _first_absent(cas, plan, i)


def _first_absent(cas: LocalCAS, plan: Plan, last: int) -> BlobNotFoundError:
    """The error for the first LINK / COPY entry in plan order, up to entry ``last``
    (whose CAS file is absent), whose CAS file is absent. With several threads, which
    missing blob a thread met first is timing; the error names the tree's first."""
    a = plan.arrays
    srcs = a.srcs.split(b"\0")
    present: dict[bytes, bool] = {}
    for k in range(last):
        if a.op[k] not in (_H.FM_OP_LINK, _H.FM_OP_COPY):
            continue
        src = srcs[k]
        if src not in present:
            present[src] = os.access(src, os.F_OK, dir_fd=cas.root_fd, follow_symlinks=False)
        if not present[src]:
            last = k
            break
    return BlobNotFoundError(digest_of_rel(srcs[last]), plan.path_of_entry(last))


def _first_failure(status: Sequence[int]) -> int | None:
    """The index of the first real failure (not -ECANCELED: never attempted)."""
    return next((i for i, rc in enumerate(status) if rc < 0 and rc != -errno.ECANCELED), None)


def failure(
    plan: Plan, dest: str, res: _binding.ExecResult, entries: Sequence[int] | None = None
) -> OSError:
    """The OSError of the first failing directory or entry, with its full path.

    ``entries``: the plan indices of ``res``'s entries when it ran a sub-plan of them
    (its directories count only when they are all of the plan's, in plan order).
    """
    rel: str | None = None
    if len(res.dir_status) == plan.n_dirs:
        d = next(
            (d for d, rc in enumerate(res.dir_status) if rc < 0 and rc != -errno.ECANCELED), None
        )
        rel = None if d is None else plan.path_of_dir(d)
    if rel is None:
        idx = range(len(res.status)) if entries is None else entries
        k = next((k for k, rc in enumerate(res.status) if rc < 0 and rc != -errno.ECANCELED), None)
        rel = plan.path_of_entry(idx[k]) if k is not None else ""
    err = -res.rc
    full = os.path.join(dest, rel) if rel else dest
    return OSError(err, f"{os.strerror(err)} (materializing {rel or '.'!r})", full)


def run_plan(
    cas: LocalCAS,
    plan: Plan,
    dest: str | os.PathLike[str],
    *,
    threads: int = 0,
    max_inflight: int = 64,
    check_srcs: bool = False,
    reporter: Reporter | None = None,
    cancel: CancelToken | None = None,
) -> _binding.ExecResult:
    """Executes ``plan`` into a new directory beside ``dest`` and publishes it as
    ``dest`` (0755; it must not exist) by one rename (:mod:`fastmat.fs.staging`).
    Executable variants must exist (:func:`check_blobs`, ``presence=False`` is
    enough). Blobs are linked optimistically; ``check_srcs`` checks every one
    natively before creating anything. ``reporter`` is told the entries done,
    ``cancel`` stops the native call between chunks (:class:`Cancelled`). On any
    failure ``dest`` never appears and the first failure is raised:
    ``BlobNotFoundError`` (digest, tree path) for an absent blob, else ``OSError``
    with the full path."""
    path = os.fspath(dest)
    ctl = _binding.ExecControl()
    with staged(path) as st:
        with watching(lambda: ctl.done, ctl.cancel, reporter, cancel):
            res = _binding.exec_plan(
                st.fd,
                cas.root_fd,
                plan.arrays,
                threads=threads,
                max_inflight=max_inflight,
                tmp_dirfd=cas.rotation_fd,
                check_srcs=check_srcs,
                ctl=ctl,
            )
        if res.rc == -errno.ECANCELED and ctl.cancelled:
            raise Cancelled(f"materialize of {plan.root} at {path} cancelled")
        if res.rc != 0:
            raise _blob_failure(cas, plan, res) or failure(plan, path, res)
        st.publish()
    if reporter is not None:
        reporter.set(ctl.done)
    return res


def _check_dest(dest: str) -> None:
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, "materialize destination exists", dest)
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise FileNotFoundError(errno.ENOENT, "parent of the destination is missing", parent)


def materialize(
    cas: LocalCAS,
    root: Digest | str,
    dest: str | os.PathLike[str],
    *,
    fetcher: Fetcher | FetcherSource | None = None,
    threads: int = 0,
    max_inflight: int = 64,
    limits: TreeLimits | None = None,
    check_blobs_first: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> MaterializeStats:
    """Builds the tree ``root`` (a ``Digest`` or ``"hash/size"``) at ``dest`` (which must
    not exist; its parent must).

    Directories 0755; plain files hardlinked to the CAS blob, executables to its
    shared 0555 variant; empty files fresh read-only inodes; symlinks verbatim;
    NodeProperties on private inodes (``unix_mode & 0o777`` wins over
    ``is_executable``; mtime to the nanosecond). The tree is validated before anything is
    created; it is built beside ``dest`` and published by one rename, so ``dest`` is
    absent or complete for every observer, also after a crash. ``threads`` 0 = one per
    core; at most ``max_inflight`` entries in flight.

    ``fetcher``: missing Directory messages and blobs come from it. Any object
    with the ``fastmat.tree.Fetcher`` methods is asked once for what is missing
    before anything is created. A ``RemoteCAS`` (or a ``RemoteFetcher``)
    instead overlaps fetching and linking (:class:`PipelinedFetcher`): present
    files are linked while the rest arrive; ``dest`` is still removed on failure.

    Without a fetcher, blobs are linked optimistically: a missing one fails its link,
    the unpublished tree is discarded and ``BlobNotFoundError`` names it (digest and
    tree path). ``check_blobs_first=True`` checks every blob natively first (one
    ``fstatat`` per file) so that a missing blob costs no work; without a fetcher
    only.

    ``progress`` is called with :class:`~fastmat.control.Progress` (entries done of
    the tree's entries) at most every 0.1 s and once at the end; ``cancel`` (e.g. a
    ``threading.Event``) stops the work soon after it is set: :class:`Cancelled`,
    nothing at ``dest``.

    Raises ``FileExistsError`` / ``FileNotFoundError`` (dest), ``InvalidTreeError``,
    ``DigestMismatchError``, ``BlobNotFoundError``, ``Cancelled``, or the ``OSError``
    of the first entry that failed (``dest`` never appears).
    """
    t0 = time.perf_counter()
    root = Digest.coerce(root)
    if threads < 0 or max_inflight < 1:
        raise ValueError(f"threads must be >= 0 and max_inflight >= 1: {threads}, {max_inflight}")
    path = os.fspath(dest)
    _check_dest(path)
    owned: ClosingFetcher | None = None
    f: Fetcher | None
    if isinstance(fetcher, FetcherSource):
        f = owned = fetcher.fetcher(cas)  # a RemoteCAS: a RemoteFetcher
    else:
        f = fetcher
    try:
        check_cancel(cancel, "materialize")
        plan = load_plan(cas, root, fetcher=f, limits=limits)
        check_cancel(cancel, "materialize")
        if f is not None and cas.read_only:
            _fetch_impossible(cas, plan)
        reporter = Reporter(progress, "materialize", plan.arrays.n_entries, "entries")
        if isinstance(f, PipelinedFetcher):
            if cas.read_only:
                plan = _private_executables(cas, plan)
            t1 = time.perf_counter()
            res = f.materialize_plan(
                plan,
                path,
                threads=threads,
                max_inflight=max_inflight,
                reporter=reporter,
                cancel=cancel,
            )
        else:
            # Pinned before the checks: no process evicts a blob the plan links until
            # it is linked (issue 11; the pipelined fetcher pins by itself).
            with cas.pinned(plan.blobs):
                plan = check_blobs(cas, plan, f, presence=f is not None)
                t1 = time.perf_counter()
                res = run_plan(
                    cas,
                    plan,
                    path,
                    threads=threads,
                    max_inflight=max_inflight,
                    check_srcs=f is None and check_blobs_first,
                    reporter=reporter,
                    cancel=cancel,
                )
        reporter.finish()
    finally:
        if owned is not None:
            owned.close()
    t2 = time.perf_counter()
    hist = _histogram(res.how)

    def method(m: int) -> int:
        return sum(n for v, n in hist.items() if v & _H.FM_HOW_METHOD_MASK == m)

    def flag(f: int) -> int:
        return sum(n for v, n in hist.items() if v & f)

    stats = MaterializeStats(
        files=plan.n_files,
        directories=plan.n_dirs,
        symlinks=plan.n_symlinks,
        bytes=plan.n_bytes,
        linked=method(_H.FM_HOW_LINK),
        reflinked=method(_H.FM_HOW_REFLINK),
        copied=method(_H.FM_HOW_COPY),
        rotated=flag(_H.FM_HOW_ROTATED),
        cross_device=flag(_H.FM_HOW_XDEV),
        link_denied=flag(_H.FM_HOW_DENIED),
        duration_s=t2 - t0,
        plan_s=t1 - t0,
        exec_s=t2 - t1,
    )
    log.debug("materialized %s at %s: %s", root, path, stats)
    return stats
