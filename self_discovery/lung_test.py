"""The lung test of stage 3: is a window of a reference volume mostly lung/air?

A class coordinate is accepted only where the window below it (``crop_rows x crop_cols x
input_deps + 3`` voxels, normalised intensities in [0, 1]) holds few "dense" voxels, those at or
above -150 HU (soft tissue). The published code counts them with a per-voxel loop; here the same
weighted count is vectorised.
"""
from __future__ import annotations

import numpy as np

from runtime.intensity import HU_MAX, HU_MIN, normalize_hu

__all__ = ["LUNG_HU", "lung_test_weight_sum", "passes_lung_test", "lung_threshold_unit"]

#: The lung test counts voxels at or above this HU value (soft tissue); -150 HU = 0.425 in [0, 1].
LUNG_HU = -150.0


def lung_test_weight_sum(window: np.ndarray, deps: int = 32, threshold: float = 0.425) -> float:
    """Weighted count of "dense" voxels of a window (X, Y, Z >= deps + 2), normalised values.

    For every voxel (i, j, d) with d < ``deps``: the first k in {0, 1, 2} with
    ``window[i, j, d + k] >= threshold`` gives the weight 1 - k/2 (1, 0.5, 0); none gives 0.
    Since k = 2 weighs 0, the sum is ``#(v_d >= t) + 0.5 * #(v_d < t <= v_{d+1})``. Values in z
    beyond ``deps + 1`` are not used.
    """
    w = np.asarray(window)
    if w.ndim != 3 or w.shape[2] < deps + 2:
        raise ValueError(f"lung test window must be (X, Y, >= {deps + 2}), got {w.shape}")
    # Work on the flat, contiguous array (fast) and drop the z >= deps positions afterwards:
    # either[i, j, d] = dense[i, j, d] | dense[i, j, d + 1] for d < Z - 1 (d + 1 stays in the
    # row); the weight is 1 for dense, 0.5 for "not dense but next is" = 0.5 * (dense + either).
    dense = np.greater_equal(np.ascontiguousarray(w), threshold).reshape(-1)      # (X*Y*Z,)
    either = np.empty_like(dense)
    np.logical_or(dense[:-1], dense[1:], out=either[:-1])
    either[-1] = dense[-1]
    dense, either = dense.reshape(w.shape), either.reshape(w.shape)               # (X, Y, Z)
    n0 = np.count_nonzero(dense) - np.count_nonzero(dense[:, :, deps:])
    n01 = np.count_nonzero(either) - np.count_nonzero(either[:, :, deps:])
    return 0.5 * float(n0 + n01)


def passes_lung_test(window: np.ndarray, deps: int = 32, max_fraction: float = 0.15,
                     threshold: float = 0.425) -> bool:
    """True when the window (X, Y, >= deps + 2) is mostly lung/air: weight sum
    <= ``max_fraction * X * Y * deps``."""
    w = np.asarray(window)
    limit = max_fraction * w.shape[0] * w.shape[1] * deps
    return lung_test_weight_sum(w, deps, threshold) <= limit


def lung_threshold_unit(hu_min: float = HU_MIN, hu_max: float = HU_MAX) -> float:
    """-150 HU on the normalised scale of the window [hu_min, hu_max] (0.425 by default)."""
    return normalize_hu(LUNG_HU, hu_min, hu_max)
