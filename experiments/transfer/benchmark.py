"""Transfer benchmark: fine-tune the study's phantom target tasks from scratch and from one
checkpoint, over several seeds, and print a scratch-vs-pretrained table like the paper's.

The tasks are the transfer study's (``experiments.transfer.data``), built once from
``--data_seed`` under ``--output_dir/data``: nodule / no-nodule lung cubes (ROC AUC) and nodules
in whole phantom volumes (IoU and Dice of sliding-window predictions). Every (task,
initialisation, seed) is a cell keyed by its settings (``finetune.cells``): a re-run reuses the
finished ones, and refuses (``--overwrite`` redoes) those made with other settings. Results go
to ``--output_dir/transfer_benchmark.json``; every run keeps its folder (metrics, checkpoints,
TensorBoard) under ``--output_dir/runs``.

    python experiments/transfer_benchmark.py --weights Checkpoints/en_de/semantic_genesis_chest_ct.pt \\
        --seeds 0 1 2 --tasks classification segmentation
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from finetune import classification as finetune_classification
from finetune import segmentation as finetune_segmentation
from finetune.cells import Cell, plan_cells, run_config, run_finetune_cell
from models.checkpoint import load_checkpoint
from models.targets import infer_width
from runtime.cli import (ArgumentParser, HelpFormatter, add_overwrite_flag, add_verbosity_flag,
                         nonneg_int, positive_float, positive_int, run_cli, seed_int)
from runtime.devices import device_name
from runtime.errors import InputError
from runtime.files import make_output_dir, output_session, save_json_atomic, write_run_config
from runtime.provenance import file_identity

from experiments.transfer import data as D
from experiments.transfer.report import BENCHMARK_METRICS, benchmark_rows, benchmark_table
from experiments.transfer.study import _flags

__all__ = ["TASKS", "METRICS", "summarize", "format_table", "build_parser", "run", "main"]

TASKS = ("classification", "segmentation")
METRICS = BENCHMARK_METRICS
summarize = benchmark_rows
format_table = benchmark_table


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
    add_verbosity_flag(g, "1: each run's epoch lines and progress bars; 2: the same")
    add_overwrite_flag(g, "the runs (and data) whose recorded settings differ from this run's")

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


def _task(args: argparse.Namespace, task: str) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(data spec, fine-tuning module, task-specific flags) of one task."""
    if task == "classification":
        spec = {"task": task, "n": list(args.cls_n), "cube": list(args.cube), "radius": None,
                "seed": args.data_seed}
        return spec, finetune_classification, {
            "--nb_epoch": str(args.cls_epochs), "--patience": str(args.cls_patience),
            "--batch_size": str(args.cls_batch_size), "--optimizer": args.cls_optimizer,
            "--lr": str(args.cls_lr)}
    spec = {"task": task, "n": list(args.seg_n), "shape": list(args.seg_shape),
            "nodules": args.seg_nodules, "seed": args.data_seed}
    return spec, finetune_segmentation, {
        "--nb_epoch": str(args.seg_epochs), "--patience": str(args.seg_patience),
        "--batch_size": str(args.seg_batch_size), "--optimizer": args.seg_optimizer,
        "--lr": str(args.seg_lr), "--steps_per_epoch": str(args.seg_steps),
        "--crop": [str(c) for c in args.seg_crop]}


def _placeholder_flags(out: Path, task: str) -> dict[str, list[str]]:
    names = ("data", "labels") if task == "classification" else ("images", "masks")
    return {f"--{p}{n}": [str(out / "data" / task)] for n in names for p in ("", "val_", "test_")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the tasks, run (or reuse) every (task, init, seed), write and return the summary."""
    ckpt_width = infer_width(load_checkpoint(args.weights)["state_dict"])
    if args.width and ckpt_width and args.width != ckpt_width:
        raise InputError(f"{args.weights}: the checkpoint has width {ckpt_width}, --width is {args.width}; "
                         f"pass --width {ckpt_width} or omit it")
    width = args.width or ckpt_width or 32
    weights_id = file_identity(args.weights)
    out = Path(args.output_dir)
    common = {"--width": str(width), "--norm": args.norm, "--device": args.device,
              "--num_workers": str(args.num_workers), "--verbose": str(args.verbose), "--overwrite": True}
    data_cells, jobs = {}, []
    for task in args.tasks:
        spec, module, specific = _task(args, task)
        data_cells[task] = D.target_cell(out, spec)
        for seed in args.seeds:
            for init in ("scratch", "pretrained"):
                folder = out / "runs" / task / init / f"seed{seed}"
                weights = args.weights if init == "pretrained" else None
                argv = _flags({**_placeholder_flags(out, task), **common, **specific,
                               "--seed": str(seed), "--output_dir": str(folder), "--weights": weights})
                cell = Cell(f"{task} {init} seed {seed}", folder,
                            {"run": run_config(module.build_parser(), argv, drop={"weights"}, under=out),
                             "data": spec, "weights": weights_id if weights else None},
                            result_files=("metrics.json",))
                jobs.append((task, init, seed, module, specific, weights, cell))
    plan = plan_cells(data_cells.values(), args.overwrite, "redo", what="step")
    plan.update(plan_cells([j[-1] for j in jobs], args.overwrite, "redo"))
    make_output_dir(out, "--output_dir")
    write_run_config(args, out)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {t: {"scratch": [], "pretrained": []}
                                                           for t in args.tasks}
    t0 = time.time()
    with output_session(out, "--output_dir"):
        flags = {t: D.target_data(out, c, plan[c.name]) for t, c in data_cells.items()}
        for task, init, seed, module, specific, weights, cell in jobs:
            action = plan[cell.name]
            print(f"[{task}] {init} seed {seed} -> {cell.folder}"
                  + (" (reused)" if action == "reuse" else ""), flush=True)
            if action == "reuse":
                result = cell.result()
            else:
                argv = _flags({**flags[task], **common, **specific, "--seed": str(seed),
                               "--output_dir": str(cell.folder), "--weights": weights})
                result = run_finetune_cell(cell, module, argv, action, METRICS[task][0][0])
            results[task][init].append({**result["test"], "best_epoch": result["best_epoch"],
                                        "run_dir": str(cell.folder)})
    rows = summarize(results)
    table = format_table(rows, len(args.seeds))
    summary = {"weights": args.weights, "width": width, "seeds": list(args.seeds),
               "tasks": list(args.tasks), "rows": rows, "runs": results, "table": table,
               "seconds": time.time() - t0}
    save_json_atomic(out / "transfer_benchmark.json", summary)
    print(table)
    print(f"wrote {out / 'transfer_benchmark.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, run, argv)
