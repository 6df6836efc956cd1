"""Transfer study (experiments/transfer): statistics, subsets, plot, presets and ``--set``
checks, and a tiny run whose steps are keyed by their settings.

The end-to-end test runs the tiny preset with scratch and one pretrained method on fold files
from ``tests/fold_fixtures`` (the pattern stages are covered by the quickstart test), then
re-runs it: with the same settings nothing runs again, with another ``--set`` value the run is
refused before anything runs and ``--overwrite`` redoes exactly the steps that changed, and a
study moved to another folder keeps every step.
"""
from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import transfer_study as ts
from experiments.transfer import config as C
from experiments.transfer import data as D
from experiments.transfer import report as R
from experiments.transfer import study as S
from finetune import classification as finetune_classification
from finetune import segmentation as finetune_segmentation
from finetune.cells import finish_cell, label_subset, start_cell
from finetune.stats import mean_ci
from preparation.phantoms import make_nodule_cubes
from pytorch import train as train_cli
from runtime.errors import InputError
from tests.fold_fixtures import make_fold_files


def test_mean_ci_and_paired_summary():
    m, lo, hi = mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6)
    assert hi - m == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)   # t(0.975, 2)
    assert math.isnan(mean_ci([0.5])[1]) and math.isnan(mean_ci([])[0])
    res = {"classification": {"scratch": {"0.1": [0.5, 0.6, 0.7]},
                              "semantic_genesis": {"0.1": [0.6, 0.72, 0.79]}}}
    rows = R.summarize(res)
    sg = [r for r in rows if r["method"] == "semantic_genesis"][0]
    assert sg["diff"] == pytest.approx(np.mean([0.1, 0.12, 0.09]))   # paired, seed by seed
    assert sg["diff_ci"][0] > 0
    table = R.format_table(rows)
    assert "| classification (AUC) | 10% | scratch | 60.0 [" in table
    assert "| semantic_genesis | 70.3 [" in table and table.splitlines()[-1].endswith("* |")


def test_label_subsets_are_stratified_nested_and_method_free():
    labels = np.array([0] * 30 + [1] * 10)
    small, big = label_subset(labels, 0.1, seed=3), label_subset(labels, 0.5, seed=3)
    assert set(small) <= set(big) and len(small) == 4 and len(big) == 20
    assert np.bincount(labels[small]).tolist() == [3, 1]
    assert np.bincount(labels[label_subset(labels, 0.01, 0)]).tolist() == [1, 1]  # one per class
    assert np.array_equal(small, label_subset(labels, 0.1, seed=3))
    assert not np.array_equal(small, label_subset(labels, 0.1, seed=4))
    assert label_subset(labels, 1.0, 0).tolist() == list(range(40))


def test_presets_and_overrides():
    cpu = C.resolve_config("cpu")
    assert cpu["width"] == 4 and len(cpu["seeds"]) >= 5 and cpu["fractions"][0] <= 0.05
    gpu, full = C.resolve_config("gpu"), C.resolve_config("full")
    for cfg in (gpu, full):
        assert cfg["width"] == 32 and cfg["cube"] == [64, 64, 32]
    assert full["classes"] == 44 and full["fractions"] == [0.05, 0.1, 0.25, 1.0]
    assert set(C.RULES) == set(cpu)                       # every key has its rule
    cfg = C.resolve_config("cpu", ["width=8", "fractions=[0.1,1]", "cls_lr=1", "cls_monitor=loss"])
    assert cfg["width"] == 8 and cfg["fractions"] == [0.1, 1.0] and cfg["cls_lr"] == 1.0
    assert cfg["cls_monitor"] == "loss"
    for name in C.PRESETS:
        for key, (rule, _) in C.RULES.items():
            assert rule(C.PRESETS[name][key]), (name, key)


