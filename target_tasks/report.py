"""The table and the plot of a target-task run, with the paper's values beside ours.

Rows come from ``finetune.stats.summary_rows`` (values are fractions in [0, 1]; shown in %).
The plot is drawn with matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from runtime.files import atomic_path
from target_tasks.inits import Init
from target_tasks.protocols import PAPER, PAPER_COLUMN_LABELS, Protocol, paper_row

__all__ = ["format_table", "plot_results"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _interval(lo: float, hi: float) -> str:
    return "n/a" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{_pct(lo)}, {_pct(hi)}]"


def _paper(task: str, column: str | None) -> str:
    if column is None or column not in PAPER[task]:
        return ""
    m, s = PAPER[task][column]
    return f"{m:.2f} ± {s:.2f} ({PAPER_COLUMN_LABELS[column]})"


def format_table(proto: Protocol, rows: list[dict[str, Any]], inits: list[Init]) -> str:
    """A Markdown table: per initialisation and label fraction the number of seeds, mean ± std,
    the 95 % interval of the mean, the paired difference to scratch with its interval (``*``
    when it excludes 0), and the paper's value for the same initialisation; then the paper's
    row. Values in %."""
    by_name = {i.name: i for i in inits}
    lines = [f"{proto.task.upper()} ({proto.title}, {proto.dataset}): test {proto.metric_label} "
             "(%) over seeds; paired difference to scratch seed by seed",
             "",
             "| init | kind | labels | seeds | mean ± std | 95% interval | vs scratch [95%] | "
             "paper (mean ± std) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        init = by_name[r["init"]]
        diff = ""
        if "diff" in r:
            lo, hi = r["diff_ci"]
            sig = " *" if math.isfinite(lo) and (lo > 0 or hi < 0) else ""
            diff = f"{'+' if r['diff'] >= 0 else ''}{_pct(r['diff'])} {_interval(lo, hi)}{sig}"
        std = _pct(r["std"]) if math.isfinite(r["std"]) else "n/a"
        paper = _paper(proto.task, init.column) if float(r["fraction"]) == 1.0 else ""
        lines.append(f"| {init.name} | {init.kind} | {100 * float(r['fraction']):g}% | {r['n']} | "
                     f"{_pct(r['mean'])} ± {std} | {_interval(*r['ci'])} | {diff} | {paper} |")
    lines += ["", f"Paper (Haghighi et al., MICCAI 2020), {proto.dataset}, test "
              f"{proto.metric_label} %, all labels: " + paper_row(proto.task)]
    return "\n".join(lines)


def plot_results(proto: Protocol, rows: list[dict[str, Any]], inits: list[Init],
                 path: str | os.PathLike) -> Path:
    """Per initialisation (x) and label fraction (one marker per fraction), the mean test metric
    with its 95 % interval; the paper's mean ± std beside it (grey diamond) for the
    initialisations it reports. Written as a PNG with matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [i.name for i in inits]
    fractions = sorted({float(r["fraction"]) for r in rows})
    fig = Figure(figsize=(max(4.5, 1.3 * len(names) + 2), 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.5 / max(1, len(fractions))
    for k, f in enumerate(fractions):
        xs, ys, lo, hi = [], [], [], []
        for r in rows:
            if float(r["fraction"]) != f or not math.isfinite(r["mean"]):
                continue
            x = names.index(r["init"]) + (k - (len(fractions) - 1) / 2) * width
            m = 100 * r["mean"]
            a, b = (100 * v if math.isfinite(v) else m for v in r["ci"])
            xs.append(x), ys.append(m), lo.append(m - a), hi.append(b - m)
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=4,
                    label=f"ours, {100 * f:g}% labels (mean, 95% interval)")
    paper = [(names.index(i.name) + 0.38, *PAPER[proto.task][i.column]) for i in inits
             if i.column in PAPER[proto.task]]
    if paper:
        xs, ms, ss = zip(*paper)
        ax.errorbar(xs, ms, yerr=ss, fmt="D", color="0.45", mfc="white", capsize=3,
                    label="paper (mean ± std, all labels)")
    # the metric lies in [0, 100] %: an interval of two seeds may reach far beyond
    shown = [100 * r["mean"] for r in rows if math.isfinite(r["mean"])] + [p[1] for p in paper]
    if shown:
        ax.set_ylim(max(0.0, min(shown) - 10), min(101.0, max(shown) + 10))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_xlim(-0.6, len(names) - 0.2)
    ax.set_ylabel(f"test {proto.metric_label} (%)")
    ax.set_title(f"{proto.task.upper()}: {proto.title} ({proto.dataset})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
