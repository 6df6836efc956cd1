"""The project's end-to-end test: the quickstart's stages on tiny phantoms, in-process.

phantoms -> prepare_dataset -> train_autoencoder -> feature_extractor -> pattern_generator_3D
-> pytorch/train.py -> nodule cubes -> finetune_classification, each through its ``main([...])``
with tiny sizes (width 4, cubes 16 x 16 x 8, one epoch). A second test checks that every
command ``scripts/quickstart.sh`` runs (quick and --full) parses with its stage's parser, so
the script and the CLIs cannot drift apart silently.
"""
from __future__ import annotations

import importlib
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import load_checkpoint
from pytorch import train as pretrain
from finetune import classification as ft
from preparation import phantoms
from preparation import prepare as prepare_dataset
from self_discovery import feature_extractor as fe
from self_discovery import pattern_generator_3D as pg
from self_discovery import train_autoencoder as ae

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "scripts" / "quickstart.sh"

STAGE_MODULES = {
    "scripts/phantoms.py": "preparation.phantoms",
    "scripts/prepare_dataset.py": "preparation.prepare",
    "self_discovery/train_autoencoder.py": "self_discovery.train_autoencoder",
    "self_discovery/feature_extractor.py": "self_discovery.feature_extractor",
    "self_discovery/pattern_generator_3D.py": "self_discovery.pattern_generator_3D",
    "pytorch/train.py": "pytorch.train",
    "scripts/finetune_classification.py": "finetune.classification",
}


def test_pipeline_end_to_end_on_tiny_phantoms(tmp_path):
    out = tmp_path / "qs"
    dev = ["--device", "cpu"]
    # 0. data: 8 phantom patients in HU (NRRD), as the quickstart writes them
    assert phantoms.main(["--output_dir", str(out / "input"), "--n", "8", "--shape", "64", "64", "20",
                          "--spacing", "1.5", "1.5", "3.0", "--seed", "100"]) == 0
    # 1. prepare
    assert prepare_dataset.main(["--input_dir", str(out / "input"), "--output_dir", str(out / "dataset"),
                                 "--val_fraction", "0.25", "--seed", "0"]) == 0
    ds = out / "dataset"
    assert len(list((ds / "train").glob("*.npy"))) == 6
    assert len(list((ds / "validation").glob("*.npy"))) == 2
    # 2. autoencoder
    assert ae.main(["--data_dir", str(ds), "--input_rows", "32", "--input_cols", "32",
                    "--input_deps", "16", "--width", "4", "--batch_size", "2", "--nb_epoch", "1",
                    "--num_workers", "0", "--output_dir", str(out / "autoencoder"),
                    "--log_dir", str(out / "runs" / "autoencoder"), "--verbose", "0", *dev]) == 0
    weights = out / "autoencoder" / "Unet_autoencoder.pt"
    assert weights.is_file()
    # 3. features
    assert fe.main(["--data_dir", str(ds), "--weights", str(weights), "--input_rows", "32",
                    "--input_cols", "32", "--input_deps", "16", "--num_workers", "0",
                    "--output_dir", str(out / "features"), "--verbose", "0", *dev]) == 0
    train_feat = np.load(out / "features" / "train_features.npy")
    assert train_feat.shape == (6, 64) and train_feat.dtype == np.float32
    # 4. anatomical patterns (2 classes x 4 instances, 3 resolutions)
    assert pg.main(["--data_dir", str(ds), "--output_dir", str(out / "patterns"),
                    "--train_features", str(out / "features" / "train_features.npy"),
                    "--val_features", str(out / "features" / "validation_features.npy"),
                    "--is_normalized", "--input_rows", "16", "--input_cols", "16", "--input_deps", "8",
                    "--crop_rows", "16", "--crop_cols", "16", "--multi_res", "--minPatchSize", "12",
                    "--maxPatchSize", "20", "--nb_classes", "2", "--nb_instances", "4",
                    "--nb_instances_val", "2", "--len_border", "4", "--len_border_z", "2",
                    "--montage_instances", "0", "--seed", "0"]) == 0
    cubes = np.load(out / "patterns" / "train_data1_vwGen_ex_ref_fold1.0.npy")
    labels = np.load(out / "patterns" / "train_label1_vwGen_ex_ref_fold1.0.npy")
    assert cubes.shape == (8, 16, 16, 8) and labels.reshape(-1).tolist() == [0] * 4 + [1] * 4
    assert 0.0 <= cubes.min() and cubes.max() <= 1.0
    # 5. pretraining (Y-Net 3D); cube size, classes, instances, resolutions from config.json
    assert pretrain.main(["--data_dir", str(out / "patterns"), "--width", "4",
                          "--batch_size", "4", "--nb_epoch", "1", "--output_dir", str(out / "pretrain"),
                          "--log_dir", str(out / "runs"), "--verbose", "0", *dev]) == 0
    ckpt = out / "pretrain" / "semantic_genesis_chest_ct.pt"
    state = load_checkpoint(ckpt)
    assert (state["config"]["cls_classes"], state["config"]["nb_multires_patch"]) == (2, 3)
    assert "state_dict" in state and "down_tr64.ops.0.conv1.weight" in state["state_dict"]
    # 6. fine-tune the pretrained encoder on nodule / no-nodule cubes
    assert phantoms.main(["--output_dir", str(out / "nodules"), "--nodule_cubes", "16",
                          "--cube_size", "16", "16", "8", "--seed", "7"]) == 0
    assert ft.main(["--data", str(out / "nodules" / "cubes.npy"), "--labels",
                    str(out / "nodules" / "labels.npy"), "--weights", str(ckpt), "--width", "4",
                    "--batch_size", "4", "--nb_epoch", "1", "--num_workers", "0",
                    "--output_dir", str(out / "finetune"), "--quiet", *dev]) == 0
    metrics = json.loads((out / "finetune" / "metrics.json").read_text())
    assert metrics["init"] == "pretrained" and metrics["loaded_keys"] > 0
    assert metrics["epochs_run"] == 1 and 0.0 <= metrics["val"]["accuracy"] <= 1.0
    # TensorBoard event files of the training stages land under the outputs folder
    assert list((out / "runs").rglob("events.out.tfevents.*"))


