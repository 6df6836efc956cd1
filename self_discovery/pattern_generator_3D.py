"""Stage 3: self-discovery of anatomical patterns.

For every class ``i`` (``--nb_classes`` C) a reference train patient is drawn among those not yet
used as a reference; a random coordinate (x, y, z) inside its borders that is at least
``--distance_threshold`` away from every earlier class's coordinate and passes the lung test is
searched (``--max_tries`` tries, then another reference); the ``--nb_instances`` train patients
and ``--nb_instances_val`` validation patients nearest to the reference (L2 on the stage-2
features, scikit-learn) each give a cube cropped at that coordinate. With ``--multi_res`` every
train patient also gives two cubes of random side [minPatchSize, maxPatchSize) around it, resized
to the cube size (resolutions 2 and 3).

Output in ``--save``, one group per block of 50 classes k = 1, 2, ... (the last block may hold
fewer classes)::

    train_data{1,2,3}_vwGen_ex_ref_fold{k}.0.npy  float32 (nb_instances * classes_in_block,
                                                          X, Y, Z)
    train_label{1,2,3}_vwGen_ex_ref_fold{k}.0.npy int64 (same N, 1): class index 0..C-1
    val_data1_vwGen_ex_ref_fold{k}.0.npy          float32 (nb_instances_val * classes_in_block,
                                                          X, Y, Z)
    val_label1_vwGen_ex_ref_fold{k}.0.npy         int64 (same N, 1)
    coordinates.csv     provenance of every cube (``--prev_coordinates`` resumes from it)
    config.json         the resolved flags
    montage/class_NNN.png   middle slices of a few cubes per class (rows: res 1, 2, 3, val)

The ``.npy`` files of a block are created with ``np.lib.format.open_memmap`` under temporary
names, filled class by class (each cube written at its row offset with ``os.pwrite``: no mapping
stays alive, ~6x faster than page-faulting a fresh mapping) and renamed when the block is
complete, so memory stays at one class whatever C and a crash never leaves a partial file.

Differences from the published code (its bugs; the README lists every difference): no cube
dropped at the end of a block and a partial last block is saved (C=44 saves 44 classes); the
"too close" flag is decided per try; volumes too small for the borders are an up-front error
naming the volume; the reference search stops with an error once every patient was tried; HU
windowing is applied to the saved cubes as well as to the lung test; the coordinates file is a
real CSV; all randomness comes from ``--seed`` (one ``np.random.Generator`` per class, derived
from one ``SeedSequence(seed)``, so a resumed run draws exactly what an uninterrupted run
draws); no float64 giant arrays. A reference given up on in one class may be drawn again by a
later class (a reference is "used" once a class was built from it; the published code uses up
every reference it draws): ``coordinates.csv`` then records every used reference, so
``--prev_coordinates`` resumes exactly.

Choices the published code leaves open: a non-reference patient whose volume is smaller than
the reference's is cropped at the reference coordinate clamped into its volume (the recorded
coordinate is the one used).

Run from the repository root::

    python self_discovery/pattern_generator_3D.py --data_dir dataset/ --multi_res
    python self_discovery/pattern_generator_3D.py --data_dir dataset/ --multi_res \
        --nb_classes 100 --prev_coordinates self_discovery/Semantic_Genesis_data/coordinates.csv
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.neighbors import NearestNeighbors
from tqdm import tqdm

from pytorch.common import (ArgumentParser, HelpFormatter, InputError, add_overwrite_flag,
                            atomic_path, call_reporting_errors, check_output_outside,
                            finite_float, middle_slice_grid,
                            nonneg_float, nonneg_int, output_session, positive_int, probability,
                            save_npy_atomic, save_png, seed_int, write_run_config)
from pytorch.data import (  # the reader's names: one contract
    CLASSES_PER_BLOCK, FOLD_INDEX, fold_file_names, write_fold_index)
from self_discovery.volumes import is_unit_range, open_volume, resize_volume, within_unit_range

__all__ = ["LUNG_HU", "CLASSES_PER_FILE", "CSV_COLUMNS", "lung_test_weight_sum",
           "passes_lung_test", "lung_threshold_unit", "normalize_crop", "resize_cube", "too_close",
           "fold_file_names", "CubeSpec", "ClassPlan", "read_coordinates", "build_parser",
           "generate_patterns", "main"]

#: The lung test counts voxels at or above this HU value (soft tissue); -150 HU = 0.425 in [0, 1].
LUNG_HU = -150.0
#: Classes per group of fold files (the reference's block of 50; what pytorch/train.py reads).
CLASSES_PER_FILE = CLASSES_PER_BLOCK
#: Multi-resolution crops are shifted by dx, dy uniform in [-MULTI_RES_SHIFT, MULTI_RES_SHIFT).
MULTI_RES_SHIFT = 10
#: Redraws of a multi-resolution crop before it is clamped into the volume instead.
MULTI_RES_REDRAWS = 1000
#: Montage tiles are enlarged (nearest neighbour) to at least this many pixels a side.
MONTAGE_TILE = 96
#: Columns of coordinates.csv. ``file`` and ``reference`` are relative to --data_dir; x, y, z is the
#: crop start and size_* its size before resizing; ``fold``/``row`` locate the cube in the files.
CSV_COLUMNS = ("class", "split", "resolution", "file", "x", "y", "z", "size_x", "size_y", "size_z",
               "reference", "fold", "row")


# ----------------------------------------------------------------------------------------------
# Lung test, vectorised
# ----------------------------------------------------------------------------------------------
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
    """True when the window is mostly lung/air: weight sum <= ``max_fraction * X * Y * deps``."""
    w = np.asarray(window)
    limit = max_fraction * w.shape[0] * w.shape[1] * deps
    return lung_test_weight_sum(w, deps, threshold) <= limit


def lung_threshold_unit(hu_min: float = -1000.0, hu_max: float = 1000.0) -> float:
    """-150 HU on the normalised scale of the window [hu_min, hu_max] (0.425 by default)."""
    return (LUNG_HU - hu_min) / (hu_max - hu_min)


# ----------------------------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------------------------
def normalize_crop(crop: np.ndarray, is_normalized: bool, hu_min: float = -1000.0,
                   hu_max: float = 1000.0) -> np.ndarray:
    """float32 copy of ``crop`` in [0, 1]: as is when normalised, else HU clipped and scaled."""
    out = np.array(crop, dtype=np.float32)  # copy: reads only this region of a memory map
    if not is_normalized:
        np.clip(out, hu_min, hu_max, out=out)
        out -= np.float32(hu_min)
        out /= np.float32(hu_max - hu_min)
    return out


#: Multi-resolution crops are resized to the cube size as the published code does with
#: scikit-image (linear, reflecting at the border, anti-aliased when shrinking): the shared
#: ``self_discovery.volumes.resize_volume``. A crop (x, y, z) -> float32 ``size``.
resize_cube = resize_volume


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


class _Volumes:
    """Memory-mapped access to the volumes with per-volume intensity detection.

    A volume is opened for each crop (a header read) so no mapping stays alive; a crop reads only
    its region. Whether a volume is HU or already in [0, 1] is decided once per volume from all
    its values (read slab by slab), which must be finite.
    """

    def __init__(self, data_dir: Path, is_normalized: bool, hu_min: float, hu_max: float) -> None:
        self.data_dir = data_dir
        self.is_normalized = is_normalized
        self.hu_min, self.hu_max = hu_min, hu_max
        self._unit: dict[str, bool] = {}
        self.detected: list[str] = []   # volumes found in [0, 1] without --is_normalized

    def path(self, rel: str) -> Path:
        return self.data_dir / rel

    def _is_unit(self, rel: str, vol: np.ndarray) -> bool:
        if rel in self._unit:
            return self._unit[rel]
        lo, hi = math.inf, -math.inf
        step = max(1, (1 << 24) // max(1, vol[0].size))     # whole volume, ~64 MB slabs in x
        for x0 in range(0, vol.shape[0], step):
            slab = np.asarray(vol[x0:x0 + step], dtype=np.float32)
            if not np.isfinite(slab).all():
                raise InputError(f"{self.path(rel)}: volume contains NaN or inf values (first in "
                                 f"x >= {x0}); re-create it with scripts/prepare_dataset.py")
            lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
        if self.is_normalized:
            if not within_unit_range(lo, hi):
                raise InputError(
                    f"{self.path(rel)}: --is_normalized is set but the volume holds values in "
                    f"[{lo:.4g}, {hi:.4g}], not [0, 1]; drop --is_normalized to window HU volumes "
                    "to [--hu_min, --hu_max], or re-create the volume with "
                    "scripts/prepare_dataset.py")
            unit = True
        else:
            unit = is_unit_range(lo, hi, self.path(rel))  # the rule of stages 1 and 2
            if unit:
                self.detected.append(rel)
                if len(self.detected) == 1:
                    print(f"note: {self.path(rel)} holds values in [{lo:.3g}, {hi:.3g}]: "
                          "treating volumes already in [0, 1] as normalised (pass "
                          "--is_normalized to say so)", file=sys.stderr)
        self._unit[rel] = unit
        return unit

    def crop(self, rel: str, x: int, y: int, z: int, size: Sequence[int]) -> np.ndarray:
        """Normalised float32 crop [x:x+sx, y:y+sy, z:z+sz] of volume ``rel``."""
        vol = open_volume(self.path(rel))
        sx, sy, sz = size
        if x < 0 or y < 0 or z < 0 or x + sx > vol.shape[0] or y + sy > vol.shape[1] \
                or z + sz > vol.shape[2]:
            raise InputError(f"{self.path(rel)}: crop at ({x}, {y}, {z}) of size {tuple(size)} "
                             f"does not fit the volume {vol.shape}")
        unit = self._is_unit(rel, vol)
        return normalize_crop(vol[x:x + sx, y:y + sy, z:z + sz], unit, self.hu_min, self.hu_max)


# ----------------------------------------------------------------------------------------------
# Coordinates CSV
# ----------------------------------------------------------------------------------------------
def read_coordinates(path: str | os.PathLike) -> dict[int, list[dict]]:
    """Parse a coordinates.csv into ``{class: [row, ...]}`` (rows in file order, ints converted).

    Raises InputError naming the file (and line) when it cannot be read or is malformed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"--prev_coordinates {path}: cannot be read ({e.strerror}); give the "
                         "coordinates.csv written by an earlier run") from e
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"--prev_coordinates {path}: missing column(s) {', '.join(missing)}; give "
                         "the coordinates.csv written by pattern_generator_3D.py")
    out: dict[int, list[dict]] = {}
    ints = ("class", "resolution", "x", "y", "z", "size_x", "size_y", "size_z", "fold", "row")
    for line, row in enumerate(reader, start=2):
        try:
            rec = {k: int(row[k]) for k in ints}
        except (TypeError, ValueError):
            raise InputError(f"--prev_coordinates {path}: line {line}: expected integers in "
                             f"columns {', '.join(ints)}; the file is damaged") from None
        rec["split"], rec["file"], rec["reference"] = row["split"], row["file"], row["reference"]
        if rec["split"] not in ("train", "validation"):
            raise InputError(f"--prev_coordinates {path}: line {line}: split {rec['split']!r} is "
                             "not train/validation; the file is damaged")
        out.setdefault(rec["class"], []).append(rec)
    return out


