"""The project's end-to-end test: the quickstart's stages on tiny phantoms, in-process, and its
summary.

phantoms -> prepare_dataset -> train_autoencoder -> feature_extractor -> pattern_generator_3D
-> nodule cubes -> pytorch/train.py (with the probe) -> finetune_classification twice
(pretrained, scratch) -> quickstart_summary, each through its ``main([...])`` with tiny sizes
(width 4, cubes 16 x 16 x 8, one epoch). A second test checks that every command
``scripts/quickstart.sh`` runs (quick and --full) parses with its stage's parser and writes
where the summary reads, so the script, the CLIs and the summary cannot drift apart silently.
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
from runtime import pipeline_summary as summary
from runtime.errors import InputError
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
    "scripts/quickstart_summary.py": "runtime.pipeline_summary",
}


def test_pipeline_end_to_end_on_tiny_phantoms(tmp_path, capsys):
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
                    "--montage_instances", "2", "--seed", "0"]) == 0
    cubes = np.load(out / "patterns" / "train_data1_vwGen_ex_ref_fold1.0.npy")
    labels = np.load(out / "patterns" / "train_label1_vwGen_ex_ref_fold1.0.npy")
    assert cubes.shape == (8, 16, 16, 8) and labels.reshape(-1).tolist() == [0] * 4 + [1] * 4
    assert 0.0 <= cubes.min() and cubes.max() <= 1.0
    # 5. nodule / no-nodule cubes of other phantom patients: fine-tuning (and probe) set, test set
    for name, seed in (("train", "7"), ("test", "8")):
        assert phantoms.main(["--output_dir", str(out / "nodules" / name), "--nodule_cubes", "16",
                              "--cube_size", "16", "16", "8", "--nodule_radius", "2", "3",
                              "--seed", seed]) == 0
    nod = {name: (str(out / "nodules" / name / "cubes.npy"), str(out / "nodules" / name / "labels.npy"))
           for name in ("train", "test")}
    # 6. pretraining (Y-Net 3D); cube size, classes, instances, resolutions from config.json
    assert pretrain.main(["--data_dir", str(out / "patterns"), "--width", "4",
                          "--batch_size", "4", "--nb_epoch", "1", "--output_dir", str(out / "pretrain"),
                          "--probe_data", nod["train"][0], "--probe_labels", nod["train"][1],
                          "--log_dir", str(out / "runs"), "--verbose", "0", *dev]) == 0
    ckpt = out / "pretrain" / "semantic_genesis_chest_ct.pt"
    state = load_checkpoint(ckpt)
    assert (state["config"]["cls_classes"], state["config"]["nb_multires_patch"]) == (2, 3)
    assert "state_dict" in state and "down_tr64.ops.0.conv1.weight" in state["state_dict"]
    # 7. fine-tune the same cubes with the pretrained encoder and from scratch
    common = ["--data", nod["train"][0], "--labels", nod["train"][1], "--test_data", nod["test"][0],
              "--test_labels", nod["test"][1], "--width", "4", "--batch_size", "4",
              "--nb_epoch", "1", "--num_workers", "0", "--seed", "0", "--quiet", *dev]
    assert ft.main([*common, "--weights", str(ckpt), "--output_dir", str(out / "finetune_pretrained")]) == 0
    assert ft.main([*common, "--output_dir", str(out / "finetune_scratch")]) == 0
    metrics = json.loads((out / "finetune_pretrained" / "metrics.json").read_text())
    assert metrics["init"] == "pretrained" and metrics["loaded_keys"] > 0
    assert metrics["epochs_run"] == 1 and 0.0 <= metrics["val"]["accuracy"] <= 1.0
    assert json.loads((out / "finetune_scratch" / "metrics.json").read_text())["init"] == "scratch"
    # TensorBoard event files of the training stages land under the outputs folder
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    # 8. the summary: what the run established and where things are
    capsys.readouterr()
    assert summary.main(["--out", str(out)]) == 0
    text = capsys.readouterr().out
    diag = json.loads((out / "pretrain" / "semantic_genesis_chest_ct_diagnostics.json").read_text())
    assert "self-classification top-1" in text and "chance 50.0%, 2 classes" in text
    for op in diag[-1]["restoration"]:
        assert summary._NAMES[op] in text
    assert "random initialisation (scratch)" in text and "after pretraining (epoch 1)" in text
    assert "pretrained" in text and "scratch" in text and "test AUC difference" in text
    for path in (out / "patterns" / "montage", out / "pretrain" / "semantic_genesis_chest_ct.pt",
                 out / "autoencoder" / "Unet_autoencoder.pt", out / "finetune_scratch" / "best.pt"):
        assert str(path) in text and path.exists()
    assert f"tensorboard --logdir {out}" in text


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


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")
@pytest.mark.parametrize("flags", [(), ("--full",), ("--no_real", "--phantoms", "3", "--epochs", "1"),
                                   ("--no_finetune", "--out", "/tmp/qs")])
def test_quickstart_commands_parse(flags):
    assert subprocess.run(["bash", "-n", str(QUICKSTART)]).returncode == 0
    cmds = _dry_run(*flags)
    scripts = [s for s, _ in cmds]
    finetunes = [] if "--no_finetune" in flags else ["scripts/finetune_classification.py"] * 2
    assert scripts == ["scripts/phantoms.py", "scripts/prepare_dataset.py",
                       "self_discovery/train_autoencoder.py", "self_discovery/feature_extractor.py",
                       "self_discovery/pattern_generator_3D.py", "scripts/phantoms.py",
                       "scripts/phantoms.py", "pytorch/train.py", *finetunes,
                       "scripts/quickstart_summary.py"]
    for script, argv in cmds:
        module = importlib.import_module(STAGE_MODULES[script])
        module.build_parser().parse_args(argv)   # SystemExit on an unknown or bad flag
    argvs = [argv for _, argv in cmds]
    # the stages write where the summary reads
    layout = summary.QuickstartLayout(Path(_flag(argvs[-1], "--out")))
    ae_argv, pre_argv = argvs[2], argvs[7]
    assert Path(_flag(ae_argv, "--output_dir")) / "Unet_autoencoder.pt" == layout.autoencoder
    assert Path(_flag(argvs[4], "--output_dir")) / "montage" == layout.montage
    assert Path(_flag(pre_argv, "--output_dir")) == layout.pretrain
    assert Path(_flag(pre_argv, "--log_dir")) == layout.runs
    assert _flag(pre_argv, "--probe_data") == _flag(argvs[5], "--output_dir") + "/cubes.npy"
    if finetunes:
        pre, scr = argvs[8], argvs[9]
        assert Path(_flag(pre, "--output_dir")) == layout.finetune_pretrained
        assert Path(_flag(scr, "--output_dir")) == layout.finetune_scratch
        # a paired comparison: the same arguments but the initial weights and the folder
        strip = {"--weights", "--output_dir"}
        same = [[a for i, a in enumerate(v) if a not in strip and (i == 0 or v[i - 1] not in strip)]
                for v in (pre, scr)]
        assert same[0] == same[1] and "--weights" in pre and "--weights" not in scr
        assert _flag(pre, "--data") == _flag(pre_argv, "--probe_data")
    if "--full" in flags:
        assert _flag(ae_argv, "--width") == "32" and _flag(ae_argv, "--input_rows") == "128"


# ------------------------------------------------------------------------------- summary
def test_auc_standard_error_matches_hanley_mcneil():
    assert summary.auc_standard_error(0.5, 50, 50) == pytest.approx(0.0580, abs=5e-4)
    assert summary.auc_standard_error(0.9, 50, 50) < summary.auc_standard_error(0.7, 50, 50)
    assert np.isnan(summary.auc_standard_error(0.8, 0, 10))


def test_pretext_lines_say_whether_top1_beats_chance():
    rec = {"epoch": 3, "cls_chance": 1 / 6, "restoration": {
        "in_painting": {"gain": 0.4, "n": 5, "mse_restored": 0.1, "mse_perturbed": 0.2}}}
    early = dict(rec, epoch=1, cls_top1=0.0, restoration={"in_painting": dict(
        rec["restoration"]["in_painting"], gain=-0.5)})
    good = "\n".join(summary.pretext_lines([early, dict(rec, cls_top1=1.0)], 18))
    assert "above chance" in good and "18 of 18" in good and "after epoch 3" in good
    assert "in-painting" in good and "-50.0%" in good and "+40.0%" in good   # epochs 1 and 3
    poor = "\n".join(summary.pretext_lines([dict(rec, cls_top1=3 / 18)], 18))
    assert "not distinguishable from chance" in poor and "3 of 18" in poor


def _finetune_dir(folder: Path, weights: str | None, seed: int, auc: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"data": ["c.npy"], "seed": seed,
                                                    "weights": weights, "test_labels": None}))
    (folder / "metrics.json").write_text(json.dumps({
        "epochs_run": 3, "best_epoch": 2, "n_train": 12, "n_val": 4,
        "val": {"auc": auc, "accuracy": 0.5}, "test": {"auc": auc, "accuracy": 0.5, "n": 8}}))
    return folder


def test_finetune_lines_side_by_side_and_refuse_unpaired_runs(tmp_path):
    pre = _finetune_dir(tmp_path / "pre", "sg.pt", 0, 0.9)
    scr = _finetune_dir(tmp_path / "scr", None, 0, 0.5)
    text = "\n".join(summary.finetune_lines(pre, scr))
    assert "pretrained" in text and "scratch" in text and "0.900" in text and "0.500" in text
    assert "no standard error: the test labels were not found" in text
    np.save(tmp_path / "labels.npy", np.array([0, 1] * 20))
    for folder in (pre, scr):
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(cfg, test_labels=str(tmp_path / "labels.npy"))))
    text = "\n".join(summary.finetune_lines(pre, scr))
    assert "0.900 +- 0.0" in text and "on 40 test cubes" in text and "higher by more than 2 SE" in text
    other = _finetune_dir(tmp_path / "other", None, 1, 0.5)
    with pytest.raises(InputError, match="--seed"):
        summary.finetune_lines(pre, other)
    with pytest.raises(InputError, match="--weights"):
        summary.finetune_lines(scr, pre)


def test_summary_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert summary.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pretraining configuration not found" in err[0]


def test_own_data_commands_parse():
    """The five commands of docs/own_data.md name flags their stages accept, and chain."""
    text = (REPO / "docs" / "own_data.md").read_text(encoding="utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    cmds = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert [c[1] for c in cmds] == ["scripts/prepare_dataset.py", "self_discovery/train_autoencoder.py",
                                    "self_discovery/feature_extractor.py",
                                    "self_discovery/pattern_generator_3D.py", "pytorch/train.py"]
    args = [importlib.import_module(STAGE_MODULES[c[1]]).build_parser().parse_args(c[2:])
            for c in cmds]
    prep, ae_args, fe_args, pg_args, pt_args = args
    assert Path(ae_args.data_dir) == Path(prep.output_dir) == Path(pg_args.data_dir)
    assert Path(fe_args.weights) == Path(ae_args.output_dir) / "Unet_autoencoder.pt"
    assert (fe_args.input_rows, fe_args.input_cols, fe_args.input_deps) == \
        (ae_args.input_rows, ae_args.input_cols, ae_args.input_deps)
    assert Path(pg_args.train_features) == Path(fe_args.output_dir) / "train_features.npy"
    assert Path(pt_args.data_dir) == Path(pg_args.output_dir)
    # 12 patients, --val_fraction 0.25: 9 train / 3 validation patients
    assert pg_args.nb_instances <= 9 and pg_args.nb_classes <= 9 and pg_args.nb_instances_val <= 3
