"""Transfer study: does pretraining with this code make target tasks better? One command.

    python experiments/transfer_study.py --preset cpu --output_dir outputs/transfer_study_cpu

Steps (each one is skipped when its outputs exist, so an interrupted study resumes):

1. Pretraining data: phantom patients -> prepared dataset -> autoencoder -> features ->
   self-discovered anatomical patterns (the quickstart's stages 0-3, in-process).
2. Target tasks on patients disjoint from pretraining (other phantom seeds; checked):
   nodule / no-nodule classification of lung cubes (test ROC AUC) and nodule segmentation in
   whole phantom chests (test Dice, sliding window). Each task has a fixed training pool, a
   fixed validation set (early stopping and model choice) and a fixed test set.
3. Pretraining, same patterns, same budget (epochs, batch, learning rate, seed) per method:
   ``semantic_genesis`` (``--exp en_de``: self-classification + self-restoration),
   ``restoration_only`` (``--lambda_cls 0``: Models Genesis-style) and ``classification_only``
   (``--exp en``). The pretext diagnostics (top-1 vs. chance, restoration gain per transform,
   a linear probe on the classification task's *validation* cubes) are collected.
4. Fine-tuning cells (task, label fraction, seed, method), ``scratch`` included: the labelled
   subset depends only on (fraction, seed) and is nested across fractions, the fine-tuning seed
   is the same for every method, so differences to scratch are paired. A classification subset
   is repeated to the pool size (with random flips), so every run gets the same number of
   updates whatever its labels; a segmentation run draws the same number of crops from fewer
   patients. Each cell's result is written atomically as it finishes.
5. Outputs in ``--output_dir``: ``transfer_study.json`` (per-seed values, summary, pretext
   diagnostics), ``transfer_study.md`` (table: mean and 95 % t-interval per method, and of the
   paired difference to scratch), ``transfer_study.png`` (metric vs. label fraction, one line per
   method, 95 % error bars).

Presets: ``cpu`` (width 4, 32 x 32 x 16 cubes, short schedules: under an hour on 2 busy cores),
``gpu`` (the published width 32 and 64 x 64 x 32 cubes, sized for one call of under 10 minutes
on one H200), ``full`` (published sizes and longer schedules, for an unattended run), ``tiny``
(seconds; the tests). Every preset value can be overridden with ``--set key=value``.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import ast
import importlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pytorch import train
from pytorch.diagnostics import format_diagnostics
from runtime.cli import (ArgumentParser, HelpFormatter, call_reporting_errors, nonneg_int, run_cli,
                         positive_int)
from runtime.devices import resolve_device
from runtime.errors import InputError
from runtime.files import (atomic_path, make_output_dir, save_json_atomic, save_npy_atomic,
                           write_run_config)
from finetune.stats import mean_ci, paired_difference
from finetune import classification as finetune_classification
from finetune import segmentation as finetune_segmentation
from experiments.plot_png import Panel, save_panels
from experiments.transfer_benchmark import _flags, build_classification_task, build_segmentation_task

__all__ = ["METHODS", "TASKS", "PRESETS", "resolve_config", "label_subset", "mean_ci",
           "summarize", "format_table", "plot_results", "study_json", "build_parser", "run",
           "main"]

METHODS = ("scratch", "semantic_genesis", "restoration_only", "classification_only")
TASKS = ("classification", "segmentation")
#: (key in the fine-tuning test metrics, name in tables)
METRIC = {"classification": ("auc", "AUC"), "segmentation": ("dice", "Dice")}
#: pretraining flags of each pretrained method (on top of the shared ones)
PRETRAIN_FLAGS = {"semantic_genesis": ["--exp", "en_de"],
                  "restoration_only": ["--exp", "en_de", "--lambda_cls", "0"],
                  "classification_only": ["--exp", "en"]}

_BASE: dict[str, Any] = dict(
    seeds=[0, 1, 2, 3, 4], fractions=[0.05, 0.1, 0.25, 1.0], data_seed=1234,
    # pretraining data (stages 0-3)
    phantoms=16, phantom_shape=[128, 128, 48], spacing=[2.25, 2.25, 5.0], phantom_seed=100,
    ae_size=[64, 64, 32], ae_epochs=2, ae_batch=4, patch_min=25, patch_max=40,
    classes=8, instances=12, val_instances=4, border=24, border_z=4,
    # small phantoms have little lung per reference patient: 200 tries (the published default)
    # can miss a coordinate for the last classes, whose references are the leftover patients
    pattern_tries=1000,
    # pretraining (stage 4)
    width=4, cube=[32, 32, 16], pre_epochs=15, pre_batch=16, pre_lr=1e-3,
    # classification task: nodule / no-nodule cubes; nodule radius range in voxels ([0, 0]:
    # scaled with the cube, 2 to min(cube) / 6, as scripts/phantoms.py makes them)
    cls_n=[80, 40, 200], cls_nodule_radius=[0.0, 0.0], cls_monitor="auc", cls_epochs=8, cls_patience=4, cls_batch=16, cls_lr=1e-3,
    # segmentation task: nodules in whole phantom chests
    seg_n=[20, 3, 8], seg_shape=[64, 64, 32], seg_nodules=3, seg_epochs=8, seg_steps=6,
    seg_patience=4, seg_batch=8, seg_lr=1e-3, seg_overlap=0.0,
)
PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores shared with other work (see the README for the design and its timing):
    # width 4, 32 x 32 x 16 cubes, three label fractions; 720 pretraining updates per method
    # (90 were too few) and 50 updates per fine-tuning run; nodules of 3-6 voxels (the radius
    # scaled with a 32 x 32 x 16 cube, 2-2.7 voxels, is the size of a vessel); classification
    # runs keep the epoch of best validation AUC (the validation loss of 4 labelled cubes rises
    # from the first epoch while the AUC still climbs)
    "cpu": dict(_BASE, fractions=[0.05, 0.25, 1.0], pre_epochs=40, cls_n=[80, 64, 200],
                cls_nodule_radius=[3.0, 6.0], cls_epochs=10, cls_patience=4, seg_epochs=10,
                seg_steps=5, seg_patience=4),
    # the published width and cube size; sized (not yet timed: no GPU here) for one H200 call of
    # under 10 minutes with --workers 8: 20 classes (24 training phantoms allow no more)
    "gpu": dict(_BASE, fractions=[0.05, 0.25, 1.0], phantoms=32, phantom_shape=[192, 192, 80],
                spacing=[1.5, 1.5, 3.0], ae_size=[128, 128, 64], ae_epochs=5, ae_batch=8,
                patch_min=50, patch_max=80, classes=20, instances=24, val_instances=8, border=40,
                border_z=4, width=32, cube=[64, 64, 32], pre_epochs=20, pre_batch=32,
                cls_n=[200, 80, 400], cls_epochs=12, cls_patience=4, seg_n=[40, 4, 12],
                seg_shape=[96, 96, 48], seg_nodules=4, seg_epochs=12, seg_steps=10,
                seg_patience=4, seg_overlap=0.25),
    # published sizes and number of classes, longer schedules: an unattended run
    "full": dict(_BASE, seeds=list(range(10)), phantoms=120, phantom_shape=[320, 320, 112],
                 spacing=[1.0, 1.0, 2.5], ae_size=[128, 128, 64], ae_epochs=50, ae_batch=8,
                 patch_min=50, patch_max=80, classes=44, instances=80, val_instances=20,
                 border=60, border_z=10, width=32, cube=[64, 64, 32], pre_epochs=200,
                 pre_batch=64, cls_n=[400, 100, 1000], cls_epochs=60, cls_patience=10,
                 seg_n=[80, 10, 30], seg_shape=[128, 128, 64], seg_nodules=4, seg_epochs=60,
                 seg_steps=25, seg_patience=10, seg_overlap=0.5),
    # seconds: the tests
    "tiny": dict(_BASE, seeds=[0, 1], fractions=[0.5, 1.0], phantoms=8, phantom_shape=[64, 64, 20],
                 spacing=[1.5, 1.5, 3.0], ae_size=[32, 32, 16], ae_epochs=1, ae_batch=2,
                 patch_min=12, patch_max=20, classes=2, instances=4, val_instances=2, border=4,
                 border_z=2, width=2, cube=[16, 16, 8], pre_epochs=1, pre_batch=4,
                 cls_n=[8, 8, 8], cls_epochs=1, cls_batch=4, seg_n=[2, 1, 1],
                 seg_shape=[24, 24, 8], seg_nodules=2, seg_epochs=1, seg_steps=1, seg_batch=2),
}


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
def resolve_config(preset: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The preset's values with ``key=value`` overrides (Python literals, e.g. ``width=8``,
    ``fractions=[0.1,1.0]``); an unknown key or a value of another type is an ``InputError``."""
    if preset not in PRESETS:
        raise InputError(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
    cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS[preset].items()}
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or key not in cfg:
            raise InputError(f"--set {item}: expected key=value with key one of {', '.join(sorted(cfg))}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise InputError(f"--set {item}: {text!r} is not a number or a list") from None
        old = cfg[key]
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
        if type(value) is not type(old) or (isinstance(old, list) and len(value) == 0):
            raise InputError(f"--set {item}: {key} takes a value like {old!r}")
        cfg[key] = value
    fr = cfg["fractions"]
    if not fr or any(not 0 < f <= 1 for f in fr) or sorted(set(fr)) != list(fr):
        raise InputError(f"fractions {fr}: increasing values in (0, 1]")
    if len(cfg["seeds"]) < 2:
        raise InputError(f"seeds {cfg['seeds']}: at least 2 seeds are needed for an interval")
    if any(c % 8 for c in cfg["cube"]):
        raise InputError(f"cube {cfg['cube']}: every side must be a multiple of 8")
    return cfg


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def pretraining_stages(out: Path, cfg: dict[str, Any], device: str) -> list[tuple[str, str, Path, list[str]]]:
    """The pipeline's stages 0-3 as (name, module, marker file, argv); a stage whose marker
    exists is done, one without it is redone (``--overwrite``). The patterns land in
    ``out/pretraining_data/patterns``."""
    root = out / "pretraining_data"
    raw, ds, ae, feat, pat = (root / n for n in ("phantoms", "dataset", "autoencoder", "features", "patterns"))
    sp = [str(s) for s in cfg["spacing"]]
    size = [str(s) for s in cfg["ae_size"]]
    c = [str(v) for v in cfg["cube"]]
    n = cfg["phantoms"]
    return [
        ("phantoms", "preparation.phantoms", raw / f"phantom_{n - 1:03d}.nrrd",
         ["--output_dir", str(raw), "--n", str(n), "--shape", *map(str, cfg["phantom_shape"]),
          "--spacing", *sp, "--format", "nrrd", "--seed", str(cfg["phantom_seed"]), "--skip_existing"]),
        ("prepare", "preparation.prepare", ds / "manifest.json",
         ["--input_dir", str(raw), "--output_dir", str(ds), "--spacing", *sp,
          "--val_fraction", "0.25", "--seed", "0"]),
        ("autoencoder", "self_discovery.train_autoencoder", ae / "Unet_autoencoder.pt",
         ["--data_dir", str(ds), "--input_rows", size[0], "--input_cols", size[1],
          "--input_deps", size[2], "--width", str(max(cfg["width"], 4)),
          "--batch_size", str(cfg["ae_batch"]), "--nb_epoch", str(cfg["ae_epochs"]),
          "--num_workers", "0", "--cache", "--device", device, "--output_dir", str(ae),
          "--log_dir", str(out / "runs" / "autoencoder"), "--verbose", "0", "--overwrite"]),
        ("features", "self_discovery.feature_extractor", feat / "features_index.json",
         ["--data_dir", str(ds), "--weights", str(ae / "Unet_autoencoder.pt"),
          "--input_rows", size[0], "--input_cols", size[1], "--input_deps", size[2],
          "--num_workers", "0", "--device", device, "--output_dir", str(feat), "--verbose", "0",
          "--overwrite"]),
        ("patterns", "self_discovery.pattern_generator_3D", pat / "fold_index.json",
         ["--data_dir", str(ds), "--output_dir", str(pat),
          "--train_features", str(feat / "train_features.npy"),
          "--val_features", str(feat / "validation_features.npy"), "--is_normalized",
          "--input_rows", c[0], "--input_cols", c[1], "--input_deps", c[2],
          "--crop_rows", c[0], "--crop_cols", c[1], "--multi_res",
          "--minPatchSize", str(cfg["patch_min"]), "--maxPatchSize", str(cfg["patch_max"]),
          "--nb_classes", str(cfg["classes"]), "--nb_instances", str(cfg["instances"]),
          "--nb_instances_val", str(cfg["val_instances"]), "--len_border", str(cfg["border"]),
          "--len_border_z", str(cfg["border_z"]), "--max_tries", str(cfg["pattern_tries"]),
          "--montage_instances", "0", "--seed", "0", "--overwrite"]),
    ]


def pretraining_data(out: Path, cfg: dict[str, Any], device: str) -> Path:
    """Run the pipeline's stages 0-3 on ``cfg["phantoms"]`` phantom patients (each skipped when
    done), in-process through each stage's ``main``; returns the folder of the
    anatomical-pattern fold files."""
    ds = out / "pretraining_data" / "dataset"
    for name, module, done, argv in pretraining_stages(out, cfg, device):
        if done.exists():
            continue
        if name == "patterns":
            n_train = len(list((ds / "train").glob("*.npy")))
            n_val = len(list((ds / "validation").glob("*.npy")))
            if cfg["instances"] > n_train or cfg["classes"] > n_train or cfg["val_instances"] > n_val:
                raise InputError(f"{n_train} train / {n_val} validation phantoms cannot give classes="
                                 f"{cfg['classes']}, instances={cfg['instances']}, val_instances="
                                 f"{cfg['val_instances']}; raise phantoms or lower them (--set)")
        t0 = time.time()
        if importlib.import_module(module).main(argv) != 0:
            raise InputError(f"stage {name} failed (see the error above); fix it and re-run: "
                             "finished stages are kept")
        print(f"[pretraining data] {name} done in {time.time() - t0:.0f} s", flush=True)
    return out / "pretraining_data" / "patterns"


def _phantom_seeds(cfg: dict[str, Any]) -> dict[str, set[int]]:
    """The phantom patient seeds each part of the study uses (see ``scripts/phantoms.py`` and
    ``transfer_benchmark.build_*_task``), to check that target patients are never pretrained on."""
    ds = cfg["data_seed"]
    per = 8  # make_nodule_cubes: one phantom per 8 cubes
    cls = {(ds * 10 + k) * 1000 + j for k, n in enumerate(cfg["cls_n"]) for j in range(math.ceil(n / per))}
    seg = {ds * 1000 + 100 * k + i for k, n in enumerate(cfg["seg_n"]) for i in range(n)}
    pre = set(range(cfg["phantom_seed"], cfg["phantom_seed"] + cfg["phantoms"]))
    return {"pretraining": pre, "classification": cls, "segmentation": seg}


def target_data(out: Path, cfg: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, list[str]]]:
    """Build (once) the target tasks' train pool / validation / test files; return their flags."""
    seeds = _phantom_seeds(cfg)
    for task in tasks:
        shared = seeds[task] & seeds["pretraining"]
        if shared:
            raise InputError(f"{task} patients {sorted(shared)[:5]} are also pretraining patients; "
                             "change data_seed or phantom_seed (--set)")
    flags: dict[str, dict[str, list[str]]] = {}
    for task in tasks:
        root = out / "data" / task
        done = root / "flags.json"
        if done.exists():
            flags[task] = json.loads(done.read_text())
            continue
        if task == "classification":
            radius = tuple(cfg["cls_nodule_radius"]) if max(cfg["cls_nodule_radius"]) > 0 else None
            f = build_classification_task(root, tuple(cfg["cls_n"]), tuple(cfg["cube"]),
                                          cfg["data_seed"], radius)
        else:
            f = build_segmentation_task(root, tuple(cfg["seg_n"]), tuple(cfg["seg_shape"]),
                                        cfg["seg_nodules"], cfg["data_seed"])
        save_json_atomic(done, f)
        flags[task] = f
    return flags


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the labelled subset for (``fraction``, ``seed``), sorted.

    Stratified when ``labels`` has classes (at least one item of each class), nested across
    fractions (the same seed's 5 % subset lies inside its 10 % subset), and independent of the
    method, so every method fine-tunes on the same items.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1ABE1]))
    picked = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        picked.append(idx[:min(idx.size, max(1, int(round(fraction * idx.size))))])
    return np.sort(np.concatenate(picked))


