"""Self-discovery stage 1: the autoencoder trainer (tiny volumes, width 4, CPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from models.checkpoint import load_checkpoint
from self_discovery import train_autoencoder as ta
from self_discovery.feature_extractor import load_encoder
from self_discovery.volumes import ResizedVolumeDataset, list_volumes, load_resized
from tests.fold_fixtures import autoencoder_args, make_volume_dataset as make_dataset

_args = autoencoder_args  # (data, out, *extra): 32 x 32 x 16, width 4, batch 2, CPU


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae")
    data = make_dataset(root / "data")
    args = ta.build_parser().parse_args(_args(data, root, "--nb_epoch", "2"))
    result = ta.train(args)
    return root, data, result


def test_two_epochs_write_checkpoints_config_tensorboard(trained):
    root, _, result = trained
    assert result["epoch"] == 2 and len(result["history"]) == 2
    for h in result["history"]:
        assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])
    best, last = root / "ckpt" / ta.BEST_NAME, root / "ckpt" / ta.LAST_NAME
    assert best.is_file() and last.is_file() and (root / "ckpt" / "config.json").is_file()
    assert list((root / "tb").glob("events.out.tfevents.*"))
    ckpt = torch.load(last)  # plain load works (only plain types stored)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "UNet3D"
    assert ckpt["model_config"]["width"] == 4 and ckpt["model_config"]["decoder"] == "upsampling"
    assert ckpt["optimizer_state_dict"]["state"]
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert "up_tr256.up_conv.weight" not in ckpt["state_dict"]  # nearest upsampling, no weights
    assert math.isclose(load_checkpoint(best)["best_loss"],
                        min(h["val_loss"] for h in result["history"]), rel_tol=1e-6)


def test_loss_falls_over_a_few_steps(tmp_path):
    data = make_dataset(tmp_path, n_train=2, n_val=1)
    ds = ResizedVolumeDataset(list_volumes(data / "train"), (32, 32, 16))
    x = torch.stack([ds[0][0], ds[1][0]])                      # (2, 1, 32, 32, 16)
    torch.manual_seed(0)
    model = ta.build_autoencoder(width=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = [float(ta.train_step(model, opt, x)) for _ in range(6)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_resume_continues_and_weights_only_initialise(trained, tmp_path):
    root, data, _ = trained
    last = root / "ckpt" / ta.LAST_NAME
    before = load_checkpoint(last)
    steps_before = max(int(s["step"]) for s in before["optimizer_state_dict"]["state"].values())
    # --resume: continue from epoch 2 to 3 with the optimizer state.
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "ckpt").mkdir()
    (out / "ckpt" / ta.LAST_NAME).write_bytes(last.read_bytes())
    assert ta.main(_args(data, out, "--nb_epoch", "3", "--resume")) == 0
    after = load_checkpoint(out / "ckpt" / ta.LAST_NAME)
    assert after["epoch"] == 3
    steps_after = max(int(s["step"]) for s in after["optimizer_state_dict"]["state"].values())
    assert steps_after == steps_before + 2                     # 4 volumes, batch 2: 2 steps
    # 2 epochs + resume 1 == 3 epochs straight (same seed: same shuffles, same weights)
    straight = tmp_path / "straight"
    assert ta.main(_args(data, straight, "--nb_epoch", "3")) == 0
    ref = load_checkpoint(straight / "ckpt" / ta.LAST_NAME)["state_dict"]
    for k, v in ref.items():
        torch.testing.assert_close(after["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # --weights: initial weights only, counters start at 0.
    args = ta.build_parser().parse_args(_args(data, tmp_path / "w", "--nb_epoch", "0",
                                              "--weights", str(last)))
    assert ta.train(args)["epoch"] == 0
    out2 = tmp_path / "w2"
    assert ta.main(_args(data, out2, "--nb_epoch", "1", "--weights", str(last))) == 0
    fresh = load_checkpoint(out2 / "ckpt" / ta.LAST_NAME)
    assert fresh["epoch"] == 1
    assert max(int(s["step"]) for s in fresh["optimizer_state_dict"]["state"].values()) == 2
    # both together are refused
    assert ta.main(_args(data, out2, "--resume", "--weights", str(last))) == 2


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    assert ta.main(_args(tmp_path / "nowhere", tmp_path, "--nb_epoch", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nowhere" in err and len(err.splitlines()) == 1
    data = make_dataset(tmp_path / "d", n_train=2, n_val=1)
    bad = np.load(data / "train" / "patient_001.npy")
    bad[3, 3, 3] = np.nan
    np.save(data / "train" / "patient_001.npy", bad)
    assert ta.main(_args(data, tmp_path, "--nb_epoch", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "patient_001.npy" in err and "NaN" in err and len(err.splitlines()) == 1
    good = make_dataset(tmp_path / "g", n_train=2, n_val=1)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(b"PK\x03\x04 not a checkpoint")
    for flag in (["--weights", str(trunc)], ["--resume", str(trunc)]):
        assert ta.main(_args(good, tmp_path, "--nb_epoch", "1", *flag)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "trunc.pt" in err and len(err.splitlines()) == 1
    assert ta.main(_args(good, tmp_path, "--input_rows", "30")) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_hu_volume_is_rescaled_with_warning(tmp_path):
    vol = np.linspace(-2000, 3000, 16 * 16 * 8, dtype=np.float32).reshape(16, 16, 8)
    np.save(tmp_path / "hu.npy", vol)
    with pytest.warns(UserWarning, match="Hounsfield"):
        t = load_resized(tmp_path / "hu.npy", (16, 16, 8))
    assert t.shape == (1, 16, 16, 8) and float(t.min()) == 0.0 and float(t.max()) == 1.0


def test_reference_flags_and_defaults():
    """The published command line: reference flag names/defaults; ``--verbose`` also bare."""
    a = ta.build_parser().parse_args(["--data_dir", "dataset/", "--verbose"])
    assert (a.arch, a.decoder, a.input_rows, a.input_cols, a.input_deps, a.batch_size) == \
        ("Unet", "upsampling", 128, 128, 64, 8)
    assert a.weights is None and a.verbose == 2
    assert ta.build_parser().parse_args(["--data_dir", "d", "--verbose", "0"]).verbose == 0


def test_batchnorm_constants_are_keras_and_reach_the_feature_extractor(trained):
    root, _, _ = trained
    model = ta.build_autoencoder(width=4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert bns and all((m.momentum, m.eps) == (0.01, 1e-3) for m in bns)
    ckpt = load_checkpoint(root / "ckpt" / ta.BEST_NAME)
    assert (ckpt["model_config"]["bn_momentum"], ckpt["model_config"]["bn_eps"]) == (0.01, 1e-3)
    enc, cfg = load_encoder(root / "ckpt" / ta.BEST_NAME)
    assert all(m.eps == 1e-3 for m in enc.modules() if isinstance(m, nn.BatchNorm3d))
    # a checkpoint without the constants was trained with PyTorch's defaults: eps stays 1e-5
    legacy = dict(ckpt, model_config={k: v for k, v in ckpt["model_config"].items()
                                      if not k.startswith("bn_")})
    torch.save(legacy, root / "legacy.pt")
    enc, _ = load_encoder(root / "legacy.pt")
    assert all(m.eps == 1e-5 for m in enc.modules() if isinstance(m, nn.BatchNorm3d))


def test_lr_halves_after_exactly_lr_patience_epochs_without_improvement():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = ta.plateau_scheduler(opt, lr_patience=3)
    lrs = []
    for loss in [1.0, 1.0, 1.0, 1.0, 1.0]:   # best at epoch 1, then 3 epochs without gain
        sched.step(loss)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4]   # as Keras ReduceLROnPlateau(patience=3)
