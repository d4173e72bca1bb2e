"""Interrupting the ``fastmat`` command (tests/test_interrupt.py, benches/bench_cancel.py):
a large tree built straight into a CAS, and a ``fastmat materialize`` child sent a
signal once it is linking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastmat import proto
from fastmat.cas import LocalCAS
from fastmat.digest import Digest

STAGING_PREFIX = ".fastmat-tmp."


def big_tree(cas: LocalCAS, n_files: int, *, per_dir: int = 1000, distinct: int = 1000) -> Digest:
    """A tree of ``n_files`` files in directories of ``per_dir``, sharing ``distinct``
    blobs (each linked ``n_files / distinct`` times: far below EMLINK); fast to make."""
    blobs = [cas.put(f"big tree blob {i}\n".encode()) for i in range(distinct)]
    root = proto.Directory()
    for d in range(-(-n_files // per_dir)):
        msg = proto.Directory()
        for i in range(min(per_dir, n_files - d * per_dir)):
            f = msg.files.add(name=f"d{d}f{i:06d}")  # distinct messages: no DAG reuse
            b = blobs[(d * per_dir + i) % distinct]
            f.digest.hash, f.digest.size_bytes = b.hash, b.size_bytes
        sub = cas.put(msg.SerializeToString())
        c = root.directories.add(name=f"d{d:05d}")
        c.digest.hash, c.digest.size_bytes = sub.hash, sub.size_bytes
    return cas.put(root.SerializeToString())


def staging(parent: Path) -> list[str]:
    """The staging directories under ``parent`` (a tree being built, or left behind)."""
    return [n for n in os.listdir(parent) if n.startswith(STAGING_PREFIX)]


@dataclass
class Interrupted:
    rc: int
    stdout: str
    stderr: str
    linking: bool  # the signal came while the tree was being built
    exit_s: float  # from the signal to the child's exit
    run_s: float  # from the child's start to its exit


def building(parent: Path) -> Callable[[], bool]:
    """Whether a tree is being built under ``parent`` now (a staging directory is there)."""
    return lambda: bool(staging(parent))


def constructing(cache: Path) -> Callable[[], bool]:
    """Whether a cache entry is being constructed in some instance's scratch now."""
    return lambda: any(cache.glob("tmp/*/b-*/.fastmat-tmp.*"))


def interrupt(
    argv: Sequence[str],
    started: Callable[[], bool],
    *,
    after_s: float,
    sig: int = signal.SIGINT,
    timeout_s: float = 300.0,
) -> Interrupted:
    """Runs ``fastmat *argv``; once ``started()`` (see :func:`building`), waits
    ``after_s`` and sends ``sig``. If the child ends first, nothing is sent (``linking``
    False)."""
    t_start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmat", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = t_start + timeout_s
    linking = False
    while time.monotonic() < deadline and proc.poll() is None:
        if started():
            linking = True
            break
        time.sleep(0.002)
    t_sig = time.monotonic()
    if linking:
        time.sleep(after_s)
        linking = proc.poll() is None
        t_sig = time.monotonic()
        if linking:
            proc.send_signal(sig)
    out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    t_end = time.monotonic()
    return Interrupted(proc.returncode, out, err, linking, t_end - t_sig, t_end - t_start)