def _fraction_key(f: float) -> str:
    return f"{f:g}"


def cell_data(out: Path, task: str, flags: dict[str, list[str]], fraction: float,
              seed: int) -> dict[str, list[str]]:
    """Fine-tuning data flags of one (task, fraction, seed): the labelled training subset
    (written once, shared by every method), the task's validation and test sets."""
    flags = dict(flags)
    if task == "classification":
        cubes = np.load(flags["--data"][0], mmap_mode="r")
        labels = np.load(flags["--labels"][0])
        root = out / "data" / task / "subsets"
        name = f"f{_fraction_key(fraction)}_seed{seed}"
        data, lab = root / f"{name}_cubes.npy", root / f"{name}_labels.npy"
        if not lab.exists():
            idx = label_subset(labels, fraction, seed)
            # repeat the subset to the pool size: the same number of updates for every fraction
            rep = np.resize(idx, len(labels))
            save_npy_atomic(data, np.asarray(cubes[rep]))
            save_npy_atomic(lab, labels[rep])
        flags["--data"], flags["--labels"] = [str(data)], [str(lab)]
    else:
        images = sorted(Path(flags["--images"][0]).glob("*.npy"))
        masks = sorted(Path(flags["--masks"][0]).glob("*.npy"))
        idx = label_subset(np.zeros(len(images), np.int64), fraction, seed)
        flags["--images"] = [str(images[i]) for i in idx]
        flags["--masks"] = [str(masks[i]) for i in idx]
    return flags


