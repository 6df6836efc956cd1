"""NCS, lung nodule segmentation: the processed LIDC-IDRI arrays distributed with the published
fine-tuning code, one case per cube.

Input, as downloaded: ``x_{train,valid,test}_64x64x32.npy`` (images) and
``m_{train,valid,test}_64x64x32.npy`` (masks) anywhere under ``--data_dir``. The published loader
squeezes each array and adds a channel axis, so a stack may be stored as (N, 64, 64, 32),
(N, 1, 64, 64, 32) or (N, 64, 64, 32, 1); the published files hold 4082 training, 3126
validation and 852 test cubes, images in [0, 1] and masks in {0, 1}, axes (x, y, z) with z
the 32 slices. ``valid`` becomes the ``val`` split.

Every array is checked before anything is written: its shape, an image stack and its mask
stack of one length, images finite and within [0, 1] (the shared tolerance, then clipped),
masks holding only 0 and 1. Cube ``i`` of split ``s`` becomes the case ``{s}_{i:05d}``:
``{s}/images/{s}_{i:05d}.npy`` (float32) and ``{s}/masks/{s}_{i:05d}.npy`` (uint8). The arrays
carry no patient identifiers: the split is the authors' (by patient, as published), and the
manifest's patient lists name the cases.

Building the cubes from the raw LIDC-IDRI DICOM scans and XML readings is not done here: how
the published cubes were centred, resampled and how the four readers' outlines were merged is
not documented, so a rebuild would not reproduce the published test set.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.intensity import check_real_array, finite_range, within_unit_range
from runtime.provenance import file_identity
from target_tasks.common import (Plan, TaskHooks, find_one, plan_settings, relative_to,
                                 write_case)

__all__ = ["SOURCE_SPLITS", "CUBE", "add_flags", "plan", "cube_layout", "work", "HOOKS"]

#: Our split -> the split name in the published file names.
SOURCE_SPLITS = {"train": "train", "val": "valid", "test": "test"}
CUBE = (64, 64, 32)
SETTINGS: tuple[str, ...] = ()
_PER_ITEM = 32       # cases written by one work item
_FIX = "download the processed NCS arrays again"


def add_flags(p: argparse.ArgumentParser) -> None:
    """NCS has no flags of its own: the arrays are used as published."""


def _find(data_dir: Path, name: str) -> Path:
    return find_one(data_dir, name, f"{name} not found; put the six processed NCS arrays (x_ "
                    "and m_ of train, valid and test, _64x64x32.npy) into it", "keep one")


def cube_layout(shape: tuple[int, ...], path: Path) -> tuple[int, int | None]:
    """(number of cubes, channel axis or None) of a stack of 64 x 64 x 32 cubes stored as
    (N, 64, 64, 32), (N, 1, 64, 64, 32) or (N, 64, 64, 32, 1); else an ``InputError``."""
    if len(shape) == 4 and tuple(shape[1:]) == CUBE:
        return shape[0], None
    if len(shape) == 5 and shape[1] == 1 and tuple(shape[2:]) == CUBE:
        return shape[0], 1
    if len(shape) == 5 and shape[4] == 1 and tuple(shape[1:4]) == CUBE:
        return shape[0], 4
    raise InputError(f"{path}: shape {tuple(shape)}, expected (N, 64, 64, 32) cubes (a channel "
                     f"axis of 1 after N or at the end is fine); {_FIX}")


def _open(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e}); {_FIX}") from None


def _check_values(x: np.ndarray, m: np.ndarray, xp: Path, mp: Path) -> None:
    """Images finite and in [0, 1]; masks only 0 and 1 (read slab by slab)."""
    check_real_array(x, xp, _FIX)
    check_real_array(m, mp, _FIX, allow_bool=True)
    lo, hi = finite_range(x, xp, _FIX, rows="cube")
    if len(x) and not within_unit_range(lo, hi):
        raise InputError(f"{xp}: image values in [{lo:.4g}, {hi:.4g}], expected [0, 1]; {_FIX}")
    step = 256
    for a in range(0, len(m), step):
        slab = np.asarray(m[a:a + step])
        bad = ~((slab == 0) | (slab == 1))
        if bad.any():
            first = a + int(np.argmax(bad.reshape(len(slab), -1).any(axis=1)))
            raise InputError(f"{mp}: mask values other than 0 and 1 (first in cube {first}: "
                             f"{np.unique(slab[bad])[:4].tolist()}); {_FIX}")


def plan(args: argparse.Namespace) -> Plan:
    """Find and check the six arrays; one work item per block of cubes."""
    data_dir = Path(args.data_dir)
    items, splits, inputs = [], {}, {}
    for split, src in SOURCE_SPLITS.items():
        xp = _find(data_dir, f"x_{src}_64x64x32.npy")
        mp = _find(data_dir, f"m_{src}_64x64x32.npy")
        x, m = _open(xp), _open(mp)
        (n, x_axis), (nm, m_axis) = cube_layout(x.shape, xp), cube_layout(m.shape, mp)
        if n != nm:
            raise InputError(f"{mp}: {nm} masks for the {n} images of {xp.name}; {_FIX}")
        _check_values(x, m, xp, mp)
        names = [f"{split}_{i:05d}" for i in range(n)]
        splits[split] = names
        for a in range(0, n, _PER_ITEM):
            items.append({"key": f"{split}:{a}", "split": split, "x": str(xp), "m": str(mp),
                          "x_axis": x_axis, "m_axis": m_axis, "start": a,
                          "names": names[a:a + _PER_ITEM]})
        for kind, p, arr in (("images", xp, x), ("masks", mp, m)):
            inputs[f"{split}_{kind}"] = {"path": relative_to(p, data_dir), "shape": list(arr.shape),
                                         "dtype": str(arr.dtype), **file_identity(p)}
        del x, m
    notes = ["the arrays carry no patient identifiers: each cube is one case, named "
             "{split}_{index}; the split is the published one"]
    return Plan("ncs", str(data_dir.resolve()), plan_settings(args, SETTINGS), splits, items,
                inputs, [], notes)


def _cube(arr: np.ndarray, i: int, axis: int | None) -> np.ndarray:
    c = np.asarray(arr[i])
    return c if axis is None else (c[0] if axis == 1 else c[..., 0])


def work(item: dict[str, Any]) -> dict[str, Any]:
    """Write one block of cases (images clipped to [0, 1], float32; masks uint8)."""
    x = np.load(item["x"], mmap_mode="r")
    m = np.load(item["m"], mmap_mode="r")
    out, split, files = Path(item["out"]), item["split"], {}
    fg = {}
    for k, name in enumerate(item["names"]):
        i = item["start"] + k
        image = np.clip(_cube(x, i, item["x_axis"]).astype(np.float32), 0.0, 1.0)
        mask = (_cube(m, i, item["m_axis"]) != 0).astype(np.uint8)
        files.update(write_case(out, split, name, image, mask))
        fg[name] = int(mask.sum())
    return {"key": item["key"], "split": split, "files": files,
            "facts": {"cases": len(item["names"]), "foreground_voxels": fg}}


def counts(plan: Plan, split: str, facts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Cases (one per cube) and cases with an empty mask."""
    fg = [v for f in facts.values() for v in f.get("foreground_voxels", {}).values()]
    return {"patients": len(plan.splits[split]), "cases": len(fg),
            "empty_masks": int(sum(v == 0 for v in fg))}


HOOKS = TaskHooks(work=work, unit="block", counts=counts)
