"""LCS, liver segmentation: the LiTS 2017 training volumes.

Input, as downloaded: ``volume-N.nii`` and ``segmentation-N.nii`` (``.nii.gz`` too) anywhere
under ``--data_dir`` (the download comes as ``Training Batch 1/`` and ``Training Batch 2/``).
Labels 0 background, 1 liver, 2 tumour; the liver mask is label > 0. Volumes 0-99 are the
training split, 100-114 validation, 115-129 test (the published protocol; volume 130 is not
used).

Every pair's headers are checked first (the segmentation on its volume's grid). Each volume is
read with SimpleITK, turned to the identity direction (LPS) with its segmentation, clipped to
[--hu_min, --hu_max] HU and scaled to [0, 1]; with ``--inplane_size N`` (default 256, the
size of the authors' processed LiTS volumes) the two in-plane axes are resampled to N voxels,
linearly for the image and by a linear resampling of the mask thresholded at 0.5 for the mask,
keeping every slice. Case ``volume-N``: ``{split}/images/volume-N.npy`` (float32 (x, y, z))
and ``{split}/masks/volume-N.npy`` (uint8).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import add_hu_flags, check_hu_window, nonneg_int
from runtime.errors import InputError
from runtime.intensity import normalize_hu
from target_tasks.common import (Plan, TaskHooks, check_same_grid, missing_or_refuse,
                                 plan_settings, read_header, read_labelled_volume, relative_to,
                                 write_case)

__all__ = ["SPLIT_IDS", "LABELS", "add_flags", "find_pairs", "plan", "work", "HOOKS"]

#: The published split of the LiTS training volumes.
SPLIT_IDS = {"train": range(0, 100), "val": range(100, 115), "test": range(115, 130)}
#: Label values of a LiTS segmentation (background, liver, tumour).
LABELS = (0, 1, 2)
SETTINGS = ("hu_min", "hu_max", "inplane_size")
_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_SEGMENTATION = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")
_FIX = "download this LiTS training batch again"


def add_flags(p: argparse.ArgumentParser) -> None:
    """The LCS flags."""
    g = p.add_argument_group("LCS")
    g.add_argument("--inplane_size", type=nonneg_int, default=256,
                   help="resample the two in-plane axes to this many voxels (the authors' "
                        "processed volumes are 256 x 256 x slices); 0 keeps the original "
                        "512 x 512 (four times the disk)")
    add_hu_flags(g)


def find_pairs(data_dir: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    """``({N: volume path}, {N: segmentation path})`` found recursively."""
    found: tuple[dict[int, Path], dict[int, Path]] = ({}, {})
    for path in sorted(data_dir.rglob("*.nii*")):
        for table, pattern in zip(found, (_VOLUME, _SEGMENTATION)):
            m = pattern.match(path.name)
            if m and path.is_file():
                n = int(m.group(1))
                if n in table:
                    raise InputError(f"{path}: a second copy of {table[n].name} ({table[n]}); "
                                     "keep one")
                table[n] = path
    return found


def plan(args: argparse.Namespace) -> Plan:
    """Pair the volumes with their segmentations, check their headers, split by number."""
    check_hu_window(args)
    data_dir = Path(args.data_dir)
    vols, segs = find_pairs(data_dir)
    if not vols and not segs:
        raise InputError(f"{data_dir}: no volume-N.nii / segmentation-N.nii found; unzip the "
                         "two LiTS training batches into it")
    for n in sorted(set(vols) - set(segs)):
        raise InputError(f"{vols[n]}: no segmentation-{n}.nii beside it; {_FIX}")
    for n in sorted(set(segs) - set(vols)):
        raise InputError(f"{segs[n]}: no volume-{n}.nii beside it; {_FIX}")
    protocol = [n for ids in SPLIT_IDS.values() for n in ids]
    missing = missing_or_refuse([f"volume-{n}" for n in protocol if n not in vols],
                                "LiTS volumes", data_dir, "unzip both LiTS training batches "
                                "into it", args.allow_missing)
    items, splits, inputs = [], {}, {}
    for split, ids in SPLIT_IDS.items():
        splits[split] = [f"volume-{n}" for n in ids if n in vols]
        for n in (n for n in ids if n in vols):
            image_info = read_header(vols[n], _FIX)
            check_same_grid(image_info, read_header(segs[n], _FIX), vols[n], segs[n])
            name = f"volume-{n}"
            items.append({"key": name, "split": split, "image": str(vols[n]),
                          "mask": str(segs[n]), "hu": [args.hu_min, args.hu_max],
                          "inplane": args.inplane_size})
            inputs[name] = {"image": relative_to(vols[n], data_dir),
                            "mask": relative_to(segs[n], data_dir), "size": image_info["size"],
                            "bytes": vols[n].stat().st_size + segs[n].stat().st_size}
    unused = sorted(set(vols) - set(protocol))
    notes = [f"not in the protocol, not used: {', '.join(f'volume-{n}' for n in unused)}"] \
        if unused else []
    return Plan("lcs", str(data_dir.resolve()), plan_settings(args, SETTINGS), splits, items,
                {"volumes": inputs}, missing, notes)


def resize_inplane(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float],
                   size: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Resample the x and y axes of ``image`` (float32 (x, y, z)) and ``mask`` (bool) to
    ``size`` voxels (linear; the mask's resampled fraction thresholded at 0.5), keeping the
    physical extent and every slice; returns both and the new spacing."""
    from preparation.ct_io import resample

    new = [spacing[0] * image.shape[0] / size, spacing[1] * image.shape[1] / size, spacing[2]]
    img = resample(image, spacing, new, pad_value=0.0)
    msk = resample(mask.astype(np.float32), spacing, new, pad_value=0.0) >= 0.5
    if img.shape[:2] != (size, size):
        raise RuntimeError(f"in-plane resampling gave {img.shape}, expected {size} x {size}")
    return img, msk, new


def work(item: dict[str, Any]) -> dict[str, Any]:
    """Read, normalise (and resize) one volume and its liver mask; write the case."""
    hu, seg, spacing, meta = read_labelled_volume(Path(item["image"]), Path(item["mask"]),
                                                  LABELS, _FIX)
    liver = seg > 0
    del seg
    image = normalize_hu(hu, *item["hu"])
    del hu
    out_spacing = list(spacing)
    if item["inplane"]:
        image, liver, out_spacing = resize_inplane(image, liver, spacing, item["inplane"])
    files = write_case(Path(item["out"]), item["split"], item["key"], image, liver)
    return {"key": item["key"], "split": item["split"], "files": files,
            "facts": {"original_size": list(meta["original_size_xyz"]),
                      "original_spacing": list(meta["original_spacing"]),
                      "orientation": meta.get("original_orientation", ""),
                      "size": list(image.shape), "spacing": [float(s) for s in out_spacing],
                      "foreground_voxels": int(liver.sum())}}


def counts(plan: Plan, split: str, facts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Patients (volumes), cases, and cases with an empty liver mask."""
    return {"patients": len(plan.splits[split]), "cases": len(facts),
            "empty_masks": int(sum(f.get("foreground_voxels", 0) == 0 for f in facts.values()))}


HOOKS = TaskHooks(work=work, unit="volume", counts=counts)