# ------------------------------------------------------------------------------------------
# pretraining and fine-tuning
# ------------------------------------------------------------------------------------------
def _pretrain_argv(method: str, cfg: dict[str, Any], patterns: Path, folder: Path, log_dir: Path,
                   probe: tuple[str, str] | None, device: str, quiet: bool) -> list[str]:
    c = [str(v) for v in cfg["cube"]]
    argv = ["--data_dir", str(patterns), "--input_rows", c[0], "--input_cols", c[1],
            "--input_deps", c[2], "--cls_classes", str(cfg["classes"]),
            "--nb_instances", str(cfg["instances"]), "--nb_instances_val", str(cfg["val_instances"]),
            "--nb_multires_patch", "3", "--width", str(cfg["width"]),
            "--batch_size", str(cfg["pre_batch"]), "--lr", str(cfg["pre_lr"]),
            "--nb_epoch", str(cfg["pre_epochs"]), "--patience", str(cfg["pre_epochs"]),
            "--seed", "1", "--device", device, "--output_dir", str(folder / "checkpoints"),
            "--log_dir", str(log_dir), "--notes", method,
            "--verbose", "0" if quiet else "1", "--overwrite", *PRETRAIN_FLAGS[method]]
    if probe is not None:
        argv += ["--probe_data", probe[0], "--probe_labels", probe[1]]
    return argv


