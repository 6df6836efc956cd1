"""Stage 0 (preparation.prepare, preparation.ct_io) and the phantoms (preparation.phantoms).

Phantom-based, tiny volumes: every format round trip with an orientation check, resampling
keeps the physical extent, bad files are skipped with a message (damaged files, complex
voxels, DICOM series with a missing or duplicated slice, CT without its rescale intercept),
every check holds for the volume as written, re-runs skip finished work. Re-runs and identity:
tests/test_prepare_reruns.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from runtime.intensity import normalize_hu
from preparation import prepare as pd
from preparation.ct_io import CTReadError, find_ct_inputs, read_ct, resample, resampled_shape
from preparation.phantoms import (_write_dicom_series, make_chest_phantom, make_nodule_cubes,
                              phantom_lung_mask, write_phantom_dataset, write_volume)

SHAPE = (40, 36, 12)
SPACING = (0.8, 0.9, 2.5)


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = pd.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ------------------------------------------------------------------------------- phantoms
def test_phantom_is_deterministic_anatomical_and_seeded():
    hu, mask = make_chest_phantom((64, 64, 24), seed=3, nodules=2)
    hu2, mask2 = make_chest_phantom((64, 64, 24), seed=3, nodules=2)
    assert hu.dtype == np.float32 and mask.dtype == np.uint8 and hu.shape == (64, 64, 24)
    assert hu.tobytes() == hu2.tobytes() and mask.tobytes() == mask2.tobytes()
    assert not np.array_equal(hu, make_chest_phantom((64, 64, 24), seed=4, nodules=2)[0])
    # air in the corners, lung, soft tissue and bone all present
    assert np.all(hu[:2, :2] < -900)
    assert 0.1 < np.mean(hu < -700) < 0.8
    assert np.mean((hu > -150) & (hu < 150)) > 0.1
    assert np.mean(hu > 500) > 0.002
    # nodules: solid, inside the chest, masked
    assert mask.sum() > 0 and np.median(hu[mask > 0]) > -100
    # LPS layout: spine (bone) posterior = high y; two lungs at low and high x
    bone = np.argwhere(hu[:, :, 12] > 500)
    assert bone[:, 1].mean() > 32
    lung = phantom_lung_mask((64, 64, 24), seed=3)
    xs = np.argwhere(lung[:, :, 14])[:, 0]
    assert (xs < 24).any() and (xs > 40).any()


def test_nodule_cubes_are_balanced_in_range_and_brighter_at_the_centre():
    cubes, labels = make_nodule_cubes(6, size=(16, 16, 8), seed=1)
    assert cubes.shape == (6, 16, 16, 8) and cubes.dtype == np.float32
    assert labels.tolist().count(1) == 3 and 0.0 <= cubes.min() and cubes.max() <= 1.0
    centre = cubes[:, 6:10, 6:10, 3:5].mean(axis=(1, 2, 3))
    assert centre[labels == 1].min() > centre[labels == 0].mean()


# ------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("fmt", ["nrrd", "nii.gz", "mhd", "dicom"])
def test_format_round_trip_and_orientation(tmp_path, capsys, fmt):
    src = tmp_path / "in"
    write_phantom_dataset(src, 1, SHAPE, seed=5, fmt=fmt, spacing=SPACING)
    rc, log = _run(capsys, "--input_dir", str(src), "--output_dir", str(tmp_path / "out"),
                   "--val_fraction", "0")
    assert rc == 0, log
    vol = np.load(tmp_path / "out" / "train" / "phantom_000.npy")
    hu, _ = make_chest_phantom(SHAPE, seed=5, spacing=SPACING)
    assert vol.dtype == np.float32 and vol.shape == SHAPE
    np.testing.assert_allclose(vol, normalize_hu(np.round(hu)), atol=1e-6)
    rec = _manifest(tmp_path / "out")["volumes"][0]
    np.testing.assert_allclose(rec["original_spacing"], SPACING, rtol=1e-5)
    assert rec["original_shape"] == list(SHAPE) and rec["output_shape"] == list(SHAPE)
    assert rec["format"] == fmt and rec["split"] == "train"
    assert "phantom_000" in (tmp_path / "out" / "manifest.csv").read_text()


def test_known_voxel_lands_at_its_sitk_index(tmp_path):
    """SimpleITK index (i, j, k) = (x, y, z) must become array[i, j, k] after reading."""
    arr = np.full((12, 10, 8), -1000, np.int16)           # SimpleITK order (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 3.0))
    img.SetPixel((7, 2, 5), 1000)                           # x=7, y=2, z=5
    sitk.WriteImage(img, str(tmp_path / "m.nrrd"))
    hu, spacing, meta = read_ct(tmp_path / "m.nrrd")
    assert hu.shape == (8, 10, 12) and spacing == pytest.approx((0.7, 0.8, 3.0))
    assert hu[7, 2, 5] == 1000 and np.count_nonzero(hu > 0) == 1
    # a RAS-stored (NIfTI-style) file is turned to LPS: the marker moves to the flipped index
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(tmp_path / "ras.nrrd"))
    hu2, _, meta2 = read_ct(tmp_path / "ras.nrrd")
    assert meta2["original_orientation"] == "RAS" and hu2[8 - 1 - 7, 10 - 1 - 2, 5] == 1000
    hu3, _, _ = read_ct(tmp_path / "ras.nrrd", reorient=False)
    assert hu3[7, 2, 5] == 1000


def test_resample_keeps_physical_extent_and_pads_with_air():
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32).reshape(20, 1, 1) * 10 - 500,
                           (20, 6, 9)).copy()
    out = resample(ramp, (1.0, 1.0, 2.5), (0.5, 1.5, 1.0))
    assert out.shape == resampled_shape((20, 6, 9), (1.0, 1.0, 2.5), (0.5, 1.5, 1.0)) == (40, 4, 22)
    for n, s, m, t in zip(ramp.shape, (1.0, 1.0, 2.5), out.shape, (0.5, 1.5, 1.0)):
        assert abs(n * s - m * t) <= t / 2 + 1e-9                # extent kept within half a voxel
    # linear along x: interior output voxel centres at (j + 0.5) * 0.5 - 0.5 input index
    j = np.arange(2, 38)
    np.testing.assert_allclose(out[j, 0, 5], ((j + 0.5) * 0.5 - 0.5) * 10 - 500, atol=1e-3)
    # y: 6 voxels of 1 mm -> 4 of 1.5 mm, same extent, no padding needed; z rounds up: 22.5 -> 22
    assert out.min() >= -1024.0
    # a body touching the ends of the scan keeps its tissue there: no fake air slices at the
    # edges whichever way the size rounds (8.33 -> 8, 3.75 -> 4, 3.5 -> 4)
    for n, t in ((5, 0.6), (3, 0.8), (7, 2.0)):
        tissue = np.full((4, 4, n), 40.0, np.float32)
        out = resample(tissue, (1, 1, 1), (1, 1, t))
        assert out.shape[2] == int(round(n / t)) and np.all(out == 40.0)


def test_prepare_with_spacing_writes_manifest(tmp_path, capsys):
    src = tmp_path / "in"
    write_phantom_dataset(src, 1, (48, 48, 16), seed=2, fmt="mhd", spacing=(0.7, 0.7, 2.5))
    rc, log = _run(capsys, "--input_dir", str(src), "--output_dir", str(tmp_path / "out"),
                   "--spacing", "1.4", "1.4", "1.25", "--val_fraction", "0")
    assert rc == 0, log
    vol = np.load(tmp_path / "out" / "train" / "phantom_000.npy")
    assert vol.shape == (24, 24, 32)
    assert 0.0 <= vol.min() and vol.max() <= 1.0
    rec = _manifest(tmp_path / "out")["volumes"][0]
    assert rec["output_spacing"] == [1.4, 1.4, 1.25] and rec["output_shape"] == [24, 24, 32]
    extent_in = np.array(rec["original_shape"]) * np.array(rec["original_spacing"])
    extent_out = np.array(rec["output_shape"]) * np.array(rec["output_spacing"])
    np.testing.assert_allclose(extent_in, extent_out, atol=0.7)


# ------------------------------------------------------------------------------- bad input
def test_bad_files_are_skipped_with_a_message(tmp_path, capsys):
    src = tmp_path / "in"
    write_phantom_dataset(src, 1, SHAPE, seed=1, fmt="nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 30), np.int16) - 1000), str(src / "flat2d.nrrd"))
    write_volume(src / "oneslice.nii.gz", np.full((30, 30, 1), -1000, np.int16))
    write_volume(src / "empty.nrrd", np.zeros((20, 20, 12), np.int16))
    write_volume(src / "mask.nrrd", (np.arange(20 * 20 * 12).reshape(20, 20, 12) % 2).astype(np.uint8))
    (src / "broken.nii.gz").write_bytes(b"not an image at all")
    (src / "notes.txt").write_text("ignored silently")
    rc, log = _run(capsys, "--input_dir", str(src), "--output_dir", str(tmp_path / "out"))
    assert rc == 0, log
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.npy")) == ["phantom_000.npy"]
    for name in ("flat2d.nrrd", "oneslice.nii.gz", "empty.nrrd", "mask.nrrd", "broken.nii.gz"):
        assert "skipped: " in log and name in log, name
    assert "notes.txt" not in log
    assert "5 skipped" in log
    skipped = _manifest(tmp_path / "out")["skipped"]
    assert len(skipped) == 5 and all(s["reason"] for s in skipped)

    # only bad files: nothing written, exit status 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.mhd").write_text("ObjectType = Image\nNDims = 3\n")
    rc, log = _run(capsys, "--input_dir", str(bad), "--output_dir", str(tmp_path / "out2"))
    assert rc == 2 and "no volume was written" in log
    rc, log = _run(capsys, "--input_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o3"))
    assert rc == 2 and "error:" in log and "missing" in log


# ------------------------------------------------------------------------------- re-runs, splits
def test_rerun_skips_done_and_split_is_stable(tmp_path, capsys):
    src = tmp_path / "in"
    write_phantom_dataset(src, 6, (24, 24, 10), seed=0, fmt="nrrd")
    out = tmp_path / "out"
    args = ["--input_dir", str(src), "--output_dir", str(out), "--val_fraction", "0.34", "--seed", "3"]
    rc, log = _run(capsys, *args)
    assert rc == 0 and "6 written" in log
    val = sorted(p.name for p in (out / "validation").glob("*.npy"))
    train = sorted(p.name for p in (out / "train").glob("*.npy"))
    assert len(val) == 2 and len(train) == 4
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    # one more patient arrives: only it is written, the others keep their files and splits
    write_phantom_dataset(src, 1, (24, 24, 10), seed=50, fmt="nrrd", prefix="late")
    rc, log = _run(capsys, *args)
    assert rc == 0 and "1 written, 6 already done" in log
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    assert set(val) <= {p.name for p in (out / "validation").glob("*.npy")}
    man = _manifest(out)
    assert len(man["volumes"]) == 7 and {v["patient"] for v in man["volumes"]} >= {"late_000"}
    # an unreadable manifest: the volumes can no longer be matched to sources, so they are kept
    # and the run stops with one line; --overwrite prepares the dataset again, same splits
    (out / "manifest.json").write_text("{not json")
    rc, log = _run(capsys, *args)
    assert rc == 2 and "manifest.json: unreadable" in log and "--overwrite" in log
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    rc, log = _run(capsys, *args, "--overwrite")
    assert rc == 0 and "7 written" in log and len(list(out.rglob("*.npy"))) == 7
    assert len(_manifest(out)["volumes"]) == 7
    # ... the dataset a first run over the same 7 sources makes, wherever it is written
    fresh = tmp_path / "fresh"
    assert _run(capsys, *args[:2], "--output_dir", str(fresh), *args[4:])[0] == 0
    layout = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*.npy")}  # noqa: E731
    assert layout(out) == layout(fresh)


def test_npy_inputs_and_dicom_series_discovery(tmp_path, capsys):
    src = tmp_path / "in"
    write_phantom_dataset(src / "npy", 2, (24, 24, 10), seed=0, fmt="npy")
    write_phantom_dataset(src / "dcm" / "patientA", 1, (24, 24, 10), seed=9, fmt="dicom")
    items = find_ct_inputs(src)
    assert [i["kind"] for i in items] == ["dicom", "file", "file"]
    rc, log = _run(capsys, "--input_dir", str(src), "--output_dir", str(tmp_path / "out"),
                   "--val_fraction", "0")
    assert rc == 0, log
    names = sorted(p.name for p in (tmp_path / "out" / "train").glob("*.npy"))
    assert names == ["dcm_patientA_phantom_000.npy", "phantom_000.npy", "phantom_001.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "train" / "phantom_000.npy"),
                                  np.load(src / "npy" / "phantom_000.npy"))


# ------------------------------------------------------------------------------- identity
def test_same_file_name_in_two_folders_are_two_patients(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    for sub, seed in (("a", 0), ("b", 1)):
        write_phantom_dataset(src / sub, 1, (24, 24, 10), seed=seed, fmt="nrrd")
    args = ["--input_dir", str(src), "--output_dir", str(out), "--val_fraction", "0"]
    rc, log = _run(capsys, *args)
    assert rc == 0 and "2 written" in log, log
    names = sorted(p.name for p in (out / "train").glob("*.npy"))
    assert len(names) == 2 and all(n.startswith("phantom_000_") for n in names)
    rc, log = _run(capsys, *args)
    assert rc == 0 and "0 written, 2 already done" in log
    write_phantom_dataset(src / "c", 1, (24, 24, 10), seed=2, fmt="nrrd")   # a third phantom_000
    rc, log = _run(capsys, *args)
    assert rc == 0 and "1 written, 2 already done" in log
    recs = _manifest(out)["volumes"]
    assert len(recs) == 3 == len({r["source_key"] for r in recs}) == len(list(out.rglob("*.npy")))
    assert all(r["output_shape"] == [24, 24, 10] for r in recs)


def test_output_inside_input_is_refused(tmp_path, capsys):
    write_phantom_dataset(tmp_path / "in", 1, (24, 24, 10), seed=0, fmt="nrrd")
    rc, log = _run(capsys, "--input_dir", str(tmp_path / "in"),
                   "--output_dir", str(tmp_path / "in" / "dataset"))
    assert rc == 2 and log.count("error:") == 1 and "overlap" in log and "Traceback" not in log
    assert not (tmp_path / "in" / "dataset").exists()


def test_odd_arrays_and_pipes_are_skipped_not_fatal(tmp_path, capsys):
    src = tmp_path / "in"
    write_phantom_dataset(src, 1, (24, 24, 10), seed=0, fmt="nrrd")
    np.save(src / "complex.npy", np.ones((24, 24, 10), np.complex64))
    np.save(src / "tiny.npy", np.linspace(0, 1, 24 * 24 * 2, dtype=np.float32).reshape(24, 24, 2))
    nan = np.linspace(-1000, 1000, 24 * 24 * 10, dtype=np.float32).reshape(24, 24, 10)
    nan[1::2] = np.nan
    np.save(src / "nan.npy", nan)
    np.save(src / "text.npy", np.array([["a"] * 10] * 24))
    os.mkfifo(src / "pipe.nrrd")
    rc, log = _run(capsys, "--input_dir", str(src), "--output_dir", str(tmp_path / "out"),
                   "--no_hu_check", "--val_fraction", "0")
    assert rc == 0 and "1 written" in log and "Traceback" not in log, log
    for name in ("complex.npy", "tiny.npy", "nan.npy", "text.npy"):
        assert f"skipped: {src / name}" in log, name
    assert "pipe.nrrd: not a regular file" in log


def test_dicom_series_uid_shared_by_two_patients_is_not_merged(tmp_path, capsys):
    folder = tmp_path / "in" / "series"
    folder.mkdir(parents=True)
    for patient, seed in (("alice", 0), ("bob", 1)):
        hu, _ = make_chest_phantom((24, 24, 6), seed=seed)
        one = _write_dicom_series(hu, (1.0, 1.0, 2.0), tmp_path / patient, patient, uid_seed=5)
        for f in one.iterdir():
            f.rename(folder / f"{patient}_{f.name}")
    items = find_ct_inputs(tmp_path / "in")
    assert len(items) == 2 and all(len(i["files"]) == 6 for i in items)
    assert {i["files"][0].split("/")[-1].split("_")[0] for i in items} == {"alice", "bob"}
    rc, log = _run(capsys, "--input_dir", str(tmp_path / "in"),
                   "--output_dir", str(tmp_path / "out"), "--val_fraction", "0", "--min_size", "4")
    assert rc == 0 and "2 written" in log, log
    vols = [np.load(p) for p in sorted((tmp_path / "out" / "train").glob("*.npy"))]
    assert [v.shape for v in vols] == [(24, 24, 6)] * 2


# ------------------------------------------------------------------------------- damaged files
def _cut(path: Path, keep: float = 0.75) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, data, damage", [
    ("v.nii", "v.nii", _cut), ("v.nii.gz", "v.nii.gz", _cut), ("v.nii.gz", "v.nii.gz", _flip),
    ("v.hdr", "v.img", _cut), ("v.gipl", "v.gipl", _cut), ("v.gipl.gz", "v.gipl.gz", _cut),
    ("v.vtk", "v.vtk", _cut), ("v.mha", "v.mha", _flip), ("v.mhd", "v.zraw", _flip),
    ("v.mhd", "v.zraw", _cut), ("v.nrrd", "v.nrrd", _cut)])
def test_truncated_or_corrupted_files_are_refused_not_read_with_zeros(tmp_path, name, data, damage):
    """ITK reads a short NIfTI/Analyze/GIPL/VTK file with zeros for the missing part and does
    not check a MetaImage's zlib checksum: the reader checks the stored data itself."""
    hu, _ = make_chest_phantom(SHAPE, seed=1)
    img = sitk.GetImageFromArray(np.round(hu).astype(np.int16).transpose(2, 1, 0).copy())
    sitk.WriteImage(img, str(tmp_path / name), useCompression=name.endswith(("mha", "mhd")))
    assert read_ct(tmp_path / name)[0].shape == SHAPE                 # intact: read
    damage(tmp_path / data)
    with pytest.raises(CTReadError, match=r"truncated|corrupted|cannot read") as e:
        read_ct(tmp_path / name)
    assert "\n" not in str(e.value) and (data in str(e.value) or name in str(e.value))


