"""Checkpoints written by the published code load everywhere; code in a pickle never runs.

A published-format file (``tests/checkpoint_fixtures.save_published``: DataParallel keys, Adam
state, NumPy-scalar ``best_loss``/``best_acc``, the pre-1.6 file format) goes through
``load_pretrained``, every ``--weights``/``--pre_path`` and ``scripts/convert_checkpoint.py``;
a file whose ``__reduce__`` would create a marker is refused by every entry point, with the
global named, and the marker never appears. Tiny networks (width 4) and volumes throughout.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import infer_model_config, load_checkpoint, load_pretrained, save_checkpoint
from models.ynet3d import ClassificationNet3D, UNet3D, YNet3D
from pytorch import train as train_cli
from runtime.errors import CheckpointError
from models import convert as cc
from finetune import classification as fc
from finetune import segmentation as fs
from experiments import transfer_benchmark as tb
from preparation.phantoms import make_nodule_cubes, write_phantom_dataset
from self_discovery import feature_extractor as fe
from self_discovery import train_autoencoder as ta
from tests.checkpoint_fixtures import WritesMarker, save_malicious, save_published
from tests.fold_fixtures import autoencoder_args, make_fold_files, make_volume_dataset, train_args
from tests.test_cli_errors import one_error_line

CUBE = (16, 16, 8)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """Published-format files: a width-4 Y-Net (3 classes, legacy and zip format), a stage-1
    autoencoder, an ``en`` network; plus their source state dicts."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    out: dict = {"root": root, "state": {}}
    for name, model, kw in (("ynet", YNet3D(cls_classes=3, width=4), {}),
                            ("ynet_zip", YNet3D(cls_classes=3, width=4), {"legacy": False}),
                            ("ae", ta.build_autoencoder(width=4), {}),
                            ("en", ClassificationNet3D(cls_classes=3, width=4), {})):
        out["state"][name] = save_published(root / f"{name}.pt", model, **kw)
        out[name] = root / f"{name}.pt"
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Volumes for stages 1-2 and fine-tuning, fold files for pretraining, nodule cubes."""
    root = tmp_path_factory.mktemp("data")
    c, lab = make_nodule_cubes(8, CUBE, seed=0)
    np.save(root / "cubes.npy", c)
    np.save(root / "labels.npy", lab)
    write_phantom_dataset(root / "img", 2, (24, 24, 8), seed=0, fmt="npy", nodules=1,
                          mask_dir=root / "msk")
    return {"volumes": make_volume_dataset(root / "vols", 3, 2, (32, 32, 16)),
            "folds": make_fold_files(root / "folds", classes=3, instances=4, val_instances=2),
            "root": root}


def _equal_where_present(model, state: dict[str, torch.Tensor]) -> int:
    """Every tensor of ``model`` that ``state`` has equals it; returns how many were compared."""
    n = 0
    for key, value in model.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key]), key
            n += 1
    return n


# --- the published format ------------------------------------------------------------------

def test_plain_torch_load_refuses_the_published_file(published):
    """What the original snippet meets on PyTorch >= 2.6, as the README quotes it."""
    quoted = "GLOBAL numpy.core.multiarray.scalar was not an allowed global by default"
    with pytest.raises(pickle.UnpicklingError, match=quoted):
        torch.load(published["ynet"])
    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert quoted in readme.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["ynet", "ynet_zip"])
def test_load_pretrained_reads_the_published_format(published, name):
    ckpt = load_checkpoint(published[name])
    assert ckpt["epoch"] == 57 and ckpt["num_epoch_no_improvement"] == 3
    assert type(ckpt["best_loss"]) is float and ckpt["best_loss"] == 0.375
    assert type(ckpt["best_acc"]) is float and ckpt["best_acc"] == 0.875
    assert ckpt["optimizer_state_dict"]["state"]  # Adam moments came through
    state = published["state"][name]
    for model in (UNet3D(width=4), YNet3D(cls_classes=3, width=4),
                  ClassificationNet3D(cls_classes=3, width=4)):
        loaded = load_pretrained(model, published[name])
        assert set(loaded) == set(model.state_dict())
        assert _equal_where_present(model, state) == len(loaded)


def test_infer_model_config_from_weights(published):
    sd = lambda n: load_checkpoint(published[n])["state_dict"]  # noqa: E731
    assert infer_model_config(sd("ynet")) == ("YNet3D", {"width": 4, "in_channels": 1,
                                                         "cls_classes": 3, "n_class": 1})
    assert infer_model_config(sd("ae")) == ("UNet3D", {"width": 4, "in_channels": 1, "n_class": 1,
                                                       "decoder": "upsampling"})
    assert infer_model_config(sd("en"))[0] == "ClassificationNet3D"
    assert infer_model_config({"fc.weight": torch.zeros(2, 2)}) == (None, {})


def test_every_weights_flag_reads_the_published_format(published, data, tmp_path, capsys):
    vols, root = data["volumes"], data["root"]
    assert ta.main(autoencoder_args(vols, tmp_path / "ae", "--weights", str(published["ae"]),
                                    "--nb_epoch", "1")) == 0
    assert fe.main(["--data_dir", str(vols), "--weights", str(published["ae"]),
                    "--output_dir", str(tmp_path / "fe"), "--input_rows", "32", "--input_cols", "32",
                    "--input_deps", "16", "--num_workers", "0", "--device", "cpu",
                    "--verbose", "0"]) == 0   # width and decoder read from the weights
    assert np.load(tmp_path / "fe" / fe.TRAIN_NAME).shape == (3, 64)
    capsys.readouterr()
    assert train_cli.main(train_args(data["folds"], tmp_path / "pre", epochs=1, resolutions=1)
                          + ["--pre_path", str(published["ynet"])]) == 0
    assert "initialised" in capsys.readouterr().out
    common = ["--width", "4", "--nb_epoch", "1", "--num_workers", "0", "--device", "cpu",
              "--quiet"]
    assert fc.main(["--data", str(root / "cubes.npy"), "--labels", str(root / "labels.npy"),
                    "--weights", str(published["ynet"]), "--batch_size", "4",
                    "--output_dir", str(tmp_path / "fc")] + common) == 0
    m = json.loads((tmp_path / "fc" / "metrics.json").read_text(encoding="utf-8"))
    assert m["init"] == "pretrained" and m["loaded_keys"] > 0
    assert fs.main(["--images", str(root / "img"), "--masks", str(root / "msk"),
                    "--weights", str(published["ynet"]), "--crop", "16", "16", "8",
                    "--steps_per_epoch", "1", "--batch_size", "2",
                    "--output_dir", str(tmp_path / "fs")] + common) == 0
    m = json.loads((tmp_path / "fs" / "metrics.json").read_text(encoding="utf-8"))
    assert m["loaded_keys"] == len(UNet3D(width=4).state_dict())
    assert tb.main(["--weights", str(published["ynet"]), "--output_dir", str(tmp_path / "tb"),
                    "--seeds", "0", "--tasks", "classification", "--cls_n", "4", "4", "4",
                    "--cube", "16", "16", "8", "--cls_epochs", "1", "--cls_batch_size", "4",
                    "--num_workers", "0", "--device", "cpu", "--quiet"]) == 0
    assert json.loads((tmp_path / "tb" / "transfer_benchmark.json")
                      .read_text(encoding="utf-8"))["width"] == 4


def test_convert_reports_and_writes_our_schema(published, tmp_path, capsys):
    out = tmp_path / "sub" / "converted.pt"
    assert cc.main([str(published["ynet"]), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "found: YNet3D, width 4, 3 classes, epoch 57" in printed
    assert "'module.'" in printed and "best_acc, best_loss" in printed
    assert "dropped: optimizer_state_dict" in printed and f"wrote {out}" in printed
    ckpt = torch.load(out)  # plain torch.load: plain types only
    assert ckpt["arch"] == "YNet3D" and ckpt["epoch"] == 57 and ckpt["best_loss"] == 0.375
    assert ckpt["model_config"] == {"width": 4, "in_channels": 1, "cls_classes": 3,
                                    "n_class": 1, "norm": "batch_stats"}
    assert ckpt["extra"] == {"best_acc": 0.875} and ckpt["num_epoch_no_improvement"] == 3
    state = published["state"]["ynet"]
    assert set(ckpt["state_dict"]) == set(state)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in state.items())
    assert not list(out.parent.glob(".*tmp"))


def test_convert_bare_prefixed_and_models_genesis_style(published, tmp_path, capsys):
    state = published["state"]["ynet"]
    bare = {"_orig_mod." + k: v for k, v in state.items()}
    bare["module.projection_head.0.weight"] = torch.zeros(3)
    torch.save(bare, tmp_path / "bare.pt")
    assert cc.main([str(tmp_path / "bare.pt"), str(tmp_path / "a.pt")]) == 0
    printed = capsys.readouterr().out
    assert "'_orig_mod.'" in printed and "projection_head.* (1 tensors" in printed
    assert "epoch 0" in printed
    # Models Genesis: a 3D U-Net with the same layer names, saved from DataParallel
    torch.manual_seed(1)
    unet = UNet3D(width=4)
    torch.save({"epoch": 9, "state_dict": {"module." + k: v for k, v in unet.state_dict().items()},
                "optimizer_state_dict": {}}, tmp_path / "mg.pt")
    assert cc.main([str(tmp_path / "mg.pt"), str(tmp_path / "b.pt")]) == 0
    assert "found: UNet3D, width 4, transpose decoder, epoch 9" in capsys.readouterr().out
    assert torch.load(tmp_path / "b.pt")["model_config"]["decoder"] == "transpose"
    assert _equal_where_present(unet, torch.load(tmp_path / "b.pt")["state_dict"]) == \
        len(unet.state_dict())
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    rc = cc.main([str(tmp_path / "other.pt"), str(tmp_path / "c.pt")])
    one_error_line(capsys, rc, str(tmp_path / "other.pt"), "fit none of")
    assert not (tmp_path / "c.pt").exists()


def test_convert_refuses_truncated_input_and_same_path(published, tmp_path, capsys):
    data = published["ynet"].read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    rc = cc.main([str(tmp_path / "t.pt"), str(tmp_path / "o.pt")])
    one_error_line(capsys, rc, f"{tmp_path / 't.pt'}: truncated", "re-download")
    rc = cc.main([str(published["ynet"]), str(published["ynet"])])
    one_error_line(capsys, rc, "same file as the input")


# --- malicious pickles ---------------------------------------------------------------------

@pytest.fixture()
def evil(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran.txt"
    return save_malicious(tmp_path / "evil.pt", marker), marker


def test_plain_pickle_would_run_the_code(tmp_path):
    """The fixture's object is really malicious: plain unpickling creates the marker."""
    marker = tmp_path / "m.txt"
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_library_loaders_refuse_code(tmp_path, legacy):
    marker = tmp_path / "m.txt"
    path = save_malicious(tmp_path / "e.pt", marker, legacy=legacy)
    for load in (load_checkpoint, lambda p: load_pretrained(UNet3D(width=4), p)):
        with pytest.raises(CheckpointError, match="refused: the file needs the Python global "
                                                  "builtins.exec") as e:
            load(path)
        assert str(e.value).startswith(str(path)) and "truncated" not in str(e.value)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # the snippet's plain load refuses it too
    assert not marker.exists()


