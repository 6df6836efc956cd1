"""Statistics of the batched perturbations against their definitions (stage 4, pretraining)."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from pytorch import perturbations as P
from pytorch.perturbations import PerturbationConfig, perturb_batch, perturb_batch_with_choices

SHAPE = (64, 64, 32)
V = 64 * 64 * 32


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cubes(n: int, seed: int = 123, shape=SHAPE) -> torch.Tensor:
    """Distinct smooth-ish values in [0, 1] so every change is visible."""
    return torch.rand((n, 1, *shape), generator=gen(seed))


# ----------------------------------------------------------------------------- elastic
def test_smoothing_equals_scipy_gaussian_filter():
    noise = torch.rand((1, 2, *SHAPE), generator=gen(1)) * 2 - 1
    ours = P.gaussian_smooth3d(noise[0, 0].double(), 8.0).numpy()
    ref = gaussian_filter(noise[0, 0].double().numpy(), 8, mode="constant", cval=0.0)
    assert np.abs(ours - ref).max() < 1e-6


def test_elastic_displacement_statistics():
    d = P.elastic_displacement(24, SHAPE, gen(2))
    assert d.shape == (24, 2, *SHAPE)
    std = d.std().item()
    p99 = torch.quantile(d.abs().flatten()[::7], 0.99).item()
    assert 2.8 < std < 3.8, std
    assert 7.0 < p99 < 10.0, p99


def test_warp_matches_scipy_map_coordinates_reflect():
    x = cubes(2, shape=(16, 12, 4))
    d = P.elastic_displacement(2, (16, 12, 4), gen(3), alpha=4000.0, sigma=3.0)  # large: reflects
    assert d.abs().max() > 16
    out = P.warp_inplane(x, d)
    ii, jj, kk = np.meshgrid(np.arange(16), np.arange(12), np.arange(4), indexing="ij")
    for n in range(2):
        ref = map_coordinates(x[n, 0].double().numpy(), [ii + d[n, 0].double().numpy(),
                              jj + d[n, 1].double().numpy(), kk], order=1, mode="reflect")
        assert np.abs(ref - out[n, 0].numpy()).max() < 1e-4


def test_elastic_mask_and_range():
    x = cubes(4, shape=(32, 32, 16))
    mask = torch.tensor([True, False, True, False])
    y = P.elastic_deform(x, gen(4), mask=mask)
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])
    assert not torch.equal(y[0], x[0])
    assert y.min() >= 0 and y.max() <= 1


# ----------------------------------------------------------------------------- shuffling
def test_shuffle_preserves_values_and_changes_only_small_blocks():
    x = cubes(40)
    y = P.local_pixel_shuffle(x, gen(5))
    assert torch.equal(torch.sort(y.flatten(1), 1).values, torch.sort(x.flatten(1), 1).values)
    changed = (y != x)[:, 0]
    for n in range(40):
        idx = changed[n].nonzero()
        if len(idx) == 0:
            continue
        # every changed voxel lies in one of <= 5 blocks of <= 6 x 6 x 3: at most 5*108 voxels
        assert len(idx) <= 5 * 6 * 6 * 3
    frac = changed.float().mean().item()
    # expected voxels per block: E[sx]E[sy]E[sz] = 3.5 * 3.5 * 2 = 24.5; a few stay in place
    assert 0.5 * 5 * 24.5 / V < frac < 1.1 * 5 * 24.5 / V, frac


def test_shuffle_block_size_range():
    # one block per cube: the changed voxels' bounding box fits [1..6] x [1..6] x [1..3]
    x = cubes(60)
    y = P.local_pixel_shuffle(x, gen(6), n_blocks=1)
    extents = []
    for n in range(60):
        idx = (y[n, 0] != x[n, 0]).nonzero()
        if len(idx) >= 2:
            ext = (idx.max(0).values - idx.min(0).values + 1).tolist()
            extents.append(ext)
    ext = np.array(extents)
    assert (ext[:, :2] <= 6).all() and (ext[:, 2] <= 3).all()
    assert ext[:, 0].max() == 6 and ext[:, 2].max() == 3


def test_local_shuffle_leaves_unmasked_cubes_unchanged():
    x = cubes(3)
    y = P.local_pixel_shuffle(x, gen(7), mask=torch.tensor([False, True, False]))
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2]) and not torch.equal(y[1], x[1])


# ----------------------------------------------------------------------------- intensity
def test_intensity_monotone_and_inverted_share():
    x = cubes(400, shape=(8, 8, 8))
    y, control, inverted = P.nonlinear_intensity(x, gen(8), return_params=True)
    xs, order = torch.sort(x.flatten(1), 1)
    ys = y.flatten(1).gather(1, order)
    dy = ys[:, 1:] - ys[:, :-1]
    inc = (dy >= -1e-6).all(1)
    dec = (dy <= 1e-6).all(1)
    assert torch.equal(inc | dec, torch.ones(400, dtype=torch.bool))   # monotone per sample
    # decreasing exactly where inverted (every sample spans a wide range of values)
    assert torch.equal(dec & ~inc, inverted)
    share = inverted.float().mean().item()
    assert 0.4 < share < 0.6, share
    assert control.min() >= 0 and control.max() < 1
    assert y.min() >= 0 and y.max() <= 1


def _reference_bezier(v, a, b, c, d, flip, n=100000):
    """The Bezier intensity curve with the reference's conventions, straight NumPy."""
    t = np.linspace(0.0, 1.0, n)
    pts = np.array([[0, 0], [a, b], [c, d], [1, 1]], dtype=np.float64)
    coef = np.array([1, 3, 3, 1])
    bern = np.stack([coef[i] * t ** (3 - i) * (1 - t) ** i for i in range(4)])  # reversed t
    xv, yv = pts[:, 0] @ bern, pts[:, 1] @ bern
    if flip:
        xv = np.sort(xv)
    else:
        xv, yv = np.sort(xv), np.sort(yv)
    return np.interp(v, xv, yv)


