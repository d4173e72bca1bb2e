"""The methods ``fastmat bench`` compares, each timed on one fresh destination.

Every method builds the same tree at a destination that does not exist yet and
returns the seconds its work took; set-up and clean-up (removing the destination,
unmounting) stay outside the clock. The tree-to-tree baselines (``os.link`` walk,
``shutil.copytree``, ``cp -al``) read the generated source tree; fastmat's methods
read the CAS the tree was ingested into; the floor runs fastmat's own plan with
nothing but ``mkdirat`` + ``linkat``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastmat import _binding

if TYPE_CHECKING:
    from fastmat.bench.shapes import Shape
    from fastmat.cache import DirectoryCache
    from fastmat.cas import LocalCAS
    from fastmat.digest import Digest
    from fastmat.remote import RemoteCAS
    from fastmat.tree import Plan


class Skip(Exception):
    """This method cannot run here (the reason is recorded instead of samples)."""


@dataclass
class Subject:
    """One shape, generated and ingested."""

    shape: Shape
    src: Path  # the generated plain tree (source of the tree-to-tree baselines)
    root: Digest
    plan: Plan
    dirs: int  # directories in the tree, root excluded


@dataclass
class Env:
    """What every method may use; one per bench run."""

    cas: LocalCAS
    cache: DirectoryCache
    work: Path  # scratch directory on the same filesystem as the CAS
    threads: int
    remote: RemoteCAS | None = None
    remote_url: str | None = None


Runner = Callable[[Env, Subject, Path], float]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    run: Runner
    description: str


def _remove(path: Path) -> None:
    _binding.remove_tree(str(path))


def floor(env: Env, subj: Subject, dest: Path) -> float:
    os.mkdir(dest)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ns = _binding.floor_exec(fd, env.cas.root_fd, subj.plan.arrays, env.threads)
    finally:
        os.close(fd)
    _remove(dest)
    return ns / 1e9


def fastmat_cold(env: Env, subj: Subject, dest: Path) -> float:
    from fastmat.materialize import materialize
    from fastmat.tree.nodecache import node_cache

    node_cache.clear()  # cold: every Directory read, hashed, decoded and validated again
    t0 = time.perf_counter()
    materialize(env.cas, subj.root, dest, threads=env.threads)
    elapsed = time.perf_counter() - t0
    _remove(dest)
    return elapsed


def cache_hit(env: Env, subj: Subject, dest: Path) -> float:
    t0 = time.perf_counter()
    result = env.cache.materialize(subj.root, dest)
    elapsed = time.perf_counter() - t0
    _remove(dest)
    if not result.hit:
        raise Skip("the directory cache missed on a warm entry (evicted?)")
    return elapsed


def overlay_workspace(env: Env, subj: Subject, dest: Path) -> float:
    """Only entering the workspace (the mount) is timed; leaving unmounts."""
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        ws = stack.enter_context(env.cache.workspace(subj.root, dest))
        elapsed = time.perf_counter() - t0
        method = ws.method
    if os.path.lexists(dest):
        _remove(dest)
    if method != "overlay":
        raise Skip(f"this process cannot mount an overlay (workspace used {method!r})")
    return elapsed


def python_link_walk(env: Env, subj: Subject, dest: Path) -> float:
    t0 = time.perf_counter()
    link_walk(subj.src, dest)
    elapsed = time.perf_counter() - t0
    _remove(dest)
    return elapsed


def link_walk(src: Path, dest: Path) -> None:
    """The obvious Python: ``os.walk`` the source, ``mkdir`` each directory, ``os.link``
    each file (the trees have no symlinks)."""
    os.mkdir(dest)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out = str(dest) if rel == "." else os.path.join(dest, rel)
        for d in dirnames:
            os.mkdir(os.path.join(out, d))
        for f in filenames:
            os.link(os.path.join(dirpath, f), os.path.join(out, f))


def copytree(env: Env, subj: Subject, dest: Path) -> float:
    t0 = time.perf_counter()
    shutil.copytree(subj.src, dest, symlinks=True)
    elapsed = time.perf_counter() - t0
    _remove(dest)
    return elapsed


def cp_al(env: Env, subj: Subject, dest: Path) -> float:
    cp = shutil.which("cp")
    if cp is None:
        raise Skip("no cp on PATH")
    t0 = time.perf_counter()
    subprocess.run([cp, "-al", str(subj.src), str(dest)], check=True)
    elapsed = time.perf_counter() - t0
    _remove(dest)
    return elapsed


def _remote(env: Env, subj: Subject, dest: Path, *, fsync: bool) -> float:
    from fastmat.cas import LocalCAS
    from fastmat.materialize import materialize

    if env.remote is None:
        raise Skip("no --remote URL")
    cas_dir = dest.with_name(dest.name + ".cas")
    try:
        with LocalCAS(cas_dir, fsync=fsync) as cas:
            t0 = time.perf_counter()
            materialize(cas, subj.root, dest, fetcher=env.remote, threads=env.threads)
            elapsed = time.perf_counter() - t0
    finally:
        for p in (dest, cas_dir):
            if os.path.lexists(p):
                _remove(p)
    return elapsed


def remote_fetch(env: Env, subj: Subject, dest: Path) -> float:
    """The cold fetch pipeline: an empty local CAS with the default settings (durable:
    group commit), every blob from the remote, each linked as it arrives
    (``materialize`` with a ``RemoteCAS`` as the fetcher)."""
    return _remote(env, subj, dest, fsync=True)


def remote_fetch_nofsync(env: Env, subj: Subject, dest: Path) -> float:
    """The same into a ``LocalCAS(fsync=False)``: not crash-safe, for comparison."""
    return _remote(env, subj, dest, fsync=False)


METHODS: tuple[Method, ...] = (
    Method(
        "floor",
        "floor",
        floor,
        "a bare C loop of mkdirat + linkat over the same plan, same threads: the system-call cost",
    ),
    Method(
        "fastmat_cold",
        "fastmat cold",
        fastmat_cold,
        "materialize(): read, hash and validate every Directory, check the blobs, link",
    ),
    Method(
        "cache_hit",
        "fastmat cache hit",
        cache_hit,
        "DirectoryCache.materialize of a cached tree: replays its entry as hardlinks",
    ),
    Method(
        "overlay",
        "overlay workspace",
        overlay_workspace,
        "DirectoryCache.workspace: mounts the entry as an overlay and unmounts it; "
        "times a mount, creates no file",
    ),
    Method("os_link_walk", "Python os.link walk", python_link_walk, "os.walk + mkdir + os.link"),
    Method("copytree", "shutil.copytree", copytree, "shutil.copytree (copies the bytes)"),
    Method("cp_al", "cp -al", cp_al, "cp -al (GNU coreutils, one process)"),
    Method(
        "remote", "remote fetch", remote_fetch, "materialize() from --remote, empty durable CAS"
    ),
    Method(
        "remote_nofsync",
        "remote fetch, fsync=False",
        remote_fetch_nofsync,
        "the same into a LocalCAS(fsync=False): not crash-safe",
    ),
)
