"""The target-task preparation (target_tasks/, scripts/prepare_target.py) on format-faithful
replicas (tests/replicas.py): cubes centred on their candidates through each scan's origin,
spacing and direction; masks on their images' grids; the published splits; identical outputs
for 1 and 2 workers; an interrupted run continued; bad inputs refused before anything is
written."""
from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from finetune.segmentation import find_volume_files, pair_volumes
from runtime.intensity import normalize_hu
from target_tasks import brats, common, lits, luna16, prepare
from tests.replicas import (NODULE_HU, make_brats_replica, make_lits_replica, make_luna16_replica,
                            make_ncs_replica)

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, argv: list, out: Path, *more: str) -> tuple[int, str]:
    rc = prepare.main([str(a) for a in argv] + ["--output_dir", str(out), *map(str, more)])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def _error(capsys, argv: list, out: Path, match: str, *more: str) -> str:
    rc, text = _run(capsys, argv, out, *more)
    assert rc == 2, text
    line = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and match in line[0], text
    return line[0]


def _interrupt_after(monkeypatch, module, calls: int) -> list:
    """Make ``module``'s work raise KeyboardInterrupt (Ctrl-C) at call number ``calls``."""
    done, real = [], module.HOOKS.work

    def work(item):
        if len(done) + 1 == calls:
            raise KeyboardInterrupt
        done.append(item["key"])
        return real(item)
    monkeypatch.setattr(module, "HOOKS", dataclasses.replace(module.HOOKS, work=work))
    return done


# ------------------------------------------------------------------------------------ NCC
@pytest.fixture(scope="module")
def luna(tmp_path_factory):
    root = tmp_path_factory.mktemp("ncc")
    facts = make_luna16_replica(root / "LUNA16")
    out = root / "prepared"
    assert prepare.main(facts["argv"] + ["--output_dir", str(out), "--quiet"]) == 0
    return facts, out


def test_ncc_every_positive_cube_has_its_nodule_at_the_centre(luna):
    facts, out = luna
    m = _manifest(out)
    assert m["complete"] and m["task"] == "ncc" and m["format_version"] == 1
    assert m["splits"] == facts["splits"]
    for split in common.SPLITS:
        cubes = np.load(out / f"{split}_cubes.npy")
        labels = np.load(out / f"{split}_labels.npy")
        rows = list(csv.DictReader(open(out / f"{split}_candidates.csv")))
        assert cubes.dtype == np.float16 and cubes.shape == (len(rows), 64, 64, 32)
        assert labels.dtype == np.int64 and 0 <= cubes.min() and cubes.max() <= 1
        assert len(rows) == m["counts"][split]["cubes"] == len(
            [c for c in facts["candidates"] if c["split"] == split])
        for cube, label, row in zip(cubes, labels, rows):
            want = facts["candidates"][int(row["candidate_row"])]
            assert row["seriesuid"] == want["seriesuid"] and int(row["class"]) == want["class"]
            assert [int(row[f"voxel_{a}"]) for a in "xyz"] == want["voxel"]
            assert [float(row[f"coord{a}"]) for a in "XYZ"] == pytest.approx(want["world"])
            assert label == want["class"]
            if label:
                nodule = np.abs(cube.astype(np.float32) - normalize_hu(NODULE_HU)) < 1e-3
                assert nodule[32, 32, 16]
                blobs, _ = ndimage.label(nodule)
                centroid = ndimage.center_of_mass(blobs == blobs[32, 32, 16])
                assert centroid == pytest.approx((32, 32, 16), abs=1e-6)


def test_ncc_world_to_voxel_uses_the_direction_and_pads_with_air(luna):
    facts, out = luna
    flipped = 0
    for uid, scan in facts["scans"].items():
        d = np.asarray(scan["direction"])
        for c in (c for c in facts["candidates"] if c["seriesuid"] == uid):
            naive = np.floor((np.asarray(c["world"]) - scan["origin"]) / scan["spacing"] + 0.5)
            flipped += not np.allclose(d, np.eye(3)) and list(naive) != c["voxel"]
    assert flipped > 10                              # ignoring the direction would be wrong
    rows = list(csv.DictReader(open(out / "train_candidates.csv")))
    cubes = np.load(out / "train_cubes.npy")
    padded = 0
    for cube, row in zip(cubes, rows):
        scan = facts["scans"][row["seriesuid"]]
        size = np.abs(np.asarray(scan["direction"])) @ np.asarray(scan["shape"])
        lo = np.array([int(row[f"voxel_{a}"]) for a in "xyz"]) - (32, 32, 16)
        grid = np.indices((64, 64, 32)).reshape(3, -1).T + lo
        outside = ~np.all((grid >= 0) & (grid < size), axis=1).reshape(64, 64, 32)
        assert np.all(cube[outside] == 0)            # air, -1000 HU
        padded += outside.any()
    assert padded == len(cubes)                      # the scans are smaller than a cube


