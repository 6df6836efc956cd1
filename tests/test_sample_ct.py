"""Stage 0 on two real chest CTs (the sample data of the pyradiomics 3.0.1 sdist).

The only tests of the suite that use the network: the files are fetched once with
``scripts/fetch_sample_ct.py`` into the cache (``$SEMANTIC_GENESIS_CACHE/sample_ct`` or
``~/.cache/semantic_genesis/sample_ct``); every test here is skipped, with the reason, when
the package index cannot be reached (a download that arrives but fails verification fails).
"""
from __future__ import annotations

import io
import json
import locale
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from runtime.intensity import normalize_hu
from preparation import sample_ct as fsc
from preparation import prepare as pd
from preparation.ct_io import read_ct
from preparation.sample_ct import (SAMPLE_FILES, DownloadError, FetchError, fetch_sample_ct,
                                     link_images, verify_sample_ct)
from self_discovery.lung_test import passes_lung_test

# Windows [x:x+64, y:y+64, z:z+35] found by looking at the scans (no resampling):
# inside the lung (about 90% of the window between -950 and -500 HU) and in the mediastinum
# (heart and great vessels, median about +30 HU).
LUNG = {"lung1_image": (112, 352, 0), "lung2_image": (112, 288, 16)}
MEDIASTINUM = {"lung1_image": (260, 260, 0), "lung2_image": (224, 224, 4)}


@pytest.fixture(scope="module")
def sample_dir() -> Path:
    try:
        return fetch_sample_ct(timeout=300, quiet=True)
    except DownloadError as e:  # a corrupt or changed download fails instead
        pytest.skip(f"sample CTs not available (package index unreachable?): {e}")


