"""The transfer experiments' data: the phantom target tasks, the pretraining data (the
pipeline's stages 0-3) and the labelled subsets of the cells, each a step keyed by its settings
(``finetune.cells``).

Records hold paths relative to the output folder, never absolute ones, so a study moved or
cloned elsewhere keeps its steps.
"""
from __future__ import annotations

import importlib
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from finetune.cells import Cell, clear_cell, finish_cell, label_subset, run_config, start_cell
from finetune.stats import fraction_key
from preparation.phantoms import make_nodule_cubes, write_phantom_dataset
from runtime.errors import InputError, ReportedError
from runtime.files import save_npy_atomic

__all__ = ["build_classification_task", "build_segmentation_task", "task_spec", "target_cell",
           "target_data", "flags_at", "pretraining_stages", "STAGE_KEYS", "in_study_terms",
           "pretraining_cell",
           "pretraining_data", "phantom_seeds", "cell_data"]


def build_classification_task(root: Path, n: tuple[int, int, int], cube: tuple[int, int, int],
                              seed: int, radius: tuple[float, float] | None = None
                              ) -> dict[str, list[str]]:
    """Write train/val/test nodule cubes and labels under ``root``; return the fine-tuning
    flags. ``radius``: nodule radius range in voxels (default: scaled with the cube, see
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


def task_spec(task: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a phantom target task's data (from the study's keys)."""
    if task == "classification":
        radius = cfg["cls_nodule_radius"]
        return {"task": task, "n": list(cfg["cls_n"]), "cube": list(cfg["cube"]),
                "radius": list(radius) if max(radius) > 0 else None, "seed": cfg["data_seed"]}
    return {"task": task, "n": list(cfg["seg_n"]), "shape": list(cfg["seg_shape"]),
            "nodules": cfg["seg_nodules"], "seed": cfg["data_seed"]}


def target_cell(out: Path, spec: dict[str, Any]) -> Cell:
    """The step that writes one task's data into ``out/data/<task>``."""
    return Cell(f"data {spec['task']}", out / "data" / spec["task"], spec)


def flags_at(out: Path, flags: dict[str, list[str]]) -> dict[str, list[str]]:
    """Recorded relative data flags as paths under ``out``."""
    return {k: [str(out / v) for v in vs] for k, vs in flags.items()}


def target_data(out: Path, cell: Cell, action: str) -> dict[str, list[str]]:
    """Build (or reuse) a task's train pool / validation / test files; return their flags."""
    if action != "reuse":
        clear_cell(cell)
        start_cell(cell, action)
        spec = cell.settings
        if spec["task"] == "classification":
            radius = tuple(spec["radius"]) if spec["radius"] else None
            f = build_classification_task(cell.folder, tuple(spec["n"]), tuple(spec["cube"]),
                                          spec["seed"], radius)
        else:
            f = build_segmentation_task(cell.folder, tuple(spec["n"]), tuple(spec["shape"]),
                                        spec["nodules"], spec["seed"])
        rel = {k: [str(Path(v).relative_to(out)) for v in vs] for k, vs in f.items()}
        finish_cell(cell, {"flags": rel})
    return flags_at(out, cell.result()["flags"])


# ------------------------------------------------------------------------------------------
# pretraining data: the pipeline's stages 0-3
# ------------------------------------------------------------------------------------------
#: Each step's flags that come from the study's keys (to name the key in a step's error).
STAGE_KEYS: dict[str, dict[str, str]] = {
    "pretrain": {"input_rows": "cube", "input_cols": "cube", "input_deps": "cube",
                 "cls_classes": "classes", "nb_instances": "instances",
                 "nb_instances_val": "val_instances", "width": "width", "batch_size": "pre_batch",
                 "lr": "pre_lr", "nb_epoch": "pre_epochs", "patience": "pre_epochs"},
    "classification": {"nb_epoch": "cls_epochs", "patience": "cls_patience",
                       "batch_size": "cls_batch", "lr": "cls_lr", "monitor": "cls_monitor",
                       "width": "width"},
    "segmentation": {"nb_epoch": "seg_epochs", "patience": "seg_patience", "batch_size": "seg_batch",
                     "lr": "seg_lr", "steps_per_epoch": "seg_steps", "overlap": "seg_overlap",
                     "crop": "cube", "width": "width"},
    "phantoms": {"n": "phantoms", "shape": "phantom_shape", "spacing": "spacing",
                 "seed": "phantom_seed"},
    "prepare": {"spacing": "spacing"},
    "autoencoder": {"input_rows": "ae_size", "input_cols": "ae_size", "input_deps": "ae_size",
                    "width": "width", "batch_size": "ae_batch", "nb_epoch": "ae_epochs"},
    "features": {"input_rows": "ae_size", "input_cols": "ae_size", "input_deps": "ae_size"},
    "patterns": {"input_rows": "cube", "input_cols": "cube", "input_deps": "cube",
                 "crop_rows": "cube", "crop_cols": "cube", "minPatchSize": "patch_min",
                 "maxPatchSize": "patch_max", "nb_classes": "classes",
                 "nb_instances": "instances", "nb_instances_val": "val_instances",
                 "len_border": "border", "len_border_z": "border_z", "max_tries": "pattern_tries"},
}
#: Each stage's module and the function its ``main`` runs.
_STAGES = {"phantoms": ("preparation.phantoms", "run"),
           "prepare": ("preparation.prepare", "prepare_dataset"),
           "autoencoder": ("self_discovery.train_autoencoder", "train"),
           "features": ("self_discovery.feature_extractor", "run"),
           "patterns": ("self_discovery.pattern_generator_3D", "generate_patterns")}


