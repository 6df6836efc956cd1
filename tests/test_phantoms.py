"""The phantom patients (``preparation.phantoms``): a fixed seed gives fixed bytes.

The digests were taken from the phantom generator before it was split into named parts
(body, lungs, vessels, airway, skeleton, composition, nodules); every stored phantom, test
and quickstart depends on the same seed giving the same patient.
"""
from __future__ import annotations

import hashlib

import numpy as np

from preparation.phantoms import make_chest_phantom

HU_SHA256 = "5b42308521202b581fc51c1fbcc1323e0a5cb9844d7d6a4e4cfa02d7f95f7df8"
MASK_SHA256 = "90b5252c1650f24dd9fbf5ae8cb3cefb6740875cac238ca3b337a93d256fcdf8"


def test_fixed_seed_gives_the_recorded_phantom():
    hu, mask = make_chest_phantom((64, 64, 20), seed=3, nodules=2)
    assert hu.dtype == np.float32 and mask.dtype == np.uint8
    assert int(mask.sum()) == 1287
    assert hashlib.sha256(hu.tobytes()).hexdigest() == HU_SHA256
    assert hashlib.sha256(mask.tobytes()).hexdigest() == MASK_SHA256


def test_nodule_radius_flag(tmp_path, capsys):
    from preparation import phantoms

    args = ["--nodule_cubes", "4", "--cube_size", "16", "16", "8", "--seed", "3"]
    assert phantoms.main(["--output_dir", str(tmp_path / "a"), *args]) == 0
    assert phantoms.main(["--output_dir", str(tmp_path / "b"), *args, "--nodule_radius", "4", "5"]) == 0
    a, b = (np.load(tmp_path / d / "cubes.npy") for d in "ab")
    labels = np.load(tmp_path / "a" / "labels.npy")
    assert np.array_equal(labels, np.load(tmp_path / "b" / "labels.npy"))
    # default radius 2-2.5 voxels here; 4-5 voxels: more nodule (soft tissue) voxels
    assert (b[labels == 1] > 0.45).sum() > (a[labels == 1] > 0.45).sum() + 50
    capsys.readouterr()
    assert phantoms.main(["--output_dir", str(tmp_path / "c"), *args, "--nodule_radius", "5", "4"]) == 2
    assert "LOW must not exceed HIGH" in capsys.readouterr().err
