"""finetune.loop: one loop for both tasks (the runtime's epoch line and history record), the
width and BatchNorm mode from the --weights checkpoint, the --resume policy (settings refused
or applied and said, inputs compared by content) and Ctrl-C. Width-2 networks, 16 x 16 x 8
cubes, one or two epochs."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from finetune import classification as fc
from finetune import loop
from finetune import segmentation as fs
from models.checkpoint import load_checkpoint, save_checkpoint
from models.ynet3d import YNet3D
from tests.checkpoint_fixtures import save_published
from tests.finetune_fixtures import WIDTH, run_flags, save_kinds, write_cubes, write_volumes
from tests.test_cli_errors import one_error_line

#: The runtime's epoch line (runtime.training.format_epoch_line), as every command prints it.
EPOCH_LINE = re.compile(r"^epoch 1/1  train_loss \S+  val_loss \S+  val_(auc|dice) \S+  "
                        r"val_(accuracy|iou) \S+  lr 1\.00e-02  \d+\.\d s  \* best$")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("loop")
    return {"root": root, "cls": write_cubes(root / "cubes"), "seg": write_volumes(root / "vols"),
            **save_kinds(root / "ckpt")}


def test_both_tasks_run_through_the_one_loop(data, tmp_path, monkeypatch, capsys):
    """Both commands go through finetune.loop.fit, print the runtime's epoch line and keep
    its history record (values, seconds, best)."""
    calls = []
    fit = loop.fit
    monkeypatch.setattr(loop, "fit", lambda *a, **k: calls.append(a[1]) or fit(*a, **k))
    for module, flags in ((fc, data["cls"] + ["--batch_size", "4"]), (fs, data["seg"])):
        out = tmp_path / module.__name__
        assert module.main(flags + ["--weights", str(data["en_de"])]
                           + run_flags(out, verbose=True)) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
        assert len(lines) == 1 and EPOCH_LINE.match(lines[0]), lines
        row = json.loads((out / "metrics.json").read_text())["history"][0]
        assert row["epoch"] == 1 and row["best"] is True and row["seconds"] > 0
        assert {"train_loss", "val_loss", "lr"} <= set(row)
    assert len(calls) == 2


def test_width_and_norm_come_from_the_checkpoint(data, tmp_path, capsys):
    """No --width: the checkpoint's width (recorded, or from its weights for a published
    file) and BatchNorm mode are used, said and recorded."""
    standard = save_checkpoint(tmp_path / "std.pt", YNet3D(cls_classes=3, width=WIDTH, norm="standard"),
                               arch="YNet3D", model_config={"width": WIDTH, "norm": "standard"})
    published = tmp_path / "published.pt"
    save_published(published, YNet3D(cls_classes=3, width=WIDTH))
    for ckpt, norm, norm_source in ((standard, "standard", f"from checkpoint {standard}"),
                                    (published, "batch_stats", "default")):
        out = tmp_path / ckpt.stem
        assert fc.main(data["cls"] + ["--weights", str(ckpt), "--batch_size", "4"]
                       + run_flags(out, verbose=True)) == 0
        said = capsys.readouterr().out
        assert f"width {WIDTH} (from checkpoint {ckpt}), norm {norm} ({norm_source})" in said
        best = load_checkpoint(out / "best.pt")
        assert best["model_config"]["width"] == WIDTH and best["model_config"]["norm"] == norm
        config = json.loads((out / "config.json").read_text())
        assert config["width"] == WIDTH and config["model_flags_from"]["width"].startswith("from checkpoint")


def test_a_width_that_contradicts_the_checkpoint_is_one_line(data, tmp_path, capsys):
    rc = fc.main(data["cls"] + ["--weights", str(data["en_de"]), "--width", "4"]
                 + run_flags(tmp_path / "out"))
    line = one_error_line(capsys, rc, str(data["en_de"]), f"width {WIDTH}", "omit --width",
                          f"pass --width {WIDTH}")
    assert len(line) < 400 and not (tmp_path / "out").exists()


def test_resume_refuses_other_settings_and_applies_epochs_and_patience(data, tmp_path, capsys):
    out = tmp_path / "run"
    flags = data["cls"] + ["--weights", str(data["en_de"]), "--batch_size", "4"]
    assert fc.main(flags + run_flags(out)) == 0
    rc = fc.main(flags + ["--lr", "0.1", "--seed", "3", "--monitor", "auc", "--resume"]
                 + run_flags(out, epochs=2))
    line = one_error_line(capsys, rc, str(out / "last.pt"), "--lr 0.01 -> 0.1", "--seed 0 -> 3",
                          "--monitor loss -> auc")
    assert "--nb_epoch" not in line and load_checkpoint(out / "last.pt")["epoch"] == 1
    assert fc.main(flags + ["--resume"] + run_flags(out, epochs=2) + ["--patience", "7"]) == 0
    assert "applying --nb_epoch 1 -> 2, --patience 5 -> 7" in capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert m["resumes"] == [{"epoch": 1, "changed": {"nb_epoch": [1, 2], "patience": [5, 7]}}]
    config = json.loads((out / "config.json").read_text())
    assert config["nb_epoch"] == 2 and config["patience"] == 7   # what ran


def test_resume_compares_the_inputs_by_content(data, tmp_path, capsys):
    """Other labels under the same name are refused; the same files moved elsewhere are not;
    dropping --weights is refused."""
    src = tmp_path / "d1"
    flags = write_cubes(src)
    out = tmp_path / "run"
    weights = ["--weights", str(data["en_de"]), "--batch_size", "4"]
    assert fc.main(flags + weights + run_flags(out)) == 0
    labels = np.load(src / "cubes_labels.npy")
    np.save(src / "cubes_labels.npy", labels[::-1].copy())    # same size, other content
    rc = fc.main(flags + weights + ["--resume"] + run_flags(out, epochs=2))
    one_error_line(capsys, rc, "--labels (same size, other content)", "--resume")
    np.save(src / "cubes_labels.npy", labels)
    moved = tmp_path / "d2"
    shutil.copytree(src, moved)
    moved_flags = ["--data", str(moved / "cubes.npy"), "--labels", str(moved / "cubes_labels.npy")]
    rc = fc.main(moved_flags + ["--resume"] + run_flags(out, epochs=2))
    one_error_line(capsys, rc, "--weights (1 file(s)", "-> not given)")
    assert fc.main(moved_flags + weights + ["--resume"] + run_flags(out, epochs=2)) == 0
    identity = json.loads((out / "config.json").read_text())["data_identity"]
    assert set(identity) == {"data", "labels", "weights"} and identity["labels"]["files"] == 1


def test_resume_takes_only_a_run_of_the_same_task(data, tmp_path, capsys):
    rc = fc.main(data["cls"] + ["--resume", str(data["en_de"])] + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, str(data["en_de"]), "pretraining checkpoint",
                   "not a checkpoint of a classification fine-tuning run")
    rc = fs.main(data["seg"] + ["--resume", str(data["autoencoder"])] + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, str(data["autoencoder"]), "an autoencoder checkpoint (stage 1",
                   "not a checkpoint of a segmentation fine-tuning run")


def test_ctrl_c_keeps_the_last_complete_epoch_and_resume_continues(data, tmp_path, monkeypatch,
                                                                   capsys):
    out = tmp_path / "run"
    flags = data["cls"] + ["--weights", str(data["en_de"]), "--batch_size", "4"]
    evaluate, calls = fc.evaluate_classifier, []

    def interrupted_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **k)
    monkeypatch.setattr(fc, "evaluate_classifier", interrupted_in_epoch_2)
    assert fc.main(flags + run_flags(out, epochs=3)) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted; continue from the last complete epoch with --resume"
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and not (out / "metrics.json").exists()
    monkeypatch.undo()
    assert fc.main(flags + ["--resume"] + run_flags(out, epochs=2)) == 0
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]