def test_ncc_negatives_are_sampled_seeded_and_positives_kept():
    rows = np.arange(1000)
    cls = np.zeros(1000, np.int8)
    cls[::100] = 1
    a = luna16._sample_rows(rows, cls, 10.0, 0, "train")
    assert len(a) == 110 and cls[a].sum() == 10 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, luna16._sample_rows(rows, cls, 10.0, 0, "train"))
    assert not np.array_equal(a, luna16._sample_rows(rows, cls, 10.0, 1, "train"))
    assert not np.array_equal(a, luna16._sample_rows(rows, cls, 10.0, 0, "val"))
    assert len(luna16._sample_rows(rows, cls, "all", 0, "test")) == 1000
    assert len(luna16._sample_rows(rows, cls, 200.0, 0, "test")) == 1000


def test_ncc_workers_identical_ratio_and_dtype(luna, tmp_path, capsys):
    facts, out = luna
    rc, _ = _run(capsys, facts["argv"], tmp_path / "two", "--workers", "2")
    assert rc == 0 and _files(tmp_path / "two") == _files(out)
    rc, _ = _run(capsys, facts["argv"], tmp_path / "f32", "--dtype", "float32", "--neg_ratio",
                 "1", "--test_neg_ratio", "0.5")
    m = _manifest(tmp_path / "f32")
    assert rc == 0 and m["settings"]["neg_ratio"] == 1.0 and m["settings"]["dtype"] == "float32"
    assert [(m["counts"][s]["positives"], m["counts"][s]["negatives"]) for s in common.SPLITS] \
        == [(4, 4), (2, 2), (4, 2)]
    c32 = np.load(tmp_path / "f32" / "train_cubes.npy")
    rows = [int(r["candidate_row"]) for r in csv.DictReader(open(out / "train_candidates.csv"))]
    kept = [int(r["candidate_row"]) for r in csv.DictReader(open(tmp_path / "f32" / "train_candidates.csv"))]
    c16 = np.load(out / "train_cubes.npy")[[rows.index(k) for k in kept]]
    assert c32.dtype == np.float32 and np.abs(c32 - c16).max() < 1e-3


def test_ncc_interrupted_run_continues_to_the_same_files(luna, tmp_path, capsys, monkeypatch):
    facts, out = luna
    done = _interrupt_after(monkeypatch, luna16, 3)
    rc, text = _run(capsys, facts["argv"], tmp_path / "out")
    assert rc == 130 and "interrupted" in text and len(done) == 2
    m = _manifest(tmp_path / "out")
    assert not m["complete"] and m["finished_splits"] == ["train"]
    assert (tmp_path / "out" / "val_cubes.partial.npy").exists()
    monkeypatch.undo()
    done = _interrupt_after(monkeypatch, luna16, 99)
    rc, text = _run(capsys, facts["argv"], tmp_path / "out")
    assert rc == 0 and len(done) == 3 and "continuing" in text     # the 3 scans not yet done
    assert _files(tmp_path / "out") == _files(out)                 # no partial file left


