"""Stage 0 re-runs (preparation.prepare, preparation.sources, preparation.manifest): a patient is
its content under a path relative to --input_dir, so moving the data changes nothing and one
scan is never in both splits; what the tool did not write is never replaced without
--overwrite; a dataset is never mixed from two settings; --workers changes no byte."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from preparation.phantoms import make_chest_phantom, write_phantom_dataset, write_volume
from tests.test_prepare_dataset import _manifest, _run

SHAPE = (24, 24, 10)


def _layout(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.npy"))}


def _args(src: Path, out: Path, *more: str) -> list[str]:
    return ["--input_dir", str(src), "--output_dir", str(out), "--val_fraction", "0.4", *more]


# ------------------------------------------------------------------------------- identity
def test_moved_renamed_or_copied_input_is_recognised_and_split_hashes_relative_paths(tmp_path,
                                                                                     capsys):
    src, out = tmp_path / "data" / "scans", tmp_path / "out"
    write_phantom_dataset(src / "a", 3, SHAPE, seed=0, fmt="nrrd")
    write_phantom_dataset(src / "b", 2, SHAPE, seed=10, fmt="nii.gz", prefix="case")
    assert _run(capsys, *_args(src, out))[0] == 0
    first = _layout(out)
    assert len(first) == 5 and any(k.startswith("validation/") for k in first)
    # moved and renamed: every patient is known, nothing is written again
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    src.rename(moved)
    rc, log = _run(capsys, *_args(moved, out))
    assert rc == 0 and "0 written, 5 already done" in log, log
    # copied (new modification times) and one file renamed: recognised by content
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy, copy_function=shutil.copy)
    (copy / "a" / "phantom_001.nrrd").rename(copy / "a" / "renamed_scan.nrrd")
    rc, log = _run(capsys, *_args(copy, out))
    assert rc == 0 and "0 written, 5 already done" in log, log
    assert _layout(out) == first
    # the same data under another checkout and output folder: the same names, splits, bytes
    other = tmp_path / "other_clone"
    assert _run(capsys, *_args(moved, other))[0] == 0
    assert _layout(other) == first
    recs = {r["patient"]: r for r in _manifest(out)["volumes"]}
    assert recs["phantom_000"]["source_key"] == "a/phantom_000.nrrd"
    assert recs["phantom_000"]["output"] == "train/phantom_000.npy" or \
        recs["phantom_000"]["output"] == "validation/phantom_000.npy"


def test_one_scan_under_two_names_is_one_patient_never_in_both_splits(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_phantom_dataset(src, 4, SHAPE, seed=0, fmt="nrrd")
    shutil.copy(src / "phantom_002.nrrd", src / "zz_copy.nrrd")           # same bytes
    hu, _ = make_chest_phantom(SHAPE, seed=3)                                # = phantom_003
    write_volume(src / "zz_003.nii.gz", np.round(hu).astype(np.int16))  # other format
    rc, log = _run(capsys, *_args(src, out, "--val_fraction", "0.5"))
    assert rc == 0 and "4 written" in log and "2 duplicate(s)" in log, log
    assert "zz_copy.nrrd is the same file content as" in log
    assert "zz_003.nii.gz holds the same voxels as patient" in log
    names = [p.stem for p in out.rglob("*.npy")]
    assert sorted(names) == ["phantom_000", "phantom_001", "phantom_002", "phantom_003"]
    recs = {r["patient"]: r for r in _manifest(out)["volumes"]}
    assert [d["source_key"] for d in recs["phantom_002"]["duplicates"]] == ["zz_copy.nrrd"]
    assert {d["same"] for r in recs.values() for d in r.get("duplicates", [])} == {"file", "voxels"}
    rc, log = _run(capsys, *_args(src, out, "--val_fraction", "0.5"))
    assert rc == 0 and "0 written, 4 already done" in log, log


# ------------------------------------------------------------------------------- not ours
def test_volumes_the_tool_did_not_write_are_kept_unless_overwrite(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_phantom_dataset(src, 2, SHAPE, seed=0, fmt="nrrd")
    (out / "train").mkdir(parents=True)
    np.save(out / "train" / "phantom_000.npy", np.zeros(SHAPE, np.float32))   # no manifest
    rc, log = _run(capsys, *_args(src, out))
    assert rc == 2 and log.count("error:") == 1 and "did not write" in log and "--overwrite" in log
    assert not np.load(out / "train" / "phantom_000.npy").any()               # kept
    assert not (out / "manifest.json").exists()
    rc, log = _run(capsys, *_args(src, out, "--overwrite"))
    assert rc == 0 and "2 written" in log and "removed the 1 volume(s)" in log
    assert len(_layout(out)) == 2 and all(np.load(out / k).any() for k in _layout(out))
    # a manifest, and beside its volumes one it does not name
    np.save(out / "validation" / "stranger.npy", np.zeros(SHAPE, np.float32))
    rc, log = _run(capsys, *_args(src, out))
    assert rc == 2 and "stranger.npy" in log and "not named in its manifest.json" in log


def test_mistyped_input_is_reported_before_the_output_is_looked_at(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_phantom_dataset(src, 2, SHAPE, seed=0, fmt="nrrd")
    assert _run(capsys, *_args(src, out))[0] == 0
    rc, log = _run(capsys, *_args(tmp_path / "inn", out, "--hu_min", "-500"))
    assert rc == 2 and "inn: --input_dir not found" in log and "settings" not in log


# ------------------------------------------------------------------------------- settings
def test_rerun_with_other_settings_is_refused_and_overwrite_applies_them_to_all(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_phantom_dataset(src, 2, SHAPE, seed=0, fmt="nrrd")
    assert _run(capsys, *_args(src, out))[0] == 0
    before = _layout(out)
    write_phantom_dataset(src, 1, SHAPE, seed=9, fmt="nrrd", prefix="late")
    rc, log = _run(capsys, *_args(src, out, "--hu_min", "-500", "--spacing", "1", "1", "2"))
    assert rc == 2 and log.count("error:") == 1, log
    assert "--hu_min -1000.0 -> -500.0" in log and "--spacing (none) -> 1.0 1.0 2.0" in log
    assert "--overwrite" in log and "another --output_dir" in log
    assert _layout(out) == before and len(_manifest(out)["volumes"]) == 2
    rc, log = _run(capsys, *_args(src, out, "--hu_min", "-500", "--overwrite"))
    assert rc == 0 and "3 written" in log
    man = _manifest(out)
    assert man["settings"]["hu_min"] == -500 and {r["hu_min"] for r in man["volumes"]} == {-500}
    assert man["complete"] is True and man["pending"] == []
    # flags that only decide which inputs are accepted may change: recorded per volume
    rc, log = _run(capsys, *_args(src, out, "--hu_min", "-500", "--no_hu_check"))
    assert rc == 0 and "0 written, 3 already done" in log


def test_manifest_of_an_earlier_version_is_read_and_upgraded(tmp_path, capsys):
    """Earlier manifests: no format, absolute source_key, no content hash, absolute output."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_phantom_dataset(src, 3, SHAPE, seed=0, fmt="nrrd")
    assert _run(capsys, *_args(src, out))[0] == 0
    man = _manifest(out)
    for r in man["volumes"]:
        r["source_key"] = str((src / Path(r["source"]).name).resolve())
        r["output"] = str(out / r["output"])
        for k in ("source_sha256", "voxel_sha256", "hu_offset", "hu_check", "duplicates"):
            r.pop(k, None)
    man.pop("format"), man.pop("pending")
    (out / "manifest.json").write_text(json.dumps(man))
    rc, log = _run(capsys, *_args(src, out))
    assert rc == 0 and "0 written, 3 already done" in log, log
    assert all(r.get("source_sha256") and r["source_key"].startswith("phantom_")
               for r in _manifest(out)["volumes"])
    # and it is recognised after a move too, by its relative key (and from now on by content)
    src.rename(tmp_path / "moved")
    rc, log = _run(capsys, *_args(tmp_path / "moved", out))
    assert rc == 0 and "0 written, 3 already done" in log, log


# ------------------------------------------------------------------------------- --workers
def test_workers_give_the_same_bytes_and_manifest(tmp_path, capsys):
    src = tmp_path / "in"
    write_phantom_dataset(src / "a", 3, SHAPE, seed=0, fmt="nrrd")
    write_phantom_dataset(src / "b", 2, SHAPE, seed=5, fmt="nii.gz")   # b/phantom_000: a name twice
    (src / "b" / "bad.nii.gz").write_bytes(b"not an image")
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        rc, log = _run(capsys, *_args(src, out, "--workers", str(n)))
        assert rc == 0 and "5 written" in log and "1 skipped" in log, log
        man = _manifest(out)
        man.pop("settings")                            # --output_dir and --workers differ
        runs[n] = (_layout(out), man, (out / "manifest.csv").read_text())
    assert runs[1] == runs[2]
    assert not [p for p in os.listdir(tmp_path / "out2") if p.startswith(".")]
