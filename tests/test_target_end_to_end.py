"""The paper's four target tasks end to end, as a user runs them: a format-faithful replica of
each public dataset (tests/replicas.py) -> ``scripts/prepare_target.py TASK`` ->
``scripts/run_target.py TASK --preset tiny`` with scratch and a pretrained checkpoint, ending in
the results table beside the paper's row and the plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.checkpoint import save_checkpoint
from models.ynet3d import YNet3D
from target_tasks import prepare, run
from target_tasks.protocols import PAPER
from tests.replicas import make_brats_replica, make_lits_replica, make_luna16_replica, make_ncs_replica

REPLICAS = {"ncc": make_luna16_replica, "ncs": make_ncs_replica, "lcs": make_lits_replica,
            "bms": make_brats_replica}
#: the input size of each task's run: NCC and NCS cubes are 64 x 64 x 32 as published; the
#: LiTS and BraTS replicas are smaller volumes than a 64 x 64 x 32 window
INPUT = {"ncc": [], "ncs": [], "lcs": ["--input", "16", "16", "8"],
         "bms": ["--input", "16", "16", "8"]}
METRIC = {"ncc": "auc", "ncs": "iou", "lcs": "iou", "bms": "iou"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "sg.pt", YNet3D(cls_classes=4, width=2))


@pytest.mark.parametrize("task", ["ncc", "ncs", "lcs", "bms"])
def test_replica_prepared_and_run_to_the_table(task, checkpoint, tmp_path, capsys):
    facts = REPLICAS[task](tmp_path / "download")
    prepared, results = tmp_path / "prepared", tmp_path / "results"
    assert prepare.main([str(a) for a in facts["argv"]] + ["--output_dir", str(prepared)]) == 0
    manifest = json.loads((prepared / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["complete"] and manifest["task"] == task
    assert run.main([task, "--prepared", str(prepared), "--init", f"semantic_genesis={checkpoint}",
                     "--seeds", "0", "--output_dir", str(results), "--preset", "tiny",
                     "--device", "cpu"] + INPUT[task]) == 0
    out = json.loads((results / "results.json").read_text(encoding="utf-8"))
    assert out["metric"] == METRIC[task] and set(out["results"]) == {"scratch", "semantic_genesis"}
    assert {c["init"] for c in out["cells"]} == {"scratch", "semantic_genesis"}
    assert all(0.0 <= c["value"] <= 1.0 for c in out["cells"])
    assert out["paper"] == {k: list(v) for k, v in PAPER[task].items()}
    mean, std = PAPER[task]["semantic_genesis"]
    assert f"{mean:.2f} ± {std:.2f}" in (results / "results.md").read_text(encoding="utf-8")
    with Image.open(results / "results.png") as im:
        assert im.format == "PNG"
