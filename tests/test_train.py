"""Pretraining (pytorch/train.py, engine, data): outputs, resume, fine-tuning snippet, bad input.

Tiny fold files (16 x 16 x 8 cubes, 3 classes), width 4-8, 1-2 epochs, CPU only.
"""
from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_state_dict_checked, save_checkpoint
from models.ynet3d import ContBatchNorm3d, UNet3D, YNet3D
from pytorch import train as train_cli
from pytorch.data import epoch_permutation, fold_file_names, load_pretraining_data
from pytorch.engine import (LossConfig, SyncContBatchNorm3d, build_model, convert_sync_batchnorm,
                            eval_step, make_optimizer, perturb_inputs, summarize_stats,
                            train_step)
from tests.fold_fixtures import SHAPE, make_fold_files, train_args

CKPT = "semantic_genesis_chest_ct"


@pytest.fixture(scope="module")
def folds(tmp_path_factory) -> Path:
    return make_fold_files(tmp_path_factory.mktemp("folds"), classes=3, instances=4,
                           val_instances=2)


def _run(argv: list[str]) -> int:
    return train_cli.main(argv)


def _sd(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path)["state_dict"]


# ------------------------------------------------------------------------------ engine
def test_loss_falls_in_a_few_steps(folds):
    train, _ = load_pretraining_data(folds, 3, 4, 2, 1, SHAPE)
    torch.manual_seed(0)
    model = build_model("en_de", 3, width=4)
    opt = make_optimizer(model, lr=3e-3)
    x, y = train.cubes[:12], train.labels[:12]
    cfg = LossConfig("en_de", lambda_cls=0.01, lambda_rec=1.0)
    g = torch.Generator().manual_seed(0)
    inputs = perturb_inputs(x, g)
    assert inputs.shape == x.shape and not torch.equal(inputs, x)
    plain = perturb_inputs(x, torch.Generator().manual_seed(0), augment=False)  # --no-augment
    assert plain.shape == x.shape and not torch.equal(plain, inputs)
    losses = [summarize_stats(train_step(model, opt, inputs, x, y, cfg))["loss"]
              for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    stats, restored = eval_step(model, inputs, x, y, cfg)
    assert restored.shape == x.shape and summarize_stats(stats)["n"] == 12


def test_en_loss_is_cross_entropy(folds):
    train, _ = load_pretraining_data(folds, 3, 4, 2, 1, SHAPE)
    model = build_model("en", 3, width=4)
    stats = train_step(model, make_optimizer(model), train.cubes[:6], train.cubes[:6],
                       train.labels[:6], LossConfig("en"))
    s = summarize_stats(stats)
    assert s["rec"] == 0 and s["loss"] == pytest.approx(s["cls"]) and 0 <= s["acc"] <= 1


def test_sync_batchnorm_keeps_batch_stats_and_keys():
    torch.manual_seed(0)
    model = YNet3D(cls_classes=3, width=4)
    ref = YNet3D(cls_classes=3, width=4)
    ref.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    convert_sync_batchnorm(model)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, ContBatchNorm3d) for m in model.modules())
    assert any(isinstance(m, SyncContBatchNorm3d) for m in model.modules())
    x = torch.rand(2, 1, *SHAPE)
    model.eval(), ref.eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[0], ref(x)[0], atol=1e-6)  # batch stats in eval too


def test_early_stopping_rule():
    assert train_cli.early_stopping_update(0.5, math.inf, 0, 2) == (True, 0.5, 0, False)
    assert train_cli.early_stopping_update(0.6, 0.5, 0, 2) == (False, 0.5, 1, False)
    assert train_cli.early_stopping_update(0.5, 0.5, 1, 2) == (False, 0.5, 2, True)


def test_epoch_permutation_shards_evenly():
    full = epoch_permutation(11, seed=3, epoch=2)
    assert sorted(full.tolist()) == list(range(11))
    a, b = epoch_permutation(11, 3, 2, 0, 2), epoch_permutation(11, 3, 2, 1, 2)
    assert len(a) == len(b) == 5 and not set(a.tolist()) & set(b.tolist())
    assert not torch.equal(epoch_permutation(11, 3, 3), full)  # reshuffled per epoch


# ------------------------------------------------------------------------------ data
def test_more_classes_in_files_and_partial_last_block(tmp_path):
    d = make_fold_files(tmp_path / "f", classes=52, instances=1, val_instances=1,
                        resolutions=2)
    train, val = load_pretraining_data(d, 51, 1, 1, 2, SHAPE)
    assert len(train) == 2 * 51 and len(val) == 51         # 50 + first 1 of block 2
    assert train.labels.max() == 50 and val.labels.tolist() == list(range(51))
    train, val = load_pretraining_data(d, 44, 1, 1, 1, SHAPE)  # the paper: 44 of 50
    assert len(train) == 44 and train.labels.max() == 43


