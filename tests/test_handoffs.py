"""Hand-offs between stages 1-4 check content, not names: features and the volumes they came
from, the autoencoder's input size, features made elsewhere, fold files of another run, an
extension that fails, published fold files in HU, ``.h5`` checkpoint names. Tiny inputs."""
from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.ynet3d import ClassificationNet3D
from pytorch import train as train_cli
from pytorch.data import load_pretraining_data
from runtime.errors import CheckpointError, InputError
from runtime.provenance import file_identity
from self_discovery import feature_extractor as fe
from self_discovery import pattern_generator_3D as pg
from self_discovery import train_autoencoder as ta
from tests.fold_fixtures import SHAPE, make_fold_files, make_volume_dataset, train_args
from tests.test_patterns import _args, make_dataset
from tests.test_cli_errors import one_error_line

SPLITS = ("train", "validation")


def autoencoder_checkpoint(path: Path, size=(32, 32, 16)) -> Path:
    """A width-4 autoencoder checkpoint recording the input size it was trained at, as
    train_autoencoder.py writes it."""
    torch.manual_seed(0)
    model = ta.build_autoencoder(width=4)
    cfg = {"input_rows": size[0], "input_cols": size[1], "input_deps": size[2], "lr_patience": 20}
    return save_checkpoint(path, model, arch="UNet3D", config=cfg,
                           model_config=ta.model_config(ta.build_parser().parse_args(
                               ["--data_dir", "x", "--width", "4"])))


def extract(data: Path, weights: Path, out: Path, *extra: str) -> int:
    return fe.main(["--data_dir", str(data), "--weights", str(weights), "--output_dir", str(out),
                    "--num_workers", "0", "--device", "cpu", "--verbose", "0", *extra])


# --- stage 2 -> 3 -----------------------------------------------------------------------------

def test_features_of_another_dataset_with_the_same_file_names_are_refused(tmp_path, capsys):
    a = make_dataset(tmp_path / "a", n_train=4, n_val=2, seed=0)
    b = make_dataset(tmp_path / "b", n_train=4, n_val=2, seed=1)   # same names, other patients
    shutil.rmtree(b / "features")
    shutil.copytree(a / "features", b / "features")
    rc = pg.main(_args(b, "out", classes=1, inst=2, inst_val=1))
    one_error_line(capsys, rc, "features_index.json", "p000.npy", "other content under the same name")
    assert not (b / "out").exists()                   # refused before the output folder is made
    assert pg.main(_args(a, "out", classes=1, inst=2, inst_val=1)) == 0


def test_the_feature_index_records_the_volumes_checkpoint_and_manifest(tmp_path, capsys):
    data = make_volume_dataset(tmp_path / "data", 3, 2, (32, 32, 16))
    (data / "manifest.json").write_text('{"complete": true}')
    weights = autoencoder_checkpoint(tmp_path / "ae.pt")
    assert extract(data, weights, tmp_path / "f", "--verbose", "1") == 0
    assert "--input_rows 32 (autoencoder checkpoint)" in capsys.readouterr().out
    index = json.loads((tmp_path / "f" / fe.INDEX_NAME).read_text())
    vol = data / "validation" / "patient_001.npy"
    assert index["volumes"]["validation"][1] == {"name": vol.name, **file_identity(vol)}
    assert index["weights_identity"] == file_identity(weights)
    assert index["dataset_manifest"] == file_identity(data / "manifest.json")
    assert index["input_size"] == [32, 32, 16]
    assert index["feature_files"][fe.TRAIN_NAME] == file_identity(tmp_path / "f" / fe.TRAIN_NAME)
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    assert (cfg["input_rows"], cfg["input_size_from"]["input_deps"]) == (32, "autoencoder checkpoint")


def test_the_feature_extractor_refuses_a_size_the_autoencoder_was_not_trained_at(tmp_path,
                                                                                 capsys):
    data = make_volume_dataset(tmp_path / "data", 2, 1, (32, 32, 16))
    weights = autoencoder_checkpoint(tmp_path / "ae.pt")
    rc = extract(data, weights, tmp_path / "f", "--input_rows", "64")
    one_error_line(capsys, rc, "ae.pt", "trained at 32x32x16", "--input_rows 64",
                   "leave these flags out")
    assert not (tmp_path / "f").exists()
    assert extract(data, weights, tmp_path / "f", "--input_rows", "32") == 0   # the same: fine


