"""Stage 3 (self_discovery/pattern_generator_3D.py): lung test, crops, files, resume, bad input.

Tiny synthetic datasets: volumes 80 x 80 x 44 (borders --len_border 4 --len_border_z 2), a
lung-like background below 0.425 with sparse dense voxels, and in every third patient a dense
slab that makes every lung test fail there; random (N, 16) features with a features_index.json
as feature_extractor.py writes it.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pytorch.data import load_pretraining_data
from pytorch.manifest import DATA_FLAGS, resolve_data_flags
from runtime.errors import InputError
from runtime.images import labelled_grid
from runtime.intensity import is_unit_range
from experiments.benchmark_patterns import naive_weight_sum  # the reference's per-voxel loop
from self_discovery import pattern_generator_3D as pg
from self_discovery.discovery import MULTI_RES_SHIFT, multi_res_crop, too_close
from self_discovery.feature_extractor import save_features
from self_discovery.lung_test import lung_test_weight_sum, lung_threshold_unit, passes_lung_test
from self_discovery.volumes import load_resized, resize_volume

SHAPE = (80, 80, 44)
SMALL = ["--len_border", "4", "--len_border_z", "2", "--montage_instances", "3"]


def _volume(rng: np.random.Generator, shape=SHAPE, dense_slab: bool = False,
            all_dense: bool = False) -> np.ndarray:
    """Values in [0, 1]: lung (< 0.425) with 5% dense voxels (> 0.425), optional dense slab."""
    vol = rng.uniform(0.02, 0.35, shape).astype(np.float32)
    dense = rng.random(shape) < 0.05
    if dense_slab:
        dense[shape[0] // 2:] = True
    if all_dense:
        dense[:] = True
    vol[dense] = rng.uniform(0.45, 0.9, int(dense.sum())).astype(np.float32)
    return vol


def make_dataset(root: Path, n_train: int = 10, n_val: int = 4, hu: bool = False,
                 all_dense: bool = False, shapes: dict | None = None, seed: int = 0) -> Path:
    """dataset root with train/ validation/ volumes and features/ (train, val, index)."""
    rng = np.random.default_rng(seed)
    names = {}
    for split, n in (("train", n_train), ("validation", n_val)):
        d = root / "data" / split
        d.mkdir(parents=True)
        names[split] = []
        for i in range(n):
            name = f"p{i:03d}.npy"
            shape = (shapes or {}).get((split, i), SHAPE)
            vol = _volume(rng, shape, dense_slab=(split == "train" and i % 3 == 1),
                          all_dense=all_dense)
            if hu:
                vol = vol * 2000.0 - 1000.0
            np.save(d / name, vol.astype(np.float32))
            names[split].append(name)
    save_features(root / "features", rng.standard_normal((n_train, 16)).astype(np.float32),
                  rng.standard_normal((n_val, 16)).astype(np.float32),
                  {"train": names["train"], "validation": names["validation"], "feature_dim": 16},
                  data_dir=root / "data")
    return root


def reindex_features(root: Path) -> None:
    """Write the features index of ``make_dataset`` again, for volumes changed since (what
    re-extracting the features records)."""
    feats, index = root / "features", json.loads((root / "features" / "features_index.json").read_text())
    save_features(feats, np.load(feats / "train_features.npy"),
                  np.load(feats / "validation_features.npy"),
                  {k: index[k] for k in ("train", "validation", "feature_dim")},
                  data_dir=root / "data")


def _args(root: Path, save: str, *extra: str, classes: int = 3, inst: int = 6,
          inst_val: int = 3) -> list[str]:
    return ["--data_dir", str(root / "data"), "--output_dir", str(root / save),
            "--train_features", str(root / "features" / "train_features.npy"),
            "--val_features", str(root / "features" / "validation_features.npy"),
            "--nb_classes", str(classes), "--nb_instances", str(inst),
            "--nb_instances_val", str(inst_val), "--seed", "7", *SMALL, *extra]


def _rows(save: Path) -> list[dict]:
    with open(save / "coordinates.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("patterns"))


@pytest.fixture(scope="module")
def run3(dataset) -> Path:
    """C=3 with multi-res, 2 classes per file -> fold1 (2 classes) + partial fold2 (1 class)."""
    assert pg.main(_args(dataset, "out3", "--multi_res", "--classes_per_file", "2")) == 0
    return dataset / "out3"


# ---------------------------------------------------------------------------------------------
def test_lung_test_equals_slow_loop():
    rng = np.random.default_rng(0)
    for trial in range(6):
        deps = int(rng.integers(2, 8))
        window = rng.random((int(rng.integers(1, 9)), int(rng.integers(1, 9)), deps + 3))
        window = window.astype(np.float32)
        window[rng.random(window.shape) < 0.1] = 0.425  # ties count as dense
        assert lung_test_weight_sum(window, deps) == naive_weight_sum(window, deps, 0.425)
        fast = passes_lung_test(window, deps, 0.3)
        assert fast == (naive_weight_sum(window, deps, 0.425)
                        <= 0.3 * window.shape[0] * window.shape[1] * deps)
    lung = np.full((64, 64, 35), 0.1, np.float32)
    body = np.full((64, 64, 35), 0.55, np.float32)
    assert lung_test_weight_sum(lung) == 0.0 and passes_lung_test(lung)
    assert lung_test_weight_sum(body) == 64 * 64 * 32 and not passes_lung_test(body)
    assert lung_threshold_unit() == pytest.approx(0.425)
    with pytest.raises(ValueError):
        lung_test_weight_sum(np.zeros((4, 4, 33)), 32)


def test_files_counts_and_cubes_match_coordinates(dataset, run3):
    save, data = run3, dataset / "data"
    cube = (64, 64, 32)
    for k, n_cls, first in ((1, 2, 0), (2, 1, 2)):
        for prefix, res, inst in [("train", r, 6) for r in (1, 2, 3)] + [("val", 1, 3)]:
            d = np.load(save / f"{prefix}_data{res}_vwGen_ex_ref_fold{k}.0.npy")
            lab = np.load(save / f"{prefix}_label{res}_vwGen_ex_ref_fold{k}.0.npy")
            assert d.dtype == np.float32 and d.shape == (inst * n_cls, *cube)
            assert lab.dtype == np.int64 and lab.shape == (inst * n_cls, 1)
            assert np.array_equal(lab[:, 0], np.repeat(np.arange(first, first + n_cls), inst))
            assert d.min() >= 0 and d.max() <= 1
    assert not list(save.glob(".*tmp*"))
    assert not (save / "train_data1_vwGen_ex_ref_fold3.0.npy").exists()
    rows = _rows(save)
    assert len(rows) == 3 * (3 * 6 + 3)
    coords = []
    for r in rows:
        prefix = "train" if r["split"] == "train" else "val"
        d = np.load(save / f"{prefix}_data{r['resolution']}_vwGen_ex_ref_fold{r['fold']}.0.npy",
                    mmap_mode="r")
        got = d[int(r["row"])]
        x, y, z = int(r["x"]), int(r["y"]), int(r["z"])
        sx, sy, sz = int(r["size_x"]), int(r["size_y"]), int(r["size_z"])
        vol = np.load(data / r["file"])
        crop = vol[x:x + sx, y:y + sy, z:z + sz]
        assert crop.shape == (sx, sy, sz)
        if r["resolution"] == "1":
            assert (sx, sy, sz) == cube
            assert np.array_equal(got, crop)
        else:
            assert 50 <= sx < 80 and sx == sy and sz == 32
            assert np.array_equal(got, resize_volume(crop, cube))
        if r["split"] == "train" and r["resolution"] == "1" and r["file"] == r["reference"]:
            coords.append((x, y, z))
            assert 4 <= x <= 80 - 64 - 1 - 4 and 2 <= z <= 44 - 32 - 3 - 1 - 2
            assert passes_lung_test(vol[x:x + 64, y:y + 64, z:z + 35])
    assert len(coords) == 3  # the reference is each class's first train cube
    refs = {r["reference"] for r in rows}
    assert len(refs) == 3
    c = np.array(coords, float)
    assert all(np.linalg.norm(c[i] - c[j]) > 5 for i in range(3) for j in range(i))
    # a montage per class and the run config
    assert sorted(p.name for p in (save / "montage").glob("*.png")) == \
        ["class_000.png", "class_001.png", "class_002.png"]
    # 4 rows (resolutions 1-3, validation) x 3 cubes; 64-voxel slices shown at 128 pixels
    with Image.open(save / "montage" / "class_000.png") as im:
        assert im.format == "PNG" and im.mode == "L"
        img = np.asarray(im)
    assert img.shape[0] > 4 * 128 and img.shape[1] > 3 * 128
    for prefix, res in [("train", 1), ("train", 2), ("train", 3), ("val", 1)]:
        d = np.load(save / f"{prefix}_data{res}_vwGen_ex_ref_fold1.0.npy", mmap_mode="r")
        for cube in d[:3]:   # the class's first three cubes of the row, each shown once
            assert _tile_count(img, cube) == 1, (prefix, res)
    assert json.loads((save / "config.json").read_text())["nb_classes"] == 3


def test_partial_block_default_file_size(dataset):
    """C=3 with the default block of 50: one fold file of 3 * instances rows, no cube dropped."""
    save = dataset / "out_default"
    assert pg.main(_args(dataset, "out_default", "--montage_instances", "0")) == 0
    d = np.load(save / "train_data1_vwGen_ex_ref_fold1.0.npy", mmap_mode="r")
    assert d.shape == (3 * 6, 64, 64, 32)
    assert not (save / "train_data2_vwGen_ex_ref_fold1.0.npy").exists()  # no --multi_res
    assert np.load(save / "val_data1_vwGen_ex_ref_fold1.0.npy", mmap_mode="r").shape[0] == 9
    # the training loader reads these files as they are, its data flags from config.json
    train, val = load_pretraining_data(save, 3, 6, 3, 1, (64, 64, 32))
    assert len(train) == 18 and len(val) == 9
    flags = argparse.Namespace(data_dir=str(save), **dict.fromkeys(DATA_FLAGS))
    assert set(resolve_data_flags(flags).values()) == {"manifest"}
    assert vars(flags) == {"data_dir": str(save), "input_rows": 64, "input_cols": 64,
                           "input_deps": 32, "cls_classes": 3, "nb_instances": 6,
                           "nb_instances_val": 3, "nb_multires_patch": 1}
    assert train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6


def _files(save: Path) -> dict[str, bytes]:
    return {str(p.relative_to(save)): p.read_bytes() for p in sorted(save.rglob("*"))
            if p.is_file() and p.name != "config.json"}


def test_same_seed_same_bytes(dataset, run3):
    assert pg.main(_args(dataset, "again", "--multi_res", "--classes_per_file", "2")) == 0
    a, b = _files(run3), _files(dataset / "again")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert pg.main(_args(dataset, "seed8", "--multi_res", "--classes_per_file", "2", "--seed",
                         "8")) == 0
    c = _files(dataset / "seed8")
    assert c["coordinates.csv"] != a["coordinates.csv"]


def test_prev_coordinates_resume_adds_classes_equal_to_a_fresh_run(dataset, run3):
    """C=2, then resume to C=3: same first two classes and a third; equal to a fresh C=3 run."""
    common = ["--multi_res", "--classes_per_file", "2"]
    assert pg.main(_args(dataset, "first2", *common, classes=2)) == 0
    prev = dataset / "first2" / "coordinates.csv"
    assert pg.main(_args(dataset, "resumed", *common, "--prev_coordinates", str(prev))) == 0
    r2, r3 = _rows(dataset / "first2"), _rows(dataset / "resumed")
    assert r3[:len(r2)] == r2 and {r["class"] for r in r3} == {"0", "1", "2"}
    a = np.load(dataset / "first2" / "train_data2_vwGen_ex_ref_fold1.0.npy")
    b = np.load(dataset / "resumed" / "train_data2_vwGen_ex_ref_fold1.0.npy")
    assert np.array_equal(a, b)
    fresh, resumed = _files(run3), _files(dataset / "resumed")
    assert fresh.keys() == resumed.keys() and all(fresh[k] == resumed[k] for k in fresh)
    # resumed in place: complete blocks are kept as they are, the new block is written
    common1 = ["--classes_per_file", "1", "--montage_instances", "0"]
    assert pg.main(_args(dataset, "inplace", *common1, classes=2)) == 0
    fold1 = dataset / "inplace" / "train_data1_vwGen_ex_ref_fold1.0.npy"
    before = fold1.stat().st_mtime_ns
    assert pg.main(_args(dataset, "inplace", *common1, "--prev_coordinates",
                         str(dataset / "inplace" / "coordinates.csv"))) == 0
    assert fold1.stat().st_mtime_ns == before
    assert (dataset / "inplace" / "train_data1_vwGen_ex_ref_fold3.0.npy").is_file()
    assert len({r["class"] for r in _rows(dataset / "inplace")}) == 3
    # a damaged coordinates file and mismatching flags are clear errors
    bad = dataset / "bad.csv"
    bad.write_text(prev.read_text().replace(",train,1,", ",train,one,", 1))
    with pytest.raises(pg.InputError, match="line 2"):
        pg.generate_patterns(pg.build_parser().parse_args(
            _args(dataset, "x", *common, "--prev_coordinates", str(bad))))
    with pytest.raises(pg.InputError, match="--nb_instances"):
        pg.generate_patterns(pg.build_parser().parse_args(
            _args(dataset, "x", *common, "--prev_coordinates", str(prev), inst=5)))


def test_hu_volumes_are_normalised(tmp_path):
    root = make_dataset(tmp_path, n_train=4, n_val=2, hu=True)
    assert pg.main(_args(root, "out", classes=2, inst=3, inst_val=2)) == 0
    d = np.load(root / "out" / "train_data1_vwGen_ex_ref_fold1.0.npy")
    assert d.min() >= 0 and d.max() <= 1
    for r in _rows(root / "out"):
        if r["split"] == "train":
            x, y, z = int(r["x"]), int(r["y"]), int(r["z"])
            hu = np.load(root / "data" / r["file"])[x:x + 64, y:y + 64, z:z + 32]
            np.testing.assert_allclose(d[int(r["row"])], np.clip((hu + 1000) / 2000, 0, 1),
                                       atol=1e-6)
    # --is_normalized on HU volumes is an error naming the volume
    assert pg.main(_args(root, "out2", "--is_normalized", classes=2, inst=3, inst_val=2)) == 2


def test_unit_volumes_without_flag_detected(dataset, run3, capsys):
    args = _args(dataset, "flag", "--multi_res", "--classes_per_file", "2", "--is_normalized")
    assert pg.main(args) == 0
    assert "treating volumes already in [0, 1] as normalised" not in capsys.readouterr().err
    a, b = _files(run3), _files(dataset / "flag")
    assert all(a[k] == b[k] for k in a)
    pg.main(_args(dataset, "noflag", classes=1, inst=2, inst_val=1))
    assert "treating volumes already in [0, 1] as normalised" in capsys.readouterr().err


def test_one_intensity_rule():
    assert is_unit_range(0.0, 1.0) and is_unit_range(-0.005, 1.008)
    assert not is_unit_range(-1024.0, 3071.0) and not is_unit_range(0.0, 1.6)
    for lo, hi in ((0.0, 1.3), (-0.5, 1.0)):
        with pytest.raises(InputError, match="neither"):
            is_unit_range(lo, hi, "v.npy")


def test_volume_neither_unit_nor_hu_is_an_error_like_stage_1(tmp_path, capsys):
    """Values up to 1.3 are neither [0, 1] nor HU: the same one-line error as stages 1-2."""
    root = make_dataset(tmp_path, n_train=4, n_val=2)
    bad = root / "data" / "train" / "p001.npy"
    np.save(bad, np.load(bad) * 1.3)
    reindex_features(root)
    assert pg.main(_args(root, "out", classes=2, inst=3, inst_val=2)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "p001.npy" in err and "are neither normalised" in err
    with pytest.raises(InputError, match="neither"):
        load_resized(bad, (16, 16, 8))


def test_too_few_patients(dataset, capsys):
    assert pg.main(_args(dataset, "x", inst=11)) == 2
    err = capsys.readouterr().err
    assert "10 train patients" in err and "--nb_instances is 11" in err
    assert pg.main(_args(dataset, "x", inst_val=5)) == 2
    err = capsys.readouterr().err
    assert "4 validation patients" in err and "--nb_instances_val is 5" in err
    assert pg.main(_args(dataset, "x", classes=11)) == 2
    assert "--nb_classes" in capsys.readouterr().err


def test_too_small_volume(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=3, n_val=2, shapes={("train", 2): (80, 80, 30)})
    assert pg.main(_args(root, "out", classes=1, inst=2, inst_val=1)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p002.npy" in err and "(80, 80, 30)" in err
    assert "73x73x40" in err and "--len_border_z" in err


def test_no_coordinate_passes(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=4, n_val=2, all_dense=True)
    assert pg.main(_args(root, "out", "--max_tries", "20", "--is_normalized", classes=2, inst=2,
                         inst_val=1)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "none of the 4 train patients tried" in err and "--lung_threshold" in err
    assert not (root / "out" / "train_data1_vwGen_ex_ref_fold1.0.npy").exists()
    assert not list((root / "out").glob(".*tmp*"))


def test_reference_flag_names_and_defaults():
    """The published flags keep their names and defaults (--help: tests/test_cli_errors.py)."""
    d = pg.build_parser().parse_args([])
    assert (d.data_dir, d.output_dir, d.nb_classes, d.nb_instances, d.nb_instances_val) == \
        ("dataset/", "self_discovery/Semantic_Genesis_data", 200, 200, 30)
    assert (d.len_border, d.len_border_z, d.max_tries, d.minPatchSize, d.maxPatchSize) == \
        (100, 30, 200, 50, 80)
    assert d.train_features == "self_discovery/features/train_features.npy"


def test_too_close_is_the_published_strict_rule():
    earlier = np.array([[100, 100, 40], [300, 300, 90]])
    assert not too_close(earlier, (103, 104, 40), 5)   # exactly 5 away: far enough
    assert too_close(earlier, (102, 104, 40), 5)       # 4.47 away: rejected
    assert not too_close(earlier, (103, 103, 43), 5)   # 5.2 away
    assert too_close(earlier, (300, 300, 90), 5)       # the same coordinate
    assert not too_close(np.zeros((0, 3)), (0, 0, 0), 5)
    assert not too_close(earlier, (100, 100, 40), 0)   # threshold 0: nothing is too close


def test_class_instances_are_the_k_nearest_patients_in_feature_space(dataset, run3):
    """Per class: the reference first, then the train patients nearest to it (L2 on the stage-2
    features) up to --nb_instances; validation: the --nb_instances_val nearest val patients."""
    train_f = np.load(dataset / "features" / "train_features.npy").astype(np.float64)
    val_f = np.load(dataset / "features" / "validation_features.npy").astype(np.float64)
    rows = _rows(run3)
    for cls in sorted({r["class"] for r in rows}):
        mine = [r for r in rows if r["class"] == cls and r["resolution"] == "1"]
        ref = int(Path(mine[0]["reference"]).stem[1:])   # train/p007.npy -> 7
        train = [int(Path(r["file"]).stem[1:]) for r in mine if r["split"] == "train"]
        val = [int(Path(r["file"]).stem[1:]) for r in mine if r["split"] == "validation"]
        by_distance = np.argsort(np.linalg.norm(train_f - train_f[ref], axis=1), kind="stable")
        assert train == [ref] + [int(i) for i in by_distance if i != ref][:5]
        assert val == [int(i) for i in np.argsort(np.linalg.norm(val_f - train_f[ref], axis=1),
                                                  kind="stable")[:3]]
        assert len(set(train)) == 6 < len(train_f) and len(set(val)) == 3 < len(val_f)


def test_multi_resolution_crops_shift_within_the_range(dataset, run3):
    """Resolutions 2 and 3 crop around the resolution-1 corner of the same patient, shifted by
    dx, dy in [-MULTI_RES_SHIFT, MULTI_RES_SHIFT), side in [minPatchSize, maxPatchSize), same z,
    inside the volume; over many draws every shift and side occurs."""
    rows = _rows(run3)
    base = {(r["class"], r["file"]): r for r in rows
            if r["split"] == "train" and r["resolution"] == "1"}
    multi = [r for r in rows if r["resolution"] in ("2", "3")]
    assert len(multi) == 2 * len(base)
    for r in multi:
        b = base[(r["class"], r["file"])]
        dx, dy = int(r["x"]) - int(b["x"]), int(r["y"]) - int(b["y"])
        side = int(r["size_x"])
        assert -MULTI_RES_SHIFT <= min(dx, dy) and max(dx, dy) < MULTI_RES_SHIFT
        assert r["z"] == b["z"] and int(r["size_y"]) == side and 50 <= side < 80
        assert 0 <= int(r["x"]) and int(r["x"]) + side <= SHAPE[0]
    rng = np.random.default_rng(0)
    draws = np.array([multi_res_crop(rng, 100, 120, (400, 400, 40), 50, 80)
                      for _ in range(4000)])
    assert set(draws[:, 0] - 100) == set(draws[:, 1] - 120) == set(range(-10, 10))
    assert set(draws[:, 2]) == set(range(50, 80))
    # a volume too small for any draw: the smallest side, clamped into the volume
    assert multi_res_crop(rng, 30, 30, (60, 60, 40), 50, 80) == (10, 10, 50)


def _tile_count(img: np.ndarray, cube: np.ndarray, k: int = 2) -> int:
    """How often the middle z-slice of ``cube`` (X, Y, Z), x across and each voxel k x k
    pixels, appears in the 8-bit picture ``img`` (H, W)."""
    tile = np.kron(cube[:, :, cube.shape[2] // 2].T, np.ones((k, k), np.float32))
    tile = (np.clip(tile, 0, 1) * 255 + 0.5).astype(np.uint8)
    th, tw = tile.shape
    rows = np.lib.stride_tricks.sliding_window_view(img, tw, axis=1)   # (H, W - tw + 1, tw)
    ys, xs = np.nonzero((rows == tile[0]).all(axis=2))
    return sum(np.array_equal(img[y:y + th, x:x + tw], tile) for y, x in zip(ys, xs))


def test_montage_tiles_are_enlarged_voxel_by_voxel():
    cube = np.random.default_rng(0).random((32, 24, 8)).astype(np.float32)
    grid = labelled_grid([[cube, cube]], min_tile=pg.MONTAGE_TILE)
    assert pg.MONTAGE_TILE >= 128
    expected = np.kron(cube[:, :, 4].T, np.ones((6, 6), np.float32))  # x6: 24 voxels -> 144
    for top, left, h, w in grid.tiles[0]:
        assert (h, w) == (6 * 24, 6 * 32)   # y down, x across
        shown = grid.image[top:top + h, left:left + w]
        np.testing.assert_allclose(shown, expected, atol=0.5 / 255 + 1e-6)
