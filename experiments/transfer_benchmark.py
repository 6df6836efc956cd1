"""Transfer benchmark: fine-tune the same small target tasks from scratch and from a checkpoint.

Two target tasks are built from synthetic chest phantoms (``scripts/phantoms.py``) once, from
``--data_seed``, and written as ``.npy`` files under ``--output_dir/data``:

* classification (nodule / no nodule), like the paper's lung nodule false-positive reduction:
  lung cubes (``--cube``), half of them with a solid nodule near the centre; metric ROC AUC.
* segmentation of nodules in whole phantom volumes (``--seg_shape``, ``--seg_nodules`` per
  volume); metric IoU (and Dice) of sliding-window predictions.

For every seed in ``--seeds`` each task is fine-tuned twice with identical settings -- from
scratch and from ``--weights`` -- by ``scripts/finetune_classification.py`` and
``scripts/finetune_segmentation.py``; the test metrics of the best-validation epoch are
collected and printed as a table like the paper's (mean +- sample std over seeds, in %).
Results go to ``--output_dir/transfer_benchmark.json``; every run keeps its own folder
(metrics, checkpoints, TensorBoard) under ``--output_dir/runs``.

    python experiments/transfer_benchmark.py --weights Checkpoints/en_de/semantic_genesis_chest_ct.pt \
        --seeds 0 1 2 --tasks classification segmentation
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import math
import time
from typing import Any

import numpy as np

from models.checkpoint import load_checkpoint
from models.targets import infer_width
from runtime.cli import (ArgumentParser, HelpFormatter, add_overwrite_flag, run_cli,
                         nonneg_int, positive_float, positive_int, seed_int)
from runtime.devices import device_name
from runtime.errors import InputError
from runtime.files import make_output_dir, save_json_atomic, save_npy_atomic, write_run_config
from finetune import classification as finetune_classification
from finetune import segmentation as finetune_segmentation
from preparation.phantoms import make_nodule_cubes, write_phantom_dataset

__all__ = ["build_classification_task", "build_segmentation_task", "summarize", "format_table",
           "build_parser", "run", "main"]

TASKS = ("classification", "segmentation")
#: (metric key in the test metrics, label in the table); the first one is the paper's metric.
METRICS = {"classification": [("auc", "AUC"), ("accuracy", "accuracy")],
           "segmentation": [("iou", "IoU"), ("dice", "Dice")]}


def build_classification_task(root: Path, n: tuple[int, int, int], cube: tuple[int, int, int],
                              seed: int, radius: tuple[float, float] | None = None
                              ) -> dict[str, list[str]]:
    """Write train/val/test nodule cubes and labels under ``root``; return the CLI flags.
    ``radius``: nodule radius range in voxels (default: scaled with the cube, see
    ``preparation.phantoms.make_nodule_cubes``)."""
    flags: dict[str, list[str]] = {}
    for k, (split, count) in enumerate(zip(("train", "val", "test"), n)):
        cubes, labels = make_nodule_cubes(count, cube, seed=seed * 10 + k, radius=radius)
        data, lab = root / f"{split}_cubes.npy", root / f"{split}_labels.npy"
        save_npy_atomic(data, cubes)
        save_npy_atomic(lab, labels)
        prefix = "" if split == "train" else f"{split}_"
        flags[f"--{prefix}data"] = [str(data)]
        flags[f"--{prefix}labels"] = [str(lab)]
    return flags


def build_segmentation_task(root: Path, n: tuple[int, int, int], shape: tuple[int, int, int],
                            nodules: int, seed: int) -> dict[str, list[str]]:
    """Write train/val/test phantom volumes ([0, 1] ``.npy``) and nodule masks; return the flags."""
    flags: dict[str, list[str]] = {}
    for k, (split, count) in enumerate(zip(("train", "val", "test"), n)):
        img, msk = root / split / "images", root / split / "masks"
        write_phantom_dataset(img, count, shape, seed=seed * 1000 + 100 * k, fmt="npy",
                              nodules=nodules, mask_dir=msk, prefix=f"{split}")
        prefix = "" if split == "train" else f"{split}_"
        flags[f"--{prefix}images"] = [str(img)]
        flags[f"--{prefix}masks"] = [str(msk)]
    return flags


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Rows (task, metric, scratch mean/std, pretrained mean/std, values) in %, from the
    per-run test metrics ``results[task][init] = [metrics, ...]``."""
    rows = []
    for task, by_init in results.items():
        for key, label in METRICS[task]:
            row: dict[str, Any] = {"task": task, "metric": label}
            for init in ("scratch", "pretrained"):
                vals = [100.0 * r[key] if r.get(key) is not None else float("nan") for r in by_init.get(init, [])]
                mean, std = _mean_std(vals)
                row[init] = {"values": vals, "mean": mean, "std": std}
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], n_seeds: int) -> str:
    """A Markdown table: task | metric | scratch mean +- std | pretrained mean +- std."""
    def cell(d: dict[str, Any]) -> str:
        return "n/a" if math.isnan(d["mean"]) else f"{d['mean']:.2f} +- {d['std']:.2f}"

    lines = [f"| task | metric (%) | scratch ({n_seeds} seeds) | pretrained ({n_seeds} seeds) |",
             "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {cell(r['scratch'])} | {cell(r['pretrained'])} |"
              for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        description="Fine-tune phantom target tasks from scratch and from a Semantic Genesis "
                    "checkpoint over several seeds; print a scratch-vs-pretrained table.",
        formatter_class=HelpFormatter)
    g = ap.add_argument_group("benchmark")
    g.add_argument("--weights", required=True, help="the pretrained checkpoint to compare with scratch")
    g.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2],
                   help="training seeds; each task is fine-tuned once per seed and initialisation")
    g.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="target tasks to run")
    g.add_argument("--width", type=positive_int, default=None,
                   help="U-Net base width (default: read from the checkpoint)")
    g.add_argument("--norm", default="batch_stats", choices=["batch_stats", "standard"],
                   help="BatchNorm mode of the fine-tuned networks (see the fine-tune scripts)")
    g.add_argument("--data_seed", type=seed_int, default=1234,
                   help="seed of the phantom task data (the same data for every run)")
    g.add_argument("--device", type=device_name, default="auto", help="auto, cpu or cuda[:i]")
    g.add_argument("--num_workers", type=nonneg_int, default=2, help="DataLoader workers per run")
    g.add_argument("--output_dir", default="runs/transfer_benchmark",
                   help="data/, runs/, config.json and transfer_benchmark.json go here")
    g.add_argument("--quiet", action="store_true", help="no per-epoch lines from the runs")
    add_overwrite_flag(g, "the runs' metrics.json, best.pt and last.pt")

    c = ap.add_argument_group("classification task (nodule / no nodule cubes)")
    c.add_argument("--cls_n", type=positive_int, nargs=3, default=[128, 64, 128],
                   metavar=("TRAIN", "VAL", "TEST"),
                   help="number of cubes per split (half with a nodule)")
    c.add_argument("--cube", type=positive_int, nargs=3, default=[64, 64, 32], metavar=("X", "Y", "Z"),
                   help="cube size, sides divisible by 8")
    c.add_argument("--cls_epochs", type=positive_int, default=30, help="maximum epochs (--nb_epoch)")
    c.add_argument("--cls_patience", type=positive_int, default=8, help="early-stopping patience")
    c.add_argument("--cls_batch_size", type=positive_int, default=16, help="batch size")
    c.add_argument("--cls_optimizer", default="sgd", choices=["sgd", "adam"], help="optimizer")
    c.add_argument("--cls_lr", type=positive_float, default=1e-2, help="learning rate")

    s = ap.add_argument_group("segmentation task (nodules in phantom volumes)")
    s.add_argument("--seg_n", type=positive_int, nargs=3, default=[8, 4, 8], metavar=("TRAIN", "VAL", "TEST"),
                   help="number of phantom volumes per split")
    s.add_argument("--seg_shape", type=positive_int, nargs=3, default=[128, 128, 64], metavar=("X", "Y", "Z"),
                   help="phantom volume size")
    s.add_argument("--seg_nodules", type=positive_int, default=4, help="nodules per phantom volume")
    s.add_argument("--seg_crop", type=positive_int, nargs=3, default=[64, 64, 32], metavar=("X", "Y", "Z"),
                   help="training crop / sliding window, sides divisible by 8")
    s.add_argument("--seg_epochs", type=positive_int, default=30, help="maximum epochs (--nb_epoch)")
    s.add_argument("--seg_steps", type=positive_int, default=25, help="training batches per epoch")
    s.add_argument("--seg_patience", type=positive_int, default=8, help="early-stopping patience")
    s.add_argument("--seg_batch_size", type=positive_int, default=8, help="batch size")
    s.add_argument("--seg_optimizer", default="sgd", choices=["sgd", "adam"], help="optimizer")
    s.add_argument("--seg_lr", type=positive_float, default=1e-2, help="learning rate")
    return ap