def _published_rows(data: Path, split: str, order: list[str]) -> np.ndarray:
    """Feature rows as another tool wrote them: row i for file order[i], encoding its number."""
    return np.array([[int(n[1:4]), 0.5] for n in order], np.float32)


def test_features_made_elsewhere_get_an_index_the_pattern_generator_accepts(tmp_path, capsys,
                                                                             monkeypatch):
    root = make_dataset(tmp_path, n_train=5, n_val=3)
    data, pub, out = root / "data", tmp_path / "published", tmp_path / "imported"
    pub.mkdir()
    real_glob = glob.glob
    monkeypatch.setattr(glob, "glob", lambda p: sorted(real_glob(p), reverse=True))  # unsorted
    for split in SPLITS:
        order = [Path(p).name for p in glob.glob(str(data / split / "*.npy"))]
        np.save(pub / f"{split}_features.npy", _published_rows(data, split, order))
    argv = ["--data_dir", str(data), "--output_dir", str(out), "--import_features",
            str(pub / "train_features.npy"), str(pub / "validation_features.npy")]
    assert fe.main(argv) == 0
    train, val, train_files, _ = fe.load_features(out / fe.TRAIN_NAME, out / fe.VAL_NAME, data)
    assert [int(r[0]) for r in train] == [int(f.name[1:4]) for f in train_files] == [0, 1, 2, 3, 4]
    assert [int(r[0]) for r in val] == [0, 1, 2]
    assert pg.main(_args(root, "out", "--train_features", str(out / fe.TRAIN_NAME),
                         "--val_features", str(out / fe.VAL_NAME), classes=1, inst=2,
                         inst_val=1)) == 0
    # an index written by hand (names only) is refused in words, not by an internal key
    (out / fe.INDEX_NAME).write_text(json.dumps({s: sorted(p.name for p in (data / s).iterdir())
                                                 for s in SPLITS}))
    with pytest.raises(InputError) as err:
        fe.load_features(out / fe.TRAIN_NAME, out / fe.VAL_NAME, data)
    assert "'sha256'" not in str(err.value) and "--import_features" in str(err.value)
    # rows that do not match the folder are refused naming both
    np.save(pub / "train_features.npy", np.zeros((4, 2), np.float32))
    one_error_line(capsys, fe.main(argv + ["--overwrite"]), "4 feature rows", "5 volumes")


# --- stage 3 -> 4 -----------------------------------------------------------------------------

def test_a_fold_file_of_another_run_with_the_same_shape_is_refused(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=6, n_val=3)
    for save, seed in (("a", "7"), ("b", "8")):
        assert pg.main(_args(root, save, "--seed", seed, "--montage_instances", "0", classes=2,
                             inst=3, inst_val=2)) == 0
    name = "train_data1_vwGen_ex_ref_fold1.0.npy"
    assert (root / "a" / name).stat().st_size == (root / "b" / name).stat().st_size
    shutil.copy(root / "b" / name, root / "a" / name)
    targs = train_args(root / "a", tmp_path, classes=2, instances=3, val_instances=2,
                       resolutions=1, epochs=1, shape=(64, 64, 32))
    one_error_line(capsys, train_cli.main(targs), name, "not the file the pattern generator "
                   "finished with", "other content of the same size")
    assert not (tmp_path / "ckpt").exists()            # refused before the output folder


