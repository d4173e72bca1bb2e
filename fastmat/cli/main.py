"""The ``fastmat`` command (also ``python -m fastmat``).

Every verb takes ``--json`` (exactly one JSON object on stdout, whatever happens) and
``--debug`` (tracebacks and debug logging). Exit codes: 0 success, 1 failure (one line
on stderr naming what failed), 2 usage error, 128 + N after signal N (130: Ctrl-C).
``materialize --workspace -- CMD`` exits with CMD's status instead.

The verb runs on a worker thread while the main thread waits for SIGINT / SIGTERM:
the first one sets the verb's cancel token (``args.cancel``; the library stops between
chunks and removes what it built), the second one stops waiting for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastmat.bench.run import QUICK_DURATION
from fastmat.cli.verbs import (
    Interrupt,
    Outcome,
    UsageError,
    cmd_bench,
    cmd_gc,
    cmd_ingest,
    cmd_materialize,
    cmd_stats,
    cmd_verify,
    cmd_worker,
    jsonable,
)
from fastmat.control import Cancelled
from fastmat.digest import Digest
from fastmat.errors import FastmatError
from fastmat.version import __version__

Verb = Callable[[argparse.Namespace], Outcome]
_OWN_SIGNALS = {"worker"}  # verbs that install their own handlers (a worker drains)
_SIGNAL_POLL_S = 0.02  # a signal the kernel gave a worker thread waits this long at most

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str) -> int:
    """``123``, ``64K``, ``10G``, ``1.5GiB`` (binary: powers of 1024) or ``500MB``,
    ``2GB`` (decimal: powers of 1000)."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 500M, 10G, 2GB)")
    number, unit, suffix = m.group(1), m.group(2).lower(), m.group(3).lower()
    base = 1000 if suffix == "b" and unit else 1024
    return int(float(number) * base ** _POWERS[unit])


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except FastmatError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _name(filename: object) -> str:
    """An OSError's filename as text (a path, or a number when the call took an fd)."""
    return (
        os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else str(filename)
    )