def _flags(d: dict[str, list[str] | str | None]) -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        if v is None or v is False:
            continue
        if v is True:
            out.append(k)
        else:
            out += [k] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the tasks, run every (task, init, seed), write and return the summary."""
    ckpt_width = infer_width(load_checkpoint(args.weights)["state_dict"])
    if args.width and ckpt_width and args.width != ckpt_width:
        raise InputError(f"{args.weights}: the checkpoint has width {ckpt_width}, --width is {args.width}; "
                         f"pass --width {ckpt_width} or omit it")
    width = args.width or ckpt_width or 32
    out = make_output_dir(args.output_dir, "--output_dir")
    write_run_config(args, out)
    common = {"--width": str(width), "--norm": args.norm, "--device": args.device,
              "--num_workers": str(args.num_workers), "--quiet": args.quiet,
              "--overwrite": args.overwrite}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    t0 = time.time()
    for task in args.tasks:
        data_root = out / "data" / task
        if task == "classification":
            data = build_classification_task(data_root, tuple(args.cls_n), tuple(args.cube), args.data_seed)
            module = finetune_classification
            specific = {"--nb_epoch": str(args.cls_epochs), "--patience": str(args.cls_patience),
                        "--batch_size": str(args.cls_batch_size), "--optimizer": args.cls_optimizer,
                        "--lr": str(args.cls_lr)}
        else:
            data = build_segmentation_task(data_root, tuple(args.seg_n), tuple(args.seg_shape),
                                           args.seg_nodules, args.data_seed)
            module = finetune_segmentation
            specific = {"--nb_epoch": str(args.seg_epochs), "--patience": str(args.seg_patience),
                        "--batch_size": str(args.seg_batch_size), "--optimizer": args.seg_optimizer,
                        "--lr": str(args.seg_lr), "--steps_per_epoch": str(args.seg_steps),
                        "--crop": [str(c) for c in args.seg_crop]}
        results[task] = {"scratch": [], "pretrained": []}
        for seed in args.seeds:
            for init in ("scratch", "pretrained"):
                run_dir = out / "runs" / task / init / f"seed{seed}"
                argv = _flags({**data, **common, **specific, "--seed": str(seed),
                               "--output_dir": str(run_dir),
                               "--weights": args.weights if init == "pretrained" else None})
                print(f"[{task}] {init} seed {seed} -> {run_dir}", flush=True)
                metrics = module.run(module.build_parser().parse_args(argv))
                test = dict(metrics["test"])
                test.pop("per_case", None)
                test.update(best_epoch=metrics["best_epoch"], run_dir=str(run_dir))
                results[task][init].append(test)
    rows = summarize(results)
    table = format_table(rows, len(args.seeds))
    summary = {"weights": args.weights, "width": width, "seeds": list(args.seeds), "tasks": list(args.tasks),
               "rows": rows, "runs": results, "table": table, "seconds": time.time() - t0}
    save_json_atomic(out / "transfer_benchmark.json", summary)
    print(table)
    print(f"wrote {out / 'transfer_benchmark.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
