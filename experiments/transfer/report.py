"""The transfer experiments' summaries: the study's table and plot (mean and 95 % interval per
method and label fraction, paired difference to scratch) and the benchmark's table (mean ± std
over seeds). Statistics from ``finetune.stats``; plots drawn with matplotlib's Agg backend."""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

from finetune.stats import mean_std, summary_rows
from runtime.files import atomic_path

from experiments.transfer.config import METRIC

__all__ = ["summarize", "format_table", "plot_results", "machine", "benchmark_rows",
           "benchmark_table"]

#: A fixed colour per method, so every plot reads the same way.
COLORS = {"scratch": "#7f7f7f", "semantic_genesis": "#1f77b4", "restoration_only": "#d62728",
          "classification_only": "#2ca02c"}


def summarize(results: dict[str, dict[str, dict[str, list[float]]]]) -> list[dict[str, Any]]:
    """Rows (task, fraction, method, n, mean, ci and, against scratch, the paired difference
    and its ci) from ``results[task][method][fraction] = [value per seed]`` (the same seed
    order everywhere)."""
    rows = []
    for task, by_method in results.items():
        for row in summary_rows(by_method, baseline="scratch"):
            row["method"] = row.pop("init")
            rows.append({"task": task, **row})
    return rows


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: task | labels | method | mean [95 % CI] | paired difference to scratch
    [95 % CI] (``*``: the interval excludes 0)."""
    lines = ["| task (metric, %) | labels | method | mean [95% CI] | vs scratch: paired diff [95% CI] |",
             "|---|---|---|---|---|"]
    for r in rows:
        metric = METRIC[r["task"]][1]
        diff = ""
        if "diff" in r:
            lo, hi = r["diff_ci"]
            diff = f"{'+' if r['diff'] >= 0 else ''}{_pct(r['diff'])} [{_pct(lo)}, {_pct(hi)}]"
            if math.isfinite(lo) and (lo > 0 or hi < 0):
                diff += " *"
        lines.append(f"| {r['task']} ({metric}) | {100 * float(r['fraction']):g}% | {r['method']} | "
                     f"{_pct(r['mean'])} [{_pct(r['ci'][0])}, {_pct(r['ci'][1])}] | {diff} |")
    return "\n".join(lines)


def plot_results(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One panel per task: mean metric (%) against the label fraction (log axis), one line per
    method with its 95 % interval as error bars; a PNG written with matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = Figure(figsize=(4.6 * len(tasks), 3.8), dpi=120)
    FigureCanvasAgg(fig)
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), k + 1)
        task_rows = [r for r in rows if r["task"] == task]
        methods = list(dict.fromkeys(r["method"] for r in task_rows))
        for j, method in enumerate(methods):
            dodge = 1.0 + 0.04 * (j - (len(methods) - 1) / 2)   # side by side on the log axis
            pts = sorted((float(r["fraction"]), 100 * r["mean"], r["ci"]) for r in task_rows
                         if r["method"] == method and math.isfinite(r["mean"]))
            if not pts:
                continue
            xs, ys = [p[0] * dodge for p in pts], [p[1] for p in pts]
            lo = [y - (100 * p[2][0] if math.isfinite(p[2][0]) else y) for y, p in zip(ys, pts)]
            hi = [(100 * p[2][1] if math.isfinite(p[2][1]) else y) - y for y, p in zip(ys, pts)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=method,
                        color=COLORS.get(method))
        ax.set_xscale("log")
        fractions = sorted({float(r["fraction"]) for r in task_rows})
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{100 * f:g}%" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("labelled fraction of the training pool")
        ax.set_ylabel(f"test {METRIC[task][1]} (%)")
        ax.set_title(f"{task}: mean and 95% interval over seeds", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def machine() -> str:
    """This machine in one line (system, CPU cores, torch, GPU)."""
    import torch
    text = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    return text + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")


#: The benchmark's metrics per task: (key in the test metrics, label); the first is the paper's.
BENCHMARK_METRICS = {"classification": [("auc", "AUC"), ("accuracy", "accuracy")],
                     "segmentation": [("iou", "IoU"), ("dice", "Dice")]}


def benchmark_rows(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The benchmark's rows (task, metric, and per init its values, mean and sample std in %)
    from the per-run test metrics ``results[task][init] = [metrics, ...]``; the std of a single
    run is given as 0."""
    rows = []
    for task, by_init in results.items():
        for key, label in BENCHMARK_METRICS[task]:
            row: dict[str, Any] = {"task": task, "metric": label}
            for init in ("scratch", "pretrained"):
                vals = [100.0 * r[key] if r.get(key) is not None else float("nan")
                        for r in by_init.get(init, [])]
                mean, std = mean_std(vals)
                std = 0.0 if math.isfinite(mean) and not math.isfinite(std) else std
                row[init] = {"values": vals, "mean": mean, "std": std}
            rows.append(row)
    return rows


def benchmark_table(rows: list[dict[str, Any]], n_seeds: int) -> str:
    """A Markdown table: task | metric | scratch mean +- std | pretrained mean +- std."""
    def cell(d: dict[str, Any]) -> str:
        return "n/a" if math.isnan(d["mean"]) else f"{d['mean']:.2f} +- {d['std']:.2f}"

    lines = [f"| task | metric (%) | scratch ({n_seeds} seeds) | pretrained ({n_seeds} seeds) |",
             "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {cell(r['scratch'])} | {cell(r['pretrained'])} |"
              for r in rows]
    return "\n".join(lines)
