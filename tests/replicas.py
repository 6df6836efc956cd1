"""Format-faithful replicas of the four target-task datasets, built from phantoms (never the
real data), for the preparation's and the fine-tuning runs' tests.

Each ``make_*_replica(root)`` writes a tiny dataset in the layout the real one is downloaded in
and returns its facts: ``data_dir``, ``argv`` (the ``prepare_target.py`` arguments that prepare
it, without ``--output_dir``), ``splits`` (the patients each split must hold) and what a test
needs to check the outputs (nodule positions, label volumes, ...).

    facts = make_luna16_replica(tmp_path / "luna")
    assert target_tasks.prepare.main(facts["argv"] + ["--output_dir", str(out)]) == 0
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from preparation.phantoms import make_chest_phantom
from target_tasks.brats import FOLDS_CSV, published_split, read_folds

__all__ = ["LUNA_DIRECTIONS", "NODULE_HU", "make_luna16_replica", "lps_index",
           "make_lits_replica", "make_brats_replica", "make_ncs_replica", "write_image"]

#: HU of the replica's nodules: one exact value, found again in the cubes.
NODULE_HU = 500.0
#: Directions of the replica's scans, in turn: identity, a flipped y axis, flipped x and z,
#: and x / y swapped with a flipped z.
LUNA_DIRECTIONS = (np.eye(3), np.diag([1.0, -1.0, 1.0]), np.diag([-1.0, 1.0, -1.0]),
                   np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))
_LUNA_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.{:012d}"


def write_image(path: Path, vol_xyz: np.ndarray, spacing: Sequence[float],
                origin: Sequence[float], direction: np.ndarray) -> Path:
    """Write an (x, y, z) array with its geometry (SimpleITK picks the format from the name:
    ``.mhd`` writes a header and a ``.raw`` beside it)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vol_xyz, (2, 1, 0))))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection(np.asarray(direction, float).ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _world(index: Sequence[float], spacing: Sequence[float], origin: Sequence[float],
           direction: np.ndarray) -> np.ndarray:
    """ITK's index -> physical point: origin + direction @ (spacing * index)."""
    return np.asarray(origin) + np.asarray(direction) @ (np.asarray(spacing) * np.asarray(index))


def lps_index(world: Sequence[float], shape: Sequence[int], spacing: Sequence[float],
              origin: Sequence[float], direction: np.ndarray) -> np.ndarray:
    """The voxel (rounded) of a world point in the scan turned to the identity direction,
    computed without SimpleITK: that scan's origin is the lowest voxel-centre corner on each
    physical axis and its spacing along physical axis k is the spacing of the file axis that
    runs along k."""
    direction = np.asarray(direction)
    corners = np.array([_world(np.array(c) * (np.asarray(shape) - 1), spacing, origin, direction)
                        for c in np.ndindex(2, 2, 2)])
    axis_of = np.abs(direction).argmax(axis=1)           # physical axis k <- file axis
    lps_spacing = np.asarray(spacing)[axis_of]
    return np.floor((np.asarray(world) - corners.min(axis=0)) / lps_spacing + 0.5).astype(int)


def _paint_sphere(hu: np.ndarray, centre: Sequence[int], radius_mm: float,
                  spacing: Sequence[float], value: float) -> None:
    grid = np.ogrid[tuple(slice(0, n) for n in hu.shape)]
    d = sum(((g - c) * s / radius_mm) ** 2 for g, c, s in zip(grid, centre, spacing))
    hu[d <= 1.0] = value


def make_luna16_replica(root: Path, shape: Sequence[int] = (40, 36, 16),
                        subsets: Sequence[int] = (0, 1, 5, 7, 9), nodules: int = 2,
                        negatives: int = 3) -> dict[str, Any]:
    """A LUNA16-like folder: ``subsetN/<uid>.mhd`` + ``.raw`` (int16 HU, non-zero origin,
    anisotropic spacing, the directions of ``LUNA_DIRECTIONS`` in turn),
    ``candidates_V2/candidates_V2.csv`` with ``nodules`` positives (spheres of
    ``NODULE_HU``, radius 3 mm, at known world points) and ``negatives`` negatives per scan
    (the last one near a corner, its cube partly outside the scan), and a decoy lung mask in
    ``seg-lungs-LUNA16/`` that is not a scan.

    Facts: ``data_dir``, ``argv``, ``splits`` ({split: [uid]}), ``scans`` ({uid: geometry}),
    ``candidates`` (rows: uid, world, class, ``voxel`` = the expected voxel in the scan turned
    to the identity direction, ``split``).
    """
    root = Path(root)
    spacing = (0.8, 0.7, 2.5)
    rows, scans, splits = [], {}, {"train": [], "val": [], "test": []}
    for i, subset in enumerate(subsets):
        uid = _LUNA_UID.format(1000 + i)
        direction = LUNA_DIRECTIONS[i % len(LUNA_DIRECTIONS)]
        origin = (-150.0 + 7 * i, 20.5 - 3 * i, -310.0 + 11 * i)
        hu, _ = make_chest_phantom(shape, seed=100 + i, spacing=spacing)
        rng = np.random.default_rng([7, i])
        split = "train" if subset <= 4 else "val" if subset <= 6 else "test"
        picks = []
        for k in range(nodules):                    # each in its own band of x: apart
            band = (shape[0] - 12) // nodules
            centre = [6 + k * band + int(rng.integers(0, max(1, band - 8))),
                      int(rng.integers(6, shape[1] - 6)), int(rng.integers(3, shape[2] - 3))]
            _paint_sphere(hu, centre, 3.0, spacing, NODULE_HU)
            picks.append((centre, 1))
        for k in range(negatives - 1):
            picks.append(([int(rng.integers(2, n - 2)) for n in shape], 0))
        picks.append(([1, 2, 0], 0))
        write_image(root / f"subset{subset}" / f"{uid}.mhd", np.round(hu).astype(np.int16),
                    spacing, origin, direction)
        for centre, label in picks:
            offset = rng.uniform(-0.3, 0.3, 3)            # rounding must find the voxel again
            world = _world(np.asarray(centre) + offset, spacing, origin, direction)
            rows.append({"seriesuid": uid, "world": world.tolist(), "class": label, "split": split,
                         "voxel": lps_index(world, shape, spacing, origin, direction).tolist()})
        scans[uid] = {"subset": subset, "split": split, "shape": list(shape), "spacing": spacing,
                      "origin": origin, "direction": direction.tolist()}
        splits[split].append(uid)
    write_image(root / "seg-lungs-LUNA16" / f"{_LUNA_UID.format(1000)}.mhd",
                np.zeros(shape, np.uint8), spacing, (0, 0, 0), np.eye(3))
    cand = root / "candidates_V2" / "candidates_V2.csv"
    cand.parent.mkdir(parents=True, exist_ok=True)
    with open(cand, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
        for r in rows:
            w.writerow([r["seriesuid"], *(f"{v:.4f}" for v in r["world"]), r["class"]])
    for r in rows:                                  # the world point as written (4 decimals)
        r["world"] = [float(f"{v:.4f}") for v in r["world"]]
    return {"data_dir": root, "argv": ["ncc", "--data_dir", str(root)], "splits": splits,
            "scans": scans, "candidates": rows, "candidates_file": cand}


def make_lits_replica(root: Path, ids: Sequence[int] = (0, 1, 2, 100, 101, 115, 116, 130),
                      shape: Sequence[int] = (32, 32, 12), inplane_size: int = 24) -> dict[str, Any]:
    """A LiTS-like download: ``Training Batch 1/`` (volumes 0-27) and ``Training Batch 2/``
    of ``volume-N.nii`` (int16 HU; N = 1 as ``.nii.gz``; odd N with a flipped x axis) and
    ``segmentation-N.nii`` (uint8: 1 liver, an ellipsoid of 60 HU, 2 a tumour inside it).

    Facts: ``data_dir``, ``argv`` (with ``--allow_missing``: the replica holds a few volumes
    of each split, and ``--inplane_size``), ``splits`` ({split: [volume-N]}), ``labels``
    ({volume-N: the label volume (x, y, z) as written}).
    """
    root = Path(root)
    spacing = (0.9, 0.9, 2.0)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    labels = {}
    for n in ids:
        hu, _ = make_chest_phantom(shape, seed=200 + n, spacing=spacing)
        grid = np.ogrid[tuple(slice(0, s) for s in shape)]
        rel = [(g - c) / r for g, c, r in zip(grid, (0.55 * shape[0], 0.5 * shape[1],
                                                     0.5 * shape[2]), (0.25 * shape[0],
                                                                       0.2 * shape[1],
                                                                       0.35 * shape[2]))]
        liver = sum(r ** 2 for r in rel) <= 1.0
        tumour = sum(r ** 2 for r in rel) <= 0.2
        hu[liver] = 60.0
        seg = liver.astype(np.uint8) + tumour.astype(np.uint8)
        folder = root / ("Training Batch 1" if n <= 27 else "Training Batch 2")
        direction = np.diag([-1.0, 1.0, 1.0]) if n % 2 else np.eye(3)
        origin = (-170.0 - n, -150.0, -400.0 + n)
        ext = ".nii.gz" if n == 1 else ".nii"
        write_image(folder / f"volume-{n}{ext}", np.round(hu).astype(np.int16), spacing, origin,
                    direction)
        write_image(folder / f"segmentation-{n}{ext}", seg, spacing, origin, direction)
        split = "train" if n < 100 else "val" if n < 115 else "test" if n < 130 else None
        if split:
            splits[split].append(f"volume-{n}")
        labels[f"volume-{n}"] = seg
    return {"data_dir": root, "splits": splits, "labels": labels, "spacing": spacing,
            "argv": ["lcs", "--data_dir", str(root), "--allow_missing",
                     "--inplane_size", str(inplane_size)]}


def _replica_patients(per_split: Sequence[int]) -> dict[str, list[str]]:
    """Real BraTS 2018 ids from the authors' folds: the first ``per_split`` (train, val,
    test) patients of each split of the published split."""
    split = published_split(read_folds(FOLDS_CSV))
    return {s: split[s][:n] for s, n in zip(("train", "val", "test"), per_split)}


def make_brats_replica(root: Path, shape: Sequence[int] = (24, 24, 16),
                       per_split: Sequence[int] = (2, 1, 2)) -> dict[str, Any]:
    """A BraTS-2018-like download: ``MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/<id>/`` with
    ``<id>_{flair,t1,t1ce,t2,seg}.nii.gz`` (MR-like positive intensities in an ellipsoid
    brain, 0 outside; labels 0, 1, 2, 4; direction diag(-1, -1, 1)) for real patient ids of
    the published split (``per_split``: how many train, val and test patients).

    Facts: ``data_dir``, ``argv`` (with ``--allow_missing``: a few of the 285 patients),
    ``splits``, ``labels`` ({id: the label volume (x, y, z) as written}), ``flair`` ({id:
    the FLAIR volume}).
    """
    root = Path(root) / "MICCAI_BraTS_2018_Data_Training"
    splits = _replica_patients(per_split)
    labels, flairs = {}, {}
    for k, pid in enumerate(p for s in splits.values() for p in s):
        rng = np.random.default_rng([11, k])
        grid = np.ogrid[tuple(slice(0, s) for s in shape)]
        brain = sum(((g - s / 2) / (0.42 * s)) ** 2 for g, s in zip(grid, shape)) <= 1.0
        tc = [int(rng.integers(s // 3, 2 * s // 3)) for s in shape]
        d = sum(((g - c) / 3.0) ** 2 for g, c in zip(grid, tc))
        seg = np.zeros(shape, np.uint8)
        seg[(d <= 2.0) & brain] = 2
        seg[(d <= 1.0) & brain] = 1
        seg[(d <= 0.4) & brain] = 4
        flair = np.where(brain, rng.normal(300.0, 40.0, shape), 0.0)
        flair[seg > 0] += 400.0
        flair = np.clip(flair, 1.0, None) * brain
        folder = root / ("HGG" if k % 2 == 0 else "LGG") / pid
        geometry = ((1.0, 1.0, 1.0), (0.0, -239.0, 0.0), np.diag([-1.0, -1.0, 1.0]))
        write_image(folder / f"{pid}_flair.nii.gz", flair.astype(np.int16), *geometry)
        write_image(folder / f"{pid}_seg.nii.gz", seg, *geometry)
        for other in ("t1", "t1ce", "t2"):
            write_image(folder / f"{pid}_{other}.nii.gz", (0.8 * flair).astype(np.int16), *geometry)
        labels[pid], flairs[pid] = seg, flair.astype(np.int16)
    return {"data_dir": root.parent, "splits": splits, "labels": labels, "flair": flairs,
            "argv": ["bms", "--data_dir", str(root.parent), "--allow_missing"]}


def make_ncs_replica(root: Path, sizes: Sequence[int] = (6, 3, 3),
                     channel_axis: int | None = 1) -> dict[str, Any]:
    """The processed NCS arrays: ``x_{train,valid,test}_64x64x32.npy`` (float32 in [0, 1],
    lung-like background and a nodule near the centre) and ``m_..._64x64x32.npy`` (uint8
    masks of the nodules), stored (N, 1, 64, 64, 32) (``channel_axis`` 1), (N, 64, 64, 32, 1)
    (4) or (N, 64, 64, 32) (None).

    Facts: ``data_dir``, ``argv``, ``splits`` ({split: [case names]}), ``images`` and
    ``masks`` ({split: (N, 64, 64, 32) arrays as written, without the channel axis}).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images, masks, splits = {}, {}, {}
    for (split, src), n in zip((("train", "train"), ("val", "valid"), ("test", "test")), sizes):
        rng = np.random.default_rng([13, n, len(split)])
        x = np.clip(rng.normal(0.075, 0.02, (n, 64, 64, 32)), 0, 1).astype(np.float32)
        m = np.zeros((n, 64, 64, 32), np.uint8)
        grid = np.ogrid[:64, :64, :32]
        for i in range(n):
            c = np.array([32, 32, 16]) + rng.integers(-3, 4, 3)
            r = rng.uniform(3.0, 8.0)
            inside = sum(((g - cc) * s / r) ** 2 for g, cc, s in zip(grid, c, (1, 1, 2))) <= 1.0
            x[i][inside] = 0.52 + 0.01 * (i % 10)
            m[i][inside] = 1
        images[split], masks[split] = x, m
        splits[split] = [f"{split}_{i:05d}" for i in range(n)]
        store = (lambda a: a) if channel_axis is None else (lambda a: np.expand_dims(a, channel_axis))
        np.save(root / f"x_{src}_64x64x32.npy", store(x))
        np.save(root / f"m_{src}_64x64x32.npy", store(m))
    return {"data_dir": root, "argv": ["ncs", "--data_dir", str(root)], "splits": splits,
            "images": images, "masks": masks}
