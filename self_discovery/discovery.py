"""Discovery of one pattern class: its reference patient, coordinate and the cubes to crop.

For class ``cls`` a reference train patient is drawn among those not yet used as a reference; up
to --max_tries random coordinates inside its ``CoordinateBounds`` are tried, and the first that
is at least --distance_threshold away from every earlier class's coordinate (``too_close``) and
passes the lung test is the class's coordinate (else another reference). The --nb_instances
train and --nb_instances_val validation patients nearest to the reference (L2 on the stage-2
features) each give a cube at that coordinate; with --multi_res every train patient also gives
two crops of random side around it (``multi_res_crop``). All draws of a class come from its own
Generator (``class_rng``), so a resumed run draws what an uninterrupted run draws.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.neighbors import NearestNeighbors

from runtime.errors import InputError
from self_discovery.lung_test import lung_test_weight_sum
from self_discovery.volumes import VolumeCrops

__all__ = ["MULTI_RES_SHIFT", "MULTI_RES_REDRAWS", "CubeSpec", "ClassPlan", "CoordinateBounds",
           "DiscoveryContext", "SearchStats", "class_rng", "nearest", "too_close",
           "search_coordinate", "multi_res_crop", "new_plan", "no_coordinate_message"]

#: Multi-resolution crops are shifted by dx, dy uniform in [-MULTI_RES_SHIFT, MULTI_RES_SHIFT).
MULTI_RES_SHIFT = 10
#: Redraws of a multi-resolution crop before it is clamped into the volume instead.
MULTI_RES_REDRAWS = 1000


@dataclass(frozen=True)
class CubeSpec:
    """One cube: crop ``file`` (relative to --data_dir) at (x, y, z) with ``size`` voxels."""
    split: str          # "train" | "validation"
    resolution: int     # 1, 2, 3
    file: str
    x: int
    y: int
    z: int
    size: tuple[int, int, int]


@dataclass
class ClassPlan:
    """Everything needed to write one class: its reference, coordinate and cubes in file order."""
    cls: int
    reference: str                    # relative path of the reference volume
    coord: tuple[int, int, int]       # coordinate in the reference volume
    cubes: list[CubeSpec] = field(default_factory=list)


@dataclass(frozen=True)
class CoordinateBounds:
    """Where a class coordinate (x, y, z) may lie in a reference volume (X, Y, Z).

    ``window`` is the lung-test window (crop_rows, crop_cols, input_deps + 3) that starts at the
    coordinate, ``border`` the margin (len_border, len_border, len_border_z) kept on both sides
    of it; the published limits keep one more voxel on the far side.
    """
    window: tuple[int, int, int]
    border: tuple[int, int, int]

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> CoordinateBounds:
        return cls((a.crop_rows, a.crop_cols, a.input_deps + 3),
                   (a.len_border, a.len_border, a.len_border_z))

    def ranges(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """Inclusive (lo, hi) per axis for a volume ``shape``; lo > hi when it is too small."""
        return [(b, int(s) - w - 1 - b) for s, w, b in zip(shape, self.window, self.border)]

    def min_shape(self) -> tuple[int, int, int]:
        """The smallest volume holding a coordinate (lo == hi on every axis)."""
        return tuple(2 * b + w + 1 for w, b in zip(self.window, self.border))  # type: ignore[return-value]


@dataclass
class DiscoveryContext:
    """What discovery reads: the flags, the volumes (relative paths, shapes (X, Y, Z)), the
    train features (N_train, D) and nearest-neighbour indexes over both splits' features."""
    args: argparse.Namespace
    volumes: VolumeCrops
    train_rel: list[str]
    val_rel: list[str]
    train_shapes: list[tuple[int, int, int]]
    val_shapes: list[tuple[int, int, int]]
    train_feats: np.ndarray
    train_nn: NearestNeighbors
    val_nn: NearestNeighbors
    lung_threshold: float             # -150 HU on the [0, 1] scale

    @classmethod
    def build(cls, a: argparse.Namespace, volumes: VolumeCrops, train_rel: list[str],
              val_rel: list[str], shapes: dict[str, tuple[int, int, int]], train_feats: np.ndarray,
              val_feats: np.ndarray, lung_threshold: float) -> DiscoveryContext:
        """Fit brute-force L2 neighbours on the features (float64, as scikit-learn computes)."""
        train_nn = NearestNeighbors(algorithm="brute").fit(train_feats.astype(np.float64))
        val_nn = NearestNeighbors(algorithm="brute").fit(val_feats.astype(np.float64))
        return cls(a, volumes, train_rel, val_rel, [shapes[r] for r in train_rel],
                   [shapes[r] for r in val_rel], train_feats, train_nn, val_nn, lung_threshold)


