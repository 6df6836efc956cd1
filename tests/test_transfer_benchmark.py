"""Transfer benchmark on a tiny configuration: both phantom tasks, two seeds, scratch vs pretrained."""
import json

import pytest
import torch

from models.checkpoint import save_checkpoint
from models.ynet3d import YNet3D
from experiments import transfer_benchmark as tb

TINY = ["--seeds", "0", "1", "--cls_n", "4", "4", "4", "--cube", "16", "16", "8", "--cls_epochs", "1",
        "--cls_batch_size", "4", "--seg_n", "1", "1", "1", "--seg_shape", "24", "24", "8",
        "--seg_nodules", "2", "--seg_crop", "24", "24", "8", "--seg_epochs", "1", "--seg_steps", "1",
        "--seg_batch_size", "2", "--num_workers", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("w") / "sg.pt", YNet3D(cls_classes=4, width=4))


def test_tiny_benchmark_table_and_json(weights, tmp_path, capsys):
    out = tmp_path / "bench"
    assert tb.main(["--weights", str(weights), "--output_dir", str(out)] + TINY) == 0
    printed = capsys.readouterr().out
    assert "| task | metric (%) | scratch (2 seeds) | pretrained (2 seeds) |" in printed
    assert "| classification | AUC |" in printed and "| segmentation | IoU |" in printed
    summary = json.loads((out / "transfer_benchmark.json").read_text(encoding="utf-8"))
    assert summary["width"] == 4  # read from the checkpoint
    assert [(r["task"], r["metric"]) for r in summary["rows"]] == [
        ("classification", "AUC"), ("classification", "accuracy"), ("segmentation", "IoU"),
        ("segmentation", "Dice")]
    for row in summary["rows"]:
        for init in ("scratch", "pretrained"):
            assert len(row[init]["values"]) == 2 and 0.0 <= row[init]["mean"] <= 100.0
    for task in ("classification", "segmentation"):
        for init in ("scratch", "pretrained"):
            for seed in (0, 1):
                run = out / "runs" / task / init / f"seed{seed}"
                m = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
                assert m["init"] == init and (m["loaded_keys"] > 0) == (init == "pretrained")


def test_summary_statistics():
    res = {"classification": {"scratch": [{"auc": 0.9, "accuracy": 0.8}, {"auc": 0.7, "accuracy": 0.6}],
                              "pretrained": [{"auc": 1.0, "accuracy": 1.0}]}}
    rows = tb.summarize(res)
    assert rows[0]["scratch"]["mean"] == pytest.approx(80.0)
    assert rows[0]["scratch"]["std"] == pytest.approx(14.1421356, rel=1e-6)  # sample std over seeds
    assert rows[0]["pretrained"]["std"] == 0.0
    assert "80.00 +- 14.14" in tb.format_table(rows, 2)


def test_transfer_benchmark_bad_width_or_missing_weights_are_one_line_errors(weights, tmp_path, capsys):
    assert tb.main(["--weights", str(weights), "--width", "8", "--output_dir", str(tmp_path)] + TINY) == 2
    assert "pass --width 4" in capsys.readouterr().err
    assert tb.main(["--weights", str(tmp_path / "none.pt"), "--output_dir", str(tmp_path)] + TINY) == 2
    assert "not found" in capsys.readouterr().err


def test_benchmark_cells_are_keyed_by_settings(weights, tmp_path, monkeypatch, capsys):
    """A re-run with the same settings reuses every run; another learning rate is refused,
    naming the setting, and --overwrite redoes the runs; another checkpoint is refused too."""
    out = tmp_path / "bench"
    argv = ["--weights", str(weights), "--output_dir", str(out), "--tasks", "classification"] + TINY
    assert tb.main(argv) == 0
    first = json.loads((out / "transfer_benchmark.json").read_text(encoding="utf-8"))
    from finetune import classification
    real = classification.run
    calls = []
    monkeypatch.setattr(classification, "run", lambda a: calls.append(a.lr) or real(a))
    assert tb.main(argv) == 0 and calls == []
    assert json.loads((out / "transfer_benchmark.json").read_text(encoding="utf-8"))["rows"] == first["rows"]
    capsys.readouterr()
    assert tb.main(argv + ["--cls_lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "run.lr: 0.01 -> 0.5" in err and "--overwrite" in err and calls == []
    assert tb.main(argv + ["--cls_lr", "0.5", "--overwrite"]) == 0 and calls == [0.5] * 4
    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "other.pt", YNet3D(cls_classes=4, width=4))
    argv[1] = str(other)
    assert tb.main(argv + ["--cls_lr", "0.5"]) == 2
    assert "weights.sha256" in capsys.readouterr().err
