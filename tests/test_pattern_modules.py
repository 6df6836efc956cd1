"""The parts of stage 3 on their own: lung test, coordinate bounds, discovery helpers, block
writing and coordinates.csv, on tiny synthetic inputs."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from pytorch.data import load_pretraining_data
from self_discovery.coordinates import plans_from_csv, read_coordinates, write_coordinates
from self_discovery.discovery import (ClassPlan, CoordinateBounds, CubeSpec, class_rng,
                                      multi_res_crop)
from self_discovery.fold_files import (CLASSES_PER_BLOCK, block_complete, check_fold_index,
                                       file_keys, fold_blocks, fold_file_names, open_block,
                                       write_fold_index)
from self_discovery.lung_test import lung_test_weight_sum, passes_lung_test


def test_lung_test_weighs_dense_voxels_and_the_next_slice():
    window = np.zeros((2, 1, 5), np.float32)       # deps 3: z = 0, 1, 2 counted, 3 looked at
    window[0, 0, 1] = 0.5                          # dense at z=1: 1, and z=0 sees it next: 0.5
    window[1, 0, 3] = 0.9                          # only seen from z=2: 0.5; z=3 not counted
    assert lung_test_weight_sum(window, deps=3) == 2.0
    assert passes_lung_test(window, deps=3, max_fraction=2.0 / 6)
    assert not passes_lung_test(window, deps=3, max_fraction=1.9 / 6)


def test_coordinate_bounds_and_the_smallest_volume_agree():
    a = argparse.Namespace(crop_rows=64, crop_cols=48, input_deps=32, len_border=10,
                           len_border_z=3)
    bounds = CoordinateBounds.from_args(a)
    assert bounds.window == (64, 48, 35)
    smallest = bounds.min_shape()
    assert smallest == (2 * 10 + 64 + 1, 2 * 10 + 48 + 1, 2 * 3 + 35 + 1)
    assert all(lo == hi for lo, hi in bounds.ranges(smallest))   # exactly one coordinate
    for axis in range(3):
        shape = list(smallest)
        shape[axis] -= 1
        assert bounds.ranges(shape)[axis][0] > bounds.ranges(shape)[axis][1]
    (lo, hi), _, _ = bounds.ranges((200, 200, 60))
    assert (lo, hi) == (10, 200 - 64 - 1 - 10)        # the window ends one voxel before the border


def test_class_generators_are_independent_of_the_order_classes_are_made():
    assert class_rng(3, 5).integers(1 << 30) == class_rng(3, 5).integers(1 << 30)
    assert class_rng(3, 5).integers(1 << 30) != class_rng(3, 6).integers(1 << 30)
    x0, y0, s = multi_res_crop(class_rng(0, 0), 20, 30, (100, 100, 40), 50, 80)
    assert 50 <= s < 80 and 0 <= x0 and x0 + s <= 100 and 0 <= y0 and y0 + s <= 100


def _plan(c: int) -> ClassPlan:
    cubes = [CubeSpec("train", 1, f"train/p{c}{j}.npy", c, j, 1, (8, 8, 4)) for j in range(2)]
    cubes.append(CubeSpec("validation", 1, f"validation/v{c}.npy", 0, 0, 0, (8, 8, 4)))
    return ClassPlan(c, cubes[0].file, (c, 0, 1), cubes)


def test_coordinates_csv_round_trip(tmp_path):
    plans = [_plan(c) for c in range(3)]
    path = tmp_path / "coordinates.csv"
    write_coordinates(path, plans, per_file=2, counts={"train": 2, "validation": 1})
    rows = read_coordinates(path)
    assert [r["fold"] for r in rows[2]] == [2, 2, 2] and [r["row"] for r in rows[1]] == [2, 3, 1]
    back = plans_from_csv(path, rows, 3, 2, 1, False, [p.reference for p in plans])
    assert back == plans


def test_a_block_is_renamed_with_its_labels_only_when_complete(tmp_path: Path):
    keys, counts, cube = file_keys(1), {"train": 2, "validation": 1}, (4, 3, 2)
    block = (tmp_path, 1, keys, counts, 5, 2, cube)     # classes 5 and 6
    with pytest.raises(RuntimeError), open_block(*block) as files:
        files.write(("train", 1), 0, np.ones(cube, np.float32))
        raise RuntimeError("killed half-way")
    assert not list(tmp_path.iterdir()) and not block_complete(*block)
    with open_block(*block) as files:
        for row in range(4):
            files.write(("train", 1), row, np.full(cube, row / 4, np.float32))
        for row in range(2):
            files.write(("validation", 1), row, np.full(cube, 0.5, np.float32))
    assert block_complete(*block) and not block_complete(tmp_path, 1, keys, counts, 4, 2, cube)
    data = np.load(tmp_path / "train_data1_vwGen_ex_ref_fold1.0.npy")
    assert data.dtype == np.float32 and data.shape == (4, *cube)
    assert [float(d.mean()) for d in data] == [0.0, 0.25, 0.5, 0.75]
    labels = np.load(tmp_path / "val_label1_vwGen_ex_ref_fold1.0.npy")
    assert labels.dtype == np.int64 and labels.tolist() == [[5], [6]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fold_contract_round_trip_written_by_stage_3_read_by_pretraining(tmp_path: Path):
    """Blocks written through the contract (two blocks of 2 and 1 classes), indexed, then loaded
    by the pretraining reader: classes and cubes come back in file order."""
    keys, counts, cube = file_keys(2), {"train": 2, "validation": 1}, (8, 8, 8)
    assert fold_blocks(3, 2) == [(1, 2), (2, 1)]
    assert fold_blocks(CLASSES_PER_BLOCK + 1) == [(1, CLASSES_PER_BLOCK), (2, 1)]
    names = []
    for k, n_cls in fold_blocks(3, 2):
        first = (k - 1) * 2
        with open_block(tmp_path, k, keys, counts, first, n_cls, cube) as files:
            for c in range(first, first + n_cls):
                for (split, _, res) in keys:
                    for j in range(counts[split]):
                        row = (c - first) * counts[split] + j
                        files.write((split, res), row, np.full(cube, c / 10 + j / 100, np.float32))
        names += [n for _, prefix, res in keys for n in fold_file_names(prefix, res, k)]
    write_fold_index(tmp_path, 3, names)
    check_fold_index(tmp_path, names)
    # the reader's blocks are of CLASSES_PER_BLOCK classes: read back block 1 (classes 0, 1)
    train, val = load_pretraining_data(tmp_path, 2, 2, 1, 2, cube)
    assert train.labels.tolist() == [0, 0, 1, 1] * 2 and val.labels.tolist() == [0, 1]
    assert train.cubes[:4, 0, 0, 0, 0].tolist() == pytest.approx([0.0, 0.01, 0.1, 0.11])
    assert val.cubes[:, 0, 0, 0, 0].tolist() == pytest.approx([0.0, 0.1])
