"""The verbs of the ``fastmat`` command: each returns (exit status, JSON payload, text).

``fastmat.cli`` parses the arguments and prints; nothing here prints except a held
workspace's banner, a workspace's warning and the progress bars (on stderr, on a
terminal only), and nothing here exits. Each verb passes ``args.cancel`` (set by the
first SIGINT / SIGTERM) to the library calls it makes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastmat.cli.progress import Progress
from fastmat.control import ProgressFn, check_cancel, stopping
from fastmat.digest import Digest
from fastmat.errors import FastmatError

if TYPE_CHECKING:
    from fastmat.cache import DirectoryCache
    from fastmat.cas import LocalCAS

_NO_BOUND = 1 << 62
ROOT_HARDLINK_WARNING = (
    "fastmat: warning: no overlay could be mounted: the workspace at {dest} is hardlinked "
    "to the CAS, and an action running as root writes through its read-only inputs into "
    "the CAS and every tree that shares them. Run the action as another user, or where "
    "overlays can be mounted (see the README, 'Root actions and the CAS')."
)


_FORWARD_AFTER_S = 0.2  # a command still running this long after a signal is sent it


class UsageError(Exception):
    """A bad combination of arguments argparse cannot see (exit status 2)."""


class Interrupt(threading.Event):
    """The verbs' cancel token, set by the command's first SIGINT / SIGTERM, which it
    records (``signum``; 0 while unset)."""

    signum = 0

    def fire(self, signum: int) -> None:
        self.signum = signum
        self.set()


Outcome = tuple[int, dict[str, Any], str]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def jsonable(obj: Any) -> Any:
    """Dataclasses, digests and paths as plain JSON values."""
    if isinstance(obj, (Digest, Path)):
        return str(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _bars(args: argparse.Namespace) -> bool | None:
    return False if args.json else None  # None: when stdout is a terminal


def _shown(bar: Progress) -> ProgressFn | None:
    """The bar as a library ``progress=`` callback, if it is drawn at all."""
    return bar.report if bar.enabled else None


def _cancel(args: argparse.Namespace) -> Interrupt | None:
    token = getattr(args, "cancel", None)
    return token if isinstance(token, Interrupt) else None


def _count_files(top: Path) -> int:
    """Regular files under ``top`` (no symlink followed): an ingest bar's total."""
    n, todo = 0, [str(top)]
    while todo:
        with contextlib.suppress(OSError), os.scandir(todo.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    n += 1
    return n


def _open_cas(path: Path, *, create: bool = False) -> LocalCAS:
    """Opens the CAS; only verbs that fill it (ingest, a remote fetch) may create it, so
    a mistyped --cas is an error, not a new empty store."""
    from fastmat.cas import LocalCAS

    try:
        return LocalCAS(path, create=create)
    except FileNotFoundError as e:
        if create or e.filename != str(path.absolute()):
            raise
        why = "no CAS here (fastmat ingest creates one)"
        raise FileNotFoundError(errno.ENOENT, why, str(path)) from None


def cmd_ingest(args: argparse.Namespace) -> Outcome:
    from fastmat.cas import LocalCAS
    from fastmat.tree import ingest_tree, load_plan

    src = Path(args.src)
    with LocalCAS(args.cas, fsync=not args.no_fsync) as cas:
        with Progress(f"ingesting {src}", enabled=_bars(args)) as bar:
            if bar.enabled:  # a terminal: count the files first, for a real bar
                bar.total = _count_files(src)
            root = ingest_tree(cas, src, progress=stopping(_shown(bar), _cancel(args)))
        plan = load_plan(cas, root)
    payload = {
        "root": str(root),
        "hash": root.hash,
        "size_bytes": root.size_bytes,
        "files": plan.n_files,
        "directories": plan.n_dirs,
        "symlinks": plan.n_symlinks,
        "bytes": plan.n_bytes,
    }
    text = (
        f"ingested {plan.n_files:,} files, {plan.n_dirs:,} directories, "
        f"{plan.n_symlinks:,} symlinks ({human_bytes(plan.n_bytes)})\n{root}"
    )
    return 0, payload, text


def cmd_materialize(args: argparse.Namespace) -> Outcome:

    command: list[str] = args.command
    if command and not args.workspace:
        raise UsageError("a command after DEST needs --workspace")
    if args.workspace and args.cache is None:
        raise UsageError("--workspace needs --cache DIR (a workspace is a view of a cache entry)")
    dest = Path(args.dest)
    with contextlib.ExitStack() as stack:
        cas = stack.enter_context(_open_cas(args.cas, create=args.remote is not None))
        fetcher = None
        if args.remote is not None:
            from fastmat.remote import RemoteCAS, RemoteFetcher

            try:
                remote = stack.enter_context(RemoteCAS(args.remote, args.instance_name))
            except ValueError as e:  # a malformed URL is a usage error
                raise UsageError(str(e)) from e
            fetcher = stack.enter_context(RemoteFetcher(remote, cas))
        bar = stack.enter_context(Progress(f"materializing {dest}", enabled=_bars(args)))
        progress, cancel = _shown(bar), _cancel(args)
        if args.cache is None:
            from fastmat.materialize import materialize

            stats = materialize(
                cas,
                args.digest,
                dest,
                fetcher=fetcher,
                threads=args.threads,
                progress=progress,
                cancel=cancel,
            )
            bar.close()
            payload = {"root": str(args.digest), "dest": str(dest), "stats": jsonable(stats)}
            text = (
                f"materialized {args.digest} at {dest}: {stats.files:,} files, "
                f"{stats.directories:,} directories, {stats.symlinks:,} symlinks, "
                f"{human_bytes(stats.bytes)} in {stats.duration_s * 1e3:.1f} ms "
                f"(linked {stats.linked:,}, reflinked {stats.reflinked:,}, copied {stats.copied:,})"
            )
            return 0, payload, text
        from fastmat.cache import DirectoryCache

        cache = stack.enter_context(
            DirectoryCache(
                cas, args.cache, max_bytes=args.cache_max_bytes, fetcher=fetcher,
                threads=args.threads,
            )
        )  # fmt: skip
        if args.workspace:
            return _workspace(args, cache, dest, command, bar)
        r = cache.materialize(args.digest, dest, progress=progress, cancel=cancel)
        bar.close()
        payload = {"root": str(args.digest), "dest": str(dest), "cache": jsonable(r)}
        text = (
            f"materialized {args.digest} at {dest}: {r.files:,} files, "
            f"{human_bytes(r.bytes)} in {r.duration_s * 1e3:.1f} ms "
            f"(cache {'hit' if r.hit else 'miss'}, {r.method})"
        )
        return 0, payload, text
    raise AssertionError("unreachable")


def _workspace(
    args: argparse.Namespace, cache: DirectoryCache, dest: Path, command: list[str], bar: Progress
) -> Outcome:
    """Holds a workspace for the command's lifetime, or until SIGINT/SIGTERM."""
    cancel = _cancel(args)
    with cache.workspace(args.digest, dest, progress=_shown(bar), cancel=cancel) as ws:
        bar.close()
        method = ws.method
        if method != "overlay" and os.geteuid() == 0:
            print(ROOT_HARDLINK_WARNING.format(dest=dest), file=sys.stderr, flush=True)
        info = {"root": str(args.digest), "dest": str(dest), "method": method}
        if command:
            rc = _run_command(command, dest, cancel, to_stderr=args.json)
            rc = 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention
            out = {**info, "command": command, "returncode": rc}
            if cancel is not None and cancel.is_set():
                out["interrupted"] = signal.Signals(cancel.signum).name
            return rc, out, ""
        if not args.json:
            print(
                f"workspace for {args.digest} at {dest} ({method}); Ctrl-C to release", flush=True
            )
        if cancel is None:
            raise UsageError("holding a workspace needs the command's main thread")
        cancel.wait()  # SIGINT / SIGTERM
    return 0, {**info, "released": True}, f"released the workspace at {dest}"


def _run_command(
    command: list[str], cwd: Path, cancel: Interrupt | None, *, to_stderr: bool
) -> int:
    """Runs ``command`` in ``cwd`` and returns its status. ``to_stderr``: its stdout
    goes to our stderr (``--json`` keeps stdout for the JSON object). A signal we got
    is passed on to it if it still runs a moment later (from a terminal, Ctrl-C
    reaches it directly)."""
    sys.stdout.flush()
    proc = subprocess.Popen(command, cwd=cwd, stdout=sys.stderr.fileno() if to_stderr else None)
    signalled_at: float | None = None
    while True:
        try:
            return proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            if cancel is None or not cancel.is_set():
                continue
            now = time.monotonic()
            if signalled_at is None:
                signalled_at = now
            elif signalled_at > 0 and now - signalled_at >= _FORWARD_AFTER_S:
                proc.send_signal(cancel.signum)
                signalled_at = -1.0  # passed on once


def _cas_payload(cas: LocalCAS, cancel: Interrupt | None) -> tuple[dict[str, Any], str]:
    """What ``stats`` reports about the CAS, as JSON and as one text block."""
    check_cancel(cancel, "stats")
    u = cas.usage()
    check_cancel(cancel, "stats")
    c = u.counters
    payload = {
        "path": str(cas.root),
        "blobs": u.blobs,
        "blob_bytes": u.blob_bytes,
        "exec_variants": u.exec_variants,
        "exec_bytes": u.exec_bytes,
        "names": u.names,
        "bytes": u.bytes,
        "bytes_cas_only": u.bytes_cas_only,
        "bytes_shared": u.bytes_shared,
        "pinned_keys": u.pinned_keys,
        "evictions": c.evictions,
        "evicted_bytes": c.evicted_bytes,
        "refetches": c.refetches,
        "recorded_bytes": u.recorded_bytes,
    }
    text = (
        f"CAS {cas.root}: {u.blobs:,} blobs ({human_bytes(u.blob_bytes)}), "
        f"{u.exec_variants:,} executable variants ({human_bytes(u.exec_bytes)})\n"
        f"  {human_bytes(u.bytes_cas_only)} held only by the CAS, "
        f"{human_bytes(u.bytes_shared)} shared with linked trees (link count > 1)\n"
        f"  {c.evictions:,} names evicted ({human_bytes(c.evicted_bytes)}), "
        f"{c.refetches:,} re-fetched after eviction; {u.pinned_keys:,} blobs pinned now"
    )
    return payload, text


def cmd_stats(args: argparse.Namespace) -> Outcome:

    with _open_cas(args.cas) as cas:
        cas_payload, text = _cas_payload(cas, _cancel(args))
        payload: dict[str, Any] = {"cas": cas_payload}
        lines = [text]
        if args.cache is not None:
            with _open_cache_readonly(cas, args.cache) as cache:
                st = cache.stats(all_instances=True)  # every process's, over its lifetime
            payload["cache"] = {"path": str(args.cache), **jsonable(st)}
            lines.append(
                f"cache {args.cache}: {st.entries:,} entries ({human_bytes(st.bytes)}); "
                f"{st.hits:,} hits, {st.misses:,} misses, {st.evictions:,} evictions"
            )
    return 0, payload, "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> Outcome:

    with contextlib.ExitStack() as stack:
        cas = stack.enter_context(_open_cas(args.cas))
        cache_report = None
        cancel = _cancel(args)
        if args.cache is None:
            with Progress("verifying the CAS", enabled=_bars(args)) as bar:
                report = cas.verify(progress=stopping(_shown(bar), cancel))
        else:
            cache = stack.enter_context(_open_cache_readonly(cas, args.cache))
            with Progress("verifying the CAS and the cache", enabled=_bars(args)) as bar:
                cache_report = cache.verify(progress=_shown(bar), cancel=cancel)
            report = cache_report.cas
        payload: dict[str, Any] = {
            "ok": report.ok,
            "blobs_checked": report.blobs_checked,
            "exec_checked": report.exec_checked,
            "bytes_checked": report.bytes_checked,
            "damaged": [
                {"digest": str(b.digest), "reason": b.reason, "kind": b.kind}
                for b in report.damaged
            ],
            "unexpected": list(report.unexpected),
            "quarantined": [str(p) for p in report.quarantined],
            "quarantining": report.quarantining,
            "duration_s": round(report.duration_s, 3),
        }
        lines = [
            f"checked {report.blobs_checked:,} blobs and {report.exec_checked:,} executable "
            f"variants ({human_bytes(report.bytes_checked)}) in {report.duration_s:.1f} s"
        ]
        lines += [f"damaged {b.kind} {b.digest}: {b.reason}" for b in report.damaged]
        lines += [f"unexpected file: {name}" for name in report.unexpected]
        if report.quarantined:
            lines.append(f"moved {len(report.quarantined)} file(s) to {cas.root / 'quarantine'}")
        if not report.quarantining and not report.ok:
            lines.append(f"read-only CAS {cas.root}: nothing quarantined (damage left in place)")
        ok = report.ok
        if cache_report is not None:
            c = cache_report
            ok = c.ok
            payload["ok"] = ok
            payload["cache"] = {
                "path": str(args.cache),
                "entries_checked": c.entries_checked,
                "files_checked": c.files_checked,
                "files_hashed": c.files_hashed,
                "invalidated": [{"key": k, "reason": r} for k, r in c.invalidated],
                "busy": [{"key": k, "reason": r} for k, r in c.busy],
            }
            lines.append(
                f"checked {c.entries_checked:,} cache entries ({c.files_checked:,} files, "
                f"{c.files_hashed:,} private ones hashed)"
            )
            lines += [f"invalidated cache entry {k}: {r}" for k, r in c.invalidated]
            lines += [f"bad cache entry {k} is in use, not invalidated: {r}" for k, r in c.busy]
    lines.append("OK" if ok else "DAMAGED")
    return (0 if ok else 1), payload, "\n".join(lines)


def _open_cache_readonly(cas: Any, path: Path) -> Any:
    """Opens a cache with bounds no existing cache exceeds, so opening evicts nothing."""
    from fastmat.cache import DirectoryCache

    return DirectoryCache(cas, path, max_bytes=_NO_BOUND, max_entries=_NO_BOUND)


def cmd_gc(args: argparse.Namespace) -> Outcome:
    if args.cache is None:
        return _gc_cas(args)
    if args.max_blobs is not None:
        raise UsageError("--max-blobs bounds the CAS: run gc without --cache for it")
    # Opening a cache sweeps: dead owners' workspaces (detached, then their upper layers
    # trashed), dead instances' scratch dirs, orphans; gc evicts down to --max-bytes and
    # waits for the background deletions.
    with (
        _open_cas(args.cas) as cas,
        Progress("collecting", enabled=_bars(args)) as bar,
        _open_cache_readonly(cas, args.cache) as cache,
    ):
        before = cache.stats()
        dead = cache.dead_mounts
        after = cache.gc(args.max_bytes, progress=_shown(bar), cancel=_cancel(args))
    payload = {
        "max_bytes": args.max_bytes,
        "evicted": before.entries - after.entries,
        "freed_bytes": before.bytes - after.bytes,
        "dead_mounts": jsonable(dead),
        "before": jsonable(before),
        "after": jsonable(after),
    }
    lines = [
        f"evicted {before.entries - after.entries} of {before.entries} cache entries, "
        f"freed {human_bytes(before.bytes - after.bytes)}; "
        f"{after.entries} entries ({human_bytes(after.bytes)}) remain"
    ]
    for m in dead:
        how = "detached and removed" if m.was_mounted else "removed (no longer mounted)"
        what = how if m.cleaned else f"left in place: {m.problem}"
        lines.append(f"dead workspace {m.dest} (entry {m.key}, instance {m.owner}): {what}")
    kept = [m for m in dead if not m.cleaned]
    return (1 if kept else 0), payload, "\n".join(lines)


def _gc_cas(args: argparse.Namespace) -> Outcome:
    """The CAS itself: least recently used unpinned names evicted down to the bounds."""
    if args.max_bytes is None and args.max_blobs is None:
        raise UsageError("gc --cas needs --max-bytes or --max-blobs (or --cache DIR)")
    with _open_cas(args.cas) as cas, Progress("collecting the CAS", enabled=_bars(args)):
        rep = cas.gc(max_bytes=args.max_bytes, max_blobs=args.max_blobs)
    payload = {"max_bytes": args.max_bytes, "max_blobs": args.max_blobs, **jsonable(rep)}
    text = (
        f"evicted {rep.evicted:,} of {rep.names_before:,} CAS names, "
        f"{human_bytes(rep.evicted_bytes)}; {rep.names_after:,} names "
        f"({human_bytes(rep.bytes_after)}) remain, {rep.pinned:,} blobs pinned"
    )
    return 0, payload, text


def cmd_bench(args: argparse.Namespace) -> Outcome:
    from fastmat.bench import BenchConfig, run_bench, selected_methods, selected_shapes
    from fastmat.bench.report import format_markdown, format_table, plot

    if args.plot is not None:  # fail before minutes of work, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise FastmatError(
                "--plot needs matplotlib: pip install 'fastmat[bench]' (or matplotlib)"
            ) from e
    cfg = BenchConfig(
        quick=args.quick,
        runs=args.runs,
        budget_s=args.budget,
        threads=args.threads,
        scale=args.scale,
        workdir=args.dir,
        remote=args.remote,
        shapes=tuple(args.shapes or ()),
        methods=tuple(args.methods or ()),
    )
    try:
        selected_shapes(cfg), selected_methods(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from e
    cancel = _cancel(args)

    def on_step(label: str, done: int, total: int | None) -> None:
        check_cancel(cancel, "bench")
        bar.update(label, done, total)

    with Progress("bench", enabled=_bars(args)) as bar:
        res = run_bench(cfg, progress=on_step)
    extra = []
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        extra.append(f"results: {args.out}")
    if args.plot is not None:
        plot(res, args.plot)
        extra.append(f"plot: {args.plot}")
    table = format_markdown(res) if args.markdown else format_table(res)
    return 0, res, table + "".join(f"{x}\n" for x in extra)


def cmd_worker(args: argparse.Namespace) -> Outcome:
    import logging

    # The worker forks (to run actions as another user) while gRPC threads run: gRPC's
    # fork handlers would only pause its threads at every fork (or log that they could
    # not). Read when grpc is first imported, which is below.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

    from fastmat.worker import (
        ConfigError,
        Worker,
        WorkerConfig,
        parse_platform,
        run_until_signalled,
    )

    if not args.debug:
        logging.getLogger("fastmat.worker").setLevel(logging.INFO)
    try:
        cfg = WorkerConfig(
            server=args.server,
            instance=args.instance,
            cas_server=args.cas_server,
            cas=args.cas,
            work=args.work,
            cache=args.cache,
            cache_max_bytes=args.cache_max_bytes,
            overlay=False if args.no_overlay else None,
            jobs=args.jobs,
            run_as=args.run_as,
            platform=parse_platform(args.platform),
            cas_max_bytes=args.cas_max_bytes,
            json_log=args.json_log,
            bot_id=args.bot_id,
            fsync=not args.no_fsync,
            threads=args.threads,
            poll_s=args.poll,
            heartbeat_s=args.heartbeat,
            drain_timeout_s=args.drain_timeout,
            default_timeout_s=args.default_timeout,
        )
        worker = Worker(cfg)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    try:
        run_until_signalled(worker)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    payload = {"bot_id": worker.bot_id, "sessions": worker.sessions_created, "drained": True}
    return 0, payload, f"worker {worker.bot_id} drained and stopped"
