"""torchrun + DistributedDataParallel pretraining on CPU (gloo): 2 processes, then resume with 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_state_dict_checked
from models.ynet3d import YNet3D
from pytorch import train as train_cli
from tests.fold_fixtures import make_fold_files, train_args

REPO = Path(__file__).resolve().parents[1]
CKPT = "semantic_genesis_chest_ct"

pytestmark = pytest.mark.slow  # two processes under torchrun


def test_two_processes_then_resume_with_one(tmp_path):
    folds = make_fold_files(tmp_path / "folds", classes=3, instances=4, val_instances=3,
                            resolutions=1)
    argv = train_args(folds, tmp_path / "out", width=4, epochs=1, resolutions=1,
                      val_instances=3, batch_size=8)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "pytorch" / "train.py"), *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    epoch_lines = [l for l in proc.stdout.splitlines() + proc.stderr.splitlines()
                   if l.startswith("epoch ")]
    assert len(epoch_lines) == 1, proc.stdout + proc.stderr   # rank 0 logs alone
    ck = tmp_path / "out" / "ckpt"
    assert sorted(p.name for p in ck.iterdir()) == sorted(
        [f"{CKPT}.pt", f"{CKPT}_last.pt", f"{CKPT}_config.json",
         f"{CKPT}_diagnostics.json"])   # no temp files left
    cfg = json.loads((ck / f"{CKPT}_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["per_rank_batch"] == 4
    assert len(list((tmp_path / "out" / "runs").rglob("events.out.tfevents.*"))) == 1
    ckpt = torch.load(ck / f"{CKPT}_last.pt")
    assert ckpt["epoch"] == 1
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
    load_state_dict_checked(YNet3D(cls_classes=3, width=4), ckpt["state_dict"], source="ddp")
    # resume in one process (a different process count) for one more epoch
    argv2 = train_args(folds, tmp_path / "out", width=4, epochs=2, resolutions=1,
                       val_instances=3, batch_size=8)
    assert train_cli.main(argv2 + ["--resume", str(ck / f"{CKPT}_last.pt")]) == 0
    resumed = torch.load(ck / f"{CKPT}_last.pt")
    assert resumed["epoch"] == 2
    assert not torch.equal(resumed["state_dict"]["down_tr64.ops.0.conv1.weight"],
                           ckpt["state_dict"]["down_tr64.ops.0.conv1.weight"])