def test_reference_files_missing_last_cube_are_accepted(tmp_path):
    d = make_fold_files(tmp_path / "f", classes=3, instances=2, val_instances=2, resolutions=1)
    name, _ = fold_file_names("train", 1, 1)
    np.save(d / name, np.load(d / name)[:-1])
    lab = fold_file_names("train", 1, 1)[1]
    np.save(d / lab, np.load(d / lab)[:-1])
    with pytest.warns(UserWarning, match="last cube"):
        train, _ = load_pretraining_data(d, 3, 2, 2, 1, SHAPE)
    assert len(train) == 5


# ------------------------------------------------------------------------------ CLI
def test_main_writes_checkpoints_config_and_tensorboard(folds, tmp_path, capsys):
    argv = train_args(folds, tmp_path, width=8, epochs=2)
    assert _run(argv) == 0
    out = capsys.readouterr()
    ck = tmp_path / "ckpt"
    best, last = ck / f"{CKPT}.pt", ck / f"{CKPT}_last.pt"
    assert best.is_file() and last.is_file()
    ckpt = torch.load(last)  # plain torch.load, as the fine-tuning snippet does
    for key in ("state_dict", "optimizer_state_dict", "epoch", "best_loss",
                "num_epoch_no_improvement", "scheduler_state_dict"):
        assert key in ckpt
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "YNet3D"
    assert ckpt["model_config"]["width"] == 8 and math.isfinite(ckpt["best_loss"])
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    cfg = json.loads((ck / f"{CKPT}_config.json").read_text())
    assert cfg["lr"] == 1e-3 and cfg["lambda_cls"] == 0.01 and cfg["width"] == 8
    assert cfg["world_size"] == 1 and cfg["amp_resolved"] == "fp32"
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    lines = [l for l in out.out.splitlines() + out.err.splitlines() if l.startswith("epoch")]
    assert len(lines) == 2 and "val loss" in lines[0] and "acc" in lines[0] and "lr" in lines[0]
    model = YNet3D(cls_classes=3, width=8)
    load_state_dict_checked(model, torch.load(best)["state_dict"])