def test_ncc_refusals_before_anything_is_written(luna, tmp_path, capsys):
    facts, out = luna
    import shutil
    data = tmp_path / "data"
    shutil.copytree(facts["data_dir"], data)
    argv = ["ncc", "--data_dir", data]
    raw = next((data / "subset7").glob("*.raw"))
    raw.write_bytes(raw.read_bytes()[:-100])
    _error(capsys, argv, tmp_path / "o1", "truncated download")
    raw.unlink()
    _error(capsys, argv, tmp_path / "o1", f"{raw}: missing")
    raw.with_suffix(".mhd").unlink()
    _error(capsys, argv, tmp_path / "o1", "1 scans named in the candidates file of the published "
                                         "protocol not found")
    assert not (tmp_path / "o1").exists()
    rc, _ = _run(capsys, argv, tmp_path / "o1", "--allow_missing")
    m = _manifest(tmp_path / "o1")
    assert rc == 0 and len(m["missing"]) == 1 and len(m["splits"]["test"]) == 1
    cand = data / "candidates_V2" / "candidates_V2.csv"
    cand.write_text(cand.read_text() + "1.2.3,1.0,x,3.0,0\n")
    _error(capsys, argv, tmp_path / "o2", f"{cand}:{len(facts['candidates']) + 2}: not a candidate")
    cand.unlink()
    _error(capsys, argv, tmp_path / "o2", "no candidates_V2.csv found")
    _error(capsys, ["ncc", "--data_dir", facts["data_dir"]], facts["data_dir"] / "out", "overlap")
    assert not (tmp_path / "o2").exists() and not (facts["data_dir"] / "out").exists()


def test_ncc_rerun_same_settings_is_a_no_op_other_settings_refused(luna, tmp_path, capsys):
    facts, out = luna
    import shutil
    shutil.copytree(out, tmp_path / "out")
    rc, text = _run(capsys, facts["argv"], tmp_path / "out", "--workers", "2")
    assert rc == 0 and "nothing to do" in text
    _error(capsys, facts["argv"], tmp_path / "out", "--neg_ratio 10.0 -> 5.0", "--neg_ratio", "5")
    ncs = make_ncs_replica(tmp_path / "ncs", sizes=(1, 1, 1))
    _error(capsys, ncs["argv"], tmp_path / "out", "--task ncc -> ncs")
    rc, _ = _run(capsys, facts["argv"], tmp_path / "out", "--neg_ratio", "1", "--overwrite")
    assert rc == 0 and _manifest(tmp_path / "out")["counts"]["train"]["cubes"] == 8


# ------------------------------------------------------------------------------------ LCS
@pytest.fixture(scope="module")
def lits_data(tmp_path_factory):
    return make_lits_replica(tmp_path_factory.mktemp("lcs") / "LiTS")


def _check_cases(out: Path, splits: dict) -> None:
    """Every split's images and masks pair by name, as the fine-tuning script pairs them."""
    for split in common.SPLITS:
        pairs = pair_volumes(find_volume_files([out / split / "images"], "--images"),
                             find_volume_files([out / split / "masks"], "--masks"))
        assert sorted(Path(i["path"]).stem for i, _ in pairs) == sorted(splits[split])
        for img_item, msk_item in pairs:
            img, msk = np.load(img_item["path"]), np.load(msk_item["path"])
            assert img.dtype == np.float32 and msk.dtype == np.uint8 and img.shape == msk.shape
            assert 0 <= img.min() and img.max() <= 1 and set(np.unique(msk)) <= {0, 1}


def test_lcs_masks_line_up_with_their_images_in_the_published_split(lits_data, tmp_path, capsys):
    rc, _ = _run(capsys, lits_data["argv"], tmp_path / "out", "--inplane_size", "0")
    m = _manifest(tmp_path / "out")
    assert rc == 0 and m["splits"] == lits_data["splits"] and "volume-130" in m["notes"][0]
    assert m["splits"]["train"] == ["volume-0", "volume-1", "volume-2"]
    _check_cases(tmp_path / "out", lits_data["splits"])
    liver_value = normalize_hu(60.0)
    for split, names in lits_data["splits"].items():
        for name in names:
            img = np.load(tmp_path / "out" / split / "images" / f"{name}.npy")
            msk = np.load(tmp_path / "out" / split / "masks" / f"{name}.npy")
            want = lits_data["labels"][name] > 0
            want = want[::-1] if int(name.split("-")[1]) % 2 else want     # x flipped on disk
            assert np.array_equal(msk, want.astype(np.uint8))
            assert np.allclose(img[msk == 1], liver_value, atol=1e-6)