def test_damaged_and_complex_files_beside_good_ones_are_skipped_with_one_line(tmp_path, capsys):
    src = tmp_path / "in"
    write_phantom_dataset(src, 2, SHAPE, seed=3, fmt="nii.gz")
    write_volume(src / "cut.nii.gz", np.round(make_chest_phantom(SHAPE, seed=9)[0]).astype(np.int16))
    _cut(src / "cut.nii.gz")
    write_volume(src / "cut.nii", np.round(make_chest_phantom(SHAPE, seed=8)[0]).astype(np.int16))
    _cut(src / "cut.nii", 0.9)
    cplx = sitk.GetImageFromArray(np.full(SHAPE[::-1], -1000 + 5j, np.complex64))
    sitk.WriteImage(cplx, str(src / "complex.nii.gz"))
    rc, log = _run(capsys, "--input_dir", str(src), "--output_dir", str(tmp_path / "out"),
                   "--val_fraction", "0")
    assert rc == 0 and "2 written" in log and "3 skipped" in log and "Traceback" not in log, log
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == \
        ["phantom_000.npy", "phantom_001.npy"]
    lines = [ln for ln in log.splitlines() if ln.startswith("skipped: ")]
    assert any("cut.nii.gz" in ln and "gzip" in ln for ln in lines)
    assert any("cut.nii:" in ln and "truncated" in ln for ln in lines)
    assert any("complex.nii.gz" in ln and "complex" in ln for ln in lines)


