"""Nothing a user made is replaced without asking, one writer per output folder, and outputs of
several files killed half-way (a real SIGKILL at a known point, in a child process) are refused
by the next stage and recovered by a re-run. Tiny data, width-4 networks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import save_checkpoint
from models.ynet3d import YNet3D
from pytorch import train as train_cli
from runtime.errors import InputError
from runtime.files import LOCK_NAME, output_session
from models import convert as cc
from finetune import classification as fc
from preparation import prepare as pd
from preparation.phantoms import make_nodule_cubes, write_phantom_dataset
from self_discovery import feature_extractor as fe
from self_discovery import pattern_generator_3D as pg
from self_discovery import train_autoencoder as ta
from self_discovery.fold_files import check_fold_index
from self_discovery.volumes import list_volumes
from tests.fold_fixtures import autoencoder_args, make_volume_dataset, tiny_pretraining, train_args
from tests.test_patterns import _args, make_dataset
from tests.test_cli_errors import one_error_line

REPO = Path(__file__).resolve().parents[1]


def killed_child(code: str) -> None:
    """Run ``code`` in a fresh Python from the repository root; it must die of SIGKILL."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- output sessions ------------------------------------------------------------------------

def test_second_writer_is_stopped_and_a_dead_writers_lock_is_taken_over(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(f"{sleeper.pid}\n")
        with pytest.raises(InputError, match=f"another run \\(process {sleeper.pid}\\)"):
            with output_session(tmp_path, "--save"):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / LOCK_NAME).write_text(f"{dead_pid()}\n")
    (tmp_path / ".x.npy.ab12cd34.tmp.npy").write_bytes(b"partial")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".y.json.zz99zz99.tmp").write_text("{")
    with output_session(tmp_path, "--save") as folder:
        assert int((folder / LOCK_NAME).read_text()) == os.getpid()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub"]  # lock released, temps gone
    assert "taken over" in capsys.readouterr().err


def test_finished_result_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"mine")
    with pytest.raises(InputError, match="best.pt: an earlier run's result is there and is kept; "
                                         "pass --overwrite to replace it or --resume"):
        with output_session(tmp_path, "--output_dir", [tmp_path / "best.pt"]):
            pass
    with output_session(tmp_path, "--output_dir", [tmp_path / "best.pt"], continuing=True):
        pass
    with output_session(tmp_path, "--output_dir", [tmp_path / "best.pt"], overwrite=True):
        pass
    assert (tmp_path / "best.pt").read_bytes() == b"mine"  # the session itself deletes nothing


def test_pretraining_never_replaces_the_published_checkpoint(tmp_path, capsys):
    args = tiny_pretraining(tmp_path)
    published = tmp_path / "ckpt" / "semantic_genesis_chest_ct.pt"
    published.parent.mkdir()
    published.write_bytes(b"the published weights")
    one_error_line(capsys, train_cli.main(args), str(published), "--overwrite", "--resume")
    assert published.read_bytes() == b"the published weights"
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()
    assert train_cli.main(args + ["--overwrite"]) == 0
    assert "--overwrite: replacing" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["autoencoder", "classification"])
def test_training_stages_keep_finished_results(tmp_path, capsys, stage):
    if stage == "autoencoder":
        data = make_volume_dataset(tmp_path / "data", 2, 1, (32, 32, 16))
        args = autoencoder_args(data, tmp_path, "--nb_epoch", "1")
        main, kept = ta.main, tmp_path / "ckpt" / "Unet_autoencoder.pt"
    else:
        c, lab = make_nodule_cubes(6, (16, 16, 8), seed=0)
        np.save(tmp_path / "c.npy", c)
        np.save(tmp_path / "l.npy", lab)
        args = ["--data", str(tmp_path / "c.npy"), "--labels", str(tmp_path / "l.npy"),
                "--width", "4", "--device", "cpu", "--nb_epoch", "1", "--quiet",
                "--num_workers", "0", "--output_dir", str(tmp_path / "out")]
        main, kept = fc.main, tmp_path / "out" / "metrics.json"
    assert main(args) == 0
    before = kept.read_bytes()
    one_error_line(capsys, main(args), str(kept), "--overwrite")
    assert kept.read_bytes() == before
    assert main(args + ["--overwrite"]) == 0


def test_non_finite_weights_stop_training_and_keep_the_last_good_checkpoint(tmp_path, capsys,
                                                                           monkeypatch):
    args = tiny_pretraining(tmp_path)
    assert train_cli.main(args) == 0
    last = tmp_path / "ckpt" / "semantic_genesis_chest_ct_last.pt"
    good = last.read_bytes()
    real_step = train_cli.train_step

    def diverging_step(net, *a, **k):
        out = real_step(net, *a, **k)
        with torch.no_grad():
            next(net.parameters()).fill_(float("inf"))   # what an exploding lr does
        return out

    monkeypatch.setattr(train_cli, "train_step", diverging_step)
    args[args.index("--nb_epoch") + 1] = "3"
    rc = train_cli.main(args + ["--resume", str(last)])
    one_error_line(capsys, rc, "epoch 2: non-finite", "last good epoch are kept")
    assert last.read_bytes() == good


