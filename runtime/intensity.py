"""CT intensities, one rule for every stage: the HU window and "already in [0, 1]".

* ``normalize_hu``: Hounsfield units clipped to [hu_min, hu_max] (default [-1000, 1000]) and
  scaled linearly to [0, 1]; preparation, the pattern generator's crops and lung-test threshold,
  stages 1-2 on HU volumes and fine-tuning on HU images all use it.
* ``within_unit_range`` / ``is_unit_range``: values within [0, 1] give or take
  ``UNIT_TOLERANCE`` are normalised intensities; a maximum above ``HU_DETECT_MAX`` means HU;
  anything else is neither (an error naming the file).
* ``finite_range``: (min, max) of a whole volume or stack of cubes, read slab by slab (memory
  stays small even for a memory-mapped file), refusing NaN or inf with the count and the first
  index; every stage checks what it reads with it.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from runtime.errors import InputError

__all__ = ["HU_MIN", "HU_MAX", "UNIT_TOLERANCE", "HU_DETECT_MAX", "normalize_hu",
           "within_unit_range", "is_unit_range", "finite_range", "check_real_array"]

#: The default HU window mapped to [0, 1] (air to dense bone).
HU_MIN, HU_MAX = -1000.0, 1000.0
#: Normalised values this far outside [0, 1] still count as [0, 1] (resampling and
#: interpolation round a little past the ends).
UNIT_TOLERANCE = 0.01
#: A volume whose maximum exceeds this is taken to be in Hounsfield units, not [0, 1].
HU_DETECT_MAX = 1.5
_SLAB_VALUES = 1 << 24   # values read at once by finite_range (64 MB of float32)


def normalize_hu(hu: np.ndarray | torch.Tensor | float, hu_min: float = HU_MIN,
                 hu_max: float = HU_MAX) -> np.ndarray | torch.Tensor | float:
    """Clip to [hu_min, hu_max] and scale linearly to [0, 1].

    An array (any shape) gives a new float32 array of its shape, a tensor a float32 tensor on
    its device, a number a float.
    """
    if not hu_max > hu_min:
        raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
    if isinstance(hu, torch.Tensor):
        return (hu.float().clamp(hu_min, hu_max) - hu_min) / (hu_max - hu_min)
    if isinstance(hu, (int, float)):
        return (min(max(float(hu), hu_min), hu_max) - hu_min) / (hu_max - hu_min)
    out = np.clip(np.asarray(hu, dtype=np.float32), hu_min, hu_max)   # a new array
    out -= np.float32(hu_min)
    out *= np.float32(1.0 / (hu_max - hu_min))
    return out


def within_unit_range(lo: float, hi: float) -> bool:
    """Values in [lo, hi] lie in [0, 1] give or take ``UNIT_TOLERANCE``."""
    return lo >= -UNIT_TOLERANCE and hi <= 1.0 + UNIT_TOLERANCE


def is_unit_range(lo: float, hi: float, path: str | os.PathLike = "volume") -> bool:
    """Tell a volume's intensities from its value range [lo, hi].

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


def finite_range(vol: np.ndarray, path: str | os.PathLike = "volume",
                 fix: str = "re-create it with scripts/prepare_dataset.py", rows: str = "x-slice",
                 row_index: Sequence[int] | np.ndarray | None = None) -> tuple[float, float]:
    """(min, max) of all values of ``vol`` (N, ...), the one finiteness and range check of
    every stage: read in slabs along axis 0, so a memory-mapped file is never loaded whole.

    NaN or inf anywhere is an ``InputError`` naming ``path``, how many of the N ``rows`` (what
    axis 0 holds: x-slices of a volume, cubes of a stack) hold any, the first of them
    (``row_index[k]`` for row k when the rows were taken from a larger file), and ``fix``.
    """
    lo, hi, bad, first = math.inf, -math.inf, 0, -1
    step = max(1, _SLAB_VALUES // max(1, vol[0].size)) if len(vol) else 1
    for x0 in range(0, vol.shape[0], step):
        slab = np.asarray(vol[x0:x0 + step], dtype=np.float32)
        finite = np.isfinite(slab).reshape(len(slab), -1).all(axis=1)
        if not finite.all():
            first = first if bad else x0 + int(np.argmin(finite))
            bad += int((~finite).sum())
        elif not bad:
            lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    if bad:
        where = int(row_index[first]) if row_index is not None else first
        raise InputError(f"{path}: NaN or inf in {bad} {rows}(s), the first at index {where}; "
                         f"{fix}")
    return lo, hi


def check_real_array(arr: np.ndarray, path: str | os.PathLike, fix: str,
                     allow_bool: bool = False) -> np.ndarray:
    """The dtype rule of every array a stage reads: real numbers (integers or floats; booleans
    where ``allow_bool``), never complex, strings or objects; an ``InputError`` naming ``path``
    and ``fix`` otherwise. Returns ``arr``."""
    if arr.dtype.kind not in ("iufb" if allow_bool else "iuf"):
        raise InputError(f"{path}: values of dtype {arr.dtype}, expected real numbers; {fix}")
    return arr