def _plans_from_csv(path: Path, rows_by_class: dict[int, list[dict]], nb_classes: int,
                    nb_instances: int, nb_instances_val: int, multi_res: bool,
                    train_rel: list[str]) -> list[ClassPlan]:
    """ClassPlans of the classes recorded in a coordinates file (checked against the flags)."""
    classes = sorted(rows_by_class)
    if classes != list(range(len(classes))):
        raise InputError(f"--prev_coordinates {path}: classes {classes[:5]}... are not 0, 1, 2, "
                         "...; the file is damaged")
    resolutions = (1, 2, 3) if multi_res else (1,)
    known = set(train_rel)
    plans = []
    for c in classes[:nb_classes]:
        rows = rows_by_class[c]
        ref = rows[0]["reference"]
        if ref not in known:
            raise InputError(f"--prev_coordinates {path}: class {c}: reference {ref} is not a "
                             "train volume of --data_dir; resume with the same --data_dir")
        cubes = []
        for split, res, n, flag in [("train", r, nb_instances, "--nb_instances")
                                    for r in resolutions] + \
                                   [("validation", 1, nb_instances_val, "--nb_instances_val")]:
            sel = [r for r in rows if r["split"] == split and r["resolution"] == res]
            if len(sel) != n:
                raise InputError(
                    f"--prev_coordinates {path}: class {c} has {len(sel)} {split} cubes of "
                    f"resolution {res} but {flag} is {n}"
                    + ("" if sel or res == 1 else " (the earlier run had no --multi_res)")
                    + "; resume with the flags of the earlier run")
            cubes += [CubeSpec(split, res, r["file"], r["x"], r["y"], r["z"],
                               (r["size_x"], r["size_y"], r["size_z"])) for r in sel]
        extra = [r for r in rows if r["split"] == "train" and r["resolution"] not in resolutions]
        if extra:
            raise InputError(f"--prev_coordinates {path}: class {c} has resolution "
                             f"{extra[0]['resolution']} cubes but --multi_res is off; resume with "
                             "--multi_res")
        first = cubes[0]
        if first.file != ref:
            raise InputError(f"--prev_coordinates {path}: class {c}: the first train cube is not "
                             "from the reference; the file is damaged")
        plans.append(ClassPlan(c, ref, (first.x, first.y, first.z), cubes))
    return plans