def test_intensity_matches_reference_definition():
    v = torch.linspace(0, 1, 257)
    control = torch.tensor([[0.1, 0.9, 0.7, 0.2], [0.8, 0.3, 0.2, 0.6], [0.5, 0.5, 0.99, 0.01]])
    for inv in (False, True):
        xs, ys = P.bezier_tables(control, torch.tensor([inv] * 3), 1000)
        ours = P.bezier_map(v.expand(3, -1), xs, ys).numpy()
        for n in range(3):
            ref = _reference_bezier(v.numpy(), *control[n].tolist(), flip=inv)
            assert np.abs(ours[n] - ref).max() < 2e-3


# ----------------------------------------------------------------------------- painting
def test_in_painting_boxes_and_fraction():
    x = cubes(200)
    y, start, size = P.in_painting(x, gen(9), return_boxes=True)
    assert (size[:, :2] >= 10).all() and (size[:, :2] <= 21).all()
    assert (size[:, 2] >= 5).all() and (size[:, 2] <= 10).all()
    assert size[:, 0].min() == 10 and size[:, 0].max() == 21
    end = start + size
    assert (start >= 3).all() and (end <= torch.tensor(SHAPE) - 3).all()
    changed = (y != x).flatten(1).float().mean(1)
    assert 0.010 < changed.mean().item() < 0.018, changed.mean()       # ~1.4 %
    # exactly the box changed (noise equal to the old value has probability ~0)
    n = 0
    box = y[n, 0, start[n, 0]:end[n, 0], start[n, 1]:end[n, 1], start[n, 2]:end[n, 2]]
    assert (y[n] != x[n]).sum() == box.numel()
    assert y.min() >= 0 and y.max() < 1


def test_out_painting_kept_box_and_fraction():
    x = cubes(200)
    y, start, size = P.out_painting(x, gen(10), return_boxes=True)
    assert (size[:, :2] >= 28).all() and (size[:, :2] <= 37).all()
    assert (size[:, 2] >= 14).all() and (size[:, 2] <= 19).all()
    end = start + size
    assert (start >= 3).all() and (end <= torch.tensor(SHAPE) - 3).all()
    kept = (y == x).flatten(1).float().mean(1)
    assert ((kept > 0.08) & (kept < 0.20)).all()
    assert 0.11 < kept.mean().item() < 0.155, kept.mean()               # ~13 %
    n = 1
    inside = y[n, 0, start[n, 0]:end[n, 0], start[n, 1]:end[n, 1], start[n, 2]:end[n, 2]]
    assert torch.equal(inside, x[n, 0, start[n, 0]:end[n, 0], start[n, 1]:end[n, 1],
                                 start[n, 2]:end[n, 2]])


def test_painting_tiny_cubes_stay_valid():
    x = cubes(8, shape=(8, 8, 8))
    for op in (P.in_painting, P.out_painting, P.local_pixel_shuffle, P.elastic_deform):
        y = op(x, gen(11))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


# ----------------------------------------------------------------------------- pipeline
def test_pipeline_one_operation_per_cube_with_quarter_shares():
    x = cubes(400, shape=(16, 16, 8))
    cfg = PerturbationConfig(elastic_prob=0.0)        # isolate the four operations
    y, choice = perturb_batch_with_choices(x, gen(12), cfg)
    shares = torch.bincount(choice, minlength=4).float() / 400
    assert ((shares > 0.18) & (shares < 0.32)).all(), shares
    changed = (y != x).flatten(1).float().mean(1)
    # the signature of each operation
    assert (changed[choice == 0] < 0.2).all()                          # small blocks only
    assert (changed[choice == 1] > 0.9).all()                          # every voxel remapped
    assert (changed[choice == 2] < 0.1).all()                          # one small box
    assert (changed[choice == 3] > 0.7).all()                          # all but one box
    assert y.min() >= 0 and y.max() <= 1


def test_pipeline_seeded_and_pure():
    x = cubes(6, shape=(32, 32, 16))
    x0 = x.clone()
    a = perturb_batch(x, gen(13))
    b = perturb_batch(x, gen(13))
    c = perturb_batch(x, gen(14))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(x, x0)                                          # input not modified
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1


def test_pipeline_disabled_is_identity_and_dtype_kept():
    x = cubes(3, shape=(16, 16, 8))
    y = perturb_batch(x, gen(15), PerturbationConfig(enabled=False))
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
    h = perturb_batch(x.half(), gen(15))
    assert h.dtype == torch.float16


def test_generator_device_mismatch_is_an_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match="generator"):
        perturb_batch(cubes(1, shape=(8, 8, 8)).cuda(), gen(0))


def test_cuda_same_seed_same_batch_and_no_host_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = cubes(4, shape=(32, 32, 16)).cuda()
    a = perturb_batch(x, torch.Generator("cuda").manual_seed(1))      # warm caches
    torch.cuda.set_sync_debug_mode("error")
    try:
        b = perturb_batch(x, torch.Generator("cuda").manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(a, b) and a.device == x.device