def pretrain(out: Path, method: str, cfg: dict[str, Any], patterns: Path, probe: tuple[str, str] | None,
             device: str, quiet: bool) -> dict[str, Any]:
    """Pretrain one method on the patterns (skipped when done); returns {"checkpoint",
    "diagnostics", "seconds"}."""
    folder = out / "pretrain" / method
    done = folder / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    argv = _pretrain_argv(method, cfg, patterns, folder, out / "runs" / "pretrain" / method,
                          probe, device, quiet)
    t0 = time.time()
    ok, summary = call_reporting_errors(train.train, train.build_parser().parse_args(argv))
    if not ok:
        raise InputError(f"pretraining {method} failed (see the error above)")
    result = {"checkpoint": summary["best_checkpoint"], "diagnostics": summary["diagnostics"],
              "best_loss": summary["best_loss"], "epochs": summary["epoch"],
              "seconds": time.time() - t0, "argv": argv}
    save_json_atomic(done, result)
    return result


def _finetune_argv(task: str, method: str, cfg: dict[str, Any], data: dict[str, list[str]],
                   weights: str | None, seed: int, run_dir: Path, device: str) -> list[str]:
    common = {"--width": str(cfg["width"]), "--device": device, "--num_workers": "0",
              "--quiet": True, "--seed": str(seed), "--output_dir": str(run_dir),
              "--weights": weights, "--optimizer": "adam", "--augment": True,
              "--overwrite": True}   # a cell without its result file is redone from the start
    if task == "classification":
        specific = {"--nb_epoch": str(cfg["cls_epochs"]), "--patience": str(cfg["cls_patience"]),
                    "--monitor": cfg["cls_monitor"],
                    "--batch_size": str(cfg["cls_batch"]), "--lr": str(cfg["cls_lr"])}
    else:
        specific = {"--nb_epoch": str(cfg["seg_epochs"]), "--patience": str(cfg["seg_patience"]),
                    "--batch_size": str(cfg["seg_batch"]), "--lr": str(cfg["seg_lr"]),
                    "--steps_per_epoch": str(cfg["seg_steps"]), "--overlap": str(cfg["seg_overlap"]),
                    "--crop": [str(c) for c in cfg["cube"]],
                    "--new_decoder": method == "classification_only"}
    return _flags({**data, **common, **specific})


