"""``fastmat bench`` at a tiny scale: structure of the results, every method sampled.

No timing assertions: tests/ holds no timings (benches/ and the bench itself do).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from fastmat.bench.report import format_markdown, format_table
from fastmat.bench.shapes import SEED_SHAPES, Shape, file_sizes, generate, shapes_for
from fastmat.cli import main
from tests.reapi_server import BuildGrid, buildgrid

_ = buildgrid  # the fixture, imported for pytest

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def test_shapes_match_the_seeds() -> None:
    full = {s.name: s for s in shapes_for(quick=False)}
    assert [(s.files, s.total_bytes) for s in SEED_SHAPES] == [
        (64, 64_000),
        (219, 40_000_000),
        (635, 180_000_000),
        (1978, 466_000_000),
    ]
    assert full["large_tree"].dirs == 100
    assert full["scale_100k"].files == 100_000
    quick = shapes_for(quick=True)
    assert [s.files for s in quick[:4]] == [64, 219, 635, 1978]  # counts kept, bytes shrunk
    assert all(
        q.total_bytes < f.total_bytes for q, f in zip(quick[1:4], SEED_SHAPES[1:4], strict=False)
    )


def test_generate_writes_distinct_files(tmp_path: Path) -> None:
    shape = Shape("t", 50, 200_000, dirs=6)
    written = generate(shape, tmp_path / "t")
    files = [Path(d, f) for d, _, fs in os.walk(tmp_path / "t") for f in fs]
    assert len(files) == 50
    assert written == sum(f.stat().st_size for f in files) == sum(file_sizes(shape))
    assert abs(written - 200_000) < 200_000 * 0.01
    assert len({f.read_bytes() for f in files}) == 50  # every blob distinct: no shared inode
    assert len({f.parent for f in files}) == 6


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib (the bench extra) is not installed")
def test_bench_quick_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "results.json", tmp_path / "results.png"
    argv = [
        "bench",
        "--quick",
        "--scale",
        "0.02",
        "--runs",
        "2",
        "--budget",
        "600",
        "--dir",
        str(tmp_path),
    ]
    rc = main([*argv, "--json", "--out", str(out), "--plot", str(png)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(stdout)
    assert json.loads(out.read_text()) == res
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(tmp_path.iterdir()) == {out, png}  # the scratch directory is gone

    for key in ("fastmat_version", "date", "machine", "config", "methods", "shapes", "results"):
        assert key in res
    assert res["machine"]["cpus"] == os.cpu_count()
    assert res["config"]["runs"] == 2
    names = [m["name"] for m in res["methods"]]
    assert names == ["floor", "fastmat_cold", "cache_hit", "overlay", "os_link_walk",
                     "copytree", "cp_al"]  # fmt: skip
    shapes = [s["name"] for s in res["shapes"]]
    assert shapes == ["small_flat", "pcm_cluster", "medium_flat", "large_tree", "scale_10k"]
    assert len(res["results"]) == len(shapes) * len(names)
    for r in res["results"]:
        if r["method"] == "overlay" and (r["skipped"] or "").startswith("this process cannot"):
            continue  # this process cannot mount: recorded with the reason
        assert r["skipped"] is None, r
        assert len(r["samples_ms"]) == 2
        assert all(x > 0 for x in r["samples_ms"])
        assert r["median_ms"] > 0
        assert r["us_per_file"] > 0
        assert r["ratio_to_floor"] > 0
        if r["method"] == "floor":
            assert r["ratio_to_floor"] == 1.0

    table = format_table(res)
    assert "scale_10k" in table
    assert "cp -al" in table
    assert "x floor" in table
    md = format_markdown(res).splitlines()
    assert md[2].startswith("| shape | floor | fastmat cold |")
    assert len(md) == 4 + len(shapes)


def test_plot_without_matplotlib_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    rc = main(["bench", "--quick", "--plot", str(tmp_path / "p.png"), "--dir", str(tmp_path)])
    _, err = capsys.readouterr()
    assert rc == 1
    assert "matplotlib" in err
    assert "fastmat[bench]" in err
    assert list(tmp_path.iterdir()) == []  # refused before any work


@pytest.mark.remote
def test_bench_remote_fetch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], buildgrid: BuildGrid
) -> None:
    argv = ["bench", "--quick", "--scale", "0.02", "--runs", "1", "--budget", "600"]
    argv += ["--dir", str(tmp_path), "--remote", buildgrid.url, "--json"]
    argv += ["--methods", "remote", "remote_nofsync"]
    argv += ["--shapes", "pcm_cluster", "large_tree"]
    rc = main(argv)
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(stdout)
    assert [m["name"] for m in res["methods"]] == ["floor", "remote", "remote_nofsync"]
    assert res["config"]["remote"] == buildgrid.url
    for r in res["results"]:
        assert r["skipped"] is None, r
        assert len(r["samples_ms"]) == 1


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib (the bench extra) is not installed")
def test_the_plot_explains_itself() -> None:
    """Issue 12, item 8: nothing said what "floor" or "fastmat cold" mean, nor that the
    overlay series times a mount; the title named neither the machine nor the time."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from fastmat.bench.report import figure

    res = json.loads((REPO / "docs" / "bench-2026-11-21.json").read_text())
    fig = figure(res)
    try:
        texts = "\n".join(t.get_text() for t in fig.findobj(Text))
    finally:
        plt.close(fig)
    assert "floor: a bare C loop of mkdirat + linkat" in texts
    assert "fastmat cold: materialize(): read, hash and validate every Directory" in texts
    assert "times a mount, creates no file" in texts  # the overlay's legend entry
    assert "overlay: one mount + unmount whatever the file count" in texts  # on its series
    m = res["machine"]
    for part in ("2026-11-21 23:45:35 UTC", m["hostname"], m["cpu_model"], m["kernel"]):
        assert part in texts


def test_quick_states_one_measured_duration(capsys: pytest.CaptureFixture[str]) -> None:
    """``--quick``'s duration was "about a minute" in the help, "~25 s" in the docs;
    16-19 s measured. One phrase everywhere, and the recorded quick run agrees."""
    from fastmat.bench.run import QUICK_DURATION, QUICK_SECONDS

    assert main(["bench", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert QUICK_DURATION in help_text
    assert "minute" not in help_text
    for doc in ("README.md", "docs/design.md", "docs/bench-2026-11-21.md"):
        text = " ".join((REPO / doc).read_text().split())
        assert "about 20 s on an idle 2-CPU machine" in text, doc
        assert "~25 s" not in text, doc
    assert QUICK_DURATION == "about 20 s on an idle 2-CPU machine"
    recorded = json.loads((REPO / "docs" / "bench-2026-11-21-quick.json").read_text())
    assert recorded["config"]["quick"] is True
    assert 0.5 * QUICK_SECONDS <= recorded["duration_s"] <= 1.5 * QUICK_SECONDS