def _write_csv(path: Path, plans: list[ClassPlan], per_file: int, counts: dict) -> None:
    """Write the provenance of ``plans`` atomically (rows in file order)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for p in plans:
        k, within = p.cls // per_file + 1, p.cls % per_file
        index: dict[tuple[str, int], int] = {}
        for s in p.cubes:
            j = index.get((s.split, s.resolution), 0)
            index[(s.split, s.resolution)] = j + 1
            row = within * counts[s.split] + j
            w.writerow([p.cls, s.split, s.resolution, s.file, s.x, s.y, s.z, *s.size,
                        p.reference, k, row])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------
def class_rng(seed: int, cls: int) -> np.random.Generator:
    """The Generator of class ``cls``: child ``cls`` of ``SeedSequence(seed)``."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(cls),)))


@dataclass
class _Context:
    args: argparse.Namespace
    volumes: _Volumes
    train_rel: list[str]
    val_rel: list[str]
    train_shapes: list[tuple[int, int, int]]
    val_shapes: list[tuple[int, int, int]]
    train_feats: np.ndarray
    train_nn: NearestNeighbors
    val_nn: NearestNeighbors
    lung_threshold: float


def _nearest(nn: NearestNeighbors, feat: np.ndarray, k: int, first: int | None = None) -> list[int]:
    """Indices of the ``k`` nearest fitted points to ``feat`` (L2), ``first`` forced first."""
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


