"""Bad input at every CLI ends in ONE line ``error: <file>: <what>; <fix>`` and exit code 2,
``--help`` explains every flag without "(default: None)" noise, and writers are atomic.

Every test runs ``main([...])`` in-process on tiny data (volumes of 16 x 16 x 8, width 4) and
fails before any training starts, so the whole file takes a few seconds.
"""
from __future__ import annotations

import errno
import argparse
import importlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from models.targets import build_classifier
from models.ynet3d import UNet3D, YNet3D
from pytorch import train as train_cli
from runtime.devices import resolve_device
from runtime.errors import CheckpointError, InputError
from runtime.files import atomic_path, make_output_dir
from finetune import classification as fc
from finetune import segmentation as fs
from preparation import phantoms
from preparation import prepare as pd
from experiments.benchmark_patterns import write_dataset
from preparation.ct_io import volume_stem
from finetune.classification import count_classes
from finetune.segmentation import find_volume_files, pair_volumes
from preparation.phantoms import make_nodule_cubes, write_phantom_dataset, write_volume
from self_discovery import feature_extractor as fe
from self_discovery import features_index
from self_discovery import pattern_generator_3D as pg
from self_discovery import train_autoencoder as ta
from self_discovery.volumes import list_volumes, open_volume
from tests.fold_fixtures import (autoencoder_args, make_fold_files, make_volume_dataset,
                                 tiny_pretraining, train_args)
from tests.test_patterns import _args, make_dataset, reindex_features

REPO = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 8)

# modules with build_parser(); phantoms and fetch_sample_ct build theirs inside main()
PARSER_MODULES = ["pytorch.train", "self_discovery.train_autoencoder",
                  "self_discovery.feature_extractor", "self_discovery.pattern_generator_3D",
                  "preparation.prepare", "finetune.classification",
                  "finetune.segmentation", "experiments.transfer_benchmark",
                  "experiments.benchmark_patterns", "experiments.benchmark_pretrain",
                  "experiments.compare_precision", "models.convert",
                  "experiments.transfer_study"]


