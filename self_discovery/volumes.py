"""Prepared volumes on disk: one float32 ``.npy`` per patient, axes (x, y, z), values in [0, 1].

Shared by the autoencoder, the feature extractor and the pattern generator. Volumes are opened
memory-mapped so that a crop reads only its region.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pytorch.common import InputError

__all__ = ["SPLITS", "list_volumes", "open_volume"]

SPLITS = ("train", "validation")


def list_volumes(folder: str | os.PathLike, flag: str = "--data_dir") -> list[Path]:
    """The ``.npy`` volumes of ``folder`` in sorted file-name order (the order features use)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found; set {flag} to a folder holding train/ and "
                         "validation/ with one .npy volume per patient "
                         "(scripts/prepare_dataset.py makes them)")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".npy" and p.is_file())
    if not files:
        raise InputError(f"{folder}: no .npy volumes; run scripts/prepare_dataset.py or set {flag}")
    return files


def open_volume(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Open a volume (X, Y, Z) memory-mapped (read-only) and check it is a 3D numeric array."""
    path = Path(path)
    try:
        vol = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy volume ({e}); re-create it with "
                         "scripts/prepare_dataset.py") from e
    if vol.ndim != 3 or not np.issubdtype(vol.dtype, np.number):
        raise InputError(f"{path}: expected a 3D numeric volume (x, y, z), got shape {vol.shape} "
                         f"dtype {vol.dtype}")
    return vol
