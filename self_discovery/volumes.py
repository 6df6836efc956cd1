"""Prepared volumes on disk: one float32 ``.npy`` per patient, axes (x, y, z), values in [0, 1].

Shared by the autoencoder, the feature extractor and the pattern generator. Volumes are opened
memory-mapped so that a crop reads only its region.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pytorch.common import InputError

__all__ = ["SPLITS", "list_volumes", "open_volume", "UNIT_TOLERANCE", "HU_DETECT_MAX",
           "within_unit_range", "is_unit_range", "to_unit_range", "load_resized",
           "ResizedVolumeDataset"]

#: Normalised volumes hold [0, 1]; values this far outside still count (interpolation rounding).
UNIT_TOLERANCE = 0.01
#: A volume whose maximum exceeds this is taken to be in Hounsfield units, not [0, 1].
HU_DETECT_MAX = 1.5

SPLITS = ("train", "validation")


def list_volumes(folder: str | os.PathLike, flag: str = "--data_dir") -> list[Path]:
    """The ``.npy`` volumes of ``folder`` in sorted file-name order (the order features use)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found; set {flag} to a folder holding train/ and "
                         "validation/ with one .npy volume per patient "
                         "(scripts/prepare_dataset.py makes them)")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".npy" and p.is_file()
                   and not p.name.startswith("."))  # ".name.*.tmp.npy": a killed atomic write
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


def within_unit_range(lo: float, hi: float) -> bool:
    """Values in [lo, hi] lie in [0, 1] give or take ``UNIT_TOLERANCE``."""
    return lo >= -UNIT_TOLERANCE and hi <= 1.0 + UNIT_TOLERANCE


def is_unit_range(lo: float, hi: float, path: str | os.PathLike = "volume") -> bool:
    """The one rule every stage uses to tell a volume's intensities from its value range.

    True: normalised, within [0, 1] give or take ``UNIT_TOLERANCE``. False: Hounsfield units
    (maximum above ``HU_DETECT_MAX``). Anything else (e.g. values up to 1.3, or down to -0.5)
    is neither, and an ``InputError`` naming ``path``: guessing would give the autoencoder and
    the pattern generator different views of the same file.
    """
    if within_unit_range(lo, hi):
        return True
    if hi > HU_DETECT_MAX:
        return False
    raise InputError(f"{path}: values in [{lo:.4g}, {hi:.4g}] are neither normalised [0, 1] "
                     f"intensities nor Hounsfield units; re-create the volume with "
                     "scripts/prepare_dataset.py")


def to_unit_range(vol: np.ndarray | torch.Tensor, path: str | os.PathLike = "volume"
                  ) -> np.ndarray | torch.Tensor:
    """Return ``vol`` unchanged when it is normalised (``is_unit_range``); otherwise treat it as
    HU: clip to [-1000, 1000], scale to [0, 1] and warn naming ``path``."""
    hi = float(vol.max())
    if is_unit_range(float(vol.min()), hi, path):
        return vol
    warnings.warn(f"{path}: values up to {hi:.0f} look like Hounsfield units; "
                  "clipping to [-1000, 1000] and scaling to [0, 1] (prepare volumes with "
                  "scripts/prepare_dataset.py to avoid this)", stacklevel=2)
    return (vol.clip(-1000.0, 1000.0) + 1000.0) / 2000.0


def load_resized(path: str | os.PathLike, size: Sequence[int]) -> torch.Tensor:
    """Read a volume (X, Y, Z) and resize it trilinearly to ``size`` = (rows, cols, depth).

    Returns a float32 tensor (1, rows, cols, depth) with values in [0, 1]
    (``F.interpolate(mode="trilinear", align_corners=False)``, as stage 1 and 2 of the method).
    Raises InputError naming the file when it holds NaN or inf values.
    """
    path = Path(path)
    vol = torch.from_numpy(np.ascontiguousarray(open_volume(path, mmap=False), dtype=np.float32))
    if vol.numel() == 0 or min(vol.shape) < 1:
        raise InputError(f"{path}: empty volume {tuple(vol.shape)}; re-create it with "
                         "scripts/prepare_dataset.py")
    if not bool(torch.isfinite(vol).all()):
        raise InputError(f"{path}: volume contains NaN or inf values; re-create it with "
                         "scripts/prepare_dataset.py or remove it from the folder")
    vol = to_unit_range(vol, path)
    size = tuple(int(s) for s in size)
    if tuple(vol.shape) != size:
        vol = F.interpolate(vol[None, None], size=size, mode="trilinear",
                            align_corners=False)[0, 0]             # (rows, cols, depth)
    return vol.unsqueeze(0).contiguous()                           # (1, rows, cols, depth)


class ResizedVolumeDataset(Dataset):
    """Whole volumes resized to one size: item ``i`` is ``(volume (1, X, Y, Z), i)``.

    Args:
        files: volume paths (e.g. ``list_volumes(data_dir / "train")``), order kept.
        size: (rows, cols, depth) after trilinear resizing.

    ``preload()`` reads and resizes every volume once and keeps them in memory (for many epochs
    over a dataset that fits in RAM: 4 MiB per volume at 128 x 128 x 64); afterwards items come
    from memory and a DataLoader needs no workers.
    """

    def __init__(self, files: Sequence[str | os.PathLike], size: Sequence[int]) -> None:
        self.files = [Path(f) for f in files]
        self.size = tuple(int(s) for s in size)
        self._memory: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def preloaded(self) -> bool:
        return self._memory is not None

    def preload(self, progress: bool = False, desc: str = "loading volumes") -> None:
        """Read and resize every volume now (tqdm bar when ``progress``)."""
        from tqdm import tqdm
        self._memory = [load_resized(f, self.size)
                        for f in tqdm(self.files, desc=desc, disable=not progress or None)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._memory is not None:
            return self._memory[i], i
        return load_resized(self.files[i], self.size), i          # (1, X, Y, Z)