def _search_coordinate(ctx: _Context, ref: int, rng: np.random.Generator,
                       earlier: np.ndarray) -> tuple[int, int, int] | None:
    """Up to --max_tries random coordinates in reference ``ref``; the first that is far enough
    from ``earlier`` (M, 3) and passes the lung test, or None."""
    a = ctx.args
    X, Y, Z = ctx.train_shapes[ref]
    b, bz = a.len_border, a.len_border_z
    hi_x, hi_y = X - a.crop_rows - 1 - b, Y - a.crop_cols - 1 - b
    hi_z = Z - a.input_deps - 3 - 1 - bz
    rel = ctx.train_rel[ref]
    for _ in range(a.max_tries):
        x = int(rng.integers(b, hi_x, endpoint=True))
        y = int(rng.integers(b, hi_y, endpoint=True))
        z = int(rng.integers(bz, hi_z, endpoint=True))
        if too_close(earlier, (x, y, z), a.distance_threshold):  # decided afresh per try
            continue
        window = ctx.volumes.crop(rel, x, y, z, (a.crop_rows, a.crop_cols, a.input_deps + 3))
        if passes_lung_test(window, a.input_deps, a.lung_threshold, ctx.lung_threshold):
            return x, y, z
    return None


def _multi_res_crop(rng: np.random.Generator, x: int, y: int, shape: Sequence[int],
                    lo: int, hi: int) -> tuple[int, int, int]:
    """(x0, y0, side) of a multi-resolution crop: side in [lo, hi), shift in [-10, 10) per axis,
    redrawn until the crop fits the volume (clamped after MULTI_RES_REDRAWS draws)."""
    X, Y = shape[0], shape[1]
    for _ in range(MULTI_RES_REDRAWS):
        s = int(rng.integers(lo, hi))
        dx = int(rng.integers(-MULTI_RES_SHIFT, MULTI_RES_SHIFT))
        dy = int(rng.integers(-MULTI_RES_SHIFT, MULTI_RES_SHIFT))
        if 0 <= x + dx and x + dx + s <= X and 0 <= y + dy and y + dy + s <= Y:
            return x + dx, y + dy, s
    s = min(lo, X, Y)
    return min(max(x, 0), X - s), min(max(y, 0), Y - s), s


