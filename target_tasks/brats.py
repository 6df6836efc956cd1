"""BMS, brain tumour segmentation: FLAIR volumes of the BraTS 2018 training set.

Input, as downloaded: ``HGG/`` and ``LGG/`` folders (possibly under
``MICCAI_BraTS_2018_Data_Training/``) of patient folders ``<id>/`` holding
``<id>_{flair,t1,t1ce,t2,seg}.nii.gz``; only FLAIR and the segmentation are read. Labels 0,
1 (necrotic core), 2 (oedema), 4 (enhancing tumour); whole tumour = label > 0.

The split is the published one: the authors' three folds of the 285 patients
(``bms_folds.csv`` in this package, or ``--folds``); folds 1 and 2 (in file order, fold 1
first) are shuffled with ``random.Random(4).shuffle``, the first ``len // 8`` of them (23) are
validation and the rest (167) training; fold 3 (95) is test.

Intensities: MRI has no Hounsfield units, so each FLAIR volume is z-scored over its brain (the
non-zero voxels: z = (v - mean) / std), and z is mapped to [0, 1] by one fixed rule: clipped to
[-a, a] (``--z_clip``, default 5) and scaled, image = z / (2 a) + 0.5, so the brain's mean lies
at 0.5 where the CT window puts water and one standard deviation is 0.1; the background
(outside the brain) is 0, where the CT window puts air. Case ``<id>``:
``{split}/images/<id>.npy`` (float32 (x, y, z)) and ``{split}/masks/<id>.npy`` (uint8).
"""
from __future__ import annotations

import argparse
import csv
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import positive_float
from runtime.errors import InputError
from runtime.provenance import file_identity
from target_tasks.common import (Plan, TaskHooks, check_same_grid, missing_or_refuse,
                                 plan_settings, read_header, read_labelled_volume, relative_to,
                                 write_case)

__all__ = ["FOLDS_CSV", "LABELS", "add_flags", "read_folds", "published_split",
           "find_patients", "zscore_to_unit", "plan", "work", "HOOKS"]

#: The authors' three folds of the BraTS 2018 training patients (patient_id, fold).
FOLDS_CSV = Path(__file__).with_name("bms_folds.csv")
#: Label values of a BraTS segmentation.
LABELS = (0, 1, 2, 4)
SETTINGS = ("folds", "z_clip")
_FIX = "download the BraTS 2018 training data again"


def add_flags(p: argparse.ArgumentParser) -> None:
    """The BMS flags."""
    g = p.add_argument_group("BMS")
    g.add_argument("--folds", type=Path, default=None,
                   help="CSV of patient_id,fold (1, 2 or 3) (default: the authors' folds of "
                        "the 285 BraTS 2018 training patients, shipped with this package)")
    g.add_argument("--z_clip", type=positive_float, default=5.0,
                   help="brain z-scores are clipped to [-z_clip, z_clip] and mapped linearly "
                        "to [0, 1] (mean brain 0.5); background 0")


