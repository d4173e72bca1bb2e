"""Eviction racing materialize: a real second process evicts everything it may, over
and over, while this one materializes (invariant 15, issue 11).

Without a fetcher a materialize either builds the whole, correct tree or raises
``BlobNotFoundError`` and leaves no destination; with a fetcher (a real BuildGrid)
it always succeeds, fetching again what was evicted (counted as re-fetches). A
pinned blob is never evicted, so no link ever fails half-way.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import stat
from collections.abc import Callable
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest

from fastmat import BlobNotFoundError, Digest, materialize
from fastmat.cas import LocalCAS
from fastmat.remote import RemoteCAS
from fastmat.tree import ingest_tree
from tests.reapi_server import BuildGrid, Uploader, build_tree, buildgrid

_ = buildgrid  # the fixture, imported for pytest
SPAWN = mp.get_context("spawn")


def _evict_forever(cas_dir: str, started: Event, stop: Event, rounds: Synchronized[int]) -> None:
    with LocalCAS(cas_dir) as cas:
        started.set()
        while not stop.is_set():
            cas.gc(max_bytes=0)  # everything that is not pinned
            with rounds.get_lock():
                rounds.value += 1


class Evictor:
    """A spawned process running ``gc(max_bytes=0)`` in a loop until stopped."""

    def __init__(self, cas_dir: Path) -> None:
        self.started, self.stop_ = SPAWN.Event(), SPAWN.Event()
        self.rounds: Synchronized[int] = SPAWN.Value("i", 0)
        self.proc = SPAWN.Process(
            target=_evict_forever, args=(str(cas_dir), self.started, self.stop_, self.rounds)
        )

    def __enter__(self) -> Evictor:
        self.proc.start()
        assert self.started.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_.set()
        self.proc.join(60)
        assert self.proc.exitcode == 0


def make_spec(tag: str, n: int) -> dict[str, Any]:
    rnd = random.Random(tag)
    spec: dict[str, Any] = {}
    for i in range(n):
        data = f"{tag}:{i}:".encode() + rnd.randbytes(rnd.randrange(500, 20_000))
        path = f"d{i % 4}/f{i}.o"
        spec[path] = ("exec", data) if i % 7 == 0 else data
    return spec


def check_tree(dest: Path, spec: dict[str, Any]) -> None:
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert found == sorted(spec)
    for path, value in spec.items():
        exe = isinstance(value, tuple)
        data = value[1] if exe else value
        p = dest / path
        assert p.read_bytes() == data, path
        assert stat.S_IMODE(p.lstat().st_mode) == (0o555 if exe else 0o444), path


def write_spec(src: Path, spec: dict[str, Any]) -> None:
    for path, value in spec.items():
        p = src / path
        p.parent.mkdir(parents=True, exist_ok=True)
        exe = isinstance(value, tuple)
        p.write_bytes(value[1] if exe else value)
        p.chmod(0o755 if exe else 0o644)


def run_race(tmp_path: Path, n: int, attempt: Callable[[int, Path], None]) -> None:
    for k in range(n):
        attempt(k, tmp_path / f"dest{k}")


def test_local_materialize_never_builds_a_wrong_or_partial_tree(tmp_path: Path) -> None:
    specs = [make_spec(f"local{t}", 30) for t in range(4)]
    srcs = []
    for t, spec in enumerate(specs):
        srcs.append(tmp_path / f"src{t}")
        write_spec(srcs[-1], spec)
    cas_dir = tmp_path / "cas"
    outcomes = {"whole": 0, "missing": 0}
    with LocalCAS(cas_dir) as cas, Evictor(cas_dir) as evictor:

        def attempt(k: int, dest: Path) -> None:
            t = k % len(specs)
            root = ingest_tree(cas, srcs[t])  # what the evictor took is stored again
            try:
                materialize(cas, root, dest)
            except BlobNotFoundError:
                assert not os.path.lexists(dest)  # nothing half-built
                outcomes["missing"] += 1
                return
            check_tree(dest, specs[t])
            outcomes["whole"] += 1

        run_race(tmp_path, 40, attempt)
        rounds = evictor.rounds.value
        evictions = cas.usage().counters.evictions
    assert outcomes["whole"] + outcomes["missing"] == 40
    assert outcomes["whole"] > 0
    assert rounds > 0
    assert evictions > 0


@pytest.mark.remote
def test_remote_materialize_fetches_again_what_was_evicted(
    buildgrid: BuildGrid, tmp_path: Path
) -> None:
    specs = [make_spec(f"remote{t}", 30) for t in range(4)]
    roots = []
    up = Uploader(buildgrid.address)
    for spec in specs:
        root, blobs = build_tree(spec)
        up.upload(blobs)
        roots.append(root)
    up.close()
    cas_dir = tmp_path / "cas"
    with (
        LocalCAS(cas_dir) as cas,
        RemoteCAS(buildgrid.url) as remote,
        Evictor(cas_dir) as evictor,
    ):

        def attempt(k: int, dest: Path) -> None:
            t = k % len(specs)
            materialize(cas, roots[t], dest, fetcher=remote)  # never fails
            check_tree(dest, specs[t])

        run_race(tmp_path, 24, attempt)
        assert evictor.rounds.value > 0
        counters = cas.usage().counters
    assert counters.evictions > 0
    assert counters.refetches > 0  # stored again after an eviction


def test_eviction_spares_what_a_materialize_pinned(tmp_path: Path) -> None:
    """Deterministic: the evictor runs between the pin and the links."""
    spec = make_spec("pinned", 12)
    src = tmp_path / "src"
    write_spec(src, spec)
    with LocalCAS(tmp_path / "cas") as cas:
        root = ingest_tree(cas, src)
        real = cas.pinned

        def pinned_then_evict(names: Any = b"") -> Any:
            cm = real(names)

            class Wrapper:
                def __enter__(self) -> Any:
                    pin = cm.__enter__()
                    with LocalCAS(tmp_path / "cas") as other:
                        rep = other.gc(max_bytes=0)
                    assert rep.pinned == len(spec)  # every blob of the tree
                    return pin

                def __exit__(self, *exc: Any) -> Any:
                    return cm.__exit__(*exc)

            return Wrapper()

        cas.pinned = pinned_then_evict  # type: ignore[method-assign]
        materialize(cas, root, tmp_path / "dest")
        check_tree(tmp_path / "dest", spec)
        del cas.pinned
        assert all(Digest.of(v[1] if isinstance(v, tuple) else v) in cas for v in spec.values())
