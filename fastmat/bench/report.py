"""Rendering ``fastmat bench`` results: the text table and the PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastmat.errors import FastmatError


def _fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def _fmt_bytes(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} KB"


def format_table(res: dict[str, Any]) -> str:
    """One block per shape, one row per method: median ms, ratio to the floor, µs/file."""
    labels = {m["name"]: m["label"] for m in res["methods"]}
    by_shape: dict[str, list[dict[str, Any]]] = {}
    for r in res["results"]:
        by_shape.setdefault(r["shape"], []).append(r)
    cfg = res["config"]
    m = res["machine"]
    head = (
        f"fastmat {res['fastmat_version']} bench, {res['date']}, "
        f"{m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('filesystem')}, "
        f"kernel {m.get('kernel')}; median of {cfg['runs']} runs, {cfg['threads']} threads"
    )
    lines = [head, ""]
    hdr = f"{'shape':<34} {'method':<20} {'median ms':>10} {'x floor':>8} {'us/file':>8}"
    lines += [hdr, "-" * len(hdr)]
    for shape in res["shapes"]:
        title = f"{shape['name']} ({shape['files']:,} files, {_fmt_bytes(shape['bytes'])})"
        for i, r in enumerate(by_shape.get(shape["name"], [])):
            first = title if i == 0 else ""
            label = labels.get(r["method"], r["method"])
            if r["median_ms"] is None:
                why = r.get("skipped") or "no samples"
                lines.append(f"{first:<34} {label:<20} {'skipped: ' + why}")
                continue
            ratio = "" if r["ratio_to_floor"] is None else f"{r['ratio_to_floor']:.2f}x"
            lines.append(
                f"{first:<34} {label:<20} {_fmt_ms(r['median_ms']):>10} {ratio:>8} "
                f"{r['us_per_file']:>8.2f}"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def format_markdown(res: dict[str, Any]) -> str:
    """A Markdown table (one row per shape, one column per method: median ms and the
    ratio to the floor), with the run's date and machine above it, for a README."""
    methods = res["methods"]
    cell = {(r["shape"], r["method"]): r for r in res["results"]}
    m = res["machine"]
    lines = [
        f"`fastmat bench{' --quick' if res['config']['quick'] else ''}`, {res['date'][:10]}: "
        f"{m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('filesystem')}, kernel "
        f"{m.get('kernel')}; median ms of {res['config']['runs']} runs (ratio to the floor)",
        "",
        "| shape | " + " | ".join(x["label"] for x in methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for s in res["shapes"]:
        row = [f"{s['name']} ({s['files']:,} files, {_fmt_bytes(s['bytes'])})"]
        for x in methods:
            r = cell.get((s["name"], x["name"]))
            if r is None or r["median_ms"] is None:
                row.append("n/a")
            elif x["name"] == "floor":
                row.append(_fmt_ms(r["median_ms"]))
            else:
                row.append(f"{_fmt_ms(r['median_ms'])} ({r['ratio_to_floor']:.2f}x)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], out: Path) -> None:
    """Two panels: time per shape per method (log scale), and cost per file against
    the file count (log-log). Needs matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise FastmatError(
            "--plot needs matplotlib: pip install 'fastmat[bench]' (or pip install matplotlib)"
        ) from e

    shapes = res["shapes"]
    methods = res["methods"]
    cell = {(r["shape"], r["method"]): r for r in res["results"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.2))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, s in enumerate(shapes):
            r = cell.get((s["name"], m["name"]))
            if r and r["median_ms"]:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(r["median_ms"])
        style = {"color": "black"} if m["name"] == "floor" else {}
        left.bar(xs, ys, width=width, label=m["label"], **style)
    left.set_yscale("log")
    left.set_xticks(range(len(shapes)))
    left.set_xticklabels(
        [f"{s['name']}\n{s['files']:,} files\n{_fmt_bytes(s['bytes'])}" for s in shapes],
        fontsize=8,
    )
    left.set_ylabel("median time (ms, log scale)")
    left.set_title("Time to materialize each shape")
    left.grid(axis="y", which="both", alpha=0.3)
    left.legend(fontsize=8)

    for m in methods:
        pts = sorted(
            (s["files"], cell[(s["name"], m["name"])]["us_per_file"])
            for s in shapes
            if (s["name"], m["name"]) in cell and cell[(s["name"], m["name"])]["us_per_file"]
        )
        if pts:
            style = {"color": "black", "linestyle": "--"} if m["name"] == "floor" else {}
            xs_, ys_ = [p[0] for p in pts], [p[1] for p in pts]
            right.plot(xs_, ys_, marker="o", label=m["label"], **style)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("files in the tree (log scale)")
    right.set_ylabel("cost per file (µs, log scale)")
    right.set_title("Cost per file against file count")
    right.grid(which="both", alpha=0.3)
    right.legend(fontsize=8)

    m = res["machine"]
    fig.suptitle(
        f"fastmat bench {res['date'][:10]}: {m.get('cpus')} CPUs, {m.get('filesystem')}, "
        f"median of {res['config']['runs']} runs (lower is better)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
