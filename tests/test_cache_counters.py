"""A cache's counters outlive the process that counted them (issue 12, item 5): each
instance writes its own file, every N events and at close (never per hit); reading
sums them; an opener folds closed instances' files into a total."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastmat.cache import DirectoryCache
from fastmat.cache import counters as cache_counters
from fastmat.cas import LocalCAS
from fastmat.cli import main
from tests.cache_helpers import BASIC, ingest


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[LocalCAS]:
    with LocalCAS(tmp_path / "cas", fsync=False) as c:
        yield c


def test_counters_of_closed_instances_are_summed_and_folded(cas: LocalCAS, tmp_path: Path) -> None:
    root = ingest(cas, tmp_path / "src", BASIC)
    path = tmp_path / "cache"
    with DirectoryCache(cas, path, fsync=False) as a:
        a.materialize(root, tmp_path / "a1")  # a miss
        a.materialize(root, tmp_path / "a2")  # a hit
    with DirectoryCache(cas, path, fsync=False) as b:
        assert (b.stats().hits, b.stats().misses) == (0, 0)  # its own, since open
        st = b.stats(all_instances=True)
        assert (st.hits, st.misses, st.constructions) == (1, 1, 1)
        assert sorted(os.listdir(path / "counters")) == [".lock", "total.json"]  # folded
        b.materialize(root, tmp_path / "b1")
        assert b.stats(all_instances=True).hits == 2  # its live counters count too
        with DirectoryCache(cas, path, fsync=False) as c:
            assert c.stats(all_instances=True).hits == 1  # b has written nothing yet
    with DirectoryCache(cas, path, fsync=False) as d:
        st = d.stats(all_instances=True)
        assert (st.hits, st.misses, st.hardlink_hits) == (2, 1, 2)


def test_an_instance_writes_every_n_events_not_per_hit(
    cas: LocalCAS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = ingest(cas, tmp_path / "src", BASIC)
    writes: list[str] = []
    real = cache_counters._write

    def counted(dir_fd: int, name: str, data: dict[str, int], mode: int) -> None:
        writes.append(name)
        real(dir_fd, name, data, mode)

    monkeypatch.setattr(cache_counters, "_write", counted)
    path = tmp_path / "cache"
    with DirectoryCache(cas, path, fsync=False) as a:
        for i in range(20):  # a miss, then 19 hits
            a.materialize(root, tmp_path / f"d{i}")
        assert writes == []  # about 40 events: below FLUSH_EVERY
    assert len(writes) == 1  # at close
    monkeypatch.setattr(cache_counters, "FLUSH_EVERY", 8)
    writes.clear()
    with DirectoryCache(cas, path, fsync=False) as a:
        for i in range(20):
            a.materialize(root, tmp_path / f"e{i}")
        during = len(writes)
        with DirectoryCache(cas, path, fsync=False) as b:
            seen = b.stats(all_instances=True).hits  # a's as last written, and the total
    assert 3 <= during <= 10  # 40 events (a hit and its method each): every 8th
    assert 19 + 8 <= seen <= 19 + 20  # the first run's, and a's as last written


def test_the_command_reports_counters_across_processes(
    cas: LocalCAS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``stats --cache`` always said ``hits: 0, misses: 0``: counters lived in memory."""
    root = ingest(cas, tmp_path / "src", BASIC)
    argv = ["--cas", str(cas.root), "--cache", str(tmp_path / "cache")]
    for name in ("d1", "d2", "d3"):  # each run: one process's instance
        assert main(["materialize", str(root), str(tmp_path / name), *argv]) == 0
    capsys.readouterr()
    assert main(["stats", *argv, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)["cache"]
    assert (st["hits"], st["misses"], st["constructions"], st["entries"]) == (2, 1, 1, 1)
