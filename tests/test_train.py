"""Pretraining (pytorch/train.py, engine, data): outputs, resume, bad input.

Tiny fold files (16 x 16 x 8 cubes, 3 classes), width 4-8, 1-2 epochs, CPU only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_state_dict_checked, save_checkpoint
from models.ynet3d import ContBatchNorm3d, YNet3D
from pytorch import train as train_cli
from pytorch.data import epoch_permutation, load_pretraining_data, validation_order
from pytorch.engine import (LossConfig, SyncContBatchNorm3d, build_model, convert_sync_batchnorm,
                            eval_step, make_optimizer, perturb_inputs, restoration_gains,
                            restoration_sums, summarize_stats, train_step)
from pytorch.perturbations import OPERATIONS
from preparation.phantoms import make_nodule_cubes
from self_discovery.fold_files import fold_file_names
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


def test_epoch_permutation_shards_evenly():
    full = epoch_permutation(11, seed=3, epoch=2)
    assert sorted(full.tolist()) == list(range(11))
    a, b = epoch_permutation(11, 3, 2, 0, 2), epoch_permutation(11, 3, 2, 1, 2)
    assert len(a) == len(b) == 5 and not set(a.tolist()) & set(b.tolist())
    assert not torch.equal(epoch_permutation(11, 3, 3), full)  # reshuffled per epoch


# ------------------------------------------------------------------------------ data
def test_validation_order_is_drawn_once_from_the_seed_and_mixes_classes():
    labels = torch.arange(10).repeat_interleave(6)          # class-contiguous, as the files
    order = validation_order(len(labels), seed=1)
    assert torch.equal(order, validation_order(len(labels), seed=1))
    assert not torch.equal(order, validation_order(len(labels), seed=2))
    assert torch.equal(order.sort().values, torch.arange(len(labels)))
    shards = [validation_order(len(labels), 1, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(len(labels)))

    def classes_per_batch(idx):   # full batches of 8
        return [len(set(labels[idx[s:s + 8]].tolist())) for s in range(0, len(idx) - 7, 8)]
    assert max(classes_per_batch(torch.arange(len(labels)))) <= 3      # file order
    assert min(classes_per_batch(order)) >= 4                          # mixed


def test_validation_batches_mix_classes_and_repeat_between_runs(tmp_path, monkeypatch):
    folds = make_fold_files(tmp_path / "f", classes=4, instances=2, val_instances=4)
    seen: list[list[list[int]]] = []

    class Recording(train_cli.BatchFeeder):
        def __init__(self, data, *a, **kw):
            super().__init__(data, *a, **kw)
            self.is_val = data.cubes.shape[1] == 2   # validation: original + fixed input
            if self.is_val:
                seen.append([])

        def __call__(self, idx):
            x, y = super().__call__(idx)
            if self.is_val:
                seen[-1].append(y.tolist())
            return x, y

    monkeypatch.setattr(train_cli, "BatchFeeder", Recording)
    for run in ("a", "b"):
        argv = train_args(folds, tmp_path / run, classes=4, instances=2, val_instances=4,
                          epochs=2, batch_size=8, resolutions=1)
        assert _run(argv) == 0
    assert len(seen) == 2 and seen[0] == seen[1]            # same seed: same batches
    epochs = len(seen[0]) // 2
    assert seen[0][:epochs] == seen[0][epochs:]             # the same every epoch
    assert all(len(set(batch)) >= 3 for batch in seen[0])   # file order: 2 classes per batch


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
    assert len(lines) == 2 and "val_loss" in lines[0] and "acc" in lines[0] and "lr" in lines[0]
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
    (tmp_path / "empty").mkdir()
    err = _error(train_args(tmp_path / "empty", tmp_path), capsys)
    assert "train_data1_vwGen_ex_ref_fold1.0.npy" in err and "val_label1" in err
    assert "--data_dir" in err and "--cls_classes" in err
    err = _error(train_args(tmp_path / "none", tmp_path), capsys)
    assert "none: folder not found; set --data_dir" in err


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
        assert "NaN" in err and "the first at index 4" in err


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


# The original README's fine-tuning snippets run verbatim against our checkpoint in
# tests/test_readme_snippets.py.


def test_more_cubes_per_class_than_nb_instances_keeps_every_class(tmp_path):
    """Files of 4 cubes per class read with --nb_instances 2: each class's first 2 cubes, not
    the first half of the classes."""
    d = make_fold_files(tmp_path / "f", classes=6, instances=4, val_instances=3, resolutions=2)
    train, val = load_pretraining_data(d, 6, 2, 1, 2, SHAPE)
    assert train.labels.tolist() == [c for c in range(6) for _ in range(2)] * 2
    assert val.labels.tolist() == list(range(6))
    full = np.load(d / fold_file_names("train", 1, 1)[0])
    np.testing.assert_array_equal(train.cubes[2:4, 0].numpy(), full[4:6])   # class 1, cubes 0-1


# ------------------------------------------------------------------------------ diagnostics
def test_restoration_gain_per_transform():
    g = torch.Generator().manual_seed(0)
    orig = torch.rand(6, 1, 8, 8, 8, generator=g)
    pert = orig + 0.1
    choices = torch.tensor([0, 0, 2, 2, -1, 3])
    perfect = restoration_gains(restoration_sums(orig, pert, orig, choices))
    assert sorted(perfect) == sorted(OPERATIONS[k] for k in (0, 2, 3))   # no intensity cube
    assert all(v["gain"] == pytest.approx(1.0) for v in perfect.values())
    assert perfect["in_painting"]["n"] == 2
    assert perfect["in_painting"]["mse_perturbed"] == pytest.approx(0.01, rel=1e-4)
    identity = restoration_gains(restoration_sums(pert, pert, orig, choices))
    assert all(v["gain"] == pytest.approx(0.0, abs=1e-6) for v in identity.values())
    worse = restoration_gains(restoration_sums(orig + 0.2, pert, orig, choices))
    assert all(v["gain"] == pytest.approx(-3.0, rel=1e-4) for v in worse.values())


def test_perturb_inputs_choices_do_not_change_the_inputs(folds):
    train, _ = load_pretraining_data(folds, 3, 4, 2, 1, SHAPE)
    x = train.cubes[:8]
    plain = perturb_inputs(x, torch.Generator().manual_seed(3))
    again, ops = perturb_inputs(x, torch.Generator().manual_seed(3), return_choices=True)
    assert torch.equal(plain, again) and ops.shape == (8,) and 0 <= int(ops.min()) <= int(ops.max()) <= 3


def test_diagnostics_on_epoch_line_tensorboard_and_json(folds, tmp_path, capsys):
    cubes, labels = make_nodule_cubes(12, SHAPE, seed=5)
    np.save(tmp_path / "probe.npy", cubes)
    np.save(tmp_path / "probe_labels.npy", labels)
    argv = train_args(folds, tmp_path, width=4, epochs=2) + [
        "--probe_data", str(tmp_path / "probe.npy"), "--probe_labels", str(tmp_path / "probe_labels.npy")]
    assert _run(argv) == 0
    out = capsys.readouterr()
    lines = [l for l in (out.out + out.err).splitlines() if "diag:" in l]
    assert len(lines) == 3 and "epoch 0 (initialisation) probe auc" in lines[0]
    assert "(chance 33.3%)" in lines[1] and "restoration gain" in lines[1] and "probe auc" in lines[1]
    printed = out.out.splitlines()
    epoch_lines = [i for i, line in enumerate(printed) if line.startswith("epoch ")]
    assert [printed[i + 1].startswith("    diag: top-1") for i in epoch_lines] == [True, True]
    diag = json.loads((tmp_path / "ckpt" / f"{CKPT}_diagnostics.json").read_text())
    assert [d["epoch"] for d in diag] == [0, 1, 2]
    assert 0.0 <= diag[2]["probe"]["value"] <= 1.0 and diag[2]["cls_chance"] == pytest.approx(1 / 3)
    assert set(diag[1]["restoration"]) <= {"local_pixel_shuffle", "nonlinear_intensity",
                                           "in_painting", "out_painting"}
    assert all(v["mse_perturbed"] > 0 for v in diag[1]["restoration"].values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow
    ev = EventAccumulator(str(next((tmp_path / "runs").iterdir())))
    ev.Reload()
    tags = ev.Tags()["scalars"]
    assert "diag/cls_top1" in tags and "diag/probe_auc" in tags
    assert any(t.startswith("diag/restoration_gain/") for t in tags)
    # an en run has no restoration, the probe still runs; a lone --probe_data is an error
    en = train_args(folds, tmp_path / "en", width=4, epochs=1) + ["--exp", "en"]
    assert _run(en + argv[-4:]) == 0
    diag = json.loads((tmp_path / "en" / "ckpt" / f"{CKPT}_diagnostics.json").read_text())
    assert diag[1]["restoration"] == {} and "probe" in diag[1]
    assert _run(en + argv[-4:-2]) == 2
    assert "--probe_data and --probe_labels go together" in capsys.readouterr().err