def read_folds(path: Path) -> list[tuple[str, int]]:
    """``[(patient_id, fold)]`` in file order; a bad row, a fold other than 1-3 or a patient
    listed twice is an ``InputError`` naming the file and line."""
    fix = "give a CSV with the columns patient_id,fold (fold 1, 2 or 3)"
    if not path.is_file():
        raise InputError(f"{path}: --folds not found; {fix}")
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header[:2] != ["patient_id", "fold"]:
            raise InputError(f"{path}: header {header[:2]}, expected patient_id,fold; {fix}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                pid, fold = row[0].strip(), int(row[1])
            except (IndexError, ValueError):
                raise InputError(f"{path}:{line}: not a patient_id,fold row; {fix}") from None
            if not pid or fold not in (1, 2, 3) or pid in seen:
                raise InputError(f"{path}:{line}: {pid or '(empty id)'} fold {fold}: each patient "
                                 f"once, in fold 1, 2 or 3; {fix}")
            seen.add(pid)
            rows.append((pid, fold))
    return rows


def published_split(folds: list[tuple[str, int]]) -> dict[str, list[str]]:
    """The published split: folds 1 + 2 in file order, ``random.Random(4).shuffle``d, the
    first ``len // 8`` validation and the rest training; fold 3 test (file order)."""
    train_ids = [p for p, f in folds if f == 1] + [p for p, f in folds if f == 2]
    random.Random(4).shuffle(train_ids)
    n_val = len(train_ids) // 8
    return {"train": train_ids[n_val:], "val": train_ids[:n_val],
            "test": [p for p, f in folds if f == 3]}


def _modality(folder: Path, pid: str, kind: str) -> Path:
    for suffix in (".nii.gz", ".nii"):
        path = folder / f"{pid}_{kind}{suffix}"
        if path.is_file():
            return path
    raise InputError(f"{folder}: {pid}_{kind}.nii.gz missing from this patient's folder; {_FIX}")


def find_patients(data_dir: Path, wanted: set[str]) -> dict[str, Path]:
    """``{patient id: folder}`` for every folder under ``data_dir`` named as a wanted id."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, _ in os.walk(data_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if d in wanted:
                if d in found:
                    raise InputError(f"{Path(dirpath) / d}: patient {d} is also at {found[d]}; "
                                     "keep one copy")
                found[d] = Path(dirpath) / d
    return found


def plan(args: argparse.Namespace) -> Plan:
    """Read the folds, find every patient's FLAIR and segmentation, check their headers."""
    data_dir = Path(args.data_dir)
    folds_path = args.folds if args.folds is not None else FOLDS_CSV
    folds = read_folds(folds_path)
    published = published_split(folds)
    folders = find_patients(data_dir, {p for p, _ in folds})
    if not folders:
        raise InputError(f"{data_dir}: none of the {len(folds)} BraTS patients of "
                         f"{folds_path.name} found; unzip the BraTS 2018 training data (HGG/ and "
                         "LGG/) into it")
    order = [p for s in ("train", "val", "test") for p in published[s]]
    missing = missing_or_refuse([p for p in order if p not in folders], "BraTS patients",
                                data_dir, "unzip the whole BraTS 2018 training set into it",
                                args.allow_missing)
    items, splits, inputs = [], {}, {}
    for split in ("train", "val", "test"):
        splits[split] = [p for p in published[split] if p in folders]
        for pid in splits[split]:
            flair = _modality(folders[pid], pid, "flair")
            seg = _modality(folders[pid], pid, "seg")
            info = read_header(flair, _FIX)
            check_same_grid(info, read_header(seg, _FIX), flair, seg)
            items.append({"key": pid, "split": split, "image": str(flair), "mask": str(seg),
                          "z_clip": args.z_clip})
            inputs[pid] = {"image": relative_to(flair, data_dir), "mask": relative_to(seg, data_dir),
                           "grade": folders[pid].parent.name, "size": info["size"],
                           "bytes": flair.stat().st_size + seg.stat().st_size}
    return Plan("bms", str(data_dir.resolve()), plan_settings(args, SETTINGS), splits, items,
                {"folds": {"path": "target_tasks/bms_folds.csv" if args.folds is None
                           else str(folds_path.resolve()), **file_identity(folds_path)},
                 "patients": inputs}, missing,
                ["validation: the first len // 8 of folds 1 + 2 after random.Random(4).shuffle"])


def zscore_to_unit(flair: np.ndarray, clip: float, path: Path) -> tuple[np.ndarray, dict]:
    """Map a FLAIR volume to [0, 1]: z-scores over the brain (non-zero voxels) clipped to
    [-clip, clip] and scaled to z / (2 clip) + 0.5; background 0. Returns float32 of
    ``flair``'s shape and the brain's mean, std and voxel count."""
    brain = flair != 0
    values = flair[brain].astype(np.float64)
    if values.size < 2 or not np.isfinite(values).all() or values.std() == 0:
        raise InputError(f"{path}: no brain to normalise (fewer than two non-zero voxels, a "
                         f"constant brain or NaN/inf); {_FIX}")
    mean, std = float(values.mean()), float(values.std())
    out = np.zeros(flair.shape, np.float32)
    out[brain] = (np.clip((values - mean) / std, -clip, clip) / (2.0 * clip) + 0.5).astype(np.float32)
    return out, {"brain_mean": mean, "brain_std": std, "brain_voxels": int(values.size)}


def work(item: dict[str, Any]) -> dict[str, Any]:
    """Read one patient's FLAIR and segmentation, normalise, write the case."""
    flair_path = Path(item["image"])
    flair, seg, spacing, meta = read_labelled_volume(flair_path, Path(item["mask"]), LABELS,
                                                     _FIX, what="FLAIR")
    image, stats = zscore_to_unit(flair, item["z_clip"], flair_path)
    tumour = seg > 0
    files = write_case(Path(item["out"]), item["split"], item["key"], image, tumour)
    return {"key": item["key"], "split": item["split"], "files": files,
            "facts": {"size": list(image.shape), "spacing": [float(s) for s in spacing],
                      "orientation": meta.get("original_orientation", ""),
                      "foreground_voxels": int(tumour.sum()), **stats}}


def counts(plan: Plan, split: str, facts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Patients, cases, and cases with an empty tumour mask."""
    return {"patients": len(plan.splits[split]), "cases": len(facts),
            "empty_masks": int(sum(f.get("foreground_voxels", 0) == 0 for f in facts.values()))}


HOOKS = TaskHooks(work=work, unit="patient", counts=counts)