def finetune_cell(out: Path, task: str, method: str, fraction: float, seed: int,
                  cfg: dict[str, Any], data: dict[str, list[str]], weights: str | None,
                  device: str, keep_checkpoints: bool = False) -> dict[str, Any]:
    """Fine-tune one cell (skipped when its result file exists); returns the result dict."""
    cell = out / "cells" / task / method / f"f{_fraction_key(fraction)}" / f"seed{seed}.json"
    if cell.exists():
        return json.loads(cell.read_text())
    run_dir = out / "runs" / "finetune" / task / method / f"f{_fraction_key(fraction)}" / f"seed{seed}"
    module = finetune_classification if task == "classification" else finetune_segmentation
    argv = _finetune_argv(task, method, cfg, data, weights, seed, run_dir, device)
    t0 = time.time()
    ok, metrics = call_reporting_errors(module.run, module.build_parser().parse_args(argv))
    if not ok:
        raise InputError(f"fine-tuning {task} {method} fraction {fraction} seed {seed} failed "
                         "(see the error above)")
    key = METRIC[task][0]
    value = metrics["test"].get(key)
    result = {"value": float("nan") if value is None else float(value),
              "val": metrics["val"].get(key), "best_epoch": metrics["best_epoch"],
              "epochs_run": metrics["epochs_run"], "n_train": metrics["n_train"],
              "loaded_keys": metrics["loaded_keys"], "seconds": time.time() - t0}
    if not keep_checkpoints:
        for name in ("best.pt", "last.pt"):
            (run_dir / name).unlink(missing_ok=True)
    save_json_atomic(cell, result)
    return result