def test_finetuning_reads_through_the_same_check(tmp_path):
    from finetune.segmentation import load_cases
    from runtime.errors import InputError

    hu, mask = make_chest_phantom(SHAPE, seed=2, nodules=1)
    write_volume(tmp_path / "img" / "c1.nii.gz", np.round(hu).astype(np.int16))
    write_volume(tmp_path / "msk" / "c1.nii.gz", mask)
    _cut(tmp_path / "img" / "c1.nii.gz")
    with pytest.raises(InputError, match="c1.nii.gz: truncated or corrupted gzip"):
        load_cases([str(tmp_path / "img")], [str(tmp_path / "msk")])


# ------------------------------------------------------------------------------- DICOM slices
def _series(tmp_path: Path, name: str = "s", n: int = 10) -> Path:
    hu, _ = make_chest_phantom((24, 24, n), seed=4)
    return _write_dicom_series(hu, (1.0, 1.0, 2.0), tmp_path / "in" / name, name, uid_seed=7)


def test_dicom_series_with_a_missing_or_duplicated_slice_is_refused(tmp_path, capsys):
    folder = _series(tmp_path)
    read_ct(folder)                                       # complete: read
    (folder / "slice_0004.dcm").unlink()                  # a missing slice
    with pytest.raises(CTReadError, match="uneven slice positions: 4.000 mm between "
                                          "slice_0003.dcm and slice_0005.dcm"):
        read_ct(folder)
    folder = _series(tmp_path, "d")
    (folder / "copy_of_5.dcm").write_bytes((folder / "slice_0005.dcm").read_bytes())
    with pytest.raises(CTReadError, match="lie at the same position"):
        read_ct(folder)
    rc, log = _run(capsys, "--input_dir", str(tmp_path / "in"), "--output_dir",
                   str(tmp_path / "out"), "--val_fraction", "0")
    assert rc == 2 and "no volume was written" in log and "Traceback" not in log
    assert "uneven slice positions" in log and "same position" in log


