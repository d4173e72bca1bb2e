"""Stress: 4 trees x 320 files, 24 threads, max_entries=2, every result checked byte for byte."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from fastmat import _binding
from fastmat.cache import DirectoryCache
from fastmat.cas import LocalCAS
from tests.cache_helpers import ingest, leftovers, modes_problems, mounted, shape, snapshot

pytestmark = pytest.mark.stress

THREADS = 24
ROUNDS = 32  # per thread: 768 materializations and workspaces in all


def test_stress_many_threads_few_entries(tmp_path: Path) -> None:
    with LocalCAS(tmp_path / "cas", fsync=False) as cas:
        roots = [ingest(cas, tmp_path / f"s{i}", shape(320, 100 + i, per_dir=16)) for i in range(4)]
        wants = [snapshot(tmp_path / f"s{i}") for i in range(4)]
        errors: list[str] = []
        done = [0]
        mu = threading.Lock()
        barrier = threading.Barrier(THREADS)
        with DirectoryCache(cas, tmp_path / "cache", max_entries=2, fsync=False) as cache:

            def worker(t: int) -> None:
                rng = random.Random(t)
                barrier.wait()
                for k in range(ROUNDS):
                    i = rng.randrange(4)
                    dest = tmp_path / "out" / f"t{t}-{k}"
                    try:
                        if k % 3 == 2:  # a third of the rounds as workspaces
                            with cache.workspace(roots[i], dest) as ws:
                                got, bad = snapshot(ws.path), modes_problems(ws.path)
                        else:
                            cache.materialize(roots[i], dest)
                            got, bad = snapshot(dest), modes_problems(dest)
                            _binding.remove_tree(dest)
                        if got != wants[i]:
                            errors.append(f"t{t} round {k}: tree {i} differs")
                        if bad:
                            errors.append(f"t{t} round {k}: modes {bad[:3]}")
                    except Exception as e:
                        errors.append(f"t{t} round {k}: {type(e).__name__}: {e}")
                    with mu:
                        done[0] += 1

            (tmp_path / "out").mkdir()
            threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            cache.drain()
            st = cache.stats()
            assert errors == []
            assert done[0] == THREADS * ROUNDS
            assert st.hits + st.misses == THREADS * ROUNDS
            assert (st.entries, st.pinned, st.damaged) == (2, 0, 0)
            assert st.constructions >= 4
            assert leftovers(tmp_path / "cache") == []
        assert not mounted(tmp_path)
        assert list((tmp_path / "out").iterdir()) == []