# ------------------------------------------------------------------------------------------
# statistics, table, plot
# ------------------------------------------------------------------------------------------
def summarize(results: dict[str, dict[str, dict[str, list[float]]]]) -> list[dict[str, Any]]:
    """Rows (task, fraction, method, mean, ci, paired difference to scratch and its ci) from
    ``results[task][method][fraction] = [value per seed]`` (same seed order everywhere)."""
    rows = []
    for task, by_method in results.items():
        fractions = sorted({f for m in by_method.values() for f in m}, key=float)
        for f in fractions:
            base = by_method.get("scratch", {}).get(f)
            for method, by_f in by_method.items():
                vals = by_f.get(f)
                if vals is None:
                    continue
                m, lo, hi = mean_ci(vals)
                row = {"task": task, "fraction": f, "method": method, "n": len(vals),
                       "mean": m, "ci": [lo, hi]}
                if base is not None and method != "scratch" and len(base) == len(vals):
                    dm, dlo, dhi = paired_difference(vals, base)
                    row.update(diff=dm, diff_ci=[dlo, dhi])
                rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: task | labels | method | mean [95 % CI] | paired difference to scratch."""
    def pct(x: float) -> str:
        return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}"

    lines = ["| task (metric, %) | labels | method | mean [95% CI] | vs scratch: paired diff [95% CI] |",
             "|---|---|---|---|---|"]
    for r in rows:
        metric = METRIC[r["task"]][1]
        diff = "" if "diff" not in r else \
            f"{'+' if r['diff'] >= 0 else ''}{pct(r['diff'])} [{pct(r['diff_ci'][0])}, {pct(r['diff_ci'][1])}]"
        if "diff" in r and math.isfinite(r["diff_ci"][0]) and (r["diff_ci"][0] > 0 or r["diff_ci"][1] < 0):
            diff += " *"
        lines.append(f"| {r['task']} ({metric}) | {100 * float(r['fraction']):g}% | {r['method']} | "
                     f"{pct(r['mean'])} [{pct(r['ci'][0])}, {pct(r['ci'][1])}] | {diff} |")
    return "\n".join(lines)


def plot_results(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One panel per task: mean metric (%) vs. label fraction (log axis), one line per method,
    95 % error bars; written as an RGB PNG (``experiments/plot_png.py``, no plotting library)."""
    panels = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        series = {}
        for method in dict.fromkeys(r["method"] for r in task_rows):
            pts = [(float(r["fraction"]), 100 * r["mean"],
                    100 * r["ci"][0] if math.isfinite(r["ci"][0]) else 100 * r["mean"],
                    100 * r["ci"][1] if math.isfinite(r["ci"][1]) else 100 * r["mean"])
                   for r in task_rows if r["method"] == method]
            series[method] = pts
        panels.append(Panel(title=f"{task} {METRIC[task][1]} (%)", xlabel="labelled fraction",
                            series=series, log_x=True))
    return save_panels(path, panels)


