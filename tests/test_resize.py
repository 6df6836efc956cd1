"""Whole-volume (stages 1-2) and multi-resolution crop (stage 3) resizing against scikit-image.

The published code resizes with ``skimage.transform.resize(..., preserve_range=True)``:
Gaussian anti-aliasing when shrinking, linear interpolation, reflection at the border. Ours
(``self_discovery.volumes.resize_volume``) must give the same numbers; plain trilinear
interpolation (no anti-aliasing, clamped border) must not pass the same bounds.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from self_discovery import volumes
from self_discovery.volumes import load_resized, resize_matrix, resize_volume

skimage_transform = pytest.importorskip("skimage.transform")

MEAN_BOUND, MAX_BOUND = 1e-6, 1e-5   # float32 rounding only


def _published(vol: np.ndarray, size) -> np.ndarray:
    return skimage_transform.resize(vol, size, order=1, preserve_range=True)


def _trilinear(vol: np.ndarray, size) -> np.ndarray:
    return F.interpolate(torch.from_numpy(vol)[None, None], size=tuple(size), mode="trilinear",
                         align_corners=False)[0, 0].numpy()


def _phantom(shape, seed=0) -> np.ndarray:
    """Sharp-edged blocks and fine noise in [0, 1]: what aliasing shows on."""
    rng = np.random.default_rng(seed)
    vol = np.kron(rng.random(tuple(s // 4 for s in shape)), np.ones((4, 4, 4)))
    vol = 0.8 * vol + 0.2 * rng.random(vol.shape)
    return vol.astype(np.float32)


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.mean()), float(d.max())


def test_whole_volume_resize_matches_skimage_and_trilinear_does_not():
    vol = _phantom((96, 96, 40))          # 3x, 3x, 2.5x smaller: like 384x384x160 -> 128x128x64
    size = (32, 32, 16)
    ref = _published(vol, size)
    got = resize_volume(vol, size)
    assert got.dtype == np.float32 and got.shape == size
    mean, mx = _diff(got, ref)
    assert mean < MEAN_BOUND and mx < MAX_BOUND, (mean, mx)
    mean, mx = _diff(_trilinear(vol, size), ref)
    assert mean > 100 * MEAN_BOUND and mx > 100 * MAX_BOUND, (mean, mx)


@pytest.mark.parametrize("shape,size", [((5, 7, 3), (16, 3, 2)), ((3, 40, 2), (1, 5, 9)),
                                        ((37, 29, 11), (8, 8, 8)), ((1, 6, 4), (2, 2, 4))])
def test_odd_factors_upsizing_and_tiny_axes_match_skimage(shape, size):
    vol = np.random.default_rng(1).random(shape).astype(np.float32)
    mean, mx = _diff(resize_volume(vol, size), _published(vol, size))
    assert mean < MEAN_BOUND and mx < MAX_BOUND, (mean, mx)


@pytest.mark.parametrize("side", [50, 57, 64, 71, 79])
def test_multi_resolution_crops_match_skimage(side):
    crop = _phantom((side + 4 - side % 4, side + 4 - side % 4, 32), seed=side)[:side, :side]
    ref = _published(crop, (64, 64, 32))
    got = resize_volume(crop, (64, 64, 32))
    assert got.dtype == np.float32 and got.shape == (64, 64, 32)
    mean, mx = _diff(got, ref)
    assert mean < MEAN_BOUND and mx < MAX_BOUND, (side, mean, mx)
    if side < 64:   # enlarged: skimage reflects at the border where trilinear clamps
        mean, mx = _diff(_trilinear(crop, (64, 64, 32)), ref)
        assert mx > 100 * MAX_BOUND, (side, mean, mx)


def test_matrix_rows_sum_to_one_and_every_path_gives_the_same_numbers():
    for n_in, n_out in [(384, 128), (50, 64), (7, 3), (1, 4)]:
        np.testing.assert_allclose(resize_matrix(n_in, n_out).sum(1), 1.0, atol=1e-12)
    vol = _phantom((48, 40, 24))
    t = resize_volume(torch.from_numpy(vol), (16, 20, 30))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    host = resize_volume(vol, (16, 20, 30))
    np.testing.assert_array_equal(t.numpy(), host)
    # the matrix-product form a GPU tensor takes, run here on the CPU
    np.testing.assert_allclose(volumes._resize_matmul(torch.from_numpy(vol), (16, 20, 30)).numpy(),
                               host, atol=2e-6)


def test_load_resized_is_the_published_resize_of_the_file(tmp_path):
    vol = _phantom((64, 64, 32))
    np.save(tmp_path / "v.npy", vol)
    got = load_resized(tmp_path / "v.npy", (32, 32, 16))
    assert tuple(got.shape) == (1, 32, 32, 16)
    mean, mx = _diff(got[0].numpy(), _published(vol, (32, 32, 16)))
    assert mean < MEAN_BOUND and mx < MAX_BOUND