def class_rng(seed: int, cls: int) -> np.random.Generator:
    """The Generator of class ``cls``: child ``cls`` of ``SeedSequence(seed)``."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(cls),)))


def nearest(nn: NearestNeighbors, feat: np.ndarray, k: int, first: int | None = None) -> list[int]:
    """Indices of the ``k`` nearest fitted points to ``feat`` (D,) (L2), ``first`` forced first."""
    n = nn.n_samples_fit_
    idx = nn.kneighbors(feat[None].astype(np.float64), n_neighbors=min(n, k + 1),
                        return_distance=False)[0]
    idx = [int(i) for i in idx]
    if first is not None:
        idx = [first] + [i for i in idx if i != first]
    return idx[:k]


def too_close(earlier: np.ndarray, coord: Sequence[int], threshold: float) -> bool:
    """True when ``coord`` lies closer than ``threshold`` (L2, voxels) to a row of ``earlier``
    (M, 3). The published rule: a distance of exactly ``threshold`` is far enough."""
    if not len(earlier):
        return False
    d = np.sqrt(((np.asarray(earlier, np.float64) - np.asarray(coord, np.float64)) ** 2).sum(1))
    return bool(np.any(d < threshold))


@dataclass
class SearchStats:
    """How the coordinate searches of one class failed: random coordinates tried, those too
    close to an earlier class, those failing the lung test, the least dense window's share of
    dense voxels, and the shapes of the references tried."""
    tries: int = 0
    too_close: int = 0
    lung_fail: int = 0
    least_dense: float = float("inf")
    shapes: list[tuple[int, int, int]] = field(default_factory=list)


def search_coordinate(ctx: DiscoveryContext, ref: int, rng: np.random.Generator,
                      earlier: np.ndarray, stats: SearchStats | None = None
                      ) -> tuple[int, int, int] | None:
    """Up to --max_tries random coordinates in reference ``ref``; the first that is far enough
    from ``earlier`` (M, 3) and passes the lung test, or None (``stats`` counts why)."""
    a = ctx.args
    stats = SearchStats() if stats is None else stats
    bounds = CoordinateBounds.from_args(a)
    (lo_x, hi_x), (lo_y, hi_y), (lo_z, hi_z) = bounds.ranges(ctx.train_shapes[ref])
    stats.shapes.append(ctx.train_shapes[ref])
    rel = ctx.train_rel[ref]
    cells = bounds.window[0] * bounds.window[1] * a.input_deps
    limit = a.lung_threshold * bounds.window[0] * bounds.window[1] * a.input_deps  # as published
    for _ in range(a.max_tries):
        x = int(rng.integers(lo_x, hi_x, endpoint=True))
        y = int(rng.integers(lo_y, hi_y, endpoint=True))
        z = int(rng.integers(lo_z, hi_z, endpoint=True))
        stats.tries += 1
        if too_close(earlier, (x, y, z), a.distance_threshold):  # decided afresh per try
            stats.too_close += 1
            continue
        window = ctx.volumes.crop(rel, x, y, z, bounds.window)
        weight = lung_test_weight_sum(window, a.input_deps, ctx.lung_threshold)
        if weight <= limit:   # passes_lung_test, with its weight kept for the message
            return x, y, z
        stats.lung_fail += 1
        stats.least_dense = min(stats.least_dense, weight / cells)
    return None


def _room(ctx: DiscoveryContext, shape: Sequence[int]) -> str:
    """Where the borders let a coordinate lie in a volume ``shape``, named for each axis where
    they leave less than half the positions the window alone would (empty when none)."""
    a = ctx.args
    bounds = CoordinateBounds.from_args(a)
    named: dict[tuple[str, str], list[str]] = {}     # (flag, where) -> axes: x and y merge
    for axis, (lo, hi), s, w, flag in zip("xyz", bounds.ranges(shape), shape, bounds.window,
                                          ("--len_border", "--len_border", "--len_border_z")):
        n, full = hi - lo + 1, max(1, int(s) - w)
        if n < full / 2:
            where = f"at {lo}" if n == 1 else f"in [{lo}, {hi}]"
            named.setdefault((f"{flag} {getattr(a, flag[2:])}",
                              f"{where} ({n} of {full} positions)"), []).append(axis)
    if not named:
        return ""
    parts = [f"{flag} keeps {' and '.join(axes)} {where}" for (flag, where), axes in named.items()]
    return (f"the borders leave little room in a {'x'.join(map(str, shape))} volume: "
            + ", ".join(parts) + "; ")


def no_coordinate_message(ctx: DiscoveryContext, cls: int, refs: int, stats: SearchStats) -> str:
    """The error when no reference gives class ``cls`` a coordinate: the borders when they
    leave little room (scans smaller than LUNA16), how the tries failed, and the fixes for
    that cause first (kept under the one-line limit: no paths)."""
    a = ctx.args
    room = _room(ctx, min(stats.shapes, key=lambda s: s[0] * s[1] * s[2])) if stats.shapes else ""
    failed = []
    if stats.too_close:
        failed.append(f"{stats.too_close} lay within --distance_threshold "
                      f"{a.distance_threshold:g} of an earlier class")
    if stats.lung_fail:
        failed.append(f"{stats.lung_fail} failed the lung test (least dense window "
                      f"{stats.least_dense:.0%} dense, --lung_threshold {a.lung_threshold:g} "
                      f"allows {a.lung_threshold:.0%})")
    fixes = []
    if room:
        fixes.append("lower --len_border/--len_border_z (100/30 suit 512x512 scans)")
    if stats.lung_fail:
        fixes.append("relax --lung_threshold" + (" (e.g. 0.3)" if a.lung_threshold < 0.3 else ""))
    if stats.too_close:
        fixes.append("lower --distance_threshold")
    fixes += ["raise --max_tries", "lower --nb_classes", "or check the intensities "
              "(--is_normalized, --hu_min/--hu_max)"]
    return (f"class {cls}: none of the {refs} train patients tried as reference gave a "
            f"coordinate: {room}of {stats.tries} random coordinates, {' and '.join(failed)}; "
            + ", ".join(fixes))


def multi_res_crop(rng: np.random.Generator, x: int, y: int, shape: Sequence[int],
                   lo: int, hi: int) -> tuple[int, int, int]:
    """(x0, y0, side) of a multi-resolution crop: side in [lo, hi), shift in
    [-MULTI_RES_SHIFT, MULTI_RES_SHIFT) per axis, redrawn until the crop fits the volume
    ``shape`` (clamped after MULTI_RES_REDRAWS draws)."""
    X, Y = shape[0], shape[1]
    for _ in range(MULTI_RES_REDRAWS):
        s = int(rng.integers(lo, hi))
        dx = int(rng.integers(-MULTI_RES_SHIFT, MULTI_RES_SHIFT))
        dy = int(rng.integers(-MULTI_RES_SHIFT, MULTI_RES_SHIFT))
        if 0 <= x + dx and x + dx + s <= X and 0 <= y + dy and y + dy + s <= Y:
            return x + dx, y + dy, s
    s = min(lo, X, Y)
    return min(max(x, 0), X - s), min(max(y, 0), Y - s), s


def _find_reference(ctx: DiscoveryContext, cls: int, rng: np.random.Generator,
                    used_refs: set[int], earlier: np.ndarray) -> tuple[int, tuple[int, int, int]]:
    """(reference index, coordinate) of class ``cls``: references drawn among the unused ones
    until one gives a coordinate; an InputError naming the cause once every one was tried."""
    remaining = [i for i in range(len(ctx.train_rel)) if i not in used_refs]
    tried, stats = 0, SearchStats()
    while remaining:
        ref = remaining.pop(int(rng.integers(len(remaining))))
        tried += 1
        coord = search_coordinate(ctx, ref, rng, earlier, stats)
        if coord is not None:
            return ref, coord
    raise InputError(no_coordinate_message(ctx, cls, tried, stats))


def new_plan(ctx: DiscoveryContext, cls: int, used_refs: set[int],
             earlier: np.ndarray) -> ClassPlan:
    """Discover class ``cls`` (earlier classes' coordinates ``earlier`` (M, 3), their
    references ``used_refs``): its reference, coordinate and the cubes to crop."""
    a = ctx.args
    rng = class_rng(a.seed, cls)
    ref, coord = _find_reference(ctx, cls, rng, used_refs, earlier)
    x, y, z = coord
    feat = ctx.train_feats[ref]
    train_idx = nearest(ctx.train_nn, feat, a.nb_instances, first=ref)
    val_idx = nearest(ctx.val_nn, feat, a.nb_instances_val)
    size1 = (a.crop_rows, a.crop_cols, a.input_deps)

    def clamped(shape):  # the reference coordinate, moved into a smaller volume if needed
        return (min(x, shape[0] - size1[0]), min(y, shape[1] - size1[1]),
                min(z, shape[2] - size1[2]))

    res1, res2, res3 = [], [], []
    for p in train_idx:
        rel, shape = ctx.train_rel[p], ctx.train_shapes[p]
        cx, cy, cz = clamped(shape)
        res1.append(CubeSpec("train", 1, rel, cx, cy, cz, size1))
        if a.multi_res:
            for res, lst in ((2, res2), (3, res3)):
                x0, y0, s = multi_res_crop(rng, cx, cy, shape, a.minPatchSize, a.maxPatchSize)
                lst.append(CubeSpec("train", res, rel, x0, y0, cz, (s, s, a.input_deps)))
    val = []
    for p in val_idx:
        cx, cy, cz = clamped(ctx.val_shapes[p])
        val.append(CubeSpec("validation", 1, ctx.val_rel[p], cx, cy, cz, size1))
    return ClassPlan(cls, ctx.train_rel[ref], coord, res1 + res2 + res3 + val)