def one_error_line(capsys, rc: int, *needles: str) -> str:
    """Assert exit code 2 and a single ``error: ...`` line holding every needle."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def junk(tmp_path_factory) -> dict[str, Path]:
    """A text file renamed .pt, a truncated checkpoint and a width-4 Y-Net checkpoint."""
    root = tmp_path_factory.mktemp("junk")
    text = root / "text.pt"
    text.write_text("hello, I am not a checkpoint\n")
    torch.manual_seed(0)
    ynet = save_checkpoint(root / "ynet4.pt", YNet3D(cls_classes=3, width=4), arch="YNet3D",
                           model_config={"width": 4, "cls_classes": 3})
    trunc = root / "trunc.pt"
    trunc.write_bytes(ynet.read_bytes()[:20000])
    return {"text": text, "trunc": trunc, "ynet4": ynet, "root": root}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """data_dir/{train,validation}/patient_*.npy, 4 + 2 volumes in [0, 1]."""
    return make_volume_dataset(tmp_path_factory.mktemp("vols"), 4, 2, SHAPE)


# --- --help ---------------------------------------------------------------------------------

#: Flags of the published commands accepted (so their commands run) but without effect here,
#: kept out of --help.
HIDDEN_FLAGS = {"pytorch.train": ["num_workers"]}


@pytest.mark.parametrize("name", PARSER_MODULES)
def test_help_explains_every_flag_without_none_defaults(name):
    parser = importlib.import_module(name).build_parser()
    # hidden: only flags accepted for the published commands that do nothing here
    hidden = [a.dest for a in parser._actions if a.help == argparse.SUPPRESS]
    assert hidden == HIDDEN_FLAGS.get(name, []), name
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    for action in shown:
        assert action.help and len(action.help.strip()) > 5, (name, action.option_strings)
    text = parser.format_help()
    assert "(default: None)" not in text
    for action in shown:
        assert all(flag in text for flag in action.option_strings), (name, action.dest)


@pytest.mark.parametrize("name", ["preparation.phantoms", "preparation.sample_ct"])
def test_help_of_main_built_parsers(name, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).main(["--help"])
    assert e.value.code == 0
    assert "(default: None)" not in capsys.readouterr().out


def test_quickstart_help_shows_only_the_header():
    out = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh"), "--help"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace",
                         check=True).stdout
    assert "Usage:" in out and "set -euo" not in out


# --- checkpoints ----------------------------------------------------------------------------

def test_text_file_renamed_pt_is_a_checkpoint_error(junk):
    with pytest.raises(CheckpointError, match="not a torch.save file") as e:
        load_checkpoint(junk["text"])
    assert str(e.value).startswith(str(junk["text"])) and "\n" not in str(e.value)


def test_truncated_checkpoint_message_is_short(junk):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(junk["trunc"])
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400 and msg.endswith("re-download or re-create it")
    assert msg.startswith(f"{junk['trunc']}: truncated")


def test_autoencoder_weights_text_file(volumes, junk, tmp_path, capsys):
    rc = ta.main(["--data_dir", str(volumes), "--weights", str(junk["text"]), "--width", "4",
                  "--input_rows", "16", "--input_cols", "16", "--input_deps", "8",
                  "--device", "cpu", "--num_workers", "0", "--nb_epoch", "1",
                  "--output_dir", str(tmp_path / "ck"), "--log_dir", str(tmp_path / "tb")])
    one_error_line(capsys, rc, str(junk["text"]), "re-create it")


def test_autoencoder_wrong_width_names_the_width(volumes, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ae4.pt", UNet3D(width=4, decoder="upsampling"))
    rc = ta.main(["--data_dir", str(volumes), "--weights", str(ckpt), "--width", "8",
                  "--input_rows", "16", "--input_cols", "16", "--input_deps", "8",
                  "--device", "cpu", "--num_workers", "0", "--nb_epoch", "1",
                  "--output_dir", str(tmp_path / "ck"), "--log_dir", str(tmp_path / "tb")])
    line = one_error_line(capsys, rc, str(ckpt), "pass --width 4")
    assert line.count("pass --width") == 1


def test_finetune_width_hint_given_once(junk, tmp_path, capsys):
    c, lab = make_nodule_cubes(4, SHAPE, seed=0)
    np.save(tmp_path / "c.npy", c)
    np.save(tmp_path / "l.npy", lab)
    rc = fc.main(["--data", str(tmp_path / "c.npy"), "--labels", str(tmp_path / "l.npy"),
                  "--weights", str(junk["ynet4"]), "--width", "8", "--device", "cpu",
                  "--nb_epoch", "1", "--quiet", "--output_dir", str(tmp_path / "out")])
    line = one_error_line(capsys, rc, str(junk["ynet4"]), "pass --width 4")
    assert line.count("pass --width") == 1


# --- pretraining / pattern generation -------------------------------------------------------

def test_train_log_dir_under_a_file(junk, tmp_path, capsys):
    args = tiny_pretraining(tmp_path)
    args[args.index("--log_dir") + 1] = str(junk["text"])
    rc = train_cli.main(args)
    one_error_line(capsys, rc, str(junk["text"]), "--log_dir")


def test_pattern_generator_nan_features(volumes, tmp_path, capsys):
    feats = np.random.default_rng(0).random((4, 8)).astype(np.float32)
    feats[2, 3] = np.nan
    np.save(tmp_path / "train_features.npy", feats)
    np.save(tmp_path / "validation_features.npy", feats[:2])
    rc = pg.main(["--data_dir", str(volumes), "--output_dir", str(tmp_path / "out"), "--is_normalized",
                  "--train_features", str(tmp_path / "train_features.npy"),
                  "--val_features", str(tmp_path / "validation_features.npy"),
                  "--input_rows", "8", "--input_cols", "8", "--input_deps", "8",
                  "--nb_classes", "1", "--nb_instances", "2", "--nb_instances_val", "1"])
    one_error_line(capsys, rc, "train_features.npy", "NaN", "feature_extractor.py")


# --- fine-tuning ----------------------------------------------------------------------------

def test_classification_nan_in_any_cube(tmp_path, capsys):
    """The value check probes every few cubes; NaN in a skipped cube must still be caught."""
    c = np.random.default_rng(0).random((24, *SHAPE)).astype(np.float32)
    c[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "c.npy", c)
    np.save(tmp_path / "l.npy", np.arange(24) % 2)
    rc = fc.main(["--data", str(tmp_path / "c.npy"), "--labels", str(tmp_path / "l.npy"),
                  "--width", "4", "--device", "cpu", "--nb_epoch", "1", "--quiet",
                  "--output_dir", str(tmp_path / "out")])
    one_error_line(capsys, rc, str(tmp_path / "c.npy"), "NaN", "index 1")


def test_classification_empty_data_dir_names_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = fc.main(["--data_dir", str(tmp_path / "empty"), "--device", "cpu", "--quiet",
                  "--output_dir", str(tmp_path / "out")])
    line = one_error_line(capsys, rc, str(tmp_path / "empty"))
    assert "{root}" not in line and f"{tmp_path / 'empty'}/nodule" in line


def test_segmentation_nan_image(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for d in ("img", "msk"):
        (tmp_path / d).mkdir()
    for i in range(3):
        img = rng.random(SHAPE, dtype=np.float32)
        if i == 0:
            img[0, 0, 0] = np.nan
        np.save(tmp_path / "img" / f"p{i}.npy", img)
        np.save(tmp_path / "msk" / f"p{i}.npy", (rng.random(SHAPE) > 0.7).astype(np.float32))
    rc = fs.main(["--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                  "--width", "4", "--device", "cpu", "--nb_epoch", "1", "--quiet",
                  "--crop", "16", "16", "8", "--output_dir", str(tmp_path / "out")])
    one_error_line(capsys, rc, "p0.npy", "NaN")


# --- data preparation, phantoms, output folders ---------------------------------------------

def test_prepare_dataset_all_skipped_names_the_file(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "flat.npy", np.zeros((16, 16), np.float32))
    rc = pd.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                  "--min_size", "1"])
    one_error_line(capsys, rc, "flat.npy", "no volume was written", "fix or remove")


def test_prepare_dataset_refusals_are_one_line_naming_file_and_fix(tmp_path, capsys):
    """Stage 0: a mistyped input is named before any output check; an output that cannot be
    added to names the manifest or the volume, what is wrong and the fixes."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_phantom_dataset(src, 2, SHAPE, seed=0, fmt="nrrd")
    base = ["--input_dir", str(src), "--output_dir", str(out), "--min_size", "4"]
    assert pd.main(base) == 0
    capsys.readouterr()
    one_error_line(capsys, pd.main(["--input_dir", str(tmp_path / "typo"), "--output_dir", str(out)]),
                   "typo: --input_dir not found")
    one_error_line(capsys, pd.main(base + ["--hu_max", "500", "--seed", "3"]),
                   "manifest.json", "other settings", "--hu_max 1000.0 -> 500.0", "--seed 0 -> 3",
                   "--overwrite")
    np.save(out / "train" / "mine.npy", np.zeros(SHAPE, np.float32))
    one_error_line(capsys, pd.main(base), "mine.npy", "did not write", "--overwrite")
    (out / "manifest.json").write_text("[1, 2")
    one_error_line(capsys, pd.main(base), "manifest.json: unreadable", "--overwrite")