@pytest.fixture(scope="module")
def prepared(sample_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample_ct")
    link_images(sample_dir, root / "in")
    rc = pd.main(["--input_dir", str(root / "in"), "--output_dir", str(root / "out"),
                  "--val_fraction", "0"])
    assert rc == 0
    return root / "out"


def test_cache_is_verified_and_idempotent(sample_dir):
    assert verify_sample_ct(sample_dir) == []
    assert fetch_sample_ct(sample_dir, quiet=True) == sample_dir   # no download the second time


def test_orientation_known_voxels(sample_dir, prepared):
    img = sitk.ReadImage(str(sample_dir / "lung1_image.nrrd"))
    vol = np.load(prepared / "train" / "lung1_image.npy", mmap_mode="r")
    assert vol.shape == img.GetSize() == (512, 512, 48)
    for idx in [(0, 0, 0), (300, 100, 7), (112, 352, 20), (256, 400, 30), (511, 3, 47)]:
        expected = normalize_hu(np.float32(img.GetPixel(idx)))
        assert vol[idx] == pytest.approx(float(expected), abs=1e-6), idx
    # LPS: the spine is posterior (high y), z runs up the body
    bone = np.argwhere(np.asarray(vol[:, :, 24]) > 0.85)
    assert bone[:, 1].mean() > 300


def test_air_zero_bone_one_and_manifest(sample_dir, prepared):
    for name, shape, sp in (("lung1_image", (512, 512, 48), (0.5703125, 0.5703125, 5.0)),
                            ("lung2_image", (512, 512, 61), (0.6269531, 0.6269531, 5.0))):
        vol = np.load(prepared / "train" / f"{name}.npy")
        assert vol.dtype == np.float32 and vol.shape == shape
        assert vol.min() >= 0.0 and vol.max() <= 1.0
        assert vol[:20, :20].mean() < 0.01                     # air outside the body
        hu, _, _ = read_ct(sample_dir / f"{name}.nrrd")
        assert np.all(vol[hu >= 1000] == 1.0) and np.count_nonzero(hu >= 1000) > 100  # bone
        assert np.median(vol[hu > 400]) > 0.7
    man = json.loads((prepared / "manifest.json").read_text())
    recs = {r["patient"]: r for r in man["volumes"]}
    np.testing.assert_allclose(recs["lung1_image"]["original_spacing"], (0.5703125, 0.5703125, 5.0))
    np.testing.assert_allclose(recs["lung2_image"]["original_spacing"], (0.6269531, 0.6269531, 5.0),
                               rtol=1e-6)
    assert recs["lung1_image"]["source_hu_min"] == -1024 and recs["lung1_image"]["source_hu_max"] == 3071


def test_lung_test_passes_in_lung_and_fails_in_mediastinum(prepared):
    for name in LUNG:
        vol = np.load(prepared / "train" / f"{name}.npy", mmap_mode="r")
        x, y, z = LUNG[name]
        assert passes_lung_test(vol[x:x + 64, y:y + 64, z:z + 35], deps=32, max_fraction=0.15), name
        x, y, z = MEDIASTINUM[name]
        assert not passes_lung_test(vol[x:x + 64, y:y + 64, z:z + 35], deps=32,
                                    max_fraction=0.15), name


def test_resampling_real_ct_keeps_extent(sample_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "lung1_image.nrrd").symlink_to(sample_dir / "lung1_image.nrrd")
    rc = pd.main(["--input_dir", str(src), "--output_dir", str(tmp_path / "out"),
                  "--val_fraction", "0", "--spacing", "1.0", "1.0", "2.5"])
    assert rc == 0
    vol = np.load(tmp_path / "out" / "train" / "lung1_image.npy", mmap_mode="r")
    assert vol.shape == (292, 292, 96)                          # 512*0.5703 = 292 mm, 48*5 = 240
    rec = json.loads((tmp_path / "out" / "manifest.json").read_text())["volumes"][0]
    assert rec["output_spacing"] == [1.0, 1.0, 2.5]
    assert vol[:10, :10].mean() < 0.01 and 0.9 < float(np.max(vol)) <= 1.0


def test_nodule_masks_align_with_images(sample_dir):
    for n in (1, 2):
        hu, sp, _ = read_ct(sample_dir / f"lung{n}_image.nrrd")
        lab, sp2, _ = read_ct(sample_dir / f"lung{n}_label.nrrd")
        assert lab.shape == hu.shape and sp == pytest.approx(sp2)
        assert 50 < np.count_nonzero(lab) and np.median(hu[lab > 0]) > -400   # a solid nodule


def test_fetch_rejects_bad_tarballs_without_network(tmp_path):
    """Offline checks of the extraction and verification (no download)."""
    def tarball(path: Path, names) -> Path:
        with tarfile.open(path, "w:gz") as tar:
            for name in names:
                data = b"not the real file"
                info = tarfile.TarInfo(f"pyradiomics-3.0.1/data/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            evil = tarfile.TarInfo("../../escape.txt")
            evil.size = 1
            tar.addfile(evil, io.BytesIO(b"x"))
        return path

    with pytest.raises(FetchError, match="holds 1 of the 4"):
        fetch_sample_ct(tmp_path / "c1", tarball=tarball(tmp_path / "a.tar.gz", ["lung1_image.nrrd"]),
                        quiet=True)
    with pytest.raises(FetchError, match="verification failed"):
        fetch_sample_ct(tmp_path / "c2", tarball=tarball(tmp_path / "b.tar.gz", list(SAMPLE_FILES)),
                        quiet=True)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
    with pytest.raises(FetchError, match="cannot extract"):
        (tmp_path / "junk.tar.gz").write_bytes(b"junk")
        fetch_sample_ct(tmp_path / "c3", tarball=tmp_path / "junk.tar.gz", quiet=True)


@pytest.fixture()
def ascii_locale():
    """The process locale as SimpleITK's DICOM writer leaves it (ANSI_X3.4-1968)."""
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    yield
    locale.setlocale(locale.LC_CTYPE, old)


def test_pip_output_is_decoded_as_utf8_whatever_the_locale(tmp_path, monkeypatch, ascii_locale,
                                                           capsys):
    """pip's UTF-8 output (and bytes that are not UTF-8) end in the script's one-line error."""
    fake = tmp_path / "fake_python"
    fake.write_text("#!/bin/sh\nprintf 'ERROR: r\\303\\251seau \\342\\206\\222 \\377 down\\n' >&2\n"
                    "exit 1\n", encoding="utf-8")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(DownloadError, match="failed \\(rc 1\\): ERROR: r\u00e9seau \u2192 \ufffd down"):
        fetch_sample_ct(tmp_path / "cache", quiet=True, timeout=30)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no_such_python"))
    assert fsc.main(["--cache_dir", str(tmp_path / "cache2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot run pip download")