def test_lcs_inplane_resize_workers_identical(lits_data, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(capsys, lits_data["argv"], one)[0] == 0
    assert _run(capsys, lits_data["argv"], two, "--workers", "2")[0] == 0
    assert _files(one) == _files(two)
    _check_cases(one, lits_data["splits"])
    img = np.load(one / "train" / "images" / "volume-0.npy")
    msk = np.load(one / "train" / "masks" / "volume-0.npy")
    assert img.shape == msk.shape == (24, 24, 12)
    assert abs(msk.mean() - (lits_data["labels"]["volume-0"] > 0).mean()) < 0.02
    interior = ndimage.binary_erosion(msk)
    assert np.allclose(img[interior], normalize_hu(60.0), atol=1e-5)


def test_lcs_interrupted_run_strays_and_refusals(lits_data, tmp_path, capsys, monkeypatch):
    argv, out = lits_data["argv"], tmp_path / "out"
    _interrupt_after(monkeypatch, lits, 3)
    assert _run(capsys, argv, out)[0] == 130
    monkeypatch.undo()
    (out / "train" / "images" / ".volume-2.npy.ab12cd34.tmp.npy").write_bytes(b"partial")
    stray = out / "train" / "images" / "volume-999.npy"
    np.save(stray, np.zeros((2, 2, 2), np.float32))
    rc, text = _run(capsys, argv, out)               # the rest is done, the stray refused
    assert rc == 2 and "2 of 7 volumes already done" in text
    assert f"{stray}: not written by this preparation" in text
    stray.unlink()
    assert _run(capsys, argv, out)[0] == 0
    assert not list(out.rglob(".*tmp*"))
    _check_cases(out, lits_data["splits"])
    _error(capsys, argv, out, "--inplane_size 24 -> 0", "--inplane_size", "0")
    _error(capsys, argv[:-3], tmp_path / "o2", "123 LiTS volumes of the published protocol not found")


def test_lcs_bad_inputs_name_the_file(tmp_path, capsys):
    facts = make_lits_replica(tmp_path / "LiTS", ids=(0, 1, 100, 115))
    batch = tmp_path / "LiTS" / "Training Batch 1"
    seg = batch / "segmentation-0.nii"
    seg.rename(batch / "kept.nii")
    _error(capsys, facts["argv"], tmp_path / "o", f"{batch / 'volume-0.nii'}: no segmentation-0.nii")
    (batch / "kept.nii").rename(seg)
    import SimpleITK as sitk
    img = sitk.ReadImage(str(seg))
    img.SetSpacing((1.5, 0.9, 2.0))
    sitk.WriteImage(img, str(seg))
    _error(capsys, facts["argv"], tmp_path / "o", f"{seg}: not on the voxel grid")
    labels = facts["labels"]["volume-0"].copy()
    labels[0, 0, 0] = 3
    img = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))
    ref = sitk.ReadImage(str(batch / "volume-0.nii"))
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(seg))
    _error(capsys, facts["argv"], tmp_path / "o", f"{seg}: label values [3.0]")
    assert not _manifest(tmp_path / "o")["complete"]


# ------------------------------------------------------------------------------------ BMS
def test_bms_published_split_of_the_authors_folds():
    folds = brats.read_folds(brats.FOLDS_CSV)
    assert len(folds) == 285 and [sum(f == k for _, f in folds) for k in (1, 2, 3)] == [95] * 3
    split = brats.published_split(folds)
    assert [len(split[s]) for s in common.SPLITS] == [167, 23, 95]
    common.check_disjoint(split)
    assert sorted(sum(split.values(), [])) == sorted(p for p, _ in folds)
    assert split["val"][:3] == ["Brats18_CBICA_AXW_1", "Brats18_TCIA02_605_1",
                                "Brats18_TCIA10_387_1"]
    assert split["test"][:2] == ["Brats18_CBICA_AZD_1", "Brats18_CBICA_AUN_1"]


def test_bms_cases_zscored_over_the_brain_masks_on_their_grid(tmp_path, capsys):
    facts = make_brats_replica(tmp_path / "BraTS")
    rc, _ = _run(capsys, facts["argv"], tmp_path / "out")
    m = _manifest(tmp_path / "out")
    assert rc == 0 and m["splits"] == facts["splits"] and len(m["missing"]) == 280
    _check_cases(tmp_path / "out", facts["splits"])
    for split, ids in facts["splits"].items():
        for pid in ids:
            img = np.load(tmp_path / "out" / split / "images" / f"{pid}.npy")
            msk = np.load(tmp_path / "out" / split / "masks" / f"{pid}.npy")
            flair = facts["flair"][pid][::-1, ::-1].astype(np.float64)     # diag(-1, -1, 1)
            brain = flair != 0
            z = (flair - flair[brain].mean()) / flair[brain].std()
            want = np.where(brain, np.clip(z, -5, 5) / 10 + 0.5, 0.0)
            assert np.allclose(img, want, atol=1e-6)
            assert np.array_equal(msk, (facts["labels"][pid][::-1, ::-1] > 0).astype(np.uint8))
            assert img[msk == 1].mean() > img[brain & (msk == 0)].mean() + 0.1