def test_output_folder_under_a_file(junk, tmp_path, capsys):
    with pytest.raises(InputError, match="--save"):
        make_output_dir(junk["text"] / "sub", "--save")
    with pytest.raises(InputError, match="not a folder"):
        with atomic_path(junk["text"] / "x.json") as tmp:
            tmp.write_text("{}")
    rc = phantoms.main(["--output_dir", str(junk["text"] / "x"), "--n", "1",
                        "--shape", "16", "16", "8", "--format", "npy"])
    one_error_line(capsys, rc, str(junk["text"] / "x"), "--output_dir")


@pytest.mark.parametrize("ext", ["nrrd", "nii.gz", "mhd"])
def test_write_volume_is_atomic_and_readable(tmp_path, ext):
    import SimpleITK as sitk  # local: only this test reads images back
    vol = np.arange(8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4)
    path = write_volume(tmp_path / f"v.{ext}", vol)
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (z, y, x)
    np.testing.assert_array_equal(back.transpose(2, 1, 0), vol)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_benchmark_patterns_dataset_written_atomically(tmp_path):
    root = write_dataset(tmp_path, 2, 1, (8, 8, 8), feat_dim=4, distinct=1)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["data/train/p0000.npy", "data/train/p0001.npy", "data/validation/p0000.npy",
                     "features/features_index.json", "features/train_features.npy",
                     "features/validation_features.npy"]


def test_width_hint_for_prefixed_keys():
    """A fine-tuning model keeps the encoder under ``base_model.``: the hint still appears."""
    (small, _), (big, _) = build_classifier(width=4), build_classifier(width=8)
    with pytest.raises(CheckpointError, match="pass --width 4"):
        load_state_dict_checked(big, small.state_dict(), source="last.pt")