def _dry_run(*flags: str) -> list[tuple[str, list[str]]]:
    res = subprocess.run(["bash", str(QUICKSTART), "--dry_run", *flags], capture_output=True,
                         text=True, encoding="utf-8", errors="replace", timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    cmds = []
    for line in res.stdout.splitlines():
        if line.startswith("==> ["):
            argv = shlex.split(line.split("] ", 1)[1])
            cmds.append((argv[1], argv[2:]))
    return cmds


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")
@pytest.mark.parametrize("flags", [(), ("--full",), ("--no_real", "--phantoms", "3", "--epochs", "1")])
def test_quickstart_commands_parse(flags):
    assert subprocess.run(["bash", "-n", str(QUICKSTART)]).returncode == 0
    cmds = _dry_run(*flags)
    scripts = [s for s, _ in cmds]
    assert scripts == ["scripts/phantoms.py", "scripts/prepare_dataset.py",
                       "self_discovery/train_autoencoder.py", "self_discovery/feature_extractor.py",
                       "self_discovery/pattern_generator_3D.py", "pytorch/train.py",
                       "scripts/phantoms.py", "scripts/finetune_classification.py"]
    for script, argv in cmds:
        module = importlib.import_module(STAGE_MODULES[script])
        module.build_parser().parse_args(argv)   # SystemExit on an unknown or bad flag
    if "--full" in flags:
        ae_argv = dict(cmds)["self_discovery/train_autoencoder.py"]
        assert ae_argv[ae_argv.index("--width") + 1] == "32"
        assert ae_argv[ae_argv.index("--input_rows") + 1] == "128"