# ------------------------------------------------------------------------------- HU as written
def test_ct_without_its_rescale_intercept_gets_the_right_fix(tmp_path, capsys):
    hu, _ = make_chest_phantom(SHAPE, seed=6)
    stored = np.clip(np.round(hu) + 1024, 0, 4095).astype(np.uint16)      # air at ~24, not -1000
    write_volume(tmp_path / "raw" / "noslope.nrrd", stored)
    write_volume(tmp_path / "good" / "ok.nrrd", np.round(hu).astype(np.int16))
    out = tmp_path / "out"
    rc, log = _run(capsys, "--input_dir", str(tmp_path / "raw"), "--output_dir", str(out))
    assert rc == 2 and "noslope.nrrd" in log and "--hu_offset -1024" in log
    assert "--no_hu_check accepts" not in log
    rc, log = _run(capsys, "--input_dir", str(tmp_path / "raw"), "--output_dir", str(out),
                   "--hu_offset", "-1024", "--val_fraction", "0")
    assert rc == 0, log
    np.testing.assert_allclose(np.load(out / "train" / "noslope.npy"),
                               normalize_hu(stored.astype(np.float32) - 1024), atol=1e-6)
    assert _manifest(out)["volumes"][0]["hu_offset"] == -1024
    # a scan that has its rescale is refused under --hu_offset, then added without it
    rc, log = _run(capsys, "--input_dir", str(tmp_path / "good"), "--output_dir", str(out),
                   "--hu_offset", "-1024", "--val_fraction", "0")
    assert rc == 0 and "ok.nrrd: stored values down to" in log and "0 written" in log
    rc, log = _run(capsys, "--input_dir", str(tmp_path / "good"), "--output_dir", str(out),
                   "--val_fraction", "0")
    assert rc == 0 and "1 written" in log
    recs = {r["patient"]: r["hu_offset"] for r in _manifest(out)["volumes"]}
    assert recs == {"noslope": -1024, "ok": 0}


def test_checks_hold_for_the_volume_as_written(tmp_path, capsys):
    src = tmp_path / "in"
    write_volume(src / "thin.nrrd", np.round(make_chest_phantom((24, 24, 10), seed=1)[0]),
                 spacing=(1.0, 1.0, 1.0))                 # 10 slices of 1 mm: 2 of 5 mm
    write_volume(src / "dense.nrrd", np.linspace(1500, 3000, 24 * 24 * 40).reshape(24, 24, 40))
    rc, log = _run(capsys, "--input_dir", str(src), "--output_dir", str(tmp_path / "out"),
                   "--spacing", "1", "1", "5", "--no_hu_check")
    assert rc == 2 and "Traceback" not in log
    assert "thin.nrrd: shape (24, 24, 2) after --spacing has an axis shorter than --min_size" in log
    assert "dense.nrrd: constant as written after the HU window [-1000, 1000]" in log
