"""Fine-tune every initialisation on one of the paper's target tasks, over seeds and label
fractions, and report the table beside the paper's.

    python scripts/run_target.py lcs --prepared data/lcs --seeds 0 1 2 \\
        --init sg=Checkpoints/en_de/semantic_genesis_chest_ct.pt --output_dir runs/lcs

Reads a folder written by ``scripts/prepare_target.py`` (its ``manifest.json`` is checked
first: complete, the same task, every recorded file present with its recorded size). Runs
``scratch`` and every ``--init NAME=CHECKPOINT`` with the task's published protocol
(``target_tasks.protocols``; every value a flag) for each seed and label fraction: one *cell*
per (initialisation, fraction, seed), fine-tuned by ``finetune.classification`` (NCC) or
``finetune.segmentation`` (NCS, LCS, BMS) in ``RES/cells/<init>/f<fraction>/seed<seed>/``.

Paired design: every initialisation of one (fraction, seed) gets the same labelled subset
(``finetune.cells.label_subset``: training cubes stratified by class for NCC, training cases
otherwise), the same fine-tuning seed (data order, crops, flips and the fresh layers'
initialisation) and the same settings; only the weights differ.

Cells are keyed by their settings (the fine-tuning configuration, the prepared manifest's
identity, the checkpoint's identity, the subset): a finished cell is reused only when they are
this run's; otherwise the run is refused before anything runs, listing the differences
(``--overwrite`` redoes those cells, or choose another ``--output_dir``). An interrupted cell
continues with ``--resume``.

Outputs in ``RES``: each cell's ``metrics.json`` (and checkpoints), ``results.json`` (every
cell, per-seed values, settings, the paper's row), ``results.md`` (the table) and
``results.png`` (the plot).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from finetune import classification as finetune_classification
from finetune import segmentation as finetune_segmentation
from finetune.cells import (Cell, decide, finish_cell, label_subset, plan_cells, relative_to,
                            run_config, run_finetune_cell, start_cell, subset_digest)
from finetune.stats import fraction_key, summary_rows
from runtime.cli import (ArgumentParser, HelpFormatter, add_verbosity_flag, nonneg_float,
                         nonneg_int, positive_float, positive_int, probability, fraction,
                         run_cli, seed_int)
from runtime.devices import device_name
from runtime.errors import InputError
from runtime.files import atomic_path, check_output_outside, output_session, save_json_atomic
from target_tasks.inits import Init, parse_inits, resolve_width
from target_tasks.prepared import Prepared, check_prepared
from target_tasks.protocols import PAPER, PROTOCOLS, TASKS, Protocol
from target_tasks import report

__all__ = ["PRESETS", "PROTOCOL_FLAGS", "resolve_protocol", "build_parser", "run", "main"]

#: Preset values on top of the published protocol. ``paper``: the protocol as published;
#: ``tiny``: seconds per cell (tests, CI): one short epoch, batch 2, one training batch per
#: epoch, width 2 when no checkpoint gives it.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"width": 32, "num_workers": 2},
    "tiny": {"width": 2, "num_workers": 0, "nb_epoch": 1, "patience": 1, "batch_size": 2,
             "steps_per_epoch": 1, "overlap": 0.0},
}
#: Protocol values a flag overrides: name -> (argparse type, help).
PROTOCOL_FLAGS: dict[str, tuple[Any, str]] = {
    "lr": (positive_float, "learning rate"),
    "batch_size": (positive_int, "training batch (and inference batch of segmentation)"),
    "patience": (positive_int, "early stopping: epochs without improvement of --monitor"),
    "nb_epoch": (positive_int, "maximum number of epochs (published: 10000, i.e. until early "
                               "stopping)"),
    "optimizer": (str, "adam (published) or sgd"),
    "loss": (str, "bce (classification) or dice / bce_dice (segmentation)"),
    "monitor": (str, "validation value for early stopping and the best epoch: loss "
                     "(published), auc (classification) or dice (segmentation)"),
    "steps_per_epoch": (positive_int, "segmentation: training batches per epoch (default: the "
                                      "task's, or one pass over the training cases)"),
    "overlap": (fraction, "segmentation: sliding-window overlap in [0, 1) (ours: 0.5)"),
    "foreground_prob": (probability, "segmentation: share of training crops centred on the "
                                     "foreground (ours: 0.5)"),
    "weight_decay": (nonneg_float, "L2 weight decay (published: none)"),
}
_CHOICES = {"optimizer": ("adam", "sgd"),
            "loss": {"classification": ("bce",), "segmentation": ("dice", "bce_dice")},
            "monitor": {"classification": ("loss", "auc"), "segmentation": ("loss", "dice")}}
_OURS = {"overlap": 0.5, "foreground_prob": 0.5, "weight_decay": 0.0}


def resolve_protocol(task: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """(values, sources): every fine-tuning value of ``task`` from the flag when given, else the
    preset, else the published protocol (``ours`` where the protocol states none)."""
    proto = PROTOCOLS[task]
    preset = PRESETS[args.preset]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in PROTOCOL_FLAGS:
        given = getattr(args, name)
        if given is not None:
            values[name], sources[name] = given, f"--{name}"
        elif name in preset:
            values[name], sources[name] = preset[name], f"preset {args.preset}"
        elif name in _OURS:
            values[name], sources[name] = _OURS[name], "ours"
        else:
            values[name], sources[name] = getattr(proto, name), "published"
    if args.input is not None:
        values["input"], sources["input"] = list(args.input), "--input"
    else:
        values["input"], sources["input"] = list(proto.input_size), "published"
    for name in ("optimizer", "loss", "monitor"):
        allowed = _CHOICES[name]
        allowed = allowed if isinstance(allowed, tuple) else allowed[proto.kind]
        if values[name] not in allowed:
            raise InputError(f"--{name} {values[name]}: {task} ({proto.kind}) takes "
                             f"{' or '.join(allowed)}")
    if any(s % 8 for s in values["input"]):
        raise InputError(f"--input {' '.join(map(str, values['input']))}: every side must be "
                         "a multiple of 8 (the encoder pools three times)")
    if proto.kind == "segmentation" and values["steps_per_epoch"] is None:
        sources["steps_per_epoch"] = "published: one pass over the training cases"
    return values, sources


# ------------------------------------------------------------------------------------------
# subsets and cells
# ------------------------------------------------------------------------------------------
@dataclass
class Subset:
    """The labelled training subset of one (fraction, seed): the fine-tuning data flags, the
    number of items and their digest (what every cell of this fraction and seed records).
    ``items``: cube indices (NCC) or case names; ``folder``: where NCC subset files go (None:
    every cube, the prepared files are read directly)."""

    flags: dict[str, list[str]]
    n: int
    digest: str
    items: list[Any]
    folder: Path | None = None


def plan_subset(res: Path, prepared: Prepared, f: float, seed: int) -> Subset:
    """The subset of training items for (``f``, ``seed``), written nowhere yet: NCC cubes
    stratified by label, segmentation cases (a list of files)."""
    if prepared.kind == "classification":
        labels = np.load(prepared.path("train_labels.npy"))
        idx = label_subset(labels, f, seed).tolist()
        if len(idx) == len(labels):
            return Subset(prepared.classification_flags(), len(idx), subset_digest(idx), idx)
        folder = res / "subsets" / f"f{fraction_key(f)}_seed{seed}"
        return Subset(prepared.classification_flags(folder), len(idx), subset_digest(idx), idx,
                      folder)
    cases = prepared.cases("train")
    chosen = [cases[i] for i in label_subset(np.zeros(len(cases), np.int64), f, seed)]
    return Subset(prepared.segmentation_flags(chosen), len(chosen), subset_digest(chosen),
                  chosen)


def write_subset(subset: Subset, prepared: Prepared) -> None:
    """Write an NCC subset's cubes and labels into its folder, unless the files there were
    written from the same prepared data and items (``finetune.cells`` record)."""
    if subset.folder is None:
        return
    cell = Cell(f"subset {subset.folder.name}", subset.folder,
                {"prepared": prepared.identity, "items": subset.digest},
                result_files=("train_cubes.npy", "train_labels.npy"))
    action, _ = decide(cell, overwrite=True, unfinished="redo")
    if action == "reuse":
        return
    start_cell(cell, action)
    prepared.write_cube_subset(np.asarray(subset.items, np.int64), subset.folder)
    finish_cell(cell, {"n": subset.n, "items": subset.items})


def _finetune_module(kind: str):
    return finetune_classification if kind == "classification" else finetune_segmentation


#: Fine-tuning flags that name data or outputs (their content is identified otherwise).
_PATH_FLAGS = frozenset({"data", "labels", "data_dir", "val_data", "val_labels", "val_data_dir",
                         "test_data", "test_labels", "test_data_dir", "images", "masks",
                         "val_images", "val_masks", "test_images", "test_masks", "output_dir",
                         "weights"})


def finetune_argv(proto: Protocol, values: dict[str, Any], init: Init, width: int, seed: int,
                  subset: Subset, folder: Path, args: argparse.Namespace,
                  resume: bool = False) -> list[str]:
    """The fine-tuning command line of one cell."""
    argv = [a for k, v in subset.flags.items() for a in [k, *v]]
    argv += ["--width", str(width), "--norm", args.norm, "--seed", str(seed),
             "--lr", repr(float(values["lr"])), "--batch_size", str(values["batch_size"]),
             "--patience", str(values["patience"]), "--nb_epoch", str(values["nb_epoch"]),
             "--optimizer", values["optimizer"], "--loss", values["loss"],
             "--monitor", values["monitor"], "--weight_decay", repr(float(values["weight_decay"])),
             "--device", args.device, "--num_workers", str(args.num_workers),
             "--output_dir", str(folder), "--verbose", "0"]
    if proto.kind == "segmentation":
        steps = values["steps_per_epoch"] or max(1, math.ceil(subset.n / values["batch_size"]))
        argv += ["--crop", *map(str, values["input"]), "--steps_per_epoch", str(steps),
                 "--overlap", repr(float(values["overlap"])),
                 "--foreground_prob", repr(float(values["foreground_prob"]))]
        if init.path is not None and not init.has_decoder:
            argv.append("--new_decoder")
    if init.path is not None:
        argv += ["--weights", init.path]
    if args.augment:
        argv.append("--augment")
    argv.append("--resume" if resume else "--overwrite")
    return argv


def cell_settings(proto: Protocol, argv: list[str], init: Init, seed: int, f: float,
                  prepared: Prepared, subset: Subset) -> dict[str, Any]:
    """What decides a cell's result: the fine-tuning configuration (the parsed command line
    without paths and runtime flags), the prepared data's and the checkpoint's identity, the
    subset, the seed and the fraction."""
    config = run_config(_finetune_module(proto.kind).build_parser(), argv, drop=_PATH_FLAGS)
    return {"task": proto.task, "init": {"kind": init.kind, "checkpoint": init.identity},
            "seed": seed, "fraction": f, "prepared": prepared.identity,
            "subset": {"n": subset.n, "sha256": subset.digest}, "finetune": config}


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        description="Fine-tune scratch and every --init checkpoint on one of the paper's target "
                    "tasks (NCC, NCS, LCS, BMS) with its published protocol, over seeds and "
                    "label fractions (paired), and write the table beside the paper's, a plot "
                    "and every per-seed value. Resumable: finished cells with the same "
                    "settings are reused.",
        formatter_class=HelpFormatter)
    ap.add_argument("task", choices=TASKS, help="ncc, ncs, lcs or bms")
    g = ap.add_argument_group("runs")
    g.add_argument("--prepared", required=True,
                   help="the folder scripts/prepare_target.py wrote for this task")
    g.add_argument("--init", nargs="+", action="extend", default=[], metavar="NAME=CHECKPOINT",
                   help="pretrained initialisations to compare with scratch (always run): ours "
                        "(en_de or en), the published Semantic Genesis file or Models Genesis "
                        "weights; the kind is read from the file")
    g.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2],
                   help="fine-tuning seeds (data order, crops, fresh layers); one cell per seed")
    g.add_argument("--label_fractions", type=_label_fraction, nargs="+", default=[1.0],
                   metavar="F", help="fractions of the training cubes (NCC) or cases in (0, 1]; "
                                     "one subset per (fraction, seed), shared by every init")
    g.add_argument("--output_dir", default=None,
                   help="cells, results.json, results.md and results.png (default: "
                        "runs/target_tasks/TASK)")
    g.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="paper: the published protocol; tiny: seconds per cell (tests)")
    g.add_argument("--overwrite", action="store_true",
                   help="redo the cells whose recorded settings differ from this run's (cells "
                        "with the same settings are kept)")
    g.add_argument("--resume", action="store_true",
                   help="continue interrupted cells from their last complete epoch")
    p = ap.add_argument_group("protocol (default: the task's published value, see "
                              "docs/target_tasks.md)")
    choices = {"optimizer": ["adam", "sgd"], "loss": ["bce", "dice", "bce_dice"],
               "monitor": ["loss", "auc", "dice"]}
    for name, (kind, text) in PROTOCOL_FLAGS.items():
        p.add_argument(f"--{name}", type=kind, default=None, choices=choices.get(name), help=text)
    p.add_argument("--input", type=positive_int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="input size (published: 64 64 32); segmentation crops and windows")
    p.add_argument("--augment", action="store_true",
                   help="random flips while training (not in the published protocol)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="U-Net base width (default: the checkpoints', else the preset's)")
    p.add_argument("--norm", default="batch_stats", choices=["batch_stats", "standard"],
                   help="BatchNorm mode (see finetune/classification.py)")
    r = ap.add_argument_group("runtime")
    r.add_argument("--device", type=device_name, default="auto", help="auto, cpu or cuda[:i]")
    r.add_argument("--num_workers", type=nonneg_int, default=None,
                   help="DataLoader workers per run (default: the preset's)")
    add_verbosity_flag(r, "1: one line per cell and a progress bar over cells; 2: the same")
    return ap


def _label_fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]")
    return value


def _check_runs(args: argparse.Namespace) -> None:
    """Cross-flag checks (argparse checks each value)."""
    if len(set(args.seeds)) != len(args.seeds):
        raise InputError(f"--seeds {' '.join(map(str, args.seeds))}: give each seed once")
    if len(set(args.label_fractions)) != len(args.label_fractions):
        raise InputError("--label_fractions: give each fraction once")


def _machine() -> str:
    import torch
    text = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    return text + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")


def run(args: argparse.Namespace, command: str | None = None) -> dict[str, Any]:
    """Check the inputs, plan every cell, run the missing ones, write and return the results."""
    _check_runs(args)
    proto = PROTOCOLS[args.task]
    values, sources = resolve_protocol(args.task, args)
    prepared = check_prepared(args.prepared, args.task, proto.kind, values["input"])
    _note_hu_window(proto, prepared)
    res = Path(args.output_dir or f"runs/target_tasks/{args.task}")
    check_output_outside(res, [args.prepared], "--output_dir", "--prepared", both_ways=True)
    inits = parse_inits(args.init)
    preset = PRESETS[args.preset]
    width, width_source = resolve_width(inits, args.width, preset["width"], f"preset {args.preset}")
    if args.num_workers is None:
        args.num_workers = preset["num_workers"]
    values["width"], sources["width"] = width, width_source
    if args.verbose:
        print(f"{args.task} ({proto.title}, {proto.dataset}): " + ", ".join(
            f"{k} {_show(values[k])} [{sources[k]}]" for k in values))
    fractions, seeds = sorted(args.label_fractions), list(args.seeds)
    with output_session(res, "--output_dir"):
        subsets = {(f, s): plan_subset(res, prepared, f, s) for f in fractions for s in seeds}
        jobs = []
        for f in fractions:
            for s in seeds:
                for init in inits:
                    folder = res / "cells" / init.name / f"f{fraction_key(f)}" / f"seed{s}"
                    argv = finetune_argv(proto, values, init, width, s, subsets[f, s], folder, args)
                    cell = Cell(f"{init.name} fraction {f:g} seed {s}", folder,
                                cell_settings(proto, argv, init, s, f, prepared, subsets[f, s]),
                                result_files=("metrics.json",))
                    jobs.append((init, f, s, cell))
        plan = plan_cells([j[3] for j in jobs], args.overwrite,
                          "resume" if args.resume else "refuse")
        for subset in subsets.values():   # after the plan: a refused run writes nothing
            write_subset(subset, prepared)
        results = _run_cells(proto, values, width, subsets, jobs, plan, args)
    return _write_results(res, proto, values, sources, prepared, inits, seeds, fractions,
                          jobs, results, command)


def _note_hu_window(proto: Protocol, prepared: Prepared) -> None:
    """Say so when the data were prepared with another HU window than the protocol's."""
    settings = prepared.manifest.get("settings") or {}
    window = (settings.get("hu_min"), settings.get("hu_max")) if isinstance(settings, dict) else (None, None)
    if proto.hu_window and None not in window and tuple(map(float, window)) != proto.hu_window:
        print(f"note: {prepared.folder} was prepared with the HU window [{window[0]:g}, "
              f"{window[1]:g}]; the published protocol uses [{proto.hu_window[0]:g}, "
              f"{proto.hu_window[1]:g}]", file=sys.stderr)


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)