# --- interrupted multi-file outputs ---------------------------------------------------------

@pytest.fixture()
def features_setup(tmp_path):
    data = make_volume_dataset(tmp_path / "data", 3, 2, (32, 32, 16))
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(save_checkpoint(tmp_path / f"ae{seed}.pt", ta.build_autoencoder(width=4),
                                     arch="UNet3D", model_config={"width": 4, "norm": "standard",
                                                                  "decoder": "upsampling"}))
    return tmp_path, data, ckpts


def _features_argv(data: Path, weights: Path, out: Path) -> list[str]:
    return ["--data_dir", str(data), "--weights", str(weights), "--output_dir", str(out),
            "--input_rows", "32", "--input_cols", "32", "--input_deps", "16",
            "--num_workers", "0", "--device", "cpu", "--verbose", "0"]


def test_features_killed_between_the_two_files_are_refused_then_redone(features_setup):
    root, data, (w0, w1) = features_setup
    out = root / "features"
    assert fe.main(_features_argv(data, w0, out)) == 0
    old_index = (out / fe.INDEX_NAME).read_bytes()
    killed_child(f"""
        import os, signal
        from self_discovery import feature_extractor as fe, features_index as fi
        real = fi.save_npy_atomic
        def save_then_die(path, array):
            real(path, array)
            if path.name == fe.TRAIN_NAME:
                os.kill(os.getpid(), signal.SIGKILL)
        fi.save_npy_atomic = save_then_die
        fe.main({_features_argv(data, w1, out) + ["--overwrite"]!r})
    """)
    with pytest.raises(InputError, match="interrupted extraction"):
        fe.load_features(out / fe.TRAIN_NAME, out / fe.VAL_NAME, data)
    (out / fe.INDEX_NAME).write_bytes(old_index)   # even with the old index back: mixed runs
    with pytest.raises(InputError, match="train and validation features must come from one run"):
        fe.load_features(out / fe.TRAIN_NAME, out / fe.VAL_NAME, data)
    (out / LOCK_NAME).write_text(f"{dead_pid()}\n")   # the killed run's lock stays behind
    assert fe.main(_features_argv(data, w1, out) + ["--overwrite"]) == 0
    fe.load_features(out / fe.TRAIN_NAME, out / fe.VAL_NAME, data)


def test_pattern_generator_killed_after_one_block_is_refused_then_resumed(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=6, n_val=3)
    argv = _args(root, "out", "--classes_per_file", "1", classes=2, inst=3, inst_val=2)
    save = root / "out"
    killed_child(f"""
        import os, signal
        from self_discovery import pattern_generator_3D as pg
        real = pg.write_coordinates
        def write_then_die(path, plans, *a):
            real(path, plans, *a)
            os.kill(os.getpid(), signal.SIGKILL)     # block 1 complete, block 2 never started
        pg.write_coordinates = write_then_die
        pg.main({argv!r})
    """)
    targs = train_args(save, tmp_path, classes=1, instances=3, val_instances=2, resolutions=1,
                       epochs=1, shape=(64, 64, 32))
    one_error_line(capsys, train_cli.main(targs), str(save), "not finished", "--prev_coordinates")
    one_error_line(capsys, pg.main(argv), "coordinates.csv", "--overwrite")  # kept, not replaced
    assert pg.main(argv + ["--prev_coordinates", str(save / "coordinates.csv")]) == 0
    assert (save / "fold_index.json").is_file() and not (save / LOCK_NAME).exists()
    assert train_cli.main(targs + ["--overwrite"]) == 0
    np.save(save / "val_label1_vwGen_ex_ref_fold1.0.npy", np.zeros((3, 1), np.int64))
    one_error_line(capsys, train_cli.main(targs + ["--overwrite"]),
                   "val_label1_vwGen_ex_ref_fold1.0.npy",
                   "not the file the pattern generator finished with")


