"""Fetching from BuildGrid on loopback: the fetch -> link pipeline against its parts,
into a durable (default) and a non-durable (``fsync=False``) local CAS side by side.

For the 635-file (180 MB, flat) and 1,978-file (466 MB, ~100 dirs) shapes, each
run starting from an empty local CAS, all in the same process run (medians,
the variants taking turns round by round, so load changes hit them alike):

- ``pipelined``: ``fastmat.materialize`` with a ``RemoteFetcher`` (links while
  fetching) into a default, durable CAS (group commit: invariant 14);
- ``pipelined_nofsync``: the same into a ``LocalCAS(fsync=False)``;
- ``fetch_only`` / ``fetch_only_nofsync``: the same fetches (GetTree + blobs)
  into an empty CAS, no links;
- ``link_only``: ``materialize`` from the CAS ``fetch_only`` filled;
- ``fetch_then_link``: ``materialize(..., fetcher=...)`` with a plain fetcher
  (fetches every missing blob, then links), durable;
- ``buildgrid``: BuildGrid's own ``Downloader.download_directory`` (its venv,
  timed inside the child process) into a fresh directory; it fsyncs nothing.

Printed: durable / non-durable, for the pipeline and for fetching alone (target
<= 1.1); pipelined / max(fetch-only, link-only) (target <= 1.2); pipelined /
buildgrid, durable (target <= 0.8) and non-durable; and the peak number of
requests in flight (bound: ``--max-inflight``, default 128). fastmat verifies
every byte it stores.

    python benches/bench_remote.py [--runs 5] [--shapes medium_flat,large_tree]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benches"))

from shapes import build_shape  # noqa: E402

from fastmat.cas import LocalCAS  # noqa: E402
from fastmat.cas.layout import digest_of_rel  # noqa: E402
from fastmat.digest import Digest  # noqa: E402
from fastmat.materialize import materialize  # noqa: E402
from fastmat.remote import RemoteCAS, RemoteFetcher  # noqa: E402
from fastmat.tree import load_plan  # noqa: E402
from tests.reapi_server import BuildGrid, Uploader, find_bgd, venv_dir  # noqa: E402

_BG_CHILD = textwrap.dedent(
    """
    import sys, time, grpc
    from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re
    from buildgrid.server.client.cas import download
    address, h, size, dest = sys.argv[1:]
    opts = [("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.insecure_channel(address, options=opts)
    digest = re.Digest(hash=h, size_bytes=int(size))
    t0 = time.perf_counter()
    with download(channel) as dl:
        dl.download_directory(digest, dest)
    print(time.perf_counter() - t0)
    """
)


def medians(runs: int, fns: dict[str, Callable[[int], float]]) -> dict[str, float]:
    """Round-robin (each round runs every variant once), so that a machine whose
    load changes during the run slows every variant alike; medians per variant."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(runs):
        for name, fn in fns.items():
            gc.collect()
            times[name].append(fn(i))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_shape(
    server: BuildGrid, name: str, args: argparse.Namespace, work: Path
) -> dict[str, float]:
    blobs: dict[Digest, bytes] = {}

    def put(data: bytes) -> Digest:
        d = Digest.of(data)
        blobs[d] = data
        return d

    root = build_shape(put, name, bytes_scale=args.bytes_scale)
    up = Uploader(server.address)
    up.upload(blobs)
    up.close()
    total_bytes = sum(len(b) for b in blobs.values())
    blobs.clear()
    remote = RemoteCAS(server.url)
    peak = 0
    n = 0

    def fresh_cas(fsync: bool = True) -> LocalCAS:
        nonlocal n
        n += 1
        return LocalCAS(work / f"cas{n}", fsync=fsync)

    def cleanup(*paths: Path) -> None:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)

    def fetcher(cas: LocalCAS) -> RemoteFetcher:
        return RemoteFetcher(remote, cas, max_inflight=args.max_inflight)

    def pipelined(fsync: bool) -> Callable[[int], float]:
        def run(_: int) -> float:
            nonlocal peak
            cas = fresh_cas(fsync)
            dest = work / f"pipe{n}"
            with fetcher(cas) as f:
                t0 = time.perf_counter()
                materialize(cas, root, dest, fetcher=f)
                dt = time.perf_counter() - t0
                peak = max(peak, f.stats.peak_inflight)
            cas.close()
            cleanup(dest, cas.root)
            return dt

        return run

    filled: list[LocalCAS] = []
    n_files = 0

    def fetch_only(fsync: bool) -> Callable[[int], float]:
        def run(_: int) -> float:
            nonlocal peak, n_files
            cas = fresh_cas(fsync)
            with fetcher(cas) as f:
                t0 = time.perf_counter()
                f.fetch_directories(root)
                plan = load_plan(cas, root)
                f.fetch_blobs([digest_of_rel(s) for s in plan.blob_srcs()])
                dt = time.perf_counter() - t0
                peak = max(peak, f.stats.peak_inflight)
                n_files = plan.n_files
            if fsync:
                filled.append(cas)
            else:
                cas.close()
                cleanup(cas.root)
            return dt

        return run

    def link_only(i: int) -> float:
        cas = filled[i]
        dest = work / f"link{n}-{i}"
        t0 = time.perf_counter()
        materialize(cas, root, dest)
        dt = time.perf_counter() - t0
        cleanup(dest)
        return dt

    class _Plain:  # a fetcher without the pipeline: fetch everything, then link
        def __init__(self, f: RemoteFetcher) -> None:
            self.f = f

        def fetch_directories(self, root: Digest) -> None:
            self.f.fetch_directories(root)

        def fetch_blobs(self, digests: Sequence[Digest]) -> None:
            self.f.fetch_blobs(digests)

    def fetch_then_link(_: int) -> float:
        cas = fresh_cas()
        dest = work / f"seq{n}"
        with fetcher(cas) as f:
            t0 = time.perf_counter()
            materialize(cas, root, dest, fetcher=_Plain(f))
            dt = time.perf_counter() - t0
        cas.close()
        cleanup(dest, cas.root)
        return dt

    def buildgrid(i: int) -> float:
        dest = work / f"bgd{i}"
        dest.mkdir()
        out = subprocess.run(
            [str(venv_dir() / "bin" / "python"), "-c", _BG_CHILD, server.address,
             root.hash, str(root.size_bytes), str(dest)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        cleanup(dest)
        return float(out.stdout.split()[-1])

    res = medians(
        args.runs,
        {
            "fetch_only": fetch_only(True),  # first: link_only links from the CAS it filled
            "link_only": link_only,
            "fetch_only_nofsync": fetch_only(False),
            "pipelined": pipelined(True),
            "pipelined_nofsync": pipelined(False),
            "fetch_then_link": fetch_then_link,
            "buildgrid": buildgrid,
        },
    )
    res.update(files=n_files, bytes=total_bytes, peak_inflight=peak)
    for cas in filled:
        cas.close()
        cleanup(cas.root)
    remote.close()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--shapes", default="medium_flat,large_tree")
    ap.add_argument("--bytes-scale", type=float, default=1.0)
    ap.add_argument("--max-inflight", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if find_bgd() is None:
        print(f"BuildGrid is not installed in {venv_dir()}: run .ci/install_buildgrid.sh")
        return 2
    results = {}
    with tempfile.TemporaryDirectory(prefix="fastmat-bench-remote-") as tmp:
        server = BuildGrid(Path(tmp) / "bgd")
        server.start()
        try:
            for name in args.shapes.split(","):
                work = Path(tmp) / name
                work.mkdir()
                results[name] = r = bench_shape(server, name, args, work)
                if args.json:
                    continue
                base = max(r["fetch_only"], r["link_only"])
                print(
                    f"{name}: {r['files']:.0f} files, {r['bytes'] / 1e6:.0f} MB, "
                    f"{args.runs} runs (medians), {os.getloadavg()[0]:.1f} load\n"
                    f"  durable:     pipelined {r['pipelined']:.3f}s  "
                    f"fetch-only {r['fetch_only']:.3f}s  link-only {r['link_only']:.3f}s  "
                    f"fetch-then-link {r['fetch_then_link']:.3f}s\n"
                    f"  non-durable: pipelined {r['pipelined_nofsync']:.3f}s  "
                    f"fetch-only {r['fetch_only_nofsync']:.3f}s\n"
                    f"  buildgrid downloader {r['buildgrid']:.3f}s\n"
                    f"  durable / non-durable: pipelined "
                    f"{r['pipelined'] / r['pipelined_nofsync']:.2f}, fetch-only "
                    f"{r['fetch_only'] / r['fetch_only_nofsync']:.2f}  (target <= 1.10)\n"
                    f"  pipelined / max(fetch-only, link-only) = {r['pipelined'] / base:.2f}"
                    f"  (target <= 1.20)\n"
                    f"  pipelined / fetch-then-link = {r['pipelined'] / r['fetch_then_link']:.2f}\n"
                    f"  pipelined / buildgrid downloader = {r['pipelined'] / r['buildgrid']:.2f}"
                    f" durable (target <= 0.80), "
                    f"{r['pipelined_nofsync'] / r['buildgrid']:.2f} non-durable\n"
                    f"  peak requests in flight {r['peak_inflight']:.0f} "
                    f"(bound {args.max_inflight})",
                    flush=True,
                )
        finally:
            server.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    worst = max(r["peak_inflight"] for r in results.values())
    if worst > args.max_inflight:
        print(f"BOUND VIOLATED: {worst:.0f} requests in flight > {args.max_inflight}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
