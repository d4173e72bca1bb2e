"""Bazel builds through ``fastmat worker``, staging with fastmat against staging with
BuildGrid's own downloader, in one run.

The farm is the tests' (:mod:`tests.buildfarm`: PostgreSQL + BuildGrid 0.9.1 with
Execution + Bots + CAS + ActionCache on loopback); the builds are Debian's offline Bazel
4.2.3 with ``--remote_executor`` / ``--noremote_accept_cached`` /
``--spawn_strategy=remote`` (:mod:`tests.bazel_project`):

- ``brotli``: Brotli 1.2.1's C library and tool plus a genrule chain (~80 actions);
- ``shared``: 16 genrules reading the same 1,000-file / 64 MiB tree (one input root).

Both variants run the same worker (``fastmat.worker.Worker``, same process model, same
session loop, execution and uploads); only its ``Stager`` differs:

- ``fastmat``: :class:`~fastmat.worker.FastmatStager` with a directory cache (overlay
  workspaces where the worker may mount, else hardlinks) over the worker's local CAS;
- ``buildgrid``: BuildGrid's ``Downloader.download_directory`` (``buildgrid.server.
  client.cas``), run in helper processes of BuildGrid's own venv (Python 3.13: it cannot
  be imported into fastmat's), one per job slot, fed over a pipe.

Each build starts from an empty worker (CAS, cache, work directory) and a ``bazel
clean``; the variants take turns round by round, after one untimed warm-up build per
project (it uploads the inputs to the farm). Reported per project and variant: the
build's wall time, staging summed over its actions and the per-action staging median
(the worker's ``phases_s.stage``: from ``stage()`` called to the tree ready), as the
median of ``--runs`` runs, and the ratios fastmat / buildgrid. BuildGrid's downloader
does not verify what it fetches; fastmat hashes every byte into its CAS.

Goals (issue 13, 2-vCPU machine): staging <= 0.15x the downloader's on the shared-tree
build, build wall time <= 0.65x there; the C library build <= 0.9x.

    python benches/bench_worker.py [--runs 3] [--projects brotli,shared] [--jobs 2]
        [--bots 1] [--no-tmpfs] [--json out.json] [--markdown]
"""

from __future__ import annotations

import os

# The worker forks actions as another user while gRPC threads run; set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import contextlib
import json
import queue
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastmat import _binding  # noqa: E402
from fastmat.control import CancelToken, check_cancel  # noqa: E402
from fastmat.digest import Digest  # noqa: E402
from fastmat.worker import Staged, Worker, WorkerConfig, run_until_signalled  # noqa: E402
from tests.bazel_project import (  # noqa: E402
    Bazel,
    bazel_problem,
    brotli_workspace,
    shared_tree_workspace,
)
from tests.buildfarm import Farm, Postgres, farm_problem, open_tmpdir  # noqa: E402
from tests.reapi_server import venv_dir  # noqa: E402

VARIANTS = ("fastmat", "buildgrid")
PROJECTS = ("brotli", "shared")
INSTANCE = "bench"

_HELPER = """
import json, sys, time, grpc
from buildgrid._protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Digest
from buildgrid.server.client.cas import download
address, instance = sys.argv[1], sys.argv[2]
opts = [("grpc.max_receive_message_length", 64 << 20)]
channel = grpc.insecure_channel(address, options=opts)
for line in sys.stdin:
    h, size, dest = line.rstrip("\\n").split("\\t")
    t0 = time.perf_counter()
    try:
        with download(channel, instance=instance) as dl:
            dl.download_directory(Digest(hash=h, size_bytes=int(size)), dest)
        out = {"ok": True, "s": time.perf_counter() - t0}
    except Exception as e:
        out = {"ok": False, "error": repr(e)}
    sys.stdout.write(json.dumps(out) + "\\n")
    sys.stdout.flush()
"""