@pytest.mark.parametrize("bad, needle", [
    ("nope=1", "KEY one of the study's keys: ae_batch, ae_epochs"),   # unknown key: every key
    ("width", "KEY one of the study's keys"),
    ("width=abc", "width takes a U-Net base width >= 1"),             # not a literal
    ("width=[1]", "width takes"),                                     # another type
    ("width=True", "width takes"),
    ("width=0", "width takes a U-Net base width >= 1"),               # out of range
    ("pre_lr=-1", "pre_lr takes a learning rate > 0"),
    ("cls_lr=1e999", "cls_lr takes"),
    ("seg_overlap=1", "seg_overlap takes a sliding-window overlap in [0, 1)"),
    ("seeds=[0]", "seeds takes at least 2 distinct seeds"),
    ("seeds=[1,1]", "seeds takes"),
    ("fractions=[1.0,0.5]", "fractions takes increasing label fractions"),
    ("fractions=[0,1]", "fractions takes"),
    ("cube=[30,32,16]", "cube takes 3 cube sizes, multiples of 8"),
    ("cube=[32,32]", "cube takes"),
    ("cls_n=[80,1,200]", "cls_n takes"),
    ("cls_nodule_radius=[6,3]", "cls_nodule_radius takes"),
    ("cls_monitor=dice", "cls_monitor takes auc or loss"),
    ("classes=1", "classes takes a number of pattern classes >= 2"),
    ("patch_min=50", "patch_min 50 is above patch_max"),
])
def test_bad_set_values_are_one_line_naming_the_key(bad, needle, tmp_path, capsys):
    """Unknown keys, wrong types and values out of range: one error line, exit code 2, no
    traceback, no flag of a pipeline stage, nothing written."""
    out = tmp_path / "study"
    rc = ts.main(["--preset", "tiny", "--set", bad, "--output_dir", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --set"), err
    assert needle in lines[0] and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("preset", ["cpu", "gpu", "full"])
def test_every_preset_builds_valid_command_lines(preset, tmp_path):
    """Each stage, pretraining and fine-tuning argv the preset makes parses with its CLI, and
    target patients never coincide with pretraining patients."""
    cfg = C.resolve_config(preset)
    for _, module, _, argv in D.pretraining_stages(tmp_path, cfg, "cpu"):
        importlib.import_module(module).build_parser().parse_args(argv)
    for method in C.PRETRAIN_FLAGS:
        train_cli.build_parser().parse_args(S._pretrain_argv(method, cfg, tmp_path, tmp_path, tmp_path,
                                                             ("p.npy", "l.npy"), "cpu", True))
    cls_data, seg_data = {"--data": ["a.npy"], "--labels": ["b.npy"]}, {"--images": ["i"], "--masks": ["m"]}
    for method in C.METHODS:
        finetune_classification.build_parser().parse_args(
            S._finetune_argv("classification", method, cfg, cls_data, None, 0, tmp_path, "cpu"))
        args = finetune_segmentation.build_parser().parse_args(
            S._finetune_argv("segmentation", method, cfg, seg_data, "w.pt", 0, tmp_path, "cpu"))
        assert args.new_decoder == (method == "classification_only")
    seeds = D.phantom_seeds(cfg)
    assert not (seeds["pretraining"] & (seeds["classification"] | seeds["segmentation"]))


def test_stage_errors_are_named_in_the_study_keys():
    msg = D.in_study_terms("patterns", "no coordinate passed the lung test; lower "
                                       "--lung_threshold or --len_border")
    assert "border (--set)" in msg and "--len_border" not in msg
    assert "the stage's --lung_threshold (fixed by the study)" in msg


def test_study_plot_is_a_matplotlib_png(tmp_path):
    rows = R.summarize({"segmentation": {
        "scratch": {"0.05": [0.1, 0.2], "1": [0.5, 0.6]},
        "restoration_only": {"0.05": [0.2, 0.3], "1": [0.6, 0.6]}}})
    path = R.plot_results(rows, tmp_path / "plot.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
        img = np.asarray(im.convert("RGB"))
    red = tuple(int(R.COLORS["restoration_only"][i:i + 2], 16) for i in (1, 3, 5))
    assert (np.abs(img.astype(int) - red).sum(-1) < 30).sum() > 100   # the method's line
    assert not list(tmp_path.glob(".*tmp*"))


def _fake_pretraining_data(folds: Path):
    """Stages 0-3 replaced by copying ready fold files (a finished, recorded step)."""
    def fake(out, cfg, device, cell, action):
        patterns = out / "pretraining_data" / "patterns"
        if action != "reuse":
            start_cell(cell, action)
            shutil.copytree(folds, patterns, dirs_exist_ok=True)
            finish_cell(cell, {"patterns": "pretraining_data/patterns"})
        return patterns
    return fake


def _no_run(monkeypatch):
    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise AssertionError("a finished step ran again")
    for module, name in ((train_cli, "train"), (finetune_classification, "run"),
                         (finetune_segmentation, "run")):
        monkeypatch.setattr(module, name, boom)


def test_tiny_study_end_to_end_resume_and_settings(tmp_path, monkeypatch, capsys):
    """Scratch and semantic_genesis, both tasks, 2 seeds, 2 fractions; a re-run redoes nothing;
    another --set value is refused, then --overwrite redoes only what it changes; a moved study
    keeps its steps."""
    folds = make_fold_files(tmp_path / "folds", classes=2, instances=4, val_instances=2)
    monkeypatch.setattr(D, "pretraining_data", _fake_pretraining_data(folds))
    out, results = tmp_path / "study", tmp_path / "results" / "study.json"
    argv = ["--preset", "tiny", "--methods", "scratch", "semantic_genesis", "--device", "cpu",
            "--output_dir", str(out), "--results_json", str(results), "--quiet"]
    assert ts.main(argv) == 0
    study = json.loads(results.read_text(encoding="utf-8"))
    assert set(study) >= {"machine", "command", "tasks"} and "--preset tiny" in study["command"]
    assert "[pretrain] semantic_genesis done (1 epochs" in capsys.readouterr().out
    for task, metric in (("classification", "auc"), ("segmentation", "dice")):
        t = study["tasks"][task]
        assert t["metric"] == metric and t["label_fractions"] == [0.5, 1.0]
        assert set(t["results"]) == {"scratch", "semantic_genesis"}
        for by_f in t["results"].values():
            assert set(by_f) == {"0.5", "1"} and all(len(v) == 2 for v in by_f.values())
    diag = study["pretraining"]["semantic_genesis"]["diagnostics"]
    assert diag[0]["epoch"] == 0 and "probe" in diag[0] and "restoration" in diag[1]
    with Image.open(results.with_suffix(".png")) as im:
        assert im.format == "PNG"
    assert "| classification (AUC) | 50% | semantic_genesis |" in (out / "transfer_study.md").read_text(encoding="utf-8")
    seg_cell = out / "cells" / "segmentation" / "semantic_genesis" / "f1" / "seed1"
    record = json.loads((seg_cell / "cell.json").read_text(encoding="utf-8"))
    assert record["finished"] and record["result"]["loaded_keys"] > 0
    assert record["settings"]["run"]["lr"] == 1e-3 and "output_dir" not in record["settings"]["run"]
    assert str(tmp_path) not in json.dumps(record)           # no absolute path in a record
    assert not (out / "cells" / "segmentation" / "scratch" / "f1" / "seed1" / "best.pt").exists()
    assert len(list((out / "data" / "classification" / "subsets").glob("*_labels.npy"))) == 4

    # the same settings: nothing runs again, the same values
    with monkeypatch.context() as m:
        _no_run(m)
        assert ts.main(argv) == 0
    assert json.loads(results.read_text(encoding="utf-8"))["tasks"] == study["tasks"]

    # another value: refused before anything runs, naming the setting and the fix
    capsys.readouterr()
    assert ts.main(argv + ["--set", "cls_lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cell classification scratch fraction 0.5 seed 0:")
    assert "run.lr: 0.001 -> 0.5" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert json.loads(results.read_text(encoding="utf-8"))["config"]["cls_lr"] == 1e-3

    # --overwrite redoes the classification cells only (pretraining and segmentation are kept)
    ran = []
    real = finetune_classification.run
    monkeypatch.setattr(finetune_classification, "run", lambda a: ran.append(a) or real(a))
    monkeypatch.setattr(train_cli, "train", lambda *a: (_ for _ in ()).throw(AssertionError("pretrained again")))
    monkeypatch.setattr(finetune_segmentation, "run", lambda *a: (_ for _ in ()).throw(AssertionError("segmentation again")))
    assert ts.main(argv + ["--set", "cls_lr=0.5", "--overwrite"]) == 0
    assert len(ran) == 8 and all(a.lr == 0.5 for a in ran)
    again = json.loads(results.read_text(encoding="utf-8"))
    assert again["config"]["cls_lr"] == 0.5
    assert again["tasks"]["segmentation"] == study["tasks"]["segmentation"]
    record = json.loads((out / "cells" / "classification" / "scratch" / "f1" / "seed0" / "cell.json").read_text(encoding="utf-8"))
    assert record["settings"]["run"]["lr"] == 0.5

    # the study moved to another folder keeps every step (records hold no absolute path)
    moved = tmp_path / "elsewhere" / "study"
    shutil.move(str(out), str(moved))
    with monkeypatch.context() as m:
        _no_run(m)
        assert ts.main(argv[:-5] + ["--output_dir", str(moved), "--set", "cls_lr=0.5", "--quiet"]) == 0
    assert json.loads((moved / "transfer_study.json").read_text(encoding="utf-8"))["tasks"] == again["tasks"]


def test_parallel_workers_give_the_serial_values(tmp_path):
    """The same scratch cells in two worker processes or in this process."""
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert ts.main(["--preset", "tiny", "--methods", "scratch", "--tasks", "classification",
                        "--device", "cpu", "--output_dir", str(out), "--workers", str(workers),
                        "--threads", "1", "--quiet"]) == 0
        runs[workers] = json.loads((out / "transfer_study.json").read_text(encoding="utf-8"))["tasks"]
    for f, vals in runs[1]["classification"]["results"]["scratch"].items():
        assert runs[2]["classification"]["results"]["scratch"][f] == pytest.approx(vals, abs=0.02)


def test_a_folder_of_an_earlier_version_is_refused_not_reused(tmp_path, capsys):
    """Step folders without a settings record (an earlier version's cache) are never reused."""
    out = tmp_path / "study"
    (out / "data" / "classification").mkdir(parents=True)
    (out / "data" / "classification" / "flags.json").write_text("{}")
    assert ts.main(["--preset", "tiny", "--methods", "scratch", "--tasks", "classification",
                    "--device", "cpu", "--output_dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds files but no cell.json" in err and "--overwrite" in err


def test_nodule_radius_of_the_classification_cubes():
    small, lab = make_nodule_cubes(16, (32, 32, 16), seed=2)
    big, lab2 = make_nodule_cubes(16, (32, 32, 16), seed=2, radius=(5.0, 5.0))
    assert np.array_equal(lab, lab2)
    centre = (slice(14, 18), slice(14, 18), slice(7, 9))   # inside a radius-5 nodule (z: 2.5)
    dense = lambda c: (c[centre] > 0.45).mean()            # noqa: E731  (soft tissue, not lung)
    assert all(dense(big[i]) > 0.9 for i in np.flatnonzero(lab2))
    assert np.mean([dense(small[i]) for i in np.flatnonzero(lab)]) < 0.9


def test_plan_refuses_before_writing(tmp_path):
    """plan_study raises before anything exists when a step's record differs."""
    out = tmp_path / "s"
    cfg = C.resolve_config("tiny")
    study = S.plan_study(out, cfg, ["scratch"], ["segmentation"], overwrite=False)
    cell = study["data"]["segmentation"]
    start_cell(cell, "run")
    finish_cell(cell, {"flags": {}})
    cfg2 = C.resolve_config("tiny", ["seg_nodules=3"])
    with pytest.raises(InputError, match=r"data segmentation: .*nodules: 2 -> 3"):
        S.plan_study(out, cfg2, ["scratch"], ["segmentation"], overwrite=False)
    assert S.plan_study(out, cfg2, ["scratch"], ["segmentation"], overwrite=True)["plan"][cell.name] == "redo"