def _new_plan(ctx: _Context, cls: int, used_refs: set[int], earlier: np.ndarray) -> ClassPlan:
    """Discover class ``cls``: its reference, coordinate and the cubes to crop."""
    a = ctx.args
    rng = class_rng(a.seed, cls)
    remaining = [i for i in range(len(ctx.train_rel)) if i not in used_refs]
    tried = 0
    coord = None
    while remaining:
        ref = remaining.pop(int(rng.integers(len(remaining))))
        tried += 1
        coord = _search_coordinate(ctx, ref, rng, earlier)
        if coord is not None:
            break
    if coord is None:
        raise InputError(
            f"class {cls}: none of the {tried} train patients tried as reference in "
            f"{ctx.volumes.data_dir / 'train'} gave a coordinate passing the lung test (weight sum "
            f"<= --lung_threshold {a.lung_threshold} of the window) and at least "
            f"--distance_threshold {a.distance_threshold} from earlier classes in --max_tries "
            f"{a.max_tries} tries each; relax --lung_threshold (e.g. 0.3) or --distance_threshold, "
            "raise --max_tries, lower --nb_classes, or check the intensities (--is_normalized, "
            "--hu_min/--hu_max)")
    x, y, z = coord
    feat = ctx.train_feats[ref]
    train_idx = _nearest(ctx.train_nn, feat, a.nb_instances, first=ref)
    val_idx = _nearest(ctx.val_nn, feat, a.nb_instances_val)
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
                x0, y0, s = _multi_res_crop(rng, cx, cy, shape, a.minPatchSize, a.maxPatchSize)
                lst.append(CubeSpec("train", res, rel, x0, y0, cz, (s, s, a.input_deps)))
    val = []
    for p in val_idx:
        cx, cy, cz = clamped(ctx.val_shapes[p])
        val.append(CubeSpec("validation", 1, ctx.val_rel[p], cx, cy, cz, size1))
    return ClassPlan(cls, ctx.train_rel[ref], coord, res1 + res2 + res3 + val)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _file_keys(multi_res: bool) -> list[tuple[str, str, int]]:
    """(split as in CubeSpec, file prefix, resolution) of every data file of a block."""
    keys = [("train", "train", r) for r in ((1, 2, 3) if multi_res else (1,))]
    return keys + [("validation", "val", 1)]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_class(ctx: _Context, plan: ClassPlan, files: dict, row0: dict,
                 montage_n: int) -> list[list[np.ndarray]]:
    """Crop every cube of ``plan`` into the block's files (``files[(split, res)]`` = (fd, data
    offset)) at rows ``row0[(split, res)] + j``; return the montage rows (first cubes)."""
    a = ctx.args
    size = (a.input_rows, a.input_cols, a.input_deps)
    nbytes = 4 * size[0] * size[1] * size[2]
    montage: dict[tuple[str, int], list[np.ndarray]] = {}
    count: dict[tuple[str, int], int] = {}
    for s in tqdm(plan.cubes, desc=f"class {plan.cls}", leave=False, disable=None):
        key = (s.split, s.resolution)
        j = count.get(key, 0)
        count[key] = j + 1
        cube = resize_cube(ctx.volumes.crop(s.file, s.x, s.y, s.z, s.size), size)  # (X, Y, Z)
        fd, offset = files[key]
        _pwrite_all(fd, memoryview(cube).cast("B"), offset + (row0[key] + j) * nbytes)
        if j < montage_n:
            montage.setdefault(key, []).append(cube)
    return [montage[k] for k in sorted(montage, key=lambda k: (k[0] != "train", k[1]))]


def generate_patterns(args: argparse.Namespace) -> list[ClassPlan]:
    """Run stage 3 with parsed ``args``; return the plans of all classes written."""
    from self_discovery.feature_extractor import load_features

    a = args
    _check_args(a)
    save = Path(a.save)
    check_output_outside(save, [Path(a.data_dir) / sp for sp in ("train", "validation")], "--save",
                         "--data_dir")
    earlier = [save / "coordinates.csv", save / FOLD_INDEX] + sorted(
        p for p in save.glob("*_vwGen_ex_ref_fold*.npy") if not p.name.startswith("."))
    resuming = bool(a.prev_coordinates) and Path(a.prev_coordinates).resolve().parent == save.resolve()
    with output_session(save, "--save", earlier, a.overwrite, "--prev_coordinates", resuming):
        return _generate(a)