def study_json(cfg: dict[str, Any], command: str, results: dict[str, dict[str, dict[str, list[float]]]],
               **extra: Any) -> dict[str, Any]:
    """The study's JSON: ``{"machine", "command", "tasks": {task: {"metric", "label_fractions",
    "results": {method: {fraction: [value per seed]}}}}, ...extra}``."""
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    tasks = {task: {"metric": METRIC[task][0], "label_fractions": [float(f) for f in cfg["fractions"]],
                    "results": by_method} for task, by_method in results.items()}
    return {"machine": machine, "command": command, "tasks": tasks, **extra}


# ------------------------------------------------------------------------------------------
# running steps: in this process, or in parallel worker processes
# ------------------------------------------------------------------------------------------
class _InlineExecutor:
    """``submit`` runs the call at once in this process and returns a finished future."""

    def submit(self, fn, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to the caller by fut.result()
            fut.set_exception(e)
        return fut

    def __enter__(self) -> "_InlineExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _init_worker(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


class _Pool(ProcessPoolExecutor):
    """Worker processes (spawned: safe with CUDA); pending steps are cancelled on an error."""

    def __exit__(self, exc_type, exc, tb):
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def _executor(workers: int, threads: int):
    if workers <= 1:
        return _InlineExecutor()
    return _Pool(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                 initializer=_init_worker, initargs=(threads,))


def _diagnostics_line(diag: dict[str, Any]) -> str:
    return format_diagnostics(diag) if "cls_top1" in diag else ""


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        description="Transfer study: pretrain Semantic Genesis and its ablations on the same "
                    "self-discovered patterns, fine-tune every method on phantom target tasks at "
                    "several label fractions and seeds (paired), and report a JSON, a table and "
                    "a plot. Resumable: re-running skips finished steps.",
        formatter_class=HelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS),
                    help="sizes and schedules: cpu (under an hour on 2 busy cores), gpu (published "
                         "sizes, < 10 min on one H200), full (unattended), tiny (tests)")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override preset values, e.g. --set width=8 seeds=[0,1,2]")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="methods to run (scratch is needed for the paired differences)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="target tasks")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--output_dir", default="outputs/transfer_study",
                    help="data, runs, per-cell results and the study's JSON / table / plot go here")
    ap.add_argument("--results_json", default=None,
                    help="also write the study's JSON to this path (e.g. experiments/results/...)")
    ap.add_argument("--plot", default=None,
                    help="also write the plot to this path (default: beside --results_json)")
    ap.add_argument("--keep_checkpoints", action="store_true",
                    help="keep every fine-tuning run's best.pt / last.pt (default: only metrics)")
    ap.add_argument("--workers", type=positive_int, default=1,
                    help="run pretraining and fine-tuning steps in this many worker processes "
                         "at once (results do not depend on it); on a GPU several small runs "
                         "share the device, on a CPU use one per core with --threads 1")
    ap.add_argument("--threads", type=nonneg_int, default=0,
                    help="torch CPU threads per process (0: torch's default); 1 is faster on a "
                         "busy machine")
    ap.add_argument("--quiet", action="store_true", help="no per-epoch pretraining lines")
    return ap


