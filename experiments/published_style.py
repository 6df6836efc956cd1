"""The published-style input pipeline: NumPy/SciPy perturbations per cube in DataLoader workers.

Used ONLY as the baseline of ``experiments/benchmark_pretrain.py``; training uses the batched torch
implementation in ``pytorch/perturbations.py``. Written from the published definitions in the way the
reference pipeline worked: one cube at a time on the host, float64 displacement fields,
``scipy.ndimage.gaussian_filter`` + ``map_coordinates`` for the elastic deformation, a Bezier
curve sampled at 100000 points + ``np.interp`` for the intensity mapping, Python loops over
shuffle blocks. Randomness is seeded per (seed, epoch, index) (the reference's was not).

Shapes: a cube is (X, Y, Z) float in [0, 1]; the dataset yields
(input (1, X, Y, Z) float32, target (1, X, Y, Z) float32, label int64).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

__all__ = ["elastic_numpy", "shuffle_numpy", "intensity_numpy", "in_paint_numpy",
           "out_paint_numpy", "perturb_cube_numpy", "PublishedStyleDataset"]

ALPHA, SIGMA = 991.0, 8.0
BEZIER_POINTS = 100000


def elastic_numpy(cube: np.ndarray, rng: np.random.Generator, alpha: float = ALPHA,
                  sigma: float = SIGMA) -> np.ndarray:
    """In-plane elastic deformation of one cube (X, Y, Z) -> (X, Y, Z) float64."""
    shape = cube.shape
    dx = gaussian_filter(rng.random(shape) * 2 - 1, sigma, mode="constant", cval=0) * alpha
    dy = gaussian_filter(rng.random(shape) * 2 - 1, sigma, mode="constant", cval=0) * alpha
    gx, gy, gz = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    coords = np.stack([gx + dx, gy + dy, gz]).reshape(3, -1)
    return map_coordinates(cube, coords, order=1, mode="reflect").reshape(shape)


def shuffle_numpy(cube: np.ndarray, rng: np.random.Generator, n_blocks: int = 5) -> np.ndarray:
    """Permute the voxels of ``n_blocks`` blocks of side [1, dim // 10] at random places."""
    out = cube.copy()
    for _ in range(n_blocks):
        size = [int(rng.integers(1, max(1, d // 10) + 1)) for d in cube.shape]
        start = [int(rng.integers(0, d - s + 1)) for d, s in zip(cube.shape, size)]
        sl = tuple(slice(a, a + s) for a, s in zip(start, size))
        block = out[sl].ravel().copy()
        rng.shuffle(block)
        out[sl] = block.reshape(size)
    return out


def intensity_numpy(cube: np.ndarray, rng: np.random.Generator,
                    n_points: int = BEZIER_POINTS) -> np.ndarray:
    """Bezier intensity mapping through (0,0), (a,b), (c,d), (1,1); decreasing with prob 1/2."""
    a, b, c, d = rng.random(4)
    t = np.linspace(0.0, 1.0, n_points)
    w = np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3])
    xs = np.array([0.0, a, c, 1.0]) @ w
    ys = np.array([0.0, b, d, 1.0]) @ w
    xs, ys = np.sort(xs), np.sort(ys)
    if rng.random() < 0.5:
        ys = ys[::-1]
    return np.interp(cube, xs, ys)


def _box(shape: tuple[int, ...], ranges: list[tuple[int, int]], rng: np.random.Generator,
         margin: int = 3) -> tuple[slice, ...]:
    size = [int(rng.integers(lo, hi + 1)) for lo, hi in ranges]
    start = [int(rng.integers(margin, max(margin, d - s - margin) + 1))
             for d, s in zip(shape, size)]
    return tuple(slice(a, a + s) for a, s in zip(start, size))


def in_paint_numpy(cube: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One box of side [dim // 6, dim // 3], >= 3 voxels from the border, becomes noise."""
    out = cube.copy()
    sl = _box(cube.shape, [(d // 6, d // 3) for d in cube.shape], rng)
    out[sl] = rng.random(out[sl].shape)
    return out


def out_paint_numpy(cube: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise everywhere but one box of side dim - [3*dim//7, 4*dim//7], >= 3 from the border."""
    out = rng.random(cube.shape)
    sl = _box(cube.shape, [(d - 4 * d // 7, d - 3 * d // 7) for d in cube.shape], rng)
    out[sl] = cube[sl]
    return out


def perturb_cube_numpy(cube: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Elastic, then one of shuffle / intensity / in-paint / out-paint (1/4 each)."""
    x = elastic_numpy(np.asarray(cube, dtype=np.float64), rng)
    op = (shuffle_numpy, intensity_numpy, in_paint_numpy, out_paint_numpy)[int(rng.integers(4))]
    return op(x, rng)


class PublishedStyleDataset(torch.utils.data.Dataset):
    """Cubes (M, X, Y, Z) + labels (M,) -> perturbed samples, one cube per ``__getitem__``."""

    def __init__(self, cubes: np.ndarray, labels: np.ndarray, seed: int = 0) -> None:
        self.cubes, self.labels, self.seed, self.epoch = cubes, labels, int(seed), 0

    def __len__(self) -> int:
        return len(self.cubes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        target = np.asarray(self.cubes[i], dtype=np.float32)
        inp = perturb_cube_numpy(target, rng).astype(np.float32)
        return (torch.from_numpy(inp[None]), torch.from_numpy(target[None].copy()),
                int(self.labels[i]))