def test_bms_refusals(tmp_path, capsys):
    facts = make_brats_replica(tmp_path / "BraTS")
    _error(capsys, facts["argv"][:-1], tmp_path / "o", "280 BraTS patients of the published "
                                                       "protocol not found")
    pid = facts["splits"]["val"][0]
    folder = next((tmp_path / "BraTS").rglob(pid))
    (folder / f"{pid}_flair.nii.gz").unlink()
    _error(capsys, facts["argv"], tmp_path / "o", f"{folder}: {pid}_flair.nii.gz missing")
    folds = tmp_path / "folds.csv"
    folds.write_text("patient_id,fold\nA,1\nB,2\nA,3\n")
    _error(capsys, facts["argv"], tmp_path / "o", f"{folds}:4: A fold 3", "--folds", folds)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ NCS
@pytest.mark.parametrize("channel_axis", [1, 4, None])
def test_ncs_every_cube_becomes_one_case(tmp_path, capsys, channel_axis):
    facts = make_ncs_replica(tmp_path / "ncs", channel_axis=channel_axis)
    rc, _ = _run(capsys, facts["argv"], tmp_path / "out")
    m = _manifest(tmp_path / "out")
    assert rc == 0 and m["splits"] == facts["splits"] and m["counts"]["val"]["cases"] == 3
    _check_cases(tmp_path / "out", facts["splits"])
    for split, names in facts["splits"].items():
        for i, name in enumerate(names):
            assert np.array_equal(np.load(tmp_path / "out" / split / "images" / f"{name}.npy"),
                                  facts["images"][split][i])
            assert np.array_equal(np.load(tmp_path / "out" / split / "masks" / f"{name}.npy"),
                                  facts["masks"][split][i])
    assert set(m["files"]) == {p.relative_to(tmp_path / "out").as_posix()
                               for p in (tmp_path / "out").rglob("*.npy")}


def test_ncs_bad_arrays_are_refused(tmp_path, capsys):
    facts = make_ncs_replica(tmp_path / "ncs")
    root = tmp_path / "ncs"
    m = np.load(root / "m_valid_64x64x32.npy")
    m[1, 0, 5, 5, 5] = 2
    np.save(root / "m_valid_64x64x32.npy", m)
    _error(capsys, facts["argv"], tmp_path / "o", "mask values other than 0 and 1 (first in cube 1")
    np.save(root / "m_valid_64x64x32.npy", m[:2].clip(0, 1))
    _error(capsys, facts["argv"], tmp_path / "o", "2 masks for the 3 images")
    np.save(root / "m_valid_64x64x32.npy", m.clip(0, 1))
    np.save(root / "x_test_64x64x32.npy", np.zeros((3, 64, 64, 16), np.float32))
    _error(capsys, facts["argv"], tmp_path / "o", "x_test_64x64x32.npy: shape (3, 64, 64, 16)")
    np.save(root / "x_train_64x64x32.npy", np.full((6, 64, 64, 32), 300.0, np.float32))
    _error(capsys, facts["argv"], tmp_path / "o", "image values in [300, 300]")
    (root / "m_train_64x64x32.npy").unlink()
    _error(capsys, facts["argv"], tmp_path / "o", "m_train_64x64x32.npy not found")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ shared
def test_splits_must_be_disjoint():
    with pytest.raises(RuntimeError, match="both train and test"):
        common.check_disjoint({"train": ["a", "b"], "val": [], "test": ["b"]})


def test_every_task_has_help_and_the_script_runs(tmp_path):
    for task in prepare.TASKS:
        with pytest.raises(SystemExit) as e:
            prepare.build_parser().parse_args([task, "--help"])
        assert e.value.code == 0
    facts = make_ncs_replica(tmp_path / "ncs", sizes=(1, 1, 1))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_target.py"), *facts["argv"],
                        "--output_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0 and "prepare_target ncs: train 1 patients / 1 cases" in r.stdout
