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


def _explained(m: dict[str, Any]) -> str:
    """A legend entry: the label and what the method does (today's words for it, else
    the results file's)."""
    from fastmat.bench.methods import METHODS

    known = {x.name: x.description for x in METHODS}
    return f"{m['label']}: {known.get(m['name'], m.get('description', ''))}"


def title(res: dict[str, Any]) -> str:
    """What the plot is of: the run's date and time, the machine, the runs."""
    m = res["machine"]
    when = res["date"].replace("T", " ").replace("+00:00", " UTC")
    quick = " --quick" if res["config"].get("quick") else ""
    return (
        f"fastmat bench{quick}, {when}, on {m.get('hostname') or 'an unnamed host'}: "
        f"{m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('filesystem')}, "
        f"kernel {m.get('kernel')}; median of {res['config']['runs']} runs, "
        f"{res['config']['threads']} threads (lower is better)"
    )


def plot(res: dict[str, Any], out: Path) -> None:
    """Writes :func:`figure` as a PNG. Needs matplotlib (the ``bench`` extra)."""
    fig = figure(res)
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def figure(res: dict[str, Any]) -> Any:
    """Two panels: time per shape per method (log scale), and cost per file against
    the file count (log-log); the legend says what each method does, the overlay
    series is marked as timing a mount, the title names the machine and the date."""
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 7.8))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, s in enumerate(shapes):
            r = cell.get((s["name"], m["name"]))
            if r and r["median_ms"]:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(r["median_ms"])
        style = {"color": "black"} if m["name"] == "floor" else {}
        if m["name"] == "overlay":
            style = {"hatch": "//", "edgecolor": "white"}
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

    for m in methods:
        pts = sorted(
            (s["files"], cell[(s["name"], m["name"])]["us_per_file"])
            for s in shapes
            if (s["name"], m["name"]) in cell and cell[(s["name"], m["name"])]["us_per_file"]
        )
        if pts:
            style = {"color": "black", "linestyle": "--"} if m["name"] == "floor" else {}
            if m["name"] == "overlay":
                style = {"linestyle": ":"}
            xs_, ys_ = [p[0] for p in pts], [p[1] for p in pts]
            right.plot(xs_, ys_, marker="o", label=m["label"], **style)
            if m["name"] == "overlay":
                right.annotate(
                    "overlay: one mount + unmount whatever the file count;\n"
                    "no file is created, so its cost per file falls as 1/files",
                    xy=(xs_[-1], ys_[-1]),
                    xytext=(0.35, 0.06),
                    textcoords="axes fraction",
                    fontsize=8,
                    arrowprops={"arrowstyle": "->", "lw": 0.8},
                )
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("files in the tree (log scale)")
    right.set_ylabel("cost per file (µs, log scale)")
    right.set_title("Cost per file against file count")
    right.grid(which="both", alpha=0.3)

    handles, labels = left.get_legend_handles_labels()
    explained = {m["label"]: _explained(m) for m in methods}
    fig.legend(
        handles,
        [explained.get(label, label) for label in labels],
        loc="lower center",
        ncol=2,
        fontsize=8,
        frameon=False,
        title="methods (each builds the same tree at a new destination; ratios are to the floor)",
        title_fontsize=8,
    )
    fig.suptitle(title(res), fontsize=9)
    fig.tight_layout(rect=(0, 0.2, 1, 0.96))
    return fig
