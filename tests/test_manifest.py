"""pytorch/train.py takes its data flags from the pattern generator's config.json.

Tiny fold files (16 x 16 x 8 cubes, 3 classes, one resolution); the CLI runs one epoch at width 4.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pytorch import train as train_cli
from pytorch.data import load_pretraining_data
from pytorch.manifest import DATA_FLAGS, MANIFEST_NAME, resolve_data_flags
from runtime.errors import InputError
from self_discovery.fold_files import FOLD_INDEX, write_fold_index
from tests.fold_fixtures import SHAPE, make_fold_files

CKPT = "semantic_genesis_chest_ct"
PAPER = {"input_rows": 64, "input_cols": 64, "input_deps": 32, "cls_classes": 44,
         "nb_instances": 200, "nb_instances_val": 30, "nb_multires_patch": 3}


def _manifest(folder: Path, **changes) -> Path:
    """The flags pattern_generator_3D.py writes for make_fold_files(classes=3, instances=4,
    val_instances=2, resolutions=1), with ``changes``, and its index of finished fold files."""
    cfg = {"input_rows": SHAPE[0], "input_cols": SHAPE[1], "input_deps": SHAPE[2],
           "nb_classes": 3, "nb_instances": 4, "nb_instances_val": 2, "multi_res": False,
           "classes_per_file": 50, "seed": 0, **changes}
    (folder / MANIFEST_NAME).write_text(json.dumps(cfg), encoding="utf-8")
    write_fold_index(folder, 3, [p.name for p in folder.glob("*_vwGen_ex_ref_fold*.npy")])
    return folder


@pytest.fixture
def folds(tmp_path) -> Path:
    return make_fold_files(tmp_path / "folds", classes=3, instances=4, val_instances=2,
                           resolutions=1)


def _args(data_dir: Path, **flags) -> argparse.Namespace:
    return argparse.Namespace(data_dir=str(data_dir), **{f: flags.get(f) for f in DATA_FLAGS})


def test_manifest_values_are_used(folds):
    args = _args(_manifest(folds))
    assert resolve_data_flags(args) == dict.fromkeys(DATA_FLAGS, "manifest")
    assert (args.input_rows, args.input_cols, args.input_deps) == SHAPE
    assert (args.cls_classes, args.nb_instances, args.nb_instances_val,
            args.nb_multires_patch) == (3, 4, 2, 1)


def test_flags_override_the_manifest(folds):
    args = _args(_manifest(folds), cls_classes=2, nb_instances=3)
    sources = resolve_data_flags(args)
    assert sources["cls_classes"] == sources["nb_instances"] == "flag"
    assert sources["nb_instances_val"] == "manifest"
    assert (args.cls_classes, args.nb_instances, args.nb_instances_val) == (2, 3, 2)


def test_without_manifest_the_paper_defaults(folds):
    args = _args(folds, input_rows=16)
    sources = resolve_data_flags(args)
    assert sources == dict(dict.fromkeys(DATA_FLAGS, "default"), input_rows="flag")
    assert {f: getattr(args, f) for f in DATA_FLAGS} == dict(PAPER, input_rows=16)


@pytest.mark.parametrize("changes, words", [
    ({"nb_instances": 5}, "holds 15 cubes"),
    ({"input_deps": 16}, "of 16x16x16"),
    ({"multi_res": True}, "train_data2_vwGen_ex_ref_fold1.0.npy is missing"),
    ({"nb_classes": 51}, "fold1.0.npy holds 200 cubes"),  # block 1 full: 50 x 4
    ({"classes_per_file": 10}, "groups of 50"),
    ({"nb_instances": "4"}, "nb_instances must be an integer"),
])
def test_manifest_inconsistent_with_the_fold_files_is_an_error(folds, changes, words):
    with pytest.raises(InputError, match=words) as e:
        resolve_data_flags(_args(_manifest(folds, **changes)))
    assert "\n" not in str(e.value) and MANIFEST_NAME in str(e.value)


def test_unfinished_run_is_left_to_the_loader(folds):
    """Without fold_index.json the generator has not finished: no manifest check, the loader
    refuses the folder and says how to resume."""
    _manifest(folds, nb_instances=5)
    (folds / FOLD_INDEX).unlink()
    args = _args(folds)
    assert resolve_data_flags(args)["nb_instances"] == "manifest" and args.nb_instances == 5
    with pytest.raises(InputError, match="not finished"):
        load_pretraining_data(folds, 3, 5, 2, 1, SHAPE)


def test_all_flags_given_the_manifest_is_not_read(folds):
    (folds / MANIFEST_NAME).write_text("not json", encoding="utf-8")
    args = _args(folds, **PAPER)
    assert resolve_data_flags(args) == dict.fromkeys(DATA_FLAGS, "flag")
    with pytest.raises(InputError, match="cannot be read as JSON"):
        resolve_data_flags(_args(folds))


def test_cli_logs_and_records_where_each_value_came_from(folds, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--data_dir", str(_manifest(folds)), "--cls_classes", "2", "--width", "4",
            "--nb_epoch", "1", "--batch_size", "4", "--device", "cpu", "--nb_preview", "0",
            "--output_dir", str(out / "ckpt"), "--log_dir", str(out / "runs")]
    assert train_cli.main(argv) == 0
    log = capsys.readouterr().out
    assert "--input_rows 16 (manifest)" in log and "--cls_classes 2 (flag)" in log
    cfg = json.loads((out / "ckpt" / f"{CKPT}_config.json").read_text())
    assert cfg["input_deps"] == 8 and cfg["nb_multires_patch"] == 1 and cfg["cls_classes"] == 2
    assert cfg["data_flags_from"] == dict(dict.fromkeys(DATA_FLAGS, "manifest"),
                                          cls_classes="flag")
    _manifest(folds, nb_instances_val=3)
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "val_data1" in err
