"""The checkpoint schema: round trip, plain torch.load, prefixes, key errors, truncation."""
import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import (load_checkpoint, load_pretrained, load_state_dict_checked,
                               save_checkpoint)
from models.ynet3d import ClassificationNet3D, UNet3D, YNet3D
from runtime.errors import CheckpointError


def _ckpt(tmp_path, model, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 1, 32, 32, 16))[0].mean().backward()
    opt.step()
    cfg = argparse.Namespace(lr=1e-3, data_dir=Path("x"), arr=np.float32(2.5))
    return save_checkpoint(tmp_path / "a" / "c.pt", model, optimizer=opt, epoch=3, best_loss=0.5,
                           num_epoch_no_improvement=1, config=cfg,
                           model_config={"width": 4, "cls_classes": 3}, **kw), opt


def test_round_trip_plain_torch_load(tmp_path):
    model = YNet3D(cls_classes=3, width=4)
    path, opt = _ckpt(tmp_path, model)
    ckpt = torch.load(path)  # plain load, as the original README's snippet does
    for key in ("state_dict", "optimizer_state_dict", "epoch", "best_loss",
                "num_epoch_no_improvement"):
        assert key in ckpt
    assert ckpt["epoch"] == 3 and ckpt["config"]["arr"] == 2.5 and ckpt["config"]["data_dir"] == "x"
    fresh = YNet3D(cls_classes=3, width=4)
    loaded = load_state_dict_checked(fresh, ckpt["state_dict"])
    assert len(loaded) == len(fresh.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])
    assert not list(tmp_path.glob("a/.*tmp"))  # no temp file left behind


def test_prefixes_and_published_extras(tmp_path):
    model = YNet3D(cls_classes=3, width=4)
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    sd["module.projection_head.0.weight"] = torch.zeros(2)
    sd["prototypes.weight"] = torch.zeros(2)
    torch.save({"state_dict": sd}, tmp_path / "pub.pt")
    unet = UNet3D(width=4)
    loaded = load_pretrained(unet, tmp_path / "pub.pt")  # clc_out skipped for a UNet3D
    assert set(loaded) == set(unet.state_dict())
    clf = ClassificationNet3D(cls_classes=3, width=4)
    assert set(load_pretrained(clf, tmp_path / "pub.pt")) == set(clf.state_dict())
    compiled_like = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": compiled_like}, tmp_path / "c.pt")
    assert len(load_pretrained(YNet3D(cls_classes=3, width=4), tmp_path / "c.pt")) == len(sd) - 2


def test_mismatch_errors_list_keys(tmp_path):
    path, _ = _ckpt(tmp_path, YNet3D(cls_classes=3, width=4))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*clc_out.fc1.weight"):
        load_pretrained(YNet3D(cls_classes=5, width=4), path)
    # A fresh head declared new loads everything else.
    loaded = load_pretrained(YNet3D(cls_classes=5, width=4), path, new_keys=["clc_out.fc1"])
    assert "clc_out.fc1.weight" not in loaded and "clc_out.conv1.weight" in loaded
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        load_pretrained(YNet3D(cls_classes=3, width=8), path)
    # the library's message names the file, what it is and the width; no command-line advice
    assert str(path) in str(err.value) and "of width 8" in str(err.value)
    assert "--width" not in str(err.value) and len(str(err.value)) < 400
    sd = torch.load(path)["state_dict"]
    del sd["down_tr64.ops.0.conv1.weight"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): down_tr64.ops.0.conv1.weight"):
        load_state_dict_checked(YNet3D(cls_classes=3, width=4), sd)


def test_truncated_and_missing_files(tmp_path):
    path, _ = _ckpt(tmp_path, YNet3D(cls_classes=3, width=4))
    data = path.read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc.pt: truncated \(\d+ bytes"):
        load_checkpoint(bad)
    legacy = tmp_path / "legacy.pt"  # the format of torch < 1.6 (the published checkpoint's)
    torch.save(torch.load(path), legacy, _use_new_zipfile_serialization=False)
    bad.write_bytes(legacy.read_bytes()[: legacy.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="trunc.pt: truncated"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_code_in_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Evil()}, p)
    with pytest.raises(CheckpointError, match="refused: the file needs the Python global "
                                              "builtins.print") as e:
        load_checkpoint(p)
    assert "truncated" not in str(e.value)


def test_best_loss_inf_round_trips(tmp_path):
    p = save_checkpoint(tmp_path / "c.pt", UNet3D(width=4))
    assert math.isinf(torch.load(p)["best_loss"])