def _generate(a: argparse.Namespace) -> list[ClassPlan]:
    from self_discovery.feature_extractor import load_features

    data_dir, save = Path(a.data_dir), Path(a.save)
    train_feats, val_feats, train_files, val_files = load_features(
        a.train_features, a.val_features, data_dir)
    train_feats = np.asarray(train_feats, dtype=np.float32)
    val_feats = np.asarray(val_feats, dtype=np.float32)
    train_rel = [f"train/{Path(f).name}" for f in train_files]
    val_rel = [f"validation/{Path(f).name}" for f in val_files]
    n_train, n_val = len(train_rel), len(val_rel)
    tdir, vdir = data_dir / "train", data_dir / "validation"
    if n_train < a.nb_instances:
        raise InputError(f"{tdir}: {n_train} train patients but --nb_instances is "
                         f"{a.nb_instances}; lower --nb_instances to at most {n_train} "
                         "(or add patients)")
    if n_val < a.nb_instances_val:
        raise InputError(f"{vdir}: {n_val} validation patients but --nb_instances_val is "
                         f"{a.nb_instances_val}; lower --nb_instances_val to at most {n_val} "
                         "(or add patients)")
    if n_train < a.nb_classes:
        raise InputError(f"{tdir}: --nb_classes {a.nb_classes} needs one distinct reference "
                         f"patient per class but there are {n_train} train patients; lower "
                         f"--nb_classes to at most {n_train}")

    # volume sizes (headers only): every train volume may become a reference
    need_ref = (2 * a.len_border + a.crop_rows + 1, 2 * a.len_border + a.crop_cols + 1,
                2 * a.len_border_z + a.input_deps + 4)
    need_mr = (a.minPatchSize, a.minPatchSize, 0) if a.multi_res else (0, 0, 0)
    need_ref = tuple(max(p, q) for p, q in zip(need_ref, need_mr))
    need_val = (a.crop_rows, a.crop_cols, a.input_deps)
    volumes = _Volumes(data_dir, a.is_normalized, a.hu_min, a.hu_max)
    shapes = {}
    for rels, need, what in ((train_rel, need_ref, "the borders --len_border "
                              f"{a.len_border} / --len_border_z {a.len_border_z} around a "
                              f"{a.crop_rows}x{a.crop_cols}x{a.input_deps + 3} lung-test window"),
                             (val_rel, need_val, "a cube")):
        for rel in rels:
            shp = tuple(int(s) for s in open_volume(volumes.path(rel)).shape)
            if any(s < n for s, n in zip(shp, need)):
                raise InputError(
                    f"{volumes.path(rel)}: volume of size {shp} is too small for {what}: it needs "
                    f"at least {need[0]}x{need[1]}x{need[2]}; lower --len_border/--len_border_z "
                    "(or the crop sizes) or remove the volume")
            shapes[rel] = shp

    train_nn = NearestNeighbors(algorithm="brute").fit(train_feats.astype(np.float64))
    val_nn = NearestNeighbors(algorithm="brute").fit(val_feats.astype(np.float64))
    ctx = _Context(a, volumes, train_rel, val_rel, [shapes[r] for r in train_rel],
                   [shapes[r] for r in val_rel], train_feats, train_nn, val_nn,
                   lung_threshold_unit(a.hu_min, a.hu_max))

    plans: list[ClassPlan] = []
    if a.prev_coordinates:
        plans = _plans_from_csv(Path(a.prev_coordinates), read_coordinates(a.prev_coordinates),
                                a.nb_classes, a.nb_instances, a.nb_instances_val, a.multi_res,
                                train_rel)
        print(f"resuming: {len(plans)} class(es) from {a.prev_coordinates} (blocks complete in "
              "--save are kept, other recorded classes re-cropped from their coordinates)")
    same_run = _same_cube_config(a, save) if plans else False
    (save / FOLD_INDEX).unlink(missing_ok=True)  # written back last: an interrupted run is seen
    write_run_config(a, save)

    per_file = a.classes_per_file
    counts = {"train": a.nb_instances, "validation": a.nb_instances_val}
    keys = _file_keys(a.multi_res)
    ref_index = {r: i for i, r in enumerate(train_rel)}
    used = {ref_index[p.reference] for p in plans}
    coords = [p.coord for p in plans]
    n_blocks = math.ceil(a.nb_classes / per_file)
    cube_size = (a.input_rows, a.input_cols, a.input_deps)
    bar = tqdm(total=a.nb_classes, desc="classes", disable=None)
    for k in range(1, n_blocks + 1):
        first, last = (k - 1) * per_file, min(k * per_file, a.nb_classes)
        n_cls = last - first
        if same_run and last <= len(plans) and _block_complete(save, k, keys, counts, first,
                                                               n_cls, cube_size):
            bar.update(n_cls)   # resumed in place: this block's files already hold these classes
            continue
        with _BlockFiles(save, k, keys, counts, first, n_cls, cube_size) as files:
            for c in range(first, last):
                if c < len(plans):
                    plan = plans[c]
                else:
                    earlier = np.array(coords, dtype=np.float64).reshape(-1, 3)   # (c, 3)
                    plan = _new_plan(ctx, c, used, earlier)
                    plans.append(plan)
                    used.add(ref_index[plan.reference])
                    coords.append(plan.coord)
                row0 = {(s, r): (c - first) * counts[s] for s, _, r in keys}
                rows = _write_class(ctx, plan, files, row0, a.montage_instances)
                if a.montage_instances > 0:
                    save_png(save / "montage" / f"class_{c:03d}.png",
                             middle_slice_grid(rows, min_tile=MONTAGE_TILE))
                bar.update(1)
        _write_csv(save / "coordinates.csv", plans[:last], per_file, counts)
    bar.close()
    write_fold_index(save, a.nb_classes, [name for k in range(1, n_blocks + 1)
                                           for _, prefix, res in keys
                                           for name in fold_file_names(prefix, res, k)])
    return plans


#: Flags that must match for the files of an earlier run in --save to be kept when resuming.
_CUBE_FLAGS = ("data_dir", "is_normalized", "hu_min", "hu_max", "input_rows", "input_cols",
               "input_deps", "crop_rows", "crop_cols", "nb_instances", "nb_instances_val",
               "multi_res", "minPatchSize", "maxPatchSize", "classes_per_file")


