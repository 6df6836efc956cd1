"""A continued run does what it records: ``--resume`` of pretraining and of the autoencoder and
``--prev_coordinates`` of the pattern generator refuse other settings (listing the flags) or
apply them and say so, and refuse other data; the recorded configuration is what ran."""
from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from models.checkpoint import load_checkpoint
from pytorch import train as train_cli
from self_discovery import feature_extractor as fe
from self_discovery import pattern_generator_3D as pg
from self_discovery import train_autoencoder as ta
from tests.fold_fixtures import (autoencoder_args, make_fold_files, make_volume_dataset,
                                 tiny_pretraining)
from tests.test_patterns import _args, make_dataset
from tests.test_cli_errors import one_error_line

CKPT = "semantic_genesis_chest_ct"


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


# --- pretraining ------------------------------------------------------------------------------

def test_pretraining_resume_refuses_other_settings_and_other_data(tmp_path, capsys):
    args = tiny_pretraining(tmp_path)
    assert train_cli.main(args) == 0
    last = tmp_path / "ckpt" / f"{CKPT}_last.pt"
    before = last.read_bytes()
    changed = _set(_set(_set(args, "--seed", "8"), "--lambda_cls", "0.1"), "--nb_epoch", "2")
    one_error_line(capsys, train_cli.main(changed + ["--resume"]), str(last),
                   "--seed 0 -> 8", "--lambda_cls 0.01 -> 0.1", "without --resume")
    assert last.read_bytes() == before
    # the same fold files under another name are the same data: accepted
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "folds", moved)
    assert train_cli.main(_set(_set(args, "--data_dir", str(moved)), "--nb_epoch", "2")
                          + ["--resume"]) == 0
    # fold files of the same shape and names with other content are other data
    other = make_fold_files(tmp_path / "other", classes=2, instances=2, val_instances=1,
                            resolutions=1, seed=5)
    rc = train_cli.main(_set(_set(args, "--data_dir", str(other)), "--nb_epoch", "3")
                        + ["--resume"])
    one_error_line(capsys, rc, "trained on other data", "train_data1_vwGen_ex_ref_fold1.0.npy",
                   "--data_dir")
    assert load_checkpoint(last)["epoch"] == 2


def test_pretraining_resume_applies_a_new_lr_and_records_it(tmp_path, capsys):
    args = tiny_pretraining(tmp_path)
    assert train_cli.main(args) == 0
    capsys.readouterr()
    assert train_cli.main(_set(_set(args, "--lr", "2e-3"), "--nb_epoch", "2")
                          + ["--resume"]) == 0
    assert "applying --lr 0.001 -> 0.002" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "ckpt" / f"{CKPT}_last.pt")
    assert ckpt["optimizer_state_dict"]["param_groups"][0]["lr"] == 2e-3   # the run used it
    assert ckpt["scheduler_state_dict"]["base_lrs"] == [2e-3]
    cfg = json.loads((tmp_path / "ckpt" / f"{CKPT}_config.json").read_text())
    assert cfg["lr"] == 2e-3 and cfg["resumes"] == [
        {"epoch": 1, "changed": {"lr": [1e-3, 2e-3], "nb_epoch": [1, 2]}}]


# --- autoencoder ------------------------------------------------------------------------------

def test_autoencoder_resume_policy(tmp_path, capsys):
    data = make_volume_dataset(tmp_path / "data", 2, 1, (32, 32, 16))
    args = autoencoder_args(data, tmp_path, "--nb_epoch", "1")
    assert ta.main(args) == 0
    last = tmp_path / "ckpt" / ta.LAST_NAME
    one_error_line(capsys, ta.main(_set(_set(args, "--batch_size", "1"), "--nb_epoch", "2")
                                   + ["--resume"]), "--batch_size 2 -> 1", "without --resume")
    other = make_volume_dataset(tmp_path / "other", 2, 1, (32, 32, 16), seed=3)  # same names
    one_error_line(capsys, ta.main(_set(_set(args, "--data_dir", str(other)), "--nb_epoch", "2")
                                   + ["--resume"]), "trained on other data",
                   "patient_000.npy: other content under the same name")
    assert load_checkpoint(last)["epoch"] == 1
    resumed = _set(_set(_set(args, "--lr", "5e-4"), "--lr_patience", "3"), "--nb_epoch", "2")
    assert ta.main(resumed + ["--resume"]) == 0
    assert "--lr 0.001 -> 0.0005, --lr_patience 20 -> 3" in capsys.readouterr().err
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 2 and ckpt["optimizer_state_dict"]["param_groups"][0]["lr"] == 5e-4
    assert ckpt["scheduler_state_dict"]["patience"] == 2          # Keras count 3 = PyTorch 2
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (cfg["lr"], cfg["lr_patience"]) == (5e-4, 3) and cfg["resumes"][0]["epoch"] == 1
    assert cfg["data_identity"]["train"][0]["name"] == "patient_000.npy"


# --- pattern generator ------------------------------------------------------------------------

def test_prev_coordinates_refuses_other_discovery_settings_and_features(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=6, n_val=3)
    assert pg.main(_args(root, "first", classes=1, inst=3, inst_val=2)) == 0
    prev = str(root / "first" / "coordinates.csv")
    cont = _args(root, "more", "--prev_coordinates", prev, classes=2, inst=3, inst_val=2)
    one_error_line(capsys, pg.main(cont + ["--seed", "9", "--lung_threshold", "0.3"]),
                   "--prev_coordinates continues a run made with other settings",
                   "--lung_threshold 0.15 -> 0.3", "--seed 7 -> 9")
    assert not (root / "more").exists()
    # features extracted again (other rows for the same volumes) rank other patients
    feats = root / "features"
    train = np.load(feats / fe.TRAIN_NAME)
    fe.save_features(feats, train[::-1].copy(), np.load(feats / fe.VAL_NAME),
                     {k: json.loads((feats / fe.INDEX_NAME).read_text())[k]
                      for k in ("train", "validation", "feature_dim")}, data_dir=root / "data")
    one_error_line(capsys, pg.main(cont), "other features or volumes", "features_index.json")
    assert not (root / "more").exists()


def test_prev_coordinates_applies_more_classes_and_says_so(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=6, n_val=3)
    assert pg.main(_args(root, "first", classes=1, inst=3, inst_val=2)) == 0
    prev = str(root / "first" / "coordinates.csv")
    assert pg.main(_args(root, "more", "--prev_coordinates", prev, "--montage_instances", "0",
                         classes=2, inst=3, inst_val=2)) == 0
    err = capsys.readouterr().err
    assert "--prev_coordinates: applying" in err and "--montage_instances 3 -> 0" in err
    assert "--nb_classes 1 -> 2" in err
    cfg = json.loads((root / "more" / "config.json").read_text())
    assert cfg["nb_classes"] == 2 and cfg["continued"] == {
        "from": prev, "changed": {"montage_instances": [3, 0], "nb_classes": [1, 2]}}
    assert cfg["features_index"]["sha256"]
    assert torch.equal(torch.from_numpy(np.load(root / "first" / "train_data1_vwGen_ex_ref_fold1.0.npy")),
                       torch.from_numpy(np.load(root / "more" / "train_data1_vwGen_ex_ref_fold1.0.npy")[:3]))