def test_prepare_killed_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    src = tmp_path / "in"
    write_phantom_dataset(src, 5, (24, 24, 10), seed=0, fmt="nrrd")
    base = ["--input_dir", str(src), "--val_fraction", "0.4", "--seed", "5"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed_child(f"""
        import os, signal
        from preparation import prepare as pd
        real, calls = pd._write_manifest, []
        def write_then_die(*a, **k):
            real(*a, **k)
            calls.append(1)
            if len(calls) == 3:            # marked incomplete, two patients recorded, three to go
                os.kill(os.getpid(), signal.SIGKILL)
        pd._write_manifest = write_then_die
        pd.main({base + ["--output_dir", str(killed)]!r})
    """)
    assert len(json.loads((killed / "manifest.json").read_text())["volumes"]) == 2

    # the split hashes the source paths, so the two patients done may both be train patients
    (killed / "validation").mkdir(exist_ok=True)
    with pytest.raises(InputError, match="has not finished this dataset"):   # stages 1-3 refuse
        list_volumes(killed / "validation")
    (killed / "train").mkdir(exist_ok=True)
    (killed / "train" / ".phantom_009.npy.ab12cd34.tmp.npy").write_bytes(b"partial")
    assert pd.main(base + ["--output_dir", str(killed)]) == 0
    assert pd.main(base + ["--output_dir", str(whole)]) == 0

    def layout(out: Path) -> dict[str, bytes]:
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.npy"))}

    assert layout(killed) == layout(whole) and len(layout(whole)) == 5
    recs = json.loads((killed / "manifest.json").read_text())["volumes"]
    assert len(recs) == 5 and all(r["original_shape"] == [24, 24, 10] for r in recs)
    assert list_volumes(killed / "validation")


def test_prepare_interrupted_after_a_volume_leaves_nothing_unrecorded(tmp_path, monkeypatch):
    """Every volume is named in the manifest before it is written: the volume of a run stopped
    between writing it and recording it is the tool's own, redone by the re-run, or removed when
    its source is gone; never a volume the dataset does not list. Other settings are refused
    while the dataset is incomplete, and the message does not call it finished."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_phantom_dataset(src, 3, (24, 24, 10), seed=0, fmt="nrrd")
    base = ["--input_dir", str(src), "--output_dir", str(out), "--val_fraction", "0"]
    real, calls = pd._write_manifest, []

    def stop_after_first_volume(*a, **k):
        calls.append(1)
        if len(calls) == 2:                   # phantom_000.npy is written, not yet recorded
            raise KeyboardInterrupt
        real(*a, **k)

    monkeypatch.setattr(pd, "_write_manifest", stop_after_first_volume)
    assert pd.main(base) == 130                # Ctrl-C: one line, exit status 130
    monkeypatch.setattr(pd, "_write_manifest", real)
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] is False and man["volumes"] == [] and len(man["pending"]) == 3
    assert (out / "train" / "phantom_000.npy").is_file()
    with pytest.raises(InputError, match=r"incomplete: an interrupted .*--hu_min -1000.0 -> -900"):
        pd.prepare_dataset(pd.build_parser().parse_args(base + ["--hu_min", "-900"]))
    (src / "phantom_000.nrrd").unlink()       # its source is gone before the re-run
    assert pd.main(base) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] is True and man["pending"] == []
    assert sorted(p.stem for p in out.rglob("*.npy")) == sorted(r["patient"] for r in man["volumes"]) \
        == ["phantom_001", "phantom_002"]


def test_second_pattern_generator_into_one_folder_is_refused_while_the_first_runs(tmp_path,
                                                                                  capsys):
    root = make_dataset(tmp_path, n_train=6, n_val=3)
    argv = _args(root, "out", classes=2, inst=3, inst_val=2)
    started = tmp_path / "started"
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from self_discovery import pattern_generator_3D as pg
        real = pg._write_class
        def slow(*a, **k):
            pathlib.Path({str(started)!r}).touch()
            time.sleep(120)                          # holds --save, a block half written
            return real(*a, **k)
        pg._write_class = slow
        pg.main({argv!r})
    """)], cwd=REPO)
    try:
        for _ in range(600):
            if started.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert started.exists()
        one_error_line(capsys, pg.main(argv), f"another run (process {first.pid})")
    finally:
        first.kill()                                 # SIGKILL: lock and temporaries stay behind
        first.wait()
    save = root / "out"
    assert (save / LOCK_NAME).exists() and any(p.name.endswith(".tmp.npy") for p in save.iterdir())
    assert pg.main(argv) == 0                        # lock taken over, temporaries removed
    assert not [p for p in save.iterdir() if p.name.startswith(".")]
    assert (save / "fold_index.json").is_file()


def test_fold_files_of_an_earlier_larger_run_are_not_read_with_the_new_ones(tmp_path):
    root = make_dataset(tmp_path, n_train=6, n_val=3)
    save = root / "out"
    assert pg.main(_args(root, "out", "--classes_per_file", "1", classes=2, inst=3,
                         inst_val=2)) == 0                       # blocks 1 and 2
    assert pg.main(_args(root, "out", "--classes_per_file", "1", "--overwrite", "--seed", "9",
                         classes=1, inst=3, inst_val=2)) == 0     # block 1 only; block 2 stale
    assert (save / "train_data1_vwGen_ex_ref_fold2.0.npy").is_file()
    # what pytorch/train.py reads of this folder for one class is block 1: listed, accepted ...
    check_fold_index(save, ["train_data1_vwGen_ex_ref_fold1.0.npy"])
    # ... and the stale block 2 is refused
    with pytest.raises(InputError, match="fold2.0.npy: not the file the pattern generator"):
        check_fold_index(save, ["train_data1_vwGen_ex_ref_fold2.0.npy"])


def test_convert_checkpoint_keeps_an_existing_output(tmp_path, capsys):
    src = tmp_path / "published.pt"
    torch.save({"state_dict": YNet3D(cls_classes=2, width=4).state_dict()}, src)
    out = tmp_path / "en_de" / "semantic_genesis_chest_ct.pt"
    out.parent.mkdir()
    out.write_bytes(b"my trained model")
    one_error_line(capsys, cc.main([str(src), str(out)]), str(out), "--overwrite")
    assert out.read_bytes() == b"my trained model"
    assert cc.main([str(src), str(out), "--overwrite"]) == 0