def test_resume_equals_uninterrupted_run(folds, tmp_path):
    common = ["--lr", "3e-3", "--seed", "7"]
    a = train_args(folds, tmp_path / "a", width=4, epochs=2, resolutions=1)
    assert _run(a + common) == 0
    b = train_args(folds, tmp_path / "b", width=4, epochs=1, resolutions=1)
    assert _run(b + common) == 0
    last_b = tmp_path / "b" / "ckpt" / f"{CKPT}_last.pt"
    after_one = _sd(last_b)
    b2 = train_args(folds, tmp_path / "b", width=4, epochs=2, resolutions=1)
    assert _run(b2 + common + ["--resume", str(last_b)]) == 0
    ca = torch.load(tmp_path / "a" / "ckpt" / f"{CKPT}_last.pt")
    cb = torch.load(last_b)
    assert ca["epoch"] == cb["epoch"] == 2
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    assert not torch.equal(after_one["out_tr.final_conv.weight"],
                           cb["state_dict"]["out_tr.final_conv.weight"])  # it did train on
    assert ca["best_loss"] == cb["best_loss"]
    assert ca["num_epoch_no_improvement"] == cb["num_epoch_no_improvement"]
    assert ca["scheduler_state_dict"] == cb["scheduler_state_dict"]
    sa, sb = ca["optimizer_state_dict"]["state"], cb["optimizer_state_dict"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_en_then_en_de_with_pre_path(folds, tmp_path, capsys):
    assert _run(train_args(folds, tmp_path / "en", epochs=1, resolutions=1)
                + ["--exp", "en"]) == 0
    en = tmp_path / "en" / "ckpt" / f"{CKPT}.pt"
    assert torch.load(en)["arch"] == "ClassificationNet3D"
    assert not any(k.startswith("up_tr") for k in _sd(en))
    capsys.readouterr()
    assert _run(train_args(folds, tmp_path / "ende", epochs=1, resolutions=1)
                + ["--pre_path", str(en), "--multi_gpu"]) == 0
    out = capsys.readouterr()
    assert "decoder new" in out.out and "torchrun" in out.err  # --multi_gpu note
    assert torch.load(tmp_path / "ende" / "ckpt" / f"{CKPT}.pt")["arch"] == "YNet3D"


# ------------------------------------------------------------------------------ bad input
def _error(argv, capsys) -> str:
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    return err


def test_missing_fold_files_named_with_flags(tmp_path, capsys):
    err = _error(train_args(tmp_path / "none", tmp_path), capsys)
    assert "train_data1_vwGen_ex_ref_fold1.0.npy" in err and "val_label1" in err
    assert "--data_dir" in err and "--cls_classes" in err


@pytest.mark.parametrize("defect", ["label_range", "shape", "nan", "rows"])
def test_bad_fold_file_named(tmp_path, capsys, defect):
    d = make_fold_files(tmp_path / "f", classes=3, instances=2, val_instances=1, resolutions=1)
    data, lab = fold_file_names("train", 1, 1)
    x, y = np.load(d / data), np.load(d / lab)
    bad = lab
    if defect == "label_range":
        y[0, 0] = 3
        np.save(d / lab, y)
    elif defect == "shape":
        np.save(d / data, x[:, :8])
        bad = data
    elif defect == "nan":
        x[4, 1, 2, 3] = np.nan
        np.save(d / data, x)
        bad = data
    else:
        np.save(d / data, x[:3])
        np.save(d / lab, y[:3])
        bad = data
    argv = train_args(d, tmp_path, instances=2, val_instances=1, resolutions=1)
    err = _error(argv, capsys)
    assert bad in err, err
    if defect == "label_range":
        assert "--cls_classes" in err
    if defect == "nan":
        assert "NaN" in err and "cube 4" in err


def test_incompatible_pre_path_and_resume_list_keys(folds, tmp_path, capsys):
    wrong = tmp_path / "w.pt"
    save_checkpoint(wrong, YNet3D(cls_classes=3, width=8))
    for flag in ("--pre_path", "--resume"):
        err = _error(train_args(folds, tmp_path, width=4, epochs=1, resolutions=1)
                     + [flag, str(wrong)], capsys)
        assert "shape mismatch" in err and "down_tr64.ops.0.conv1.weight" in err
    err = _error(train_args(folds, tmp_path, resolutions=1)
                 + ["--pre_path", str(wrong), "--resume", str(wrong)], capsys)
    assert "--resume and --pre_path" in err


def test_input_size_must_divide_by_8(folds, tmp_path, capsys):
    argv = train_args(folds, tmp_path)
    argv[argv.index("--input_deps") + 1] = "12"
    assert "--input_deps" in _error(argv, capsys)


# ------------------------------------------------------------------------------ fine-tuning
# The original README's two fine-tuning snippets, loading part unchanged except for the path
# (WEIGHT_DIR) and a tiny dataset; run on our width-32 en_de checkpoint.
_SNIPPET_CLASSIFICATION = '''
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import Dataset, DataLoader
from models.ynet3d import *

# prepare your own data
train_loader = DataLoader(TINY_DATASET, batch_size=config.batch_size, shuffle=True)

# prepare the 3D model
class TargetNet(nn.Module):
    def __init__(self, base_model,n_class=1):
        super(TargetNet, self).__init__()

        self.base_model = base_model
        self.dense_1 = nn.Linear(512, n_class, bias=True)

    def forward(self, x):
        self.base_model(x)
        self.base_out = self.base_model.out512
        # This global average polling is for shape (N,C,H,W) not for (N, H, W, C)
        # where N = batch_size, C = channels, H = height, and W = Width
        self.out_glb_avg_pool = F.avg_pool3d(self.base_out, kernel_size=self.base_out.size()[2:]).view(self.base_out.size()[0],-1)
        self.linear_out = self.dense_1(self.out_glb_avg_pool)
        final_out = F.relu(self.linear_out)
        return final_out

base_model = UNet3D()

#Load pre-trained weights
weight_dir = WEIGHT_DIR
checkpoint = torch.load(weight_dir)
state_dict = checkpoint['state_dict']
state_dict = {k.replace("module.", ""): v for k, v in state_dict.items()}
delete = [key for key in state_dict if "projection_head" in key]
for key in delete: del state_dict[key]
delete = [key for key in state_dict if "prototypes" in key]
for key in delete: del state_dict[key]
for key in state_dict.keys():
    if key in base_model.state_dict().keys():
        base_model.state_dict()[key].copy_(state_dict[key])
        print("Copying {} <---- {}".format(key, key))
    elif key.replace("classficationNet.", "") in base_model.state_dict().keys():
        base_model.state_dict()[key.replace("classficationNet.", "")].copy_(state_dict[key])
        print("Copying {} <---- {}".format(key.replace("classficationNet.", ""), key))
    else:
        print("Key {} is not found".format(key))

target_model = TargetNet(base_model)
target_model.to(device)
target_model = nn.DataParallel(target_model, device_ids = [i for i in range(torch.cuda.device_count())])
criterion = nn.BCELoss()
optimizer = torch.optim.SGD(target_model.parameters(), config.lr, momentum=0.9, weight_decay=0.0, nesterov=False)

# train the model

for epoch in range(intial_epoch, config.nb_epoch):
    target_model.train()
    for batch_ndx, (x,y) in enumerate(train_loader):
        x, y = x.float().to(device), y.float().to(device)
        pred = F.sigmoid(target_model(x))
        loss = criterion(pred, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
'''

_SNIPPET_SEGMENTATION = '''
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import Dataset, DataLoader
from models.ynet3d import *

#Declare the Dice Loss
def torch_dice_coef_loss(y_true,y_pred, smooth=1.):
    y_true_f = torch.flatten(y_true)
    y_pred_f = torch.flatten(y_pred)
    intersection = torch.sum(y_true_f * y_pred_f)
    return 1. - ((2. * intersection + smooth) / (torch.sum(y_true_f) + torch.sum(y_pred_f) + smooth))

# prepare your own data
train_loader = DataLoader(TINY_DATASET, batch_size=config.batch_size, shuffle=True)

# prepare the 3D model

model = UNet3D()

#Load pre-trained weights
weight_dir = WEIGHT_DIR
checkpoint = torch.load(weight_dir)
state_dict = checkpoint['state_dict']
#Load pre-trained weights
checkpoint = torch.load(weight_dir)
state_dict = checkpoint['state_dict']
state_dict = {k.replace("module.", ""): v for k, v in state_dict.items()}
delete = [key for key in state_dict if "projection_head" in key]
for key in delete: del state_dict[key]
delete = [key for key in state_dict if "prototypes" in key]
for key in delete: del state_dict[key]
for key in state_dict.keys():
    if key in model.state_dict().keys():
        model.state_dict()[key].copy_(state_dict[key])
        print("Copying {} <---- {}".format(key, key))
    elif key.replace("classficationNet.", "") in model.state_dict().keys():
        model.state_dict()[key.replace("classficationNet.", "")].copy_(state_dict[key])
        print("Copying {} <---- {}".format(key.replace("classficationNet.", ""), key))
    else:
        print("Key {} is not found".format(key))

model.to(device)
model = nn.DataParallel(model, device_ids = [i for i in range(torch.cuda.device_count())])
criterion = torch_dice_coef_loss
optimizer = torch.optim.SGD(model.parameters(), config.lr, momentum=0.9, weight_decay=0.0, nesterov=False)

# train the model

for epoch in range(intial_epoch, config.nb_epoch):
    model.train()
    for batch_ndx, (x,y) in enumerate(train_loader):
        x, y = x.float().to(device), y.float().to(device)
        pred = model(x)
        loss = criterion(pred, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
'''


@pytest.fixture(scope="module")
def width32_checkpoint(tmp_path_factory) -> Path:
    """A width-32 en_de checkpoint as pretraining writes it (saved untrained)."""
    torch.manual_seed(0)
    ynet = YNet3D(cls_classes=44, width=32)
    folder = tmp_path_factory.mktemp("w32")
    return save_checkpoint(folder / "Checkpoints" / "en_de" / f"{CKPT}.pt", ynet,
                           optimizer=torch.optim.Adam(ynet.parameters()), epoch=1, best_loss=0.1,
                           arch="YNet3D", model_config={"width": 32, "cls_classes": 44})


@pytest.mark.parametrize("snippet", ["classification", "segmentation"])
def test_readme_finetuning_snippet_copies_every_unet_key(width32_checkpoint, capsys, snippet):
    import argparse

    path = width32_checkpoint
    x = torch.rand(2, 1, *SHAPE)
    y = (torch.rand(2, 1) if snippet == "classification" else (torch.rand(2, 1, *SHAPE) > 0.5))
    ns = {"TINY_DATASET": torch.utils.data.TensorDataset(x, y.float()),
          "WEIGHT_DIR": str(path), "device": torch.device("cpu"), "intial_epoch": 0,
          "config": argparse.Namespace(batch_size=2, lr=1e-3, nb_epoch=1)}
    code = _SNIPPET_CLASSIFICATION if snippet == "classification" else _SNIPPET_SEGMENTATION
    exec(compile(textwrap.dedent(code), f"readme_{snippet}_snippet", "exec"), ns)
    printed = capsys.readouterr().out
    copied = set(re.findall(r"^Copying (\S+) <---- \S+$", printed, re.M))
    unet_keys = set(UNet3D().state_dict())
    assert copied == unet_keys
    not_found = set(re.findall(r"^Key (\S+) is not found$", printed, re.M))
    assert not_found and all(k.startswith("clc_out.") for k in not_found)