def _same_cube_config(a: argparse.Namespace, save: Path) -> bool:
    """True when --prev_coordinates lies in --save and that run used the same cube flags."""
    prev = Path(a.prev_coordinates)
    cfg_path = save / "config.json"
    if prev.resolve().parent != save.resolve() or not cfg_path.is_file():
        return False
    try:
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(old.get(k) == getattr(a, k) for k in _CUBE_FLAGS)


def _block_labels(first: int, n_cls: int, per_class: int) -> np.ndarray:
    """Class indices of a block's rows: ``first`` .. ``first + n_cls - 1``, each ``per_class``
    times (cubes of one class are contiguous), int64 (n_cls * per_class,)."""
    return np.repeat(np.arange(first, first + n_cls, dtype=np.int64), per_class)


def _block_complete(save: Path, k: int, keys: list[tuple[str, str, int]], counts: dict,
                    first: int, n_cls: int, cube: tuple[int, int, int]) -> bool:
    """True when every file of block ``k`` exists with the rows and labels of its classes."""
    for split, prefix, res in keys:
        data_name, label_name = fold_file_names(prefix, res, k)
        n = counts[split] * n_cls
        try:
            data = np.load(save / data_name, mmap_mode="r")
            labels = np.load(save / label_name)
        except (OSError, ValueError):
            return False
        want = _block_labels(first, n_cls, counts[split])
        if data.shape != (n, *cube) or data.dtype != np.float32 or labels.shape != (n, 1) \
                or not np.array_equal(labels[:, 0], want):
            return False
    return True


