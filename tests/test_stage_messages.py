"""Messages of stages 1-4 that send the user the right way: a checkpoint of another stage named
as such, the lung-test failure naming its cause, inputs before outputs, interrupted runs not
called results, Ctrl-C as one line that leaves the last complete checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from pytorch import train as train_cli
from runtime.errors import InputError
from runtime.files import LOCK_NAME, output_session
from self_discovery import feature_extractor as fe
from self_discovery import pattern_generator_3D as pg
from self_discovery import train_autoencoder as ta
from tests.fold_fixtures import autoencoder_args, make_volume_dataset, tiny_pretraining
from tests.test_handoffs import autoencoder_checkpoint
from tests.test_patterns import _args, make_dataset
from tests.test_cli_errors import one_error_line

REPO = Path(__file__).resolve().parents[1]
CKPT = "semantic_genesis_chest_ct"


def test_an_autoencoder_checkpoint_as_pre_path_is_named_as_such(tmp_path, capsys):
    args = tiny_pretraining(tmp_path)
    ae = autoencoder_checkpoint(tmp_path / "Unet_autoencoder.pt")
    line = one_error_line(capsys, train_cli.main(args + ["--pre_path", str(ae)]),
                          "Unet_autoencoder.pt: an autoencoder checkpoint of stage 1",
                          "--pre_path takes a checkpoint of pytorch/train.py",
                          "feature_extractor.py --weights")
    assert "missing key" not in line and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("threshold, hint", [("0.15", "(e.g. 0.3)"), ("0.3", None)])
def test_no_coordinate_names_the_border_that_leaves_no_room(tmp_path, capsys, threshold, hint):
    root = make_dataset(tmp_path, n_train=3, n_val=2, all_dense=True)      # 80 x 80 x 44
    rc = pg.main(_args(root, "out", "--len_border_z", "4", "--lung_threshold", threshold,
                       "--max_tries", "5", classes=1, inst=2, inst_val=1))
    line = one_error_line(capsys, rc, "none of the 3 train patients", "15 random coordinates",
                          "15 failed the lung test",
                          "--len_border_z 4 keeps z at 4 (1 of 9 positions)",
                          "lower --len_border/--len_border_z", f"--lung_threshold {threshold}")
    assert "keeps x" not in line                      # x has room: not named
    assert (hint in line) if hint else ("e.g. 0.3" not in line)


def test_a_mistyped_data_dir_is_named_before_the_output_folder(tmp_path, capsys):
    typo = str(tmp_path / "datset")
    out = tmp_path / "out"
    out.mkdir()
    for name in (ta.BEST_NAME, fe.TRAIN_NAME, fe.INDEX_NAME, "fold_index.json", f"{CKPT}.pt"):
        (out / name).write_bytes(b"an earlier run's result")
    weights = autoencoder_checkpoint(tmp_path / "ae.pt")
    runs = {
        "autoencoder": lambda: ta.main(["--data_dir", typo, "--output_dir", str(out)]),
        "features": lambda: fe.main(["--data_dir", typo, "--weights", str(weights),
                                     "--output_dir", str(out)]),
        "patterns": lambda: pg.main(["--data_dir", typo, "--output_dir", str(out)]),
        "pretraining": lambda: train_cli.main(["--data_dir", typo, "--output_dir", str(out)]),
    }
    for stage, run in runs.items():
        line = one_error_line(capsys, run(), "datset", "folder not found")
        assert "earlier run" not in line, stage


def test_an_interrupted_run_is_not_called_a_result(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=4, n_val=2)
    argv = _args(root, "out", classes=1, inst=2, inst_val=1)
    assert pg.main(argv) == 0
    (root / "out" / "fold_index.json").unlink()          # as a run stopped half-way leaves it
    line = one_error_line(capsys, pg.main(argv), "files of an interrupted run",
                          "no fold_index.json", "continue it with --prev_coordinates")
    assert "result" not in line
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "best.pt").write_bytes(b"weights")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / LOCK_NAME).write_text(f"{dead.pid}\n")     # the lock a killed run leaves
    with pytest.raises(InputError, match="files of an interrupted run are there .its run was "
                                         "interrupted: it left its lock"):
        with output_session(folder, "--output_dir", [folder / "best.pt"]):
            pass


def _interrupt_second_step(monkeypatch, module) -> None:
    """Ctrl-C during epoch 2 (the tiny runs take one step per epoch)."""
    real, calls = module.train_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, "train_step", step)


@pytest.mark.parametrize("stage", ["autoencoder", "pretraining"])
def test_ctrl_c_is_one_line_and_keeps_the_last_complete_checkpoint(tmp_path, capsys,
                                                                   monkeypatch, stage):
    if stage == "autoencoder":
        data = make_volume_dataset(tmp_path / "data", 2, 1, (32, 32, 16))
        args, module, main = autoencoder_args(data, tmp_path, "--nb_epoch", "3"), ta, ta.main
        last = tmp_path / "ckpt" / ta.LAST_NAME
    else:
        args, module, main = tiny_pretraining(tmp_path, epochs=3), train_cli, train_cli.main
        last = tmp_path / "ckpt" / f"{CKPT}_last.pt"
    _interrupt_second_step(monkeypatch, module)
    capsys.readouterr()
    assert main(args) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["interrupted; continue with --resume"], err
    assert load_checkpoint(last)["epoch"] == 1
    assert not (last.parent / LOCK_NAME).exists()
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    line = one_error_line(capsys, main(args), f"{last.name} stopped after epoch 1",
                          "continue it with --resume")
    assert "result" not in line
    assert main(args + ["--resume"]) == 0
    assert load_checkpoint(last)["epoch"] == 3


def test_a_real_sigint_during_pretraining(tmp_path):
    args = tiny_pretraining(tmp_path, epochs=3)
    code = textwrap.dedent(f"""
        import os, signal, sys
        from pytorch import train as t
        real, calls = t.train_step, []
        def step(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)   # what Ctrl-C sends
            return real(*a, **k)
        t.train_step = step
        sys.exit(t.main({args!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "interrupted; continue with --resume"
    ckpt = load_checkpoint(tmp_path / "ckpt" / f"{CKPT}_last.pt")
    assert ckpt["epoch"] == 1 and torch.isfinite(ckpt["state_dict"]["out_tr.final_conv.weight"]).all()
    cfg = json.loads((tmp_path / "ckpt" / f"{CKPT}_config.json").read_text())
    assert cfg["nb_epoch"] == 3