def _run_cells(proto: Protocol, values: dict[str, Any], width: int, subsets: dict,
               jobs: list, plan: dict[str, str], args: argparse.Namespace) -> dict[str, dict]:
    """Run (or reuse) every cell in order, one line each; returns {cell name: result}."""
    results: dict[str, dict] = {}
    bar = tqdm(total=len(jobs), desc="cells", dynamic_ncols=True, disable=not args.verbose)
    for init, f, s, cell in jobs:
        action = plan[cell.name]
        if action == "reuse":
            result = cell.result()
        else:
            resume = action == "resume" and (cell.folder / "last.pt").is_file()
            argv = finetune_argv(proto, values, init, width, s, subsets[f, s], cell.folder, args,
                                 resume=resume)
            result = run_finetune_cell(cell, _finetune_module(proto.kind), argv, action,
                                       proto.metric)
        results[cell.name] = result
        bar.update(1)
        if args.verbose:
            note = " (reused)" if action == "reuse" else " (resumed)" if action == "resume" else ""
            tqdm.write(f"{init.name} seed {s} fraction {f:g}: test {proto.metric_label} "
                       f"{result['value']:.4f}, best epoch {result.get('best_epoch')} "
                       f"({result.get('seconds', 0):.0f} s){note}")
    bar.close()
    return results