class _BlockFiles:
    """The data files of block ``k``: created with ``open_memmap`` (header, full size) under
    temporary names and opened for writing; on success closed, the label files written and
    everything renamed onto the final names; on error the temporary files are removed."""

    def __init__(self, save: Path, k: int, keys: list[tuple[str, str, int]], counts: dict,
                 first: int, n_cls: int, cube: tuple[int, int, int]) -> None:
        self.save, self.k, self.keys, self.counts, self.cube = save, k, keys, counts, cube
        self.first, self.n_cls = first, n_cls
        self._ctx: list = []
        self._fds: list[int] = []

    def __enter__(self) -> dict:
        files = {}
        try:
            for split, prefix, res in self.keys:
                data_name, _ = fold_file_names(prefix, res, self.k)
                ctx = atomic_path(self.save / data_name, suffix=".npy")
                tmp = ctx.__enter__()
                self._ctx.append(ctx)
                n = self.counts[split] * self.n_cls
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                               shape=(n, *self.cube))
                offset = int(mm.offset)
                del mm
                fd = os.open(tmp, os.O_WRONLY)
                self._fds.append(fd)
                files[(split, res)] = (fd, offset)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return files

    def __exit__(self, exc_type, exc, tb) -> bool:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if exc_type is None:
            for split, prefix, res in self.keys:
                _, label_name = fold_file_names(prefix, res, self.k)
                labels = _block_labels(self.first, self.n_cls, self.counts[split])
                save_npy_atomic(self.save / label_name, labels.reshape(-1, 1))
        for ctx in reversed(self._ctx):
            ctx.__exit__(exc_type, exc, tb)  # renames on success, removes the temp on error
        self._ctx = []
        return False


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _check_args(a: argparse.Namespace) -> None:
    positive = ("input_rows", "input_cols", "input_deps", "crop_rows", "crop_cols", "nb_classes",
                "nb_instances", "nb_instances_val", "minPatchSize", "max_tries", "classes_per_file")
    for name in positive:
        if getattr(a, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(a, name)}")
    for name in ("len_border", "len_border_z", "montage_instances"):
        if getattr(a, name) < 0:
            raise InputError(f"--{name} must be >= 0, got {getattr(a, name)}")
    if a.maxPatchSize <= a.minPatchSize:
        raise InputError(f"--maxPatchSize ({a.maxPatchSize}) must exceed --minPatchSize "
                         f"({a.minPatchSize}): sides are drawn from [min, max)")
    if a.hu_max <= a.hu_min:
        raise InputError(f"--hu_max ({a.hu_max}) must exceed --hu_min ({a.hu_min})")
    if not 0 <= a.lung_threshold <= 1:
        raise InputError(f"--lung_threshold must lie in [0, 1], got {a.lung_threshold}")
    if a.distance_threshold < 0:
        raise InputError(f"--distance_threshold must be >= 0, got {a.distance_threshold}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of stage 3 (reference flag names and defaults, plus ours)."""
    ap = ArgumentParser(
        description="Self-discovery of anatomical patterns (Semantic Genesis stage 3): crop "
                    "C classes of similar cubes from the train/validation volumes.",
        formatter_class=HelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--data_dir", default="dataset/",
                   help="folder holding train/ and validation/ with one .npy volume (x, y, z) "
                        "per patient (scripts/prepare_dataset.py makes them)")
    g.add_argument("--save", default="self_discovery/Semantic_Genesis_data",
                   help="output folder for the fold files, coordinates.csv, config.json and "
                        "montage/ (pytorch/train.py --data_dir reads it)")
    g.add_argument("--train_features", default="self_discovery/features/train_features.npy",
                   help="stage-2 features of the train volumes (N_train, D), sorted file order")
    g.add_argument("--val_features", default="self_discovery/features/validation_features.npy",
                   help="stage-2 features of the validation volumes (N_val, D)")
    g.add_argument("--is_normalized", action="store_true",
                   help="volumes are already in [0, 1]; without it HU volumes are clipped to "
                        "[--hu_min, --hu_max] and scaled (volumes found in [0, 1] are detected "
                        "and used as they are)")
    g.add_argument("--hu_min", type=finite_float, default=-1000.0,
                   help="lower end of the HU window mapped to 0")
    g.add_argument("--hu_max", type=finite_float, default=1000.0,
                   help="upper end of the HU window mapped to 1")
    g = ap.add_argument_group("cubes")
    g.add_argument("--input_rows", type=positive_int, default=64, help="saved cube size in x")
    g.add_argument("--input_cols", type=positive_int, default=64, help="saved cube size in y")
    g.add_argument("--input_deps", type=positive_int, default=32, help="saved cube size in z (and crop "
                                                             "depth)")
    g.add_argument("--crop_rows", type=positive_int, default=64, help="resolution-1 crop size in x "
                   "(resized to --input_rows when different)")
    g.add_argument("--crop_cols", type=positive_int, default=64, help="resolution-1 crop size in y "
                   "(resized to --input_cols when different)")
    g.add_argument("--multi_res", action="store_true",
                   help="also save two multi-resolution crops per train patient (resolutions 2 "
                        "and 3: side in [--minPatchSize, --maxPatchSize), resized)")
    g.add_argument("--minPatchSize", type=positive_int, default=50,
                   help="smallest in-plane side of a multi-resolution crop")
    g.add_argument("--maxPatchSize", type=positive_int, default=80,
                   help="multi-resolution sides are drawn below this (exclusive)")
    g = ap.add_argument_group("discovery")
    g.add_argument("--nb_classes", type=positive_int, default=200,
                   help="number of pattern classes C (the paper trained with 44)")
    g.add_argument("--nb_instances", type=positive_int, default=200,
                   help="train cubes per class (from the nearest train patients)")
    g.add_argument("--nb_instances_val", type=positive_int, default=30,
                   help="validation cubes per class (from the nearest validation patients)")
    g.add_argument("--distance_threshold", type=nonneg_float, default=5,
                   help="a class coordinate must be at least this far (voxels, L2) from every "
                        "earlier class's coordinate (closer is rejected)")
    g.add_argument("--len_border", type=nonneg_int, default=100,
                   help="coordinates keep this many voxels from the x/y borders of the reference")
    g.add_argument("--len_border_z", type=nonneg_int, default=30,
                   help="coordinates keep this many voxels from the z borders of the reference")
    g.add_argument("--max_tries", type=positive_int, default=200,
                   help="random coordinates tried per reference before another reference")
    g.add_argument("--lung_threshold", type=probability, default=0.15,
                   help="lung test: reject a window whose weighted count of voxels >= -150 HU "
                        "exceeds this fraction of the cube")
    g.add_argument("--prev_coordinates", default=None,
                   help="coordinates.csv of an earlier run: its classes are re-cropped from the "
                        "recorded coordinates and discovery continues up to --nb_classes")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of all random draws (same seed and inputs -> same bytes)")
    add_overwrite_flag(g, "the fold files and coordinates.csv")
    g = ap.add_argument_group("output")
    g.add_argument("--montage_instances", type=nonneg_int, default=8,
                   help="cubes per row in montage/class_NNN.png (0: no montage)")
    g.add_argument("--classes_per_file", type=positive_int, default=CLASSES_PER_FILE,
                   help="classes per group of fold files (keep 50: pytorch/train.py expects it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: returns 0, or 2 after a one-line error on bad input."""
    args = build_parser().parse_args(argv)
    ok, plans = call_reporting_errors(generate_patterns, args)
    if not ok:
        return 2
    print(f"wrote {len(plans)} classes to {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
