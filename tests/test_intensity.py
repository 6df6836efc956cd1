"""The one intensity rule: the HU window, "already in [0, 1]" and the full-volume range."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import intensity
from runtime.errors import InputError
from runtime.intensity import (UNIT_TOLERANCE, finite_range, is_unit_range, normalize_hu,
                               within_unit_range)
from self_discovery.lung_test import lung_threshold_unit
from self_discovery.volumes import normalize_crop, to_unit_range


def test_the_window_clips_and_scales_arrays_tensors_and_numbers_alike():
    hu = np.array([-3000.0, -1000.0, -150.0, 0.0, 1000.0, 3071.0])
    want = [0.0, 0.0, 0.425, 0.5, 1.0, 1.0]
    out = normalize_hu(hu)
    assert out.dtype == np.float32 and out.tolist() == pytest.approx(want)
    t = normalize_hu(torch.tensor(hu, dtype=torch.float64))
    assert t.dtype == torch.float32 and t.tolist() == pytest.approx(want)
    assert normalize_hu(-150.0) == pytest.approx(0.425) == lung_threshold_unit()
    assert normalize_hu(np.array([-500.0, 0.0]), -500.0, 500.0).tolist() == [0.0, 0.5]
    assert lung_threshold_unit(-1150.0, 850.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        normalize_hu(hu, 100.0, 100.0)
    assert normalize_crop(hu, False).tolist() == pytest.approx(want)
    assert normalize_crop(np.float64([0.3]), True).dtype == np.float32   # normalised: as is


def test_one_tolerance_decides_unit_range_everywhere():
    assert within_unit_range(-UNIT_TOLERANCE, 1 + UNIT_TOLERANCE)
    assert not within_unit_range(-2 * UNIT_TOLERANCE, 1.0)
    assert is_unit_range(0.0, 1.0) and not is_unit_range(-1024.0, 3071.0)
    with pytest.raises(InputError, match="neither"):
        is_unit_range(0.0, 1.3, "v.npy")
    vol = torch.full((2, 2, 2), 400.0)
    with pytest.warns(UserWarning, match="Hounsfield"):
        assert to_unit_range(vol).tolist() == normalize_hu(vol).tolist()


def test_the_range_of_a_volume_is_read_whole_in_slabs(monkeypatch):
    monkeypatch.setattr(intensity, "_SLAB_VALUES", 8)   # slabs of one x-plane (4 x 2 values)
    vol = np.zeros((5, 4, 2), np.float32)
    vol[4, 3, 1] = 2.5                                  # only in the last slab
    vol[0, 0, 0] = -1.0
    assert finite_range(vol) == (-1.0, 2.5)
    vol[3, 0, 0] = np.nan
    vol[1, 2, 0] = np.inf
    with pytest.raises(InputError, match=r"v\.npy: NaN or inf in 2 x-slice\(s\), the first at index 1; "):
        finite_range(vol, "v.npy")
    with pytest.raises(InputError, match=r"NaN or inf in 2 cube\(s\), the first at index 11; drop"):
        finite_range(vol, "c.npy", "drop them", rows="cube", row_index=[10, 11, 12, 13, 14])