def _write_results(res: Path, proto: Protocol, values: dict, sources: dict, prepared: Prepared,
                   inits: list[Init], seeds: list[int], fractions: list[float], jobs: list,
                   results: dict[str, dict], command: str | None) -> dict[str, Any]:
    """results.json, results.md and results.png from the cells' results."""
    by_init = {i.name: {fraction_key(f): [results[c.name]["value"] for i2, f2, s, c in jobs
                                         if i2.name == i.name and f2 == f] for f in fractions}
               for i in inits}
    rows = summary_rows(by_init, baseline="scratch")
    cells = [{"init": i.name, "fraction": f, "seed": s, "folder": relative_to(c.folder, res),
              "settings": c.settings, **results[c.name]} for i, f, s, c in jobs]
    out = {"task": proto.task, "protocol": proto.as_dict(), "values": values, "sources": sources,
           "prepared": prepared.summary(), "inits": [i.as_dict() for i in inits],
           "seeds": seeds, "label_fractions": fractions, "metric": proto.metric,
           "results": by_init, "summary": rows, "paper": PAPER[proto.task], "cells": cells,
           "machine": _machine(), "command": command or "python scripts/run_target.py " +
           " ".join(shlex.quote(a) for a in sys.argv[1:])}
    table = report.format_table(proto, rows, inits)
    out["table"] = table
    save_json_atomic(res / "results.json", out)
    with atomic_path(res / "results.md") as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    report.plot_results(proto, rows, inits, res / "results.png")
    print(table)
    print(f"wrote {res / 'results.json'}, {res / 'results.md'}, {res / 'results.png'}")
    return out


def main(argv: list[str] | None = None) -> int:
    command = None if argv is None else "python scripts/run_target.py " + " ".join(
        shlex.quote(a) for a in argv)
    return run_cli(build_parser, lambda args: run(args, command), argv,
                   interrupted="run the same command again with --resume: finished cells are "
                               "kept")