class BuildGridStager:
    """Stages with BuildGrid's ``download_directory`` in ``n`` helper processes of its
    venv (one per concurrent staging)."""

    name = "buildgrid"

    def __init__(self, python: Path, address: str, instance: str, n: int) -> None:
        self._helpers: queue.Queue[subprocess.Popen[str]] = queue.Queue()
        self._all = []
        for _ in range(n):
            p = subprocess.Popen(
                [str(python), "-c", _HELPER, address, instance],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            self._all.append(p)
            self._helpers.put(p)

    def close(self) -> None:
        for p in self._all:
            with contextlib.suppress(OSError):
                assert p.stdin is not None
                p.stdin.close()
            p.wait(30)

    @contextlib.contextmanager
    def stage(
        self, root: Digest, dest: Path, cancel: CancelToken | None = None
    ) -> Iterator[Staged]:
        check_cancel(cancel, "staging")  # BuildGrid's downloader cannot be stopped once asked
        p = self._helpers.get()
        try:
            assert p.stdin is not None
            assert p.stdout is not None
            p.stdin.write(f"{root.hash}\t{root.size_bytes}\t{dest}\n")
            p.stdin.flush()
            reply = json.loads(p.stdout.readline())
        finally:
            self._helpers.put(p)
        if not reply["ok"]:
            with contextlib.suppress(FileNotFoundError):
                _binding.remove_tree(dest)
            raise RuntimeError(f"BuildGrid's download_directory failed: {reply['error']}")
        try:
            yield Staged(dest, "buildgrid-download", "none")
        finally:
            with contextlib.suppress(FileNotFoundError):
                _binding.remove_tree(dest)


def child_main(spec: dict[str, Any]) -> None:
    """The worker process of one variant (``--worker-child``)."""
    cfg = WorkerConfig(
        server=spec["server"],
        instance=spec["instance"],
        cas=Path(spec["base"]) / "cas",
        work=Path(spec["base"]) / "work",
        cache=Path(spec["base"]) / "cache" if spec["variant"] == "fastmat" else None,
        jobs=spec["jobs"],
        json_log=Path(spec["base"]) / "actions.jsonl",
        bot_id=spec["bot_id"],
        fsync=spec["fsync"],
        heartbeat_s=1.0,
    )
    factory = None
    if spec["variant"] == "buildgrid":
        python = venv_dir() / "bin" / "python"
        address = spec["server"].removeprefix("grpc://")

        def factory(cas: Any, remote: Any) -> BuildGridStager:
            return BuildGridStager(python, address, spec["instance"], spec["jobs"])

    import logging

    logging.basicConfig(level=logging.INFO, format="fastmat: %(levelname)s: %(message)s")
    run_until_signalled(Worker(cfg, stager=factory))


class Bots:
    """``bots`` worker processes of one variant, each in its own directory."""

    def __init__(self, variant: str, base: Path, farm: Farm, args: argparse.Namespace) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dirs: list[Path] = []
        for i in range(args.bots):
            d = base / f"bot{i}"
            d.mkdir(parents=True)
            d.chmod(0o755)
            self.dirs.append(d)
            spec = {
                "variant": variant, "server": farm.url, "instance": INSTANCE,
                "base": str(d), "jobs": args.jobs, "bot_id": f"bench-{variant}-{i}",
                "fsync": not args.no_fsync,
            }  # fmt: skip
            with (d / "worker.log").open("wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--worker-child", json.dumps(spec)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 120
        for d in self.dirs:
            while "bot session" not in (d / "worker.log").read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start: {(d / 'worker.log').read_text()}")
                time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def records(self) -> list[dict[str, Any]]:
        out = []
        for d in self.dirs:
            log = d / "actions.jsonl"
            if log.exists():
                out += [json.loads(line) for line in log.read_text().splitlines() if line]
        return out


def one_build(
    project: str, variant: str, bz: Bazel, farm: Farm, *, scratch: Path, args: argparse.Namespace
) -> dict[str, Any]:
    base = scratch / f"{project}-{variant}-{time.monotonic_ns()}"
    clean = bz.run("clean")
    if clean.returncode != 0:
        raise RuntimeError(clean.stderr[-3000:])
    bots = Bots(variant, base, farm, args)
    try:
        t0 = time.perf_counter()
        res = bz.run("build", "//:all", remote=farm.url, instance=INSTANCE)
        wall = time.perf_counter() - t0
    finally:
        bots.stop()
    if res.returncode != 0:
        raise RuntimeError(f"{project} / {variant} build failed:\n{res.stderr[-4000:]}")
    recs = bots.records()
    stages = [r["phases_s"].get("stage", 0.0) for r in recs]
    shutil.rmtree(base, ignore_errors=True)
    return {
        "wall_s": wall,
        "actions": len(recs),
        "stage_sum_s": sum(stages),
        "stage_median_s": statistics.median(stages) if stages else 0.0,
        "cache_hits": sum(r["cache"] == "hit" for r in recs),
        "methods": sorted({r["staging"] for r in recs}),
        "not_ok": sum(r["outcome"] != "ok" or r["exit_code"] != 0 for r in recs),
    }


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for project, by_variant in results.items():
        med = {
            v: {
                k: statistics.median(run[k] for run in runs)
                for k in ("wall_s", "stage_sum_s", "stage_median_s", "actions", "cache_hits")
            }
            for v, runs in by_variant.items()
        }
        f, b = med["fastmat"], med["buildgrid"]
        out[project] = {
            "median": med,
            "ratio": {
                k: f[k] / b[k] if b[k] else float("nan")
                for k in ("wall_s", "stage_sum_s", "stage_median_s")
            },
            # each round's two builds ran back to back: their ratio, then the median
            # (steadier than a ratio of medians when the machine's load drifts)
            "paired_ratio": {
                k: statistics.median(
                    fr[k] / br[k]
                    for fr, br in zip(by_variant["fastmat"], by_variant["buildgrid"], strict=True)
                    if br[k]
                )
                for k in ("wall_s", "stage_sum_s")
            },
            "range": {
                v: {
                    k: [min(r[k] for r in runs), max(r[k] for r in runs)]
                    for k in ("wall_s", "stage_sum_s", "stage_median_s")
                }
                for v, runs in by_variant.items()
            },
            "methods": {v: runs[0]["methods"] for v, runs in by_variant.items()},
        }
    return out


def _x(ratio: float) -> str:
    return "<0.01x" if ratio < 0.01 else f"{ratio:.2f}x"


def table(summary: dict[str, Any], runs: int, markdown: bool) -> str:
    names = {"brotli": "Brotli 1.2.1 + round trip", "shared": "16 actions, one 1,000-file tree"}
    rows = []
    for project, s in summary.items():
        m, r, rng = s["median"], s["ratio"], s["range"]
        f, b = m["fastmat"], m["buildgrid"]
        rows.append(
            [
                f"{names.get(project, project)} ({f['actions']:.0f} actions)",
                f"{b['wall_s']:.1f} s ({rng['buildgrid']['wall_s'][0]:.1f}-"
                f"{rng['buildgrid']['wall_s'][1]:.1f})",
                f"{f['wall_s']:.1f} s ({rng['fastmat']['wall_s'][0]:.1f}-"
                f"{rng['fastmat']['wall_s'][1]:.1f})",
                f"{r['wall_s']:.2f}x (paired {s['paired_ratio']['wall_s']:.2f}x)",
                f"{b['stage_sum_s']:.2f} s / {b['stage_median_s'] * 1e3:.0f} ms",
                f"{f['stage_sum_s']:.2f} s / {f['stage_median_s'] * 1e3:.1f} ms",
                f"{_x(r['stage_sum_s'])} / {_x(r['stage_median_s'])}",
            ]
        )
    head = [
        "build",
        "wall, BuildGrid downloader",
        "wall, fastmat",
        "wall ratio",
        "staging sum / action median, downloader",
        "staging sum / action median, fastmat",
        "staging ratio (sum / median)",
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *rows]
        ]
    return "\n".join(lines) + (
        f"\n(medians of {runs} runs, ranges in parentheses; paired: the median of each "
        "round's fastmat / downloader ratio)\n"
    )


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker-child":
        child_main(json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--projects", default=",".join(PROJECTS))
    ap.add_argument("--bots", type=int, default=1, help="worker processes per variant")
    ap.add_argument("--jobs", type=int, default=2, help="leases per worker")
    ap.add_argument("--no-tmpfs", action="store_true", help="worker dirs on the temp dir's fs")
    ap.add_argument("--no-fsync", action="store_true", help="the worker's CAS without fsync")
    ap.add_argument("--json", type=Path, help="write every sample here")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--report", type=Path, help="only print the tables of a --json file")
    args = ap.parse_args()
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        runs = len(next(iter(saved["samples"].values()))["fastmat"])
        print(saved["setting"])
        print(table(summarize(saved["samples"]), runs, args.markdown))
        return 0
    for problem in (farm_problem(), bazel_problem()):
        if problem:
            print(f"cannot run: {problem}", file=sys.stderr)
            return 1
    projects = [p for p in args.projects.split(",") if p]
    base = open_tmpdir("fastmat-bench-worker-")
    scratch = base / "scratch"
    scratch.mkdir()
    scratch.chmod(0o755)
    mounted = False
    if not args.no_tmpfs and os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=6g,mode=0755", "tmpfs", str(scratch)],
            check=False, capture_output=True,
        ).returncode == 0  # fmt: skip
    pg = Postgres(base / "pg")
    farm = Farm(base / "bgd", pg, instances=[INSTANCE], keepalive_s=60)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        pg.start()
        farm.start()
        for project in projects:
            ws = base / f"ws-{project}"
            if project == "brotli":
                brotli_workspace(ws)
            else:
                shared_tree_workspace(ws)
            with Bazel(ws, base / f"bazel-{project}", max_idle_s=900) as bz:
                print(f"{project}: warm-up build", file=sys.stderr, flush=True)
                one_build(project, "fastmat", bz, farm, scratch=scratch, args=args)
                results[project] = {v: [] for v in VARIANTS}
                for i in range(args.runs):
                    for v in VARIANTS if i % 2 == 0 else reversed(VARIANTS):
                        r = one_build(project, v, bz, farm, scratch=scratch, args=args)
                        results[project][v].append(r)
                        print(
                            f"{project} run {i + 1} {v}: wall {r['wall_s']:.1f} s, staging "
                            f"{r['stage_sum_s']:.2f} s / median "
                            f"{r['stage_median_s'] * 1e3:.1f} ms ({r['actions']} actions, "
                            f"{r['cache_hits']} cache hits, {r['methods']})",
                            file=sys.stderr, flush=True,
                        )  # fmt: skip
    finally:
        farm.stop()
        pg.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(scratch)], check=False)
        shutil.rmtree(base, ignore_errors=True)
    summary = summarize(results)
    setting = (
        f"{args.bots} worker(s) x {args.jobs} jobs, Bazel --jobs=8, worker dirs on "
        f"{'tmpfs' if mounted else 'the temp dir'}, CAS fsync {'off' if args.no_fsync else 'on'}, "
        f"{os.cpu_count()} CPUs"
    )
    print(setting)
    print(table(summary, args.runs, args.markdown))
    for project, s in summary.items():
        print(f"{project}: staging methods {s['methods']}")
    if args.json is not None:
        args.json.write_text(json.dumps({"setting": setting, "samples": results,
                                         "summary": summary}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