def test_every_cli_refuses_code(evil, data, tmp_path, capsys):
    path, marker = evil
    vols, root = data["volumes"], data["root"]
    fine = ["--width", "4", "--nb_epoch", "1", "--num_workers", "0", "--device", "cpu",
            "--quiet"]
    calls = {
        "convert": lambda: cc.main([str(path), str(tmp_path / "out.pt")]),
        "autoencoder --weights": lambda: ta.main(autoencoder_args(
            vols, tmp_path / "ae", "--weights", str(path), "--nb_epoch", "1")),
        "autoencoder --resume": lambda: ta.main(autoencoder_args(
            vols, tmp_path / "ae", "--resume", str(path), "--nb_epoch", "1")),
        "features --weights": lambda: fe.main([
            "--data_dir", str(vols), "--weights", str(path), "--output_dir", str(tmp_path / "fe"),
            "--device", "cpu", "--num_workers", "0"]),
        "train --pre_path": lambda: train_cli.main(
            train_args(data["folds"], tmp_path / "t1", epochs=1) + ["--pre_path", str(path)]),
        "train --resume": lambda: train_cli.main(
            train_args(data["folds"], tmp_path / "t2", epochs=1) + ["--resume", str(path)]),
        "classification --weights": lambda: fc.main([
            "--data", str(root / "cubes.npy"), "--labels", str(root / "labels.npy"),
            "--weights", str(path), "--output_dir", str(tmp_path / "fc")] + fine),
        "classification --resume": lambda: fc.main([
            "--data", str(root / "cubes.npy"), "--labels", str(root / "labels.npy"),
            "--resume", str(path), "--output_dir", str(tmp_path / "fc2")] + fine),
        "segmentation --weights": lambda: fs.main([
            "--images", str(root / "img"), "--masks", str(root / "msk"), "--weights", str(path),
            "--crop", "16", "16", "8", "--output_dir", str(tmp_path / "fs")] + fine),
        "transfer benchmark --weights": lambda: tb.main([
            "--weights", str(path), "--output_dir", str(tmp_path / "tb"), "--device", "cpu"]),
    }
    for name, call in calls.items():
        rc = call()
        line = one_error_line(capsys, rc, str(path), "builtins.exec")
        assert "refused" in line, name
        assert not marker.exists(), name
    assert not (tmp_path / "out.pt").exists()


def test_our_checkpoints_still_load_plainly(tmp_path):
    p = save_checkpoint(tmp_path / "c.pt", YNet3D(cls_classes=3, width=4), best_loss=0.5)
    assert torch.load(p)["best_loss"] == 0.5 and load_checkpoint(p)["best_loss"] == 0.5