def test_list_volumes_skips_leftovers_of_killed_atomic_writes(tmp_path):
    """A SIGKILL during save_npy_atomic leaves ``.p1.npy.XXXX.tmp.npy``; it is never a patient."""
    np.save(tmp_path / "p0.npy", np.zeros(SHAPE, np.float32))
    np.save(tmp_path / ".p1.npy.abcd.tmp.npy", np.zeros(SHAPE, np.float32))
    assert [p.name for p in list_volumes(tmp_path)] == ["p0.npy"]


def test_dicom_phantom_series_written_via_a_temporary_folder(tmp_path):
    (path,) = write_phantom_dataset(tmp_path, 1, (24, 24, 4), fmt="dicom")
    (path,) = write_phantom_dataset(tmp_path, 1, (24, 24, 4), fmt="dicom")  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert len(list(path.iterdir())) == 4


def test_phantoms_without_patients_is_a_one_line_error(tmp_path, capsys):
    assert phantoms.main(["--output_dir", str(tmp_path / "p"), "--n", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --n 0") and "\n" not in err


# --- segmentation pairs images and masks by name ---------------------------------------------

def _seg_folders(root: Path, images: list[str], masks: list[str]) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir(parents=True)
    for name in images:
        np.save(root / "img" / f"{name}.npy", rng.random(SHAPE, dtype=np.float32))
    for name in masks:
        np.save(root / "msk" / f"{name}.npy", (rng.random(SHAPE) > 0.7).astype(np.uint8))
    return root / "img", root / "msk"


def test_segmentation_pairs_by_name_not_sort_order(tmp_path):
    """case1, case10, case2 sort differently from case1_mask, case10_mask, case2_mask."""
    img, msk = _seg_folders(tmp_path, ["case1", "case10", "case2"],
                            ["case2_seg", "case10_mask", "case1_label"])
    pairs = pair_volumes(find_volume_files([img], "--images"), find_volume_files([msk], "--masks"))
    assert [(volume_stem(a["path"]), volume_stem(b["path"])) for a, b in pairs] == [
        ("case1", "case1_label"), ("case10", "case10_mask"), ("case2", "case2_seg")]


@pytest.mark.parametrize("masks, needle", [
    (["case1_mask", "case2_mask", "other_mask"], "mask(s) matching no image: "),
    (["case1_mask", "case1_seg", "case2"], "several masks for one image"),
    (["case1_mask"], "image(s) without a mask: "),
])
def test_segmentation_unmatched_or_ambiguous_masks_are_listed(tmp_path, capsys, masks, needle):
    img, msk = _seg_folders(tmp_path, ["case1", "case2"], masks)
    rc = fs.main(["--images", str(img), "--masks", str(msk), "--width", "4", "--device", "cpu",
                  "--nb_epoch", "1", "--quiet", "--crop", "16", "16", "8",
                  "--output_dir", str(tmp_path / "out")])
    one_error_line(capsys, rc, needle, "_mask, _seg or _label")


def test_segmentation_same_image_name_in_two_folders_is_refused(tmp_path, capsys):
    """Two test images named p0 would also write one predictions/p0.npy over the other."""
    img, msk = _seg_folders(tmp_path / "a", ["p0", "p1"], ["p0_mask", "p1_mask"])
    img2, msk2 = _seg_folders(tmp_path / "b", ["p0"], ["p0_mask"])
    rc = fs.main(["--images", str(img), "--masks", str(msk), "--test_images", str(img), str(img2),
                  "--test_masks", str(msk), str(msk2), "--width", "4", "--device", "cpu",
                  "--nb_epoch", "1", "--quiet", "--crop", "16", "16", "8", "--save_predictions",
                  "--output_dir", str(tmp_path / "out")])
    one_error_line(capsys, rc, "--test_images", "share a name", str(img2 / "p0.npy"))


# --- labels never size a head by their maximum -----------------------------------------------

@pytest.mark.parametrize("labels, needle", [
    ([0, 1, 0, 10**9, 1, 0], "found 3 distinct label(s): 0, 1, 1000000000"),
    ([0, 5000] * 3, "found 2 distinct label(s): 0, 5000"),
])
def test_classification_labels_must_be_0_to_k_minus_1(tmp_path, capsys, labels, needle):
    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((6, *SHAPE)).astype(np.float32))
    np.save(tmp_path / "l.npy", np.array(labels, np.int64))
    rc = fc.main(["--data", str(tmp_path / "c.npy"), "--labels", str(tmp_path / "l.npy"),
                  "--width", "4", "--device", "cpu", "--nb_epoch", "1", "--quiet",
                  "--output_dir", str(tmp_path / "out")])
    one_error_line(capsys, rc, needle, "--num_classes")


def test_count_classes_with_explicit_num_classes():
    assert count_classes(np.array([0, 2, 2, 0]), num_classes=3) == 3
    assert count_classes(np.array([1, 0, 2])) == 3
    with pytest.raises(InputError, match=r"do not all lie in \[0, --num_classes 2\)"):
        count_classes(np.array([0, 2]), num_classes=2)
    with pytest.raises(InputError, match=r"\.\.\. \(90 more\)"):
        count_classes(np.arange(1, 101))


# --- every numeric flag is checked at parse time, by the shared argparse types ---------------

BAD_FLAGS = [
    ("pytorch.train", ["--data_dir", "x", "--device", "foo"], "--device"),
    ("pytorch.train", ["--data_dir", "x", "--device", "mps"], "--device"),
    ("pytorch.train", ["--data_dir", "x", "--device", "meta"], "--device"),
    ("pytorch.train", ["--data_dir", "x", "--seed", "-1"], "--seed"),
    ("pytorch.train", ["--data_dir", "x", "--lr", "nan"], "--lr"),
    ("pytorch.train", ["--data_dir", "x", "--lr", "inf"], "--lr"),
    ("pytorch.train", ["--data_dir", "x", "--width", "0"], "--width"),
    ("self_discovery.train_autoencoder", ["--data_dir", "x", "--lr", "-1"], "--lr"),
    ("self_discovery.feature_extractor", ["--data_dir", "x", "--weights", "w",
                                          "--batch_size", "0"], "--batch_size"),
    ("self_discovery.pattern_generator_3D", ["--hu_max", "inf"], "--hu_max"),
    ("self_discovery.pattern_generator_3D", ["--lung_threshold", "1.5"], "--lung_threshold"),
    ("preparation.prepare", ["--input_dir", "x", "--spacing", "1", "0", "1"], "--spacing"),
    ("preparation.prepare", ["--input_dir", "x", "--hu_min", "nan"], "--hu_min"),
    ("finetune.segmentation", ["--crop", "16", "-16", "8"], "--crop"),
    ("finetune.segmentation", ["--overlap", "1"], "--overlap"),
    ("finetune.classification", ["--val_fraction", "nan"], "--val_fraction"),
    ("finetune.classification", ["--weight_decay", "-1"], "--weight_decay"),
    ("experiments.benchmark_pretrain", ["--seed", "-1"], "--seed"),
    ("experiments.benchmark_pretrain", ["--device", "mps"], "--device"),
    ("experiments.benchmark_patterns", ["--lung_threshold", "2"], "--lung_threshold"),
    ("experiments.compare_precision", ["--lr", "inf"], "--lr"),
    ("experiments.transfer_benchmark", ["--weights", "w", "--seeds", "0", "-1"], "--seeds"),
    ("preparation.sample_ct", ["--timeout", "nan"], "--timeout"),
]


@pytest.mark.parametrize("module, argv, flag", BAD_FLAGS)
def test_bad_numeric_flags_are_one_line_errors_at_parse_time(module, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert flag in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        importlib.import_module("pytorch.train").main(["--data_dir", "x", "--device", "cuda:0"])
    assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(InputError, match="not a device of this tool"):
        resolve_device("mps")


# --- arrays, workers, disks, checkpoints -----------------------------------------------------

def test_error_in_a_dataloader_worker_is_the_same_one_line_error(tmp_path, capsys):
    data = make_volume_dataset(tmp_path / "data", 2, 1, (32, 32, 16))
    bad = np.load(data / "train" / "patient_001.npy")
    bad[3, 3, 3] = np.nan
    np.save(data / "train" / "patient_001.npy", bad)
    argv = autoencoder_args(data, tmp_path, "--nb_epoch", "1")
    argv[argv.index("--num_workers") + 1] = "1"
    line = one_error_line(capsys, ta.main(argv), "patient_001.npy", "NaN")
    assert "worker" not in line and "Original Traceback" not in line


def test_full_disk_is_one_line_naming_the_path(volumes, tmp_path, capsys, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "ae.pt", UNet3D(width=4, decoder="upsampling"),
                           model_config={"width": 4, "decoder": "upsampling"})

    def full(path, array):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(features_index, "save_npy_atomic", full)
    rc = fe.main(["--data_dir", str(volumes), "--weights", str(ckpt), "--output_dir",
                  str(tmp_path / "f"), "--input_rows", "16", "--input_cols", "16",
                  "--input_deps", "8", "--num_workers", "0", "--device", "cpu", "--verbose", "0"])
    one_error_line(capsys, rc, str(tmp_path / "f" / "train_features.npy"), "No space left")


@pytest.mark.parametrize("field, value, needle", [
    ("epoch", "three", "field 'epoch' is 'three'"),
    ("num_epoch_no_improvement", -2, "field 'num_epoch_no_improvement' is -2"),
    ("state_dict", "bad-value", "not tensors"),
])
def test_malformed_resume_checkpoint_fields(tmp_path, capsys, field, value, needle):
    args = tiny_pretraining(tmp_path)
    assert train_cli.main(args) == 0
    last = tmp_path / "ckpt" / "semantic_genesis_chest_ct_last.pt"
    ckpt = torch.load(last)
    if field == "state_dict":
        ckpt["state_dict"][next(iter(ckpt["state_dict"]))] = value
    else:
        ckpt[field] = value
    torch.save(ckpt, tmp_path / "odd.pt")
    args[args.index("--nb_epoch") + 1] = "2"
    one_error_line(capsys, train_cli.main(args + ["--resume", str(tmp_path / "odd.pt")]),
                   str(tmp_path / "odd.pt"), needle)


@pytest.mark.parametrize("config, needle", [({"width": "4"}, "'width' is '4'"),
                                            ({"width": 4, "decoder": "foo"}, "'decoder' is 'foo'"),
                                            ({"width": 4, "norm": "bar"}, "'norm' is 'bar'")])
def test_malformed_model_config(volumes, tmp_path, capsys, config, needle):
    ckpt = save_checkpoint(tmp_path / "ae.pt", UNet3D(width=4, decoder="upsampling"),
                           model_config=config)
    rc = fe.main(["--data_dir", str(volumes), "--weights", str(ckpt), "--output_dir",
                  str(tmp_path / "f"), "--num_workers", "0", "--device", "cpu"])
    one_error_line(capsys, rc, str(ckpt), needle)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_nan_weights_are_refused_by_both_finetuning_scripts(tmp_path, capsys, task):
    model = YNet3D(cls_classes=2, width=4)
    with torch.no_grad():
        model.down_tr64.ops[0].conv1.weight[0, 0, 0, 0, 0] = float("nan")
    ckpt = save_checkpoint(tmp_path / "nan.pt", model)
    common = ["--weights", str(ckpt), "--width", "4", "--device", "cpu", "--nb_epoch", "1",
              "--quiet", "--num_workers", "0", "--output_dir", str(tmp_path / "out")]
    if task == "classification":
        np.save(tmp_path / "c.npy", np.random.default_rng(0).random((6, *SHAPE)).astype(np.float32))
        np.save(tmp_path / "l.npy", np.arange(6) % 2)
        rc = fc.main(["--data", str(tmp_path / "c.npy"), "--labels", str(tmp_path / "l.npy")]
                     + common)
    else:
        img, msk = _seg_folders(tmp_path, ["a", "b"], ["a_mask", "b_mask"])
        rc = fs.main(["--images", str(img), "--masks", str(msk), "--crop", "16", "16", "8"]
                     + common)
    one_error_line(capsys, rc, str(ckpt), "NaN or inf", "down_tr64.ops.0.conv1.weight")


def test_batch_of_one_under_batch_statistics_is_a_clear_error(tmp_path, capsys):
    data = make_fold_files(tmp_path / "folds", classes=2, instances=1, val_instances=1,
                           resolutions=1, shape=(8, 8, 8))
    args = train_args(data, tmp_path, classes=2, instances=1, val_instances=1, resolutions=1,
                      epochs=1, width=4, batch_size=1, shape=(8, 8, 8))
    one_error_line(capsys, train_cli.main(args), "a batch of one cube", "batches of 2 or more")


def test_pattern_generator_reads_every_voxel_for_nan(tmp_path, capsys):
    root = make_dataset(tmp_path, n_train=4, n_val=2)
    vol = np.load(root / "data" / "train" / "p001.npy")
    vol[1::2] = np.nan                                 # odd rows only: a strided sample misses it
    np.save(root / "data" / "train" / "p001.npy", vol)
    reindex_features(root)                             # features recorded for these volumes
    rc = pg.main(_args(root, "out", classes=2, inst=4, inst_val=2))
    one_error_line(capsys, rc, "p001.npy", "NaN")


def test_huge_class_count_gives_a_readable_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()                       # a folder without the fold files
    args = train_args(tmp_path / "empty", tmp_path)
    args[args.index("--cls_classes") + 1] = "1000000"
    line = one_error_line(capsys, train_cli.main(args), "more characters", "--cls_classes")
    assert len(line) < 800


@pytest.mark.parametrize("dtype", [np.complex64, "<U3"])
def test_string_or_complex_arrays_are_refused_by_every_reader(tmp_path, capsys, dtype):
    arr = np.zeros((4, *SHAPE)).astype(dtype)
    np.save(tmp_path / "c.npy", arr)
    np.save(tmp_path / "l.npy", np.arange(4) % 2)
    rc = fc.main(["--data", str(tmp_path / "c.npy"), "--labels", str(tmp_path / "l.npy"),
                  "--width", "4", "--device", "cpu", "--quiet", "--output_dir", str(tmp_path / "o")])
    one_error_line(capsys, rc, "c.npy", "expected real numbers")
    img, msk = _seg_folders(tmp_path / "seg", ["a", "b"], ["a_mask", "b_mask"])
    np.save(img / "a.npy", arr[0])
    rc = fs.main(["--images", str(img), "--masks", str(msk), "--width", "4", "--device", "cpu",
                  "--quiet", "--crop", "16", "16", "8", "--output_dir", str(tmp_path / "o2")])
    one_error_line(capsys, rc, "a.npy", "expected real numbers")
    with pytest.raises(InputError, match="expected real numbers"):
        open_volume(tmp_path / "seg" / "img" / "a.npy")


def test_segmentation_nan_mask_is_refused(tmp_path, capsys):
    img, msk = _seg_folders(tmp_path, ["a", "b"], [])
    for name in ("a", "b"):
        m = np.zeros(SHAPE, np.float32)
        m[0, 0, 0] = np.nan if name == "b" else 1.0
        np.save(msk / f"{name}_mask.npy", m)
    rc = fs.main(["--images", str(img), "--masks", str(msk), "--width", "4", "--device", "cpu",
                  "--quiet", "--crop", "16", "16", "8", "--output_dir", str(tmp_path / "o")])
    one_error_line(capsys, rc, "b_mask.npy", "NaN")


def test_state_dict_with_a_non_string_key(tmp_path, capsys):
    sd = YNet3D(cls_classes=2, width=4).state_dict()
    sd[3] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "odd.pt")
    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((6, *SHAPE)).astype(np.float32))
    np.save(tmp_path / "l.npy", np.arange(6) % 2)
    rc = fc.main(["--data", str(tmp_path / "c.npy"), "--labels", str(tmp_path / "l.npy"),
                  "--weights", str(tmp_path / "odd.pt"), "--width", "4", "--device", "cpu",
                  "--quiet", "--output_dir", str(tmp_path / "o")])
    one_error_line(capsys, rc, str(tmp_path / "odd.pt"), "state_dict key 3")


def test_outputs_inside_the_folders_a_stage_reads_are_refused(volumes, tmp_path, capsys):
    """Features or fold files written into train/ would be read as patients by the next run;
    predictions inside --images as images."""
    rc = fe.main(["--data_dir", str(volumes), "--weights", "w.pt",
                  "--output_dir", str(volumes / "train")])
    one_error_line(capsys, rc, "--output_dir", "overlap")
    rc = pg.main(["--data_dir", str(volumes), "--output_dir", str(volumes / "validation" / "x")])
    one_error_line(capsys, rc, "--output_dir", "overlap")
    img, msk = _seg_folders(tmp_path, ["a", "b"], ["a_mask", "b_mask"])
    rc = fs.main(["--images", str(img), "--masks", str(msk), "--output_dir", str(img / "run"),
                  "--device", "cpu"])
    one_error_line(capsys, rc, "--output_dir", "overlap")
    assert not (img / "run").exists()
