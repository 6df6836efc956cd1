"""The input perturbations of Semantic Genesis (stage 4) as batched torch operations.

Every function takes a batch of cubes ``(N, 1, X, Y, Z)`` with values in [0, 1] on any device,
plus a ``torch.Generator`` **on the same device**, and returns a new tensor of the same shape,
dtype and device; the input is never modified. All randomness comes from the generator (no
global RNG), so the same seed gives the same batch on the same device. Nothing in the hot path
synchronises with the host: per-sample random values stay on the device and are applied by
broadcasting (box masks from coordinate comparisons, block shuffles by ``argsort`` of random
keys + ``gather``/``scatter``, Bezier mappings by a batched ``searchsorted`` on a per-sample
curve table). The same code runs on CPU and GPU.

Per cube (``perturb_batch``), following the published method:

1. elastic deformation (always when augmentation is on): two displacement fields ``dx, dy`` of
   the cube's shape (X, Y, Z), each uniform noise in [-1, 1] smoothed by a 3D Gaussian
   (sigma 8, zero outside the cube, scipy's ``gaussian_filter(mode="constant")`` kernel with
   ``truncate=4``) times alpha = 991; the cube is resampled in-plane at ``(x + dx, y + dy, z)``
   with linear interpolation and half-sample-symmetric reflection at the border (scipy's
   ``map_coordinates(order=1, mode="reflect")``; here ``grid_sample(bilinear, reflection,
   align_corners=False)`` which is the same boundary rule). Displacement std ~3.3 voxels,
   99th percentile of |d| ~8.6 voxels for 64 x 64 x 32 (measured; the fields vary along z too:
   a 2D (X, Y) field smoothed with sigma 8 would have a std of ~18 voxels, not the published 3.3).
2. exactly one of four, each with probability 1/4:

   - local pixel shuffling: 5 blocks of size [1..X//10] x [1..Y//10] x [1..Z//10] at a random
     place (corner uniform in [0, X - size]); the voxels inside each block are permuted.
   - non-linear intensity: the cubic Bezier curve through (0,0), (a,b), (c,d), (1,1),
     a..d uniform in [0, 1), sampled at ``bezier_points`` values of t; the intensity v maps to
     ``np.interp(v, sort(x(t)), sort(y(t)))`` (increasing) or, with probability 1/2, to
     ``np.interp(v, sort(x(t)), sort(y(t))[::-1])`` (decreasing, the reference's "flip"),
     i.e. x(s) -> y(s) or x(s) -> y(1 - s).
   - in-painting: one box of size [X//6..X//3] x [Y//6..Y//3] x [Z//6..Z//3], at least 3 voxels
     from the border, filled with uniform noise in [0, 1) (~1.4 % of the voxels).
   - out-painting: uniform noise in [0, 1) everywhere except one box of size
     ``X - randint(3X//7, 4X//7)`` (and likewise for Y, Z), at least 3 voxels from the border,
     which keeps the cube (~13 %, 8..20 % of the voxels for 64 x 64 x 32).

Deviations from the reference code, all on purpose:

- Local pixel shuffling permutes the *current* contents of each block in turn. The reference
  copied every block from the unshuffled cube, so where two blocks overlapped some voxel values
  were duplicated and others lost; here each block is a permutation, so the multiset of voxel
  values is always preserved.
- Randomness is explicit and seeded (the reference drew from unseeded NumPy).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_SIGMA", "DEFAULT_TRUNCATE", "DEFAULT_SHUFFLE_BLOCKS",
    "DEFAULT_SHUFFLE_DIVISOR", "DEFAULT_BEZIER_POINTS", "DEFAULT_INVERT_PROB",
    "DEFAULT_INPAINT_DIVISORS", "DEFAULT_OUTPAINT_FRACTIONS", "DEFAULT_MARGIN", "OPERATIONS",
    "PerturbationConfig", "perturb_batch", "perturb_batch_with_choices", "choose_operations",
    "elastic_displacement", "gaussian_smooth3d", "warp_inplane", "elastic_deform",
    "local_pixel_shuffle",
    "bezier_tables", "bezier_map", "nonlinear_intensity", "in_painting", "out_painting",
    "gaussian_kernel1d", "shuffle_block_range", "inpaint_size_range", "outpaint_size_range",
]

#: Elastic deformation: displacement = alpha * gaussian(uniform(-1, 1), sigma).
DEFAULT_ALPHA: float = 991.0
DEFAULT_SIGMA: float = 8.0
#: Gaussian kernel radius = int(truncate * sigma + 0.5), as scipy.ndimage.gaussian_filter.
DEFAULT_TRUNCATE: float = 4.0
#: Local pixel shuffling: number of blocks; block side in [1, dim // divisor].
DEFAULT_SHUFFLE_BLOCKS: int = 5
DEFAULT_SHUFFLE_DIVISOR: int = 10
#: Non-linear intensity: samples of the Bezier parameter t; probability of the decreasing map.
DEFAULT_BEZIER_POINTS: int = 1000
DEFAULT_INVERT_PROB: float = 0.5
#: In-painting box side in [dim // 6, dim // 3] (the pair is (6, 3)).
DEFAULT_INPAINT_DIVISORS: tuple[int, int] = (6, 3)
#: Out-painting kept box side = dim - randint(3 * dim // 7, 4 * dim // 7): ((3, 7), (4, 7)).
DEFAULT_OUTPAINT_FRACTIONS: tuple[tuple[int, int], tuple[int, int]] = ((3, 7), (4, 7))
#: In/out-painting boxes stay at least this many voxels away from the border.
DEFAULT_MARGIN: int = 3
#: Names of the four exclusive perturbations, in the order of ``PerturbationConfig.weights``.
OPERATIONS: tuple[str, ...] = ("local_pixel_shuffle", "nonlinear_intensity", "in_painting",
                               "out_painting")


@dataclass(frozen=True)
class PerturbationConfig:
    """Parameters of ``perturb_batch``; defaults are the published values.

    Sizes are relative to the cube (divisors / fractions of each side) where the published code
    defines them that way, so the same config serves 64 x 64 x 32 and tiny test cubes.
    """

    enabled: bool = True                  # False -> input = target (no augmentation)
    elastic_prob: float = 1.0             # elastic always when augmentation is on (published)
    alpha: float = DEFAULT_ALPHA          # displacement scale
    sigma: float = DEFAULT_SIGMA          # Gaussian smoothing of the displacement noise
    truncate: float = DEFAULT_TRUNCATE    # kernel radius in sigmas (scipy's default)
    # relative weights of (shuffle, intensity, in-paint, out-paint); exactly one per cube
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    shuffle_blocks: int = DEFAULT_SHUFFLE_BLOCKS
    shuffle_divisor: int = DEFAULT_SHUFFLE_DIVISOR
    bezier_points: int = DEFAULT_BEZIER_POINTS
    invert_prob: float = DEFAULT_INVERT_PROB
    inpaint_divisors: tuple[int, int] = DEFAULT_INPAINT_DIVISORS
    outpaint_fractions: tuple[tuple[int, int], tuple[int, int]] = DEFAULT_OUTPAINT_FRACTIONS
    margin: int = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if not 0.0 <= self.elastic_prob <= 1.0:
            raise ValueError(f"elastic_prob must be in [0, 1], got {self.elastic_prob}")
        if len(self.weights) != 4 or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"weights must be 4 non-negative numbers with a positive sum, "
                             f"got {self.weights}")
        if self.shuffle_blocks < 0 or self.shuffle_divisor < 1 or self.bezier_points < 2:
            raise ValueError("shuffle_blocks >= 0, shuffle_divisor >= 1, bezier_points >= 2")


# ----------------------------------------------------------------------------- helpers
def _check(cubes: torch.Tensor, generator: torch.Generator) -> None:
    if cubes.dim() != 5 or cubes.shape[1] != 1:
        raise ValueError(f"expected cubes (N, 1, X, Y, Z), got {tuple(cubes.shape)}")
    if not cubes.is_floating_point():
        raise ValueError(f"expected floating-point cubes, got {cubes.dtype}")
    gdev, cdev = torch.device(generator.device), cubes.device
    if gdev.type != cdev.type or (gdev.type == "cuda" and (gdev.index or 0) != (cdev.index or 0)):
        raise ValueError(f"generator is on {gdev} but cubes are on {cdev}: create it with "
                         f"torch.Generator(device=cubes.device)")


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 from ``generator``."""
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def _randint(lo: int, hi: torch.Tensor | int, shape: tuple[int, ...],
             generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """int64 uniform in [lo, hi] inclusive (like ``random.randint``), per element.

    ``hi`` is a Python int or an int64 tensor broadcasting against ``shape`` (per-sample
    bounds); where hi < lo the result is lo. Only Python scalars meet device tensors here, so
    nothing is copied from the host (no implicit synchronisation).
    """
    u = _rand(shape, generator, device).double()          # < 1, so floor(u * count) < count
    if isinstance(hi, torch.Tensor):
        count = (hi - lo + 1).clamp_min(1)
        return torch.minimum((u * count).long(), count - 1) + lo
    count = max(int(hi) - int(lo) + 1, 1)
    return (u * count).long().clamp_max(count - 1) + int(lo)


def _mask_or_all(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device).to(torch.bool)
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape ({n},), got {tuple(mask.shape)}")
    return mask


def _where_samples(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-sample select: (N,) mask, (N, ...) tensors."""
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


def _box_mask(starts: torch.Tensor, sizes: torch.Tensor,
              shape: tuple[int, int, int]) -> torch.Tensor:
    """Boolean (N, 1, X, Y, Z): inside the per-sample box [start, start + size) on each axis.

    ``starts``, ``sizes``: (N, 3) int64 (x, y, z).
    """
    dev = starts.device
    inside = None
    for axis, length in enumerate(shape):
        coord = torch.arange(length, device=dev).view(1, length)          # (1, L)
        lo, hi = starts[:, axis:axis + 1], starts[:, axis:axis + 1] + sizes[:, axis:axis + 1]
        ok = (coord >= lo) & (coord < hi)                                   # (N, L)
        view = [ok.shape[0], 1, 1, 1, 1]
        view[2 + axis] = length
        ok = ok.view(view)
        inside = ok if inside is None else inside & ok
    assert inside is not None
    return inside


# ----------------------------------------------------------------------------- elastic
def gaussian_kernel1d(sigma: float, truncate: float = DEFAULT_TRUNCATE) -> np.ndarray:
    """The normalised 1D Gaussian of ``scipy.ndimage.gaussian_filter`` (radius
    ``int(truncate * sigma + 0.5)``), float64 (2r + 1,)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return w / w.sum()


@functools.lru_cache(maxsize=32)
def _smoothing_matrix_np(length: int, sigma: float, truncate: float) -> np.ndarray:
    """(L, L) matrix M with (M @ v) = Gaussian filter of v with zeros outside [0, L)."""
    w = gaussian_kernel1d(sigma, truncate)
    r = (len(w) - 1) // 2
    i = np.arange(length)
    diff = i[None, :] - i[:, None]                   # column - row
    m = np.where(np.abs(diff) <= r, w[np.clip(diff + r, 0, 2 * r)], 0.0)
    return m.astype(np.float32)


_MATRIX_CACHE: dict[tuple[int, float, float, str], torch.Tensor] = {}


def _smoothing_matrix(length: int, sigma: float, truncate: float,
                      device: torch.device) -> torch.Tensor:
    key = (length, float(sigma), float(truncate), str(device))
    m = _MATRIX_CACHE.get(key)
    if m is None:
        m = torch.from_numpy(_smoothing_matrix_np(length, float(sigma), float(truncate))).to(device)
        if len(_MATRIX_CACHE) > 64:
            _MATRIX_CACHE.clear()
        _MATRIX_CACHE[key] = m
    return m


def elastic_displacement(n: int, shape: tuple[int, int, int], generator: torch.Generator,
                         alpha: float = DEFAULT_ALPHA, sigma: float = DEFAULT_SIGMA,
                         truncate: float = DEFAULT_TRUNCATE,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Random in-plane displacement fields, (N, 2, X, Y, Z) float32 (dx, dy) in voxels.

    Each field is uniform noise in [-1, 1] smoothed by a separable 3D Gaussian with zero
    padding (exactly scipy's ``gaussian_filter(mode="constant", cval=0)``; the separable filter
    is applied as one small (L, L) matrix product per axis), times ``alpha``.
    """
    device = torch.device(device) if device is not None else torch.device(generator.device)
    noise = _rand((n, 2, *shape), generator, device) * 2.0 - 1.0           # (N, 2, X, Y, Z)
    with torch.autocast(device_type=device.type, enabled=False):           # keep fp32 GEMMs
        return gaussian_smooth3d(noise, sigma, truncate) * alpha


def gaussian_smooth3d(volumes: torch.Tensor, sigma: float = DEFAULT_SIGMA,
                      truncate: float = DEFAULT_TRUNCATE) -> torch.Tensor:
    """Separable Gaussian filter over the last three axes with zeros outside the volume.

    (..., X, Y, Z) -> (..., X, Y, Z); equals ``scipy.ndimage.gaussian_filter(v, sigma,
    mode="constant", cval=0, truncate=truncate)`` on each volume. Each 1D pass is a product with
    an (L, L) banded matrix (a zero-padded conv1d, written as one GEMM for speed on any device).
    """
    X, Y, Z = volumes.shape[-3:]
    dev = volumes.device
    mx = _smoothing_matrix(X, sigma, truncate, dev).to(volumes.dtype)
    my = _smoothing_matrix(Y, sigma, truncate, dev).to(volumes.dtype)
    mz = _smoothing_matrix(Z, sigma, truncate, dev).to(volumes.dtype)
    d = torch.einsum("ai,...ijk->...ajk", mx, volumes)                      # along x
    d = torch.einsum("bj,...ajk->...abk", my, d)                            # along y
    return torch.matmul(d, mz.t())                                          # along z


def warp_inplane(cubes: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Resample every z-slice at (x + dx, y + dy): bilinear, half-sample-symmetric reflection.

    cubes (N, C, X, Y, Z), displacement (N, 2, X, Y, Z) in voxels -> (N, C, X, Y, Z).
    Equals ``scipy.ndimage.map_coordinates(cube, [x + dx, y + dy, z], order=1, mode="reflect")``.
    """
    N, C, X, Y, Z = cubes.shape
    dev = cubes.device
    # one 2D problem per (sample, z): (N*Z, C, X, Y)
    img = cubes.float().permute(0, 4, 1, 2, 3).reshape(N * Z, C, X, Y)
    disp = displacement.float().permute(0, 4, 2, 3, 1).reshape(N * Z, X, Y, 2)  # (N*Z, X, Y, 2)
    xs = torch.arange(X, device=dev, dtype=torch.float32).view(1, X, 1)
    ys = torch.arange(Y, device=dev, dtype=torch.float32).view(1, 1, Y)
    px = xs + disp[..., 0]                                                   # (N*Z, X, Y)
    py = ys + disp[..., 1]
    # align_corners=False: voxel i sits at normalised (2i + 1) / L - 1, and "reflection" mirrors
    # about the outer voxel edges (-0.5, L - 0.5): scipy's "reflect".
    grid = torch.stack(((2.0 * py + 1.0) / Y - 1.0, (2.0 * px + 1.0) / X - 1.0), dim=-1)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.reshape(N, Z, C, X, Y).permute(0, 2, 3, 4, 1).to(cubes.dtype)


def elastic_deform(cubes: torch.Tensor, generator: torch.Generator,
                   mask: torch.Tensor | None = None,
                   alpha: float = DEFAULT_ALPHA, sigma: float = DEFAULT_SIGMA,
                   truncate: float = DEFAULT_TRUNCATE) -> torch.Tensor:
    """Elastic in-plane deformation of the samples where ``mask`` (N,) is true (all if None).

    (N, 1, X, Y, Z) -> (N, 1, X, Y, Z). Randomness is drawn for every sample regardless of
    ``mask`` (a fixed amount per call, so results never depend on a host sync).
    """
    _check(cubes, generator)
    N, _, X, Y, Z = cubes.shape
    mask = _mask_or_all(mask, N, cubes.device)
    disp = elastic_displacement(N, (X, Y, Z), generator, alpha, sigma, truncate, cubes.device)
    return _where_samples(mask, warp_inplane(cubes, disp), cubes)


# ----------------------------------------------------------------------------- shuffling
def shuffle_block_range(dim: int, divisor: int = DEFAULT_SHUFFLE_DIVISOR) -> tuple[int, int]:
    """Inclusive block side range [1, max(1, dim // divisor)]."""
    return 1, max(1, dim // divisor)


def local_pixel_shuffle(cubes: torch.Tensor, generator: torch.Generator,
                        mask: torch.Tensor | None = None, n_blocks: int = DEFAULT_SHUFFLE_BLOCKS,
                        divisor: int = DEFAULT_SHUFFLE_DIVISOR) -> torch.Tensor:
    """Permute the voxels inside ``n_blocks`` random small blocks per selected sample.

    Block sides uniform in [1, dim // divisor] (inclusive), corner uniform in [0, dim - side].
    Each block permutes the current contents of its voxels (blocks applied in turn), so the
    multiset of values is preserved. (N, 1, X, Y, Z) -> (N, 1, X, Y, Z).

    Vectorised over the batch: every block is embedded in a fixed (bx, by, bz) local grid of
    the largest block size; invalid local positions get +inf keys so ``argsort`` puts the valid
    ones first, a random-key ``argsort`` gives the permutation, and writes for invalid positions
    go to a dummy voxel that is dropped at the end.
    """
    _check(cubes, generator)
    N, _, X, Y, Z = cubes.shape
    dev = cubes.device
    V = X * Y * Z
    mask = _mask_or_all(mask, N, dev)
    bmax = [shuffle_block_range(d, divisor)[1] for d in (X, Y, Z)]
    li, lj, lk = torch.meshgrid(*(torch.arange(b, device=dev) for b in bmax), indexing="ij")
    li, lj, lk = li.reshape(1, -1), lj.reshape(1, -1), lk.reshape(1, -1)  # (1, L)
    L = li.shape[1]
    canon = torch.arange(L, device=dev, dtype=torch.float32).view(1, L)
    # flat values plus one dummy slot at index V that absorbs writes of invalid positions
    cur = torch.cat((cubes.reshape(N, V), cubes.new_zeros(N, 1)), dim=1)  # (N, V + 1)
    for _ in range(n_blocks):
        size = torch.stack([_randint(1, b, (N,), generator, dev) for b in bmax], 1)   # (N, 3)
        start = torch.stack([_randint(0, d - size[:, a], (N,), generator, dev)
                             for a, d in enumerate((X, Y, Z))], 1)                   # (N, 3)
        keys = _rand((N, L), generator, dev)
        valid = ((li < size[:, 0:1]) & (lj < size[:, 1:2]) & (lk < size[:, 2:3])
                 & mask.view(N, 1))                                                  # (N, L)
        flat = ((start[:, 0:1] + li) * Y + (start[:, 1:2] + lj)) * Z + (start[:, 2:3] + lk)
        flat = flat.masked_fill(~valid, V)                                          # (N, L)
        inf = float("inf")
        dest_order = torch.argsort(canon.expand(N, L).masked_fill(~valid, inf), dim=1)  # valid 1st
        src_order = torch.argsort(keys.masked_fill(~valid, inf), dim=1)           # random valid
        dest = flat.gather(1, dest_order)
        src = flat.gather(1, src_order)                                             # dummies align
        cur = cur.scatter(1, dest, cur.gather(1, src))
    return cur[:, :V].reshape(cubes.shape)


# ----------------------------------------------------------------------------- intensity
def bezier_tables(control: torch.Tensor, inverted: torch.Tensor,
                  n_points: int = DEFAULT_BEZIER_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample interpolation tables of the Bezier intensity mapping.

    control: (N, 4) = (a, b, c, d), the curve through (0,0), (a,b), (c,d), (1,1);
    inverted: (N,) bool. Returns (xs, ys), each (N, n_points) float32, xs ascending; the
    mapping is ``np.interp(v, xs[n], ys[n])``: ys ascending (increasing map) or descending
    (inverted: the reference paired sorted x with y in the opposite parameter order).
    """
    dev = control.device
    t = torch.linspace(0.0, 1.0, n_points, device=dev, dtype=torch.float64).view(1, -1)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3     # Bernstein (P0 = 0)
    c = control.double()
    xs = b1 * c[:, 0:1] + b2 * c[:, 2:3] + b3                             # (N, T)
    ys = b1 * c[:, 1:2] + b2 * c[:, 3:4] + b3
    xs = torch.sort(xs, dim=1).values
    ys = torch.sort(ys, dim=1).values
    ys = torch.where(inverted.view(-1, 1), ys.flip(1), ys)
    return xs.float(), ys.float()


def bezier_map(values: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Batched ``np.interp``: values (N, ...) through per-sample tables xs, ys (N, T).

    Values outside [xs[:, 0], xs[:, -1]] take the end values, as ``np.interp``.
    """
    N, T = xs.shape
    v = values.reshape(N, -1).float().contiguous()                        # (N, V)
    idx = torch.searchsorted(xs.contiguous(), v, right=True).clamp(1, T - 1)
    x0, x1 = xs.gather(1, idx - 1), xs.gather(1, idx)
    y0, y1 = ys.gather(1, idx - 1), ys.gather(1, idx)
    dx = x1 - x0
    w = torch.where(dx > 0, (v - x0) / torch.where(dx > 0, dx, torch.ones_like(dx)),
                    torch.zeros_like(dx)).clamp(0.0, 1.0)
    out = y0 + w * (y1 - y0)
    out = torch.where(v <= xs[:, :1], ys[:, :1], out)
    out = torch.where(v >= xs[:, -1:], ys[:, -1:], out)
    return out.reshape(values.shape).to(values.dtype)


def nonlinear_intensity(cubes: torch.Tensor, generator: torch.Generator,
                        mask: torch.Tensor | None = None, n_points: int = DEFAULT_BEZIER_POINTS,
                        invert_prob: float = DEFAULT_INVERT_PROB,
                        return_params: bool = False
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map intensities through a random monotone Bezier curve per selected sample.

    Control points (a, b), (c, d) uniform in [0, 1)^2; decreasing with probability
    ``invert_prob``. (N, 1, X, Y, Z) -> (N, 1, X, Y, Z); with ``return_params`` also the
    (N, 4) control values and the (N,) bool ``inverted``.
    """
    _check(cubes, generator)
    N = cubes.shape[0]
    dev = cubes.device
    mask = _mask_or_all(mask, N, dev)
    control = _rand((N, 4), generator, dev)
    inverted = _rand((N,), generator, dev) < invert_prob
    xs, ys = bezier_tables(control, inverted, n_points)
    out = _where_samples(mask, bezier_map(cubes, xs, ys), cubes)
    if return_params:
        return out, control, inverted
    return out


# ----------------------------------------------------------------------------- painting
def inpaint_size_range(dim: int, divisors: tuple[int, int] = DEFAULT_INPAINT_DIVISORS
                       ) -> tuple[int, int]:
    """Inclusive in-painting box side range [dim // 6, dim // 3] (at least 1)."""
    lo = max(1, dim // divisors[0])
    return lo, max(lo, dim // divisors[1])


def outpaint_size_range(dim: int, fractions: tuple[tuple[int, int], tuple[int, int]]
                        = DEFAULT_OUTPAINT_FRACTIONS) -> tuple[int, int]:
    """Inclusive kept-box side range: dim - 4*dim//7 .. dim - 3*dim//7 (at least 1)."""
    (n0, d0), (n1, d1) = fractions
    lo = max(1, dim - n1 * dim // d1)
    return lo, max(lo, dim - n0 * dim // d0)


def _random_boxes(n: int, shape: tuple[int, int, int], ranges: list[tuple[int, int]], margin: int,
                  generator: torch.Generator, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample boxes: sizes (N, 3) uniform in ``ranges`` (inclusive), starts (N, 3) uniform
    in [margin, dim - size - margin] (clamped into the cube for tiny cubes)."""
    size = torch.stack([_randint(lo, hi, (n,), generator, device) for lo, hi in ranges], 1)
    start = torch.stack([_randint(margin, d - size[:, a] - margin, (n,), generator, device)
                         for a, d in enumerate(shape)], 1)
    # tiny cubes (margin does not fit): keep the box inside the cube
    start = torch.stack([torch.minimum(start[:, a], (d - size[:, a]).clamp_min(0))
                         for a, d in enumerate(shape)], 1)
    return start, size


def in_painting(cubes: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None,
                divisors: tuple[int, int] = DEFAULT_INPAINT_DIVISORS, margin: int = DEFAULT_MARGIN,
                return_boxes: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill one random box per selected sample with uniform noise in [0, 1).

    Box side in [dim // 6, dim // 3], >= ``margin`` voxels from the border.
    (N, 1, X, Y, Z) -> (N, 1, X, Y, Z); with ``return_boxes`` also starts, sizes (N, 3).
    """
    _check(cubes, generator)
    N, _, X, Y, Z = cubes.shape
    dev = cubes.device
    mask = _mask_or_all(mask, N, dev)
    ranges = [inpaint_size_range(d, divisors) for d in (X, Y, Z)]
    start, size = _random_boxes(N, (X, Y, Z), ranges, margin, generator, dev)
    noise = _rand(tuple(cubes.shape), generator, dev).to(cubes.dtype)
    box = _box_mask(start, size, (X, Y, Z)) & mask.view(N, 1, 1, 1, 1)
    out = torch.where(box, noise, cubes)
    return (out, start, size) if return_boxes else out


def out_painting(cubes: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None,
                 fractions: tuple[tuple[int, int], tuple[int, int]] = DEFAULT_OUTPAINT_FRACTIONS,
                 margin: int = DEFAULT_MARGIN, return_boxes: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace everything but one random box per selected sample by uniform noise in [0, 1).

    Kept side = dim - randint(3*dim//7, 4*dim//7), >= ``margin`` voxels from the border.
    (N, 1, X, Y, Z) -> (N, 1, X, Y, Z); with ``return_boxes`` also starts, sizes (N, 3).
    """
    _check(cubes, generator)
    N, _, X, Y, Z = cubes.shape
    dev = cubes.device
    mask = _mask_or_all(mask, N, dev)
    ranges = [outpaint_size_range(d, fractions) for d in (X, Y, Z)]
    start, size = _random_boxes(N, (X, Y, Z), ranges, margin, generator, dev)
    noise = _rand(tuple(cubes.shape), generator, dev).to(cubes.dtype)
    outside = ~_box_mask(start, size, (X, Y, Z)) & mask.view(N, 1, 1, 1, 1)
    out = torch.where(outside, noise, cubes)
    return (out, start, size) if return_boxes else out


# ----------------------------------------------------------------------------- pipeline
def choose_operations(n: int, generator: torch.Generator,
                      weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
                      device: torch.device | str | None = None) -> torch.Tensor:
    """(N,) int64 in {0, 1, 2, 3}: the index into ``OPERATIONS`` for each cube."""
    device = torch.device(device) if device is not None else torch.device(generator.device)
    w = np.asarray(weights, dtype=np.float64)
    cum = np.cumsum(w / w.sum())[:-1]
    u = _rand((n,), generator, device).double()
    choice = torch.zeros(n, dtype=torch.int64, device=device)
    for bound in cum.tolist():           # Python floats: no host->device copy
        choice += (u >= bound).long()
    return choice


def perturb_batch_with_choices(cubes: torch.Tensor, generator: torch.Generator,
                               config: PerturbationConfig = PerturbationConfig()
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``perturb_batch`` that also returns the (N,) chosen operation per cube (index into
    ``OPERATIONS``; -1 for all when ``config.enabled`` is False)."""
    _check(cubes, generator)
    N = cubes.shape[0]
    dev = cubes.device
    if not config.enabled:
        return cubes.clone(), torch.full((N,), -1, dtype=torch.int64, device=dev)
    with torch.autocast(device_type=dev.type, enabled=False):  # full precision even in amp code
        return _perturb(cubes, generator, config)


def _perturb(cubes: torch.Tensor, generator: torch.Generator,
             config: PerturbationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    N = cubes.shape[0]
    dev = cubes.device
    x = cubes.float()
    elastic = _rand((N,), generator, dev) < config.elastic_prob
    choice = choose_operations(N, generator, config.weights, dev)
    if config.elastic_prob > 0:  # a Python float: skipping costs no synchronisation
        x = elastic_deform(x, generator, elastic, config.alpha, config.sigma, config.truncate)
    x = local_pixel_shuffle(x, generator, choice == 0, config.shuffle_blocks,
                            config.shuffle_divisor)
    x = nonlinear_intensity(x, generator, choice == 1, config.bezier_points, config.invert_prob)
    x = in_painting(x, generator, choice == 2, config.inpaint_divisors, config.margin)
    x = out_painting(x, generator, choice == 3, config.outpaint_fractions, config.margin)
    return x.to(cubes.dtype), choice


def perturb_batch(cubes: torch.Tensor, generator: torch.Generator,
                  config: PerturbationConfig = PerturbationConfig()) -> torch.Tensor:
    """Semantic Genesis inputs for a batch of target cubes.

    cubes (N, 1, X, Y, Z) float in [0, 1] on any device; ``generator`` on the same device.
    Returns the perturbed inputs (N, 1, X, Y, Z), same dtype/device; ``cubes`` is not modified.
    Per cube: elastic deformation (probability ``config.elastic_prob``, 1 by default), then
    exactly one of local pixel shuffling / non-linear intensity / in-painting / out-painting
    (probability 1/4 each by default). ``config.enabled=False`` returns a copy of ``cubes``.
    """
    return perturb_batch_with_choices(cubes, generator, config)[0]
