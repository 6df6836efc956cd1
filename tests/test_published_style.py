"""The NumPy reference perturbations (experiments/published_style.py, one cube at a time, as the
published pipeline ran) against the batched torch ones (pytorch/perturbations.py), operation by
operation: the same statistics over many samples, within a few standard errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pytorch import perturbations as P
from experiments import published_style as S

N = 300  # samples per operation and implementation


def _numpy(op, cube: np.ndarray, n: int = N, seed: int = 0) -> np.ndarray:
    """(n, X, Y, Z): ``op`` applied to ``cube`` with n independent draws."""
    rng = np.random.default_rng(seed)
    return np.stack([op(cube.astype(np.float64), rng) for _ in range(n)])


def _torch(op, cube: np.ndarray, n: int = N, seed: int = 0) -> np.ndarray:
    batch = torch.from_numpy(cube.astype(np.float32))[None, None].repeat(n, 1, 1, 1, 1)
    return op(batch, torch.Generator().manual_seed(seed))[:, 0].double().numpy()


def _close(a: np.ndarray, b: np.ndarray, sigmas: float = 4.0, floor: float = 0.0) -> None:
    """Per-sample statistics ``a`` and ``b`` have the same mean within ``sigmas`` standard
    errors of the difference (plus ``floor``)."""
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert abs(a.mean() - b.mean()) <= sigmas * se + floor, (a.mean(), b.mean(), se)


def test_elastic_deformation_same_statistics():
    """On a ramp, out - in follows the displacement (away from the reflecting border): its mean
    square and largest value tell a 20 % different alpha apart."""
    shape = (32, 32, 16)
    x, y, _ = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    cube = (x / (shape[0] - 1) + y / (shape[1] - 1)) / 2
    a = _numpy(S.elastic_numpy, cube) - cube
    b = _torch(P.elastic_deform, cube) - cube
    inner = (slice(None), slice(8, -8), slice(8, -8))
    for stat in (lambda d: (d[inner] ** 2).mean(axis=(1, 2, 3)),
                 lambda d: np.abs(d).max(axis=(1, 2, 3)), lambda d: d.mean(axis=(1, 2, 3))):
        _close(stat(a), stat(b))
    assert 0.03 < np.abs(a).max() < 0.5  # the deformation does move the cube


def test_local_pixel_shuffle_same_statistics():
    cube = np.random.default_rng(1).random((64, 64, 16))
    a, b = _numpy(S.shuffle_numpy, cube, n=200), _torch(P.local_pixel_shuffle, cube, n=200)
    for out in (a, b):  # each block is a permutation: the values are kept
        np.testing.assert_allclose(np.sort(out[:5].reshape(5, -1)),
                                   np.sort(np.broadcast_to(cube, (5, *cube.shape)).reshape(5, -1)),
                                   atol=1e-6)
    changed = [(np.abs(out - cube) > 1e-6).mean(axis=(1, 2, 3)) for out in (a, b)]
    _close(*changed)
    assert 0 < changed[0].mean() < 0.01  # a few small blocks


def test_nonlinear_intensity_same_statistics():
    cube = np.linspace(0.0, 1.0, 8 * 8 * 8).reshape(8, 8, 8)
    a, b = _numpy(S.intensity_numpy, cube), _torch(P.nonlinear_intensity, cube)
    for stat in (lambda o: o.mean(axis=(1, 2, 3)),
                 lambda o: np.abs(o - cube).mean(axis=(1, 2, 3)),
                 lambda o: (np.diff(o.reshape(len(o), -1), axis=1) < 0).any(1).astype(float)):
        _close(stat(a), stat(b))
    for out in (a, b):  # monotone curves through the corners: 0 and 1 map to 0 or 1
        o = out.reshape(len(out), -1)
        increasing = o[:, -1] > o[:, 0]
        assert 0.35 < increasing.mean() < 0.65
        np.testing.assert_allclose(o[increasing][:, [0, -1]], [[0, 1]] * increasing.sum(),
                                   atol=1e-3)
        assert o.min() >= -1e-6 and o.max() <= 1 + 1e-6


@pytest.mark.parametrize("numpy_op, torch_op", [(S.in_paint_numpy, P.in_painting),
                                                (S.out_paint_numpy, P.out_painting)],
                         ids=["in_painting", "out_painting"])
def test_painting_same_statistics(numpy_op, torch_op):
    cube = np.zeros((32, 32, 16))  # painted voxels are noise > 0, kept voxels stay 0
    a, b = _numpy(numpy_op, cube), _torch(torch_op, cube)
    painted = [out > 0 for out in (a, b)]
    _close(*(p.mean(axis=(1, 2, 3)) for p in painted))
    _close(*(np.array([o[p].mean() for o, p in zip(out, pm)]) for out, pm in zip((a, b), painted)))
    for out, p in zip((a, b), painted):
        noise = out[p]
        assert abs(noise.mean() - 0.5) < 0.01 and abs(noise.std() - 12 ** -0.5) < 0.01
        if numpy_op is S.in_paint_numpy:  # the box keeps 3 voxels from every border
            assert not p[:, :3].any() and not p[:, -3:].any() and not p[..., :3].any()
        else:  # the kept box does
            assert p[:, :3].all() and p[:, -3:].all() and p[..., -3:].all()