def _error_line(e: BaseException) -> str:
    """One clear line: the strerror and the paths for an OSError, the message otherwise."""
    if isinstance(e, OSError) and e.strerror and not isinstance(e, FastmatError):
        where = ""
        if e.filename is not None:
            where = f": {_name(e.filename)}"
            if e.filename2 is not None:
                where += f" -> {_name(e.filename2)}"
        return f"{e.strerror}{where}"
    return str(e) or type(e).__name__


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print exactly one JSON object")
    common.add_argument("--debug", action="store_true", help="tracebacks and debug logging")

    cas = argparse.ArgumentParser(add_help=False)
    cas.add_argument("--cas", required=True, type=Path, metavar="DIR", help="local CAS root")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--cache", type=Path, metavar="DIR", help="directory cache root")
    bounded = argparse.ArgumentParser(add_help=False)  # the verbs that may build entries
    bounded.add_argument(
        "--cache-max-bytes",
        type=parse_size,
        default=parse_size("10G"),
        metavar="SIZE",
        help="directory cache size bound (default 10G)",
    )

    p = argparse.ArgumentParser(
        prog="fastmat",
        description="Materialize REAPI v2 input trees from a local CAS, fast and safely.",
        epilog="Exit status: 0 success, 1 failure, 2 usage error. "
        "Run 'fastmat VERB --help' for a verb's options.",
    )
    p.add_argument("--version", action="version", version=f"fastmat {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    s = sub.add_parser(
        "ingest",
        parents=[common, cas],
        formatter_class=fmt,
        help="store a directory in the CAS, print its root digest",
        description="Store SRC (files, executables, symlinks, empty directories) in the CAS "
        "as REAPI Directory messages.\nThe last line of output is the root digest hash/size.",
    )
    s.add_argument("src", metavar="SRC", help="directory to ingest")
    s.add_argument("--no-fsync", action="store_true", help="skip fsync (faster, not crash-safe)")

    s = sub.add_parser(
        "materialize",
        parents=[common, cas, cache, bounded],
        formatter_class=fmt,
        help="build a tree at DEST",
        description="Build the tree DIGEST (hash/size) at DEST, which must not exist.\n\n"
        "--cache DIR keeps whole trees: a hit clones a cached entry instead of relinking.\n"
        "--remote URL fetches what the local CAS lacks from a REAPI v2 server (contacted\n"
        "only then: with every blob local, a server that is down changes nothing).\n"
        "--workspace (needs --cache) makes DEST a workspace (an overlay mount where this\n"
        "process may mount, a hardlink copy otherwise) that exists only while fastmat runs:\n"
        "  fastmat materialize D DEST --cas C --cache K --workspace -- make -C . test\n"
        "runs the command in DEST, releases the workspace and exits with the command's\n"
        "status; without a command the workspace is held until Ctrl-C or SIGTERM.\n"
        "With --json the command's stdout goes to stderr, so that stdout holds only the\n"
        "JSON object; Ctrl-C or SIGTERM is passed on to the command.\n\n"
        "Ctrl-C (or SIGTERM) stops a materialize soon: DEST never appears, what was built\n"
        "is removed, exit status 130 (143). A second one exits without waiting.",
        usage="%(prog)s [options] DIGEST DEST --cas DIR [--cache DIR] [--remote URL] "
        "[--workspace [-- CMD ...]]",
    )
    s.add_argument("digest", metavar="DIGEST", type=_digest, help="root digest, hash/size")
    s.add_argument("dest", metavar="DEST", help="destination (must not exist)")
    s.add_argument("--remote", metavar="URL", help="REAPI server, grpc://host:port or grpcs://")
    s.add_argument("--instance-name", default="", metavar="NAME", help="REAPI instance name")
    s.add_argument("--workspace", action="store_true", help="hold DEST as a workspace (see above)")
    s.add_argument("--threads", type=int, default=0, metavar="N", help="link threads (0: per CPU)")

    s = sub.add_parser(
        "stats",
        parents=[common, cas, cache],
        help="CAS (and cache) usage",
        description="Counts and bytes of the CAS blobs and executable variants, the bytes "
        "held only by the CAS vs shared with linked trees, evictions and re-fetches, and "
        "with --cache the directory cache's statistics.",
    )

    s = sub.add_parser(
        "verify",
        parents=[common, cas, cache],
        help="re-hash every blob (and cache entry), quarantine damage",
        description="Check every blob and executable variant (type, mode, size, SHA-256); "
        "damaged ones are moved to <cas>/quarantine/ and reported. With --cache, then "
        "check every cache entry (no file links a quarantined blob, private files hash to "
        "their digests) and invalidate the bad ones. Exit status 1 if anything was bad.",
    )

    s = sub.add_parser(
        "gc",
        parents=[common, cas, cache],
        help="evict CAS blobs down to a size, or clean up a directory cache",
        description="Without --cache: evict the least recently used unpinned CAS blobs "
        "and executable variants until the CAS holds at most --max-bytes (and "
        "--max-blobs names); trees and cache entries already linked to an evicted blob "
        "keep it. With --cache DIR: clean up after dead processes (workspaces whose owner "
        "was killed: their overlay detached, then their upper layer removed; dead "
        "instances' scratch; orphans), each dead workspace reported (exit status 1 if "
        "one could not be cleaned), and with --max-bytes also evict unpinned entries "
        "(least recently used first) until the cache holds at most that.",
    )
    s.add_argument(
        "--max-bytes",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="bound, e.g. 500M, 10G, 2GB (default: evict nothing)",
    )
    s.add_argument(
        "--max-blobs", type=int, metavar="N", help="bound on the CAS's names (without --cache)"
    )

    s = sub.add_parser(
        "worker",
        parents=[common, cas, cache, bounded],
        formatter_class=fmt,
        help="run a remote-execution worker (Remote Workers API bot)",
        description="Take actions from a REAPI server's Bots service (BuildGrid) and run\n"
        "them, staging each input root with fastmat: a directory-cache workspace (an\n"
        "overlay mount where the worker may mount) or a materialize from the local CAS,\n"
        "fetching what it lacks from the server.\n\n"
        "Actions run in their own process group with the Command's environment only,\n"
        "as --run-as (default when started as root: nobody). The first SIGTERM or\n"
        "SIGINT drains (no new work; running actions get --drain-timeout, then are\n"
        "returned to the server), a second one returns them at once.",
        epilog="Bazel: --remote_executor=grpc://HOST:PORT [--remote_instance_name=NAME]\n"
        "  --spawn_strategy=remote (see the README, 'Run a worker').\n"
        "--json-log FILE writes one JSON object per action (digest, exit code, each\n"
        "phase's duration, cache hit or miss, bytes fetched and uploaded).",
        usage="%(prog)s --server URL [--instance NAME] --cas DIR --work DIR [--cache DIR] "
        "[--jobs N] [--run-as USER] [--platform KEY=VALUE ...] [--cas-max-bytes N] "
        "[--json-log FILE]",
    )
    s.add_argument("--server", required=True, metavar="URL", help="grpc://host:port (Bots)")
    s.add_argument("--instance", default="", metavar="NAME", help="REAPI instance name")
    s.add_argument("--cas-server", metavar="URL", help="CAS server when not --server")
    s.add_argument("--work", required=True, type=Path, metavar="DIR", help="actions run here")
    s.add_argument("--no-overlay", action="store_true", help="never mount overlay workspaces")
    s.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, metavar="N", help="actions at once"
    )
    s.add_argument("--run-as", metavar="USER", help="user actions run as (root: nobody)")
    s.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="platform property to advertise and require (repeatable)",
    )
    s.add_argument("--cas-max-bytes", type=parse_size, metavar="SIZE", help="local CAS byte budget")
    s.add_argument("--json-log", type=Path, metavar="FILE", help="per-action log ('-': stdout)")
    s.add_argument("--bot-id", metavar="ID", help="default: hostname + a hash of --work")
    s.add_argument("--threads", type=int, default=0, metavar="N", help="link threads (0: per CPU)")
    s.add_argument(
        "--drain-timeout", type=float, default=60.0, metavar="S", help="on SIGTERM (default 60)"
    )
    s.add_argument(
        "--default-timeout",
        type=float,
        default=0.0,
        metavar="S",
        help="timeout of actions that set none (default: none)",
    )
    s.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip fsync in the CAS and cache (only for a CAS wiped at boot, e.g. tmpfs)",
    )
    s.add_argument("--poll", type=float, default=30.0, help=argparse.SUPPRESS)
    s.add_argument("--heartbeat", type=float, default=2.0, help=argparse.SUPPRESS)

    s = sub.add_parser(
        "bench",
        parents=[common],
        formatter_class=fmt,
        help="the comparison benchmark",
        description="Materialize the seed shapes (64 files / 64 KB ... 1,978 files / 466 MB)\n"
        "and a 100,000-file tree with fastmat and the alternatives, side by side, on a\n"
        "temporary CAS; print median ms and the ratio to the floor (bare mkdirat+linkat).\n"
        f"--quick: smaller files and a 10,000-file scaling tree ({QUICK_DURATION}).\n"
        "Each method runs once untimed, then --runs times interleaved with the others.",
        epilog="shapes: small_flat pcm_cluster medium_flat large_tree, and scale_100k\n"
        "  (scale_10k with --quick)\n"
        "methods: floor (C mkdirat+linkat loop), fastmat_cold (materialize), cache_hit\n"
        "  (DirectoryCache hit), overlay (workspace mount; skipped where this process\n"
        "  cannot mount), os_link_walk, copytree, cp_al, and with --remote: remote (the\n"
        "  fetch pipeline into an empty default, durable CAS) and remote_nofsync (the\n"
        "  same with fsync=False, side by side)\n"
        "--json prints the --out object: machine, config, shapes, every sample.",
    )
    s.add_argument("--quick", action="store_true", help=f"small sizes, {QUICK_DURATION}")
    s.add_argument(
        "--runs", type=int, default=0, metavar="N", help="timed runs (default 5, quick 3)"
    )
    s.add_argument(
        "--budget",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds per shape and method (default 20, quick 2): slower methods get "
        "fewer runs, at least one",
    )
    s.add_argument("--threads", type=int, default=0, metavar="N", help="threads (0: per CPU)")
    s.add_argument("--out", type=Path, metavar="FILE", help="write every sample as JSON")
    s.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG plot (needs matplotlib)")
    s.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    s.add_argument("--remote", metavar="URL", help="also time fetching from this REAPI server")
    s.add_argument("--dir", type=Path, metavar="DIR", help="scratch parent (default: temp dir)")
    s.add_argument("--shapes", nargs="+", metavar="NAME", help="only these shapes")
    s.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (+ floor)")
    s.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before or after the verb ran (its own: handled below)
        print("fastmat: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:  # materialize --workspace -- CMD ...: CMD is not ours to parse
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        rc = e.code if isinstance(e.code, int) else 2
        if rc and "--json" in argv:
            _emit_json({"ok": False, "error": "usage error (see stderr)", "type": "UsageError"})
        return rc
    args.command = command
    if command and args.verb != "materialize":
        msg = "unexpected arguments after --"
        print(f"{parser.prog} {args.verb}: error: {msg}", file=sys.stderr)
        if args.json:
            _emit_json({"ok": False, "error": msg, "type": "UsageError"})
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="fastmat: %(levelname)s: %(message)s",
    )
    verbs: dict[str, Verb] = {
        "ingest": cmd_ingest,
        "materialize": cmd_materialize,
        "stats": cmd_stats,
        "verify": cmd_verify,
        "gc": cmd_gc,
        "bench": cmd_bench,
        "worker": cmd_worker,
    }
    cancel = args.cancel = Interrupt()
    try:
        if args.verb in _OWN_SIGNALS:
            rc, payload, text = verbs[args.verb](args)
        else:
            rc, payload, text = _run(verbs[args.verb], args, cancel)
    except UsageError as e:
        print(f"{parser.prog} {args.verb}: error: {e}", file=sys.stderr)
        if args.json:
            _emit_json({"ok": False, "error": str(e), "type": "UsageError"})
        return 2
    except (KeyboardInterrupt, Cancelled) as e:
        forced = isinstance(e, KeyboardInterrupt)
        signum = cancel.signum or signal.SIGINT
        name = signal.Signals(signum).name
        msg = f"interrupted by {name}" + (" (a second time: not cleaned up)" if forced else "")
        print(f"fastmat: {msg}", file=sys.stderr)
        if args.json:
            _emit_json({"ok": False, "error": msg, "type": "Cancelled", "signal": name})
        return 128 + signum
    except (FastmatError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        msg = _error_line(e)
        print(f"fastmat: error: {msg}", file=sys.stderr)
        if args.json:
            _emit_json({"ok": False, "error": msg, "type": type(e).__name__})
        return 1
    if args.json:
        _emit_json(payload)
    elif text:
        print(text)
    return rc


def _run(verb: Verb, args: argparse.Namespace, cancel: Interrupt) -> Outcome:
    """Runs ``verb`` on a worker thread; meanwhile SIGINT / SIGTERM set ``cancel`` (the
    first) or raise ``KeyboardInterrupt`` here (the second: stop waiting). Off the main
    thread (``main`` called from a thread) no handler can be installed: runs inline."""
    if threading.current_thread() is not threading.main_thread():
        return verb(args)
    out: list[Outcome] = []
    err: list[BaseException] = []

    def work() -> None:
        try:
            out.append(verb(args))
        except BaseException as e:  # re-raised on the main thread
            err.append(e)

    def on_signal(signum: int, frame: object) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.fire(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker = threading.Thread(target=work, name=f"fastmat-{args.verb}", daemon=True)
        worker.start()
        while worker.is_alive():  # on_signal runs here, between waits: a signal the
            worker.join(_SIGNAL_POLL_S)  # kernel gave another thread wakes no join()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if err:
        raise err[0]
    return out[0]


def _emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(jsonable(obj), sort_keys=False) + "\n")
    sys.stdout.flush()