def run(args: argparse.Namespace, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) the whole study; return the study's JSON dict."""
    cfg = resolve_config(args.preset, args.overrides)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    out = make_output_dir(args.output_dir, "--output_dir")
    write_run_config(dict(vars(args), config=cfg), out)
    if "scratch" not in args.methods:
        print("note: without scratch there are no paired differences", file=sys.stderr)
    t0 = time.time()
    flags = target_data(out, cfg, list(args.tasks))
    pretrained = [m for m in args.methods if m != "scratch"]
    patterns, probe = None, None
    if pretrained:
        patterns = pretraining_data(out, cfg, device)
        if "classification" in flags:   # the probe reads validation cubes, never the test set
            probe = (flags["classification"]["--val_data"][0], flags["classification"]["--val_labels"][0])
    cells = [(task, f, seed, method) for method in args.methods for task in args.tasks
             for f in cfg["fractions"] for seed in cfg["seeds"]]
    pre: dict[str, dict[str, Any]] = {}
    values: dict[tuple, float] = {}
    bar = tqdm(total=len(cells), desc="fine-tuning cells", dynamic_ncols=True)
    quiet_pretrain = args.quiet or args.workers > 1   # parallel epoch lines would interleave
    with _executor(args.workers, args.threads) as ex:
        pending: dict[Any, tuple[str, Any]] = {}

        def submit_cells(method: str) -> None:
            for key in (c for c in cells if c[3] == method):
                task, f, seed, _ = key
                data = cell_data(out, task, flags[task], f, seed)   # written here, once
                weights = pre[method]["checkpoint"] if method != "scratch" else None
                fut = ex.submit(finetune_cell, out, task, method, f, seed, cfg, data, weights,
                                device, args.keep_checkpoints)
                pending[fut] = ("cell", key)

        for method in pretrained:
            print(f"[pretrain] {method}", flush=True)
            pending[ex.submit(pretrain, out, method, cfg, patterns, probe, device,
                              quiet_pretrain)] = ("pretrain", method)
        if "scratch" in args.methods:
            submit_cells("scratch")   # scratch needs no pretraining: it runs alongside
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                kind, what = pending.pop(fut)
                result = fut.result()
                if kind == "pretrain":
                    pre[what] = result
                    print(f"[pretrain] {what} done ({result['epochs']} epochs, "
                          f"{result['seconds']:.0f} s); last epoch"
                          + _diagnostics_line(result["diagnostics"][-1]).replace("    diag:", ""),
                          flush=True)
                    submit_cells(what)
                else:
                    values[what] = result["value"]
                    bar.update(1)
                    bar.set_postfix_str(f"{what[0]} {100 * what[1]:g}% seed {what[2]} {what[3]}")
    bar.close()
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        t: {m: {_fraction_key(f): [values[(t, f, seed, m)] for seed in cfg["seeds"]]
                for f in cfg["fractions"]} for m in args.methods} for t in args.tasks}
    rows = summarize(results)
    table = format_table(rows)
    command = command or "python experiments/transfer_study.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    study = study_json(cfg, command, results, seeds=list(cfg["seeds"]), preset=args.preset,
                       config=cfg, summary=rows, table=table,
                       pretraining={m: {"diagnostics": p["diagnostics"], "seconds": p["seconds"],
                                        "epochs": p["epochs"]} for m, p in pre.items()},
                       seconds_this_call=time.time() - t0)
    save_json_atomic(out / "transfer_study.json", study)
    with atomic_path(out / "transfer_study.md") as tmp:
        tmp.write_text(table + "\n")
    if args.results_json:
        save_json_atomic(make_output_dir(Path(args.results_json).parent, "--results_json")
                         / Path(args.results_json).name, study)
    plot_results(rows, out / "transfer_study.png")
    if args.results_json or args.plot:
        plot = Path(args.plot) if args.plot else Path(args.results_json).with_suffix(".png")
        plot_results(rows, make_output_dir(plot.parent, "--plot") / plot.name)
    print(table)
    print(f"wrote {out / 'transfer_study.json'}, {out / 'transfer_study.md'}, {out / 'transfer_study.png'}")
    return study


def main(argv: list[str] | None = None) -> int:
    command = None if argv is None else "python experiments/transfer_study.py " + " ".join(
        shlex.quote(a) for a in argv)
    return run_cli(build_parser, lambda args: run(args, command), argv,
                   interrupted="run the same command again: finished steps are kept")


if __name__ == "__main__":
    raise SystemExit(main())