def pretraining_stages(out: Path, cfg: dict[str, Any], device: str) -> list[tuple[str, str, Path, list[str]]]:
    """The pipeline's stages 0-3 as (name, module, marker file, argv); a stage whose marker
    exists is done. The patterns land in ``out/pretraining_data/patterns``."""
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


def pretraining_cell(out: Path, cfg: dict[str, Any]) -> Cell:
    """The step of stages 0-3, keyed by every stage's settings (its parsed command line without
    the paths inside ``out``)."""
    settings = {name: run_config(importlib.import_module(module).build_parser(), argv, under=out)
                for name, module, _, argv in pretraining_stages(out, cfg, "cpu")}
    return Cell("pretraining data", out / "pretraining_data", settings)


def in_study_terms(stage: str, message: str) -> str:
    """A stage's error with its flags named as the study's keys (``--set``)."""
    keys = STAGE_KEYS.get(stage, {})

    def name(m: re.Match) -> str:
        flag = m.group(1)
        return f"{keys[flag]} (--set)" if flag in keys else f"the stage's --{flag} (fixed by the study)"
    return re.sub(r"--(\w+)", name, message)


def _run_stage(name: str, argv: list[str]) -> None:
    module, function = _STAGES[name]
    mod = importlib.import_module(module)
    try:
        getattr(mod, function)(mod.build_parser().parse_args(argv))
    except ReportedError as e:
        raise InputError(f"pretraining data, stage {name}: {in_study_terms(name, str(e))}; "
                         "change the study's keys with --set (finished stages are kept)") from e


def pretraining_data(out: Path, cfg: dict[str, Any], device: str, cell: Cell, action: str) -> Path:
    """Run the pipeline's stages 0-3 on ``cfg["phantoms"]`` phantom patients in-process (a
    stage whose marker exists is skipped when the step continues); returns the folder of the
    anatomical-pattern fold files."""
    patterns = out / "pretraining_data" / "patterns"
    if action == "reuse":
        return patterns
    if action == "redo":
        clear_cell(cell)
    start_cell(cell, action)
    ds = out / "pretraining_data" / "dataset"
    for name, _, done, argv in pretraining_stages(out, cfg, device):
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
        _run_stage(name, argv)
        print(f"[pretraining data] {name} done in {time.time() - t0:.0f} s", flush=True)
    finish_cell(cell, {"patterns": "pretraining_data/patterns"})
    return patterns


def phantom_seeds(cfg: dict[str, Any]) -> dict[str, set[int]]:
    """The phantom patient seeds each part of the study uses (see ``preparation/phantoms.py``
    and the task builders above), to check that target patients are never pretrained on."""
    ds = cfg["data_seed"]
    per = 8  # make_nodule_cubes: one phantom per 8 cubes
    cls = {(ds * 10 + k) * 1000 + j for k, n in enumerate(cfg["cls_n"]) for j in range(math.ceil(n / per))}
    seg = {ds * 1000 + 100 * k + i for k, n in enumerate(cfg["seg_n"]) for i in range(n)}
    pre = set(range(cfg["phantom_seed"], cfg["phantom_seed"] + cfg["phantoms"]))
    return {"pretraining": pre, "classification": cls, "segmentation": seg}


def cell_data(out: Path, task: str, flags: dict[str, list[str]], fraction: float,
              seed: int) -> tuple[dict[str, list[str]], list[Any]]:
    """(fine-tuning data flags, the subset's items) of one (task, fraction, seed): the
    labelled training subset (written once into the task's data folder, shared by every
    method) and the task's validation and test sets. A classification subset is repeated to
    the pool size, so every fraction gets the same number of updates."""
    flags = dict(flags)
    if task == "classification":
        labels = np.load(flags["--labels"][0])
        idx = label_subset(labels, fraction, seed)
        root = out / "data" / task / "subsets"
        name = f"f{fraction_key(fraction)}_seed{seed}"
        data, lab = root / f"{name}_cubes.npy", root / f"{name}_labels.npy"
        if not lab.exists():
            cubes = np.load(flags["--data"][0], mmap_mode="r")
            rep = np.resize(idx, len(labels))
            save_npy_atomic(data, np.asarray(cubes[rep]))
            save_npy_atomic(lab, labels[rep])
        flags["--data"], flags["--labels"] = [str(data)], [str(lab)]
        return flags, idx.tolist()
    images = sorted(Path(flags["--images"][0]).glob("*.npy"))
    masks = sorted(Path(flags["--masks"][0]).glob("*.npy"))
    idx = label_subset(np.zeros(len(images), np.int64), fraction, seed)
    flags["--images"] = [str(images[i]) for i in idx]
    flags["--masks"] = [str(masks[i]) for i in idx]
    return flags, [images[i].name for i in idx]