def test_a_failed_extension_leaves_the_finished_folder_usable(tmp_path, capsys, monkeypatch):
    root = make_dataset(tmp_path, n_train=8, n_val=3)
    save = root / "out"
    assert pg.main(_args(root, "out", classes=2, inst=3, inst_val=2)) == 0

    def files() -> dict[str, bytes]:
        return {p.relative_to(save).as_posix(): p.read_bytes()
                for p in sorted(save.rglob("*")) if p.is_file()}

    before = files()
    real = pg.new_plan

    def fail_at_class_2(ctx, cls, *a):
        if cls == 2:
            raise InputError("class 2: no coordinate passed (simulated)")
        return real(ctx, cls, *a)

    monkeypatch.setattr(pg, "new_plan", fail_at_class_2)
    extend = _args(root, "out", "--prev_coordinates", str(save / "coordinates.csv"), classes=3,
                   inst=3, inst_val=2)
    one_error_line(capsys, pg.main(extend), "simulated")
    assert files() == before                 # index, config, coordinates and blocks untouched
    train, val = load_pretraining_data(save, 2, 3, 2, 1, (64, 64, 32))
    assert len(train) == 6 and len(val) == 4
    monkeypatch.setattr(pg, "new_plan", real)
    assert pg.main(extend) == 0
    assert "applying --nb_classes 2 -> 3" in capsys.readouterr().err
    assert json.loads((save / "fold_index.json").read_text())["nb_classes"] == 3
    assert json.loads((save / "config.json").read_text())["continued"]["changed"] == \
        {"nb_classes": [2, 3]}
    assert not (save / ".staging").exists()
    load_pretraining_data(save, 3, 3, 2, 1, (64, 64, 32))


def test_published_fold_files_in_hu_load_normalised_with_a_note(tmp_path, capsys):
    unit = make_fold_files(tmp_path / "unit", classes=2, instances=2, val_instances=1,
                           resolutions=1)
    hu, neither = tmp_path / "hu", tmp_path / "neither"
    for folder, scale in ((hu, lambda a: a * 2000.0 - 1000.0), (neither, lambda a: a * 1.3)):
        folder.mkdir()
        for p in unit.glob("*.npy"):
            arr = np.load(p)
            np.save(folder / p.name, scale(arr) if "_data" in p.name else arr)  # float64, as published
    ref_train, ref_val = load_pretraining_data(unit, 2, 2, 1, 1, SHAPE)
    train, val = load_pretraining_data(hu, 2, 2, 1, 1, SHAPE)
    torch.testing.assert_close(train.cubes, ref_train.cubes, atol=1e-5, rtol=0)
    torch.testing.assert_close(val.cubes, ref_val.cubes, atol=1e-5, rtol=0)
    err = capsys.readouterr().err
    assert "Hounsfield units" in err and "[-1000, 1000]" in err
    with pytest.raises(InputError, match="neither normalised"):
        load_pretraining_data(neither, 2, 2, 1, 1, SHAPE)


# --- checkpoint names -------------------------------------------------------------------------

def test_h5_names_of_the_published_readme_read_the_pt_file_in_every_stage(tmp_path, capsys):
    data = make_volume_dataset(tmp_path / "data", 2, 1, (32, 32, 16))
    ae = autoencoder_checkpoint(tmp_path / "Unet_autoencoder.pt")
    h5 = ae.with_suffix(".h5")
    assert extract(data, h5, tmp_path / "f") == 0                            # stage 2
    assert "reading Unet_autoencoder.pt" in capsys.readouterr().err
    argv = ["--data_dir", str(data), "--output_dir", str(tmp_path / "ae"), "--log_dir",
            str(tmp_path / "tb"), "--input_rows", "32", "--input_cols", "32", "--input_deps", "16",
            "--width", "4", "--num_workers", "0", "--device", "cpu", "--verbose", "0"]
    shutil.copy(ae, tmp_path / "ae1.pt")                                     # (one note a file)
    assert ta.main(argv + ["--nb_epoch", "0", "--weights", str(tmp_path / "ae1.h5")]) == 0
    assert "reading ae1.pt" in capsys.readouterr().err                       # stage 1
    en = save_checkpoint(tmp_path / "en.pt", ClassificationNet3D(cls_classes=2, width=4),
                         arch="ClassificationNet3D")
    folds = make_fold_files(tmp_path / "folds", classes=2, instances=2, val_instances=1,
                            resolutions=1)
    targs = train_args(folds, tmp_path, classes=2, instances=2, val_instances=1, resolutions=1,
                       epochs=1, width=4)
    assert train_cli.main(targs + ["--pre_path", str(en.with_suffix(".h5"))]) == 0   # stage 4
    assert "reading en.pt" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="nor missing.pt beside it"):
        load_checkpoint(tmp_path / "missing.h5")
    keras = tmp_path / "keras.h5"
    keras.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError, match="Keras/HDF5"):
        load_checkpoint(keras)
