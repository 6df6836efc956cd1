"""Transfer study (experiments/transfer_study.py): statistics, subsets, plot, presets, a tiny run.

The end-to-end test runs the tiny preset with scratch and one pretrained method on fold files
from ``tests/fold_fixtures`` (the pattern stages are covered by the quickstart test), then
re-runs it to check that finished cells are not redone.
"""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pytorch import train as train_cli
from finetune import classification as finetune_classification
from finetune import segmentation as finetune_segmentation
from experiments import transfer_study as ts
from preparation.phantoms import make_nodule_cubes
from tests.fold_fixtures import make_fold_files


def test_mean_ci_and_paired_summary():
    m, lo, hi = ts.mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6)
    assert hi - m == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)   # t(0.975, 2)
    assert math.isnan(ts.mean_ci([0.5])[1]) and math.isnan(ts.mean_ci([])[0])
    res = {"classification": {"scratch": {"0.1": [0.5, 0.6, 0.7]},
                              "semantic_genesis": {"0.1": [0.6, 0.72, 0.79]}}}
    rows = ts.summarize(res)
    sg = [r for r in rows if r["method"] == "semantic_genesis"][0]
    assert sg["diff"] == pytest.approx(np.mean([0.1, 0.12, 0.09]))   # paired, seed by seed
    assert sg["diff_ci"][0] > 0
    table = ts.format_table(rows)
    assert "| classification (AUC) | 10% | scratch | 60.0 [" in table
    assert "| semantic_genesis | 70.3 [" in table and table.splitlines()[-1].endswith("* |")


def test_label_subsets_are_stratified_nested_and_method_free():
    labels = np.array([0] * 30 + [1] * 10)
    small, big = ts.label_subset(labels, 0.1, seed=3), ts.label_subset(labels, 0.5, seed=3)
    assert set(small) <= set(big) and len(small) == 4 and len(big) == 20
    assert np.bincount(labels[small]).tolist() == [3, 1]
    assert np.bincount(labels[ts.label_subset(labels, 0.01, 0)]).tolist() == [1, 1]  # one per class
    assert np.array_equal(small, ts.label_subset(labels, 0.1, seed=3))
    assert not np.array_equal(small, ts.label_subset(labels, 0.1, seed=4))
    assert ts.label_subset(labels, 1.0, 0).tolist() == list(range(40))


def test_presets_and_overrides(capsys):
    cpu = ts.resolve_config("cpu")
    assert cpu["width"] == 4 and len(cpu["seeds"]) >= 5 and cpu["fractions"][0] <= 0.05
    gpu, full = ts.resolve_config("gpu"), ts.resolve_config("full")
    for cfg in (gpu, full):
        assert cfg["width"] == 32 and cfg["cube"] == [64, 64, 32]
    assert full["classes"] == 44 and full["fractions"] == [0.05, 0.1, 0.25, 1.0]
    cfg = ts.resolve_config("cpu", ["width=8", "fractions=[0.1,1.0]", "cls_lr=1"])
    assert cfg["width"] == 8 and cfg["fractions"] == [0.1, 1.0] and cfg["cls_lr"] == 1.0
    for bad, msg in ((["nope=1"], "expected key=value"), (["width=abc"], "not a number"),
                     (["width=[1]"], "takes a value like 4"), (["fractions=[1.0,0.5]"], "increasing"),
                     (["seeds=[0]"], "at least 2 seeds"), (["cube=[30,32,16]"], "multiple of 8")):
        with pytest.raises(ts.InputError, match=msg):
            ts.resolve_config("cpu", bad)
    assert ts.main(["--preset", "tiny", "--set", "width=x", "--output_dir", "/nonexistent/x"]) == 2
    assert capsys.readouterr().err.startswith("error: --set width=x")


@pytest.mark.parametrize("preset", ["cpu", "gpu", "full"])
def test_every_preset_builds_valid_command_lines(preset, tmp_path):
    """Each stage, pretraining and fine-tuning argv the preset makes parses with its CLI, and
    target patients never coincide with pretraining patients."""
    cfg = ts.resolve_config(preset)
    for _, module, _, argv in ts.pretraining_stages(tmp_path, cfg, "cpu"):
        importlib.import_module(module).build_parser().parse_args(argv)
    for method in ts.PRETRAIN_FLAGS:
        train_cli.build_parser().parse_args(ts._pretrain_argv(method, cfg, tmp_path, tmp_path, tmp_path,
                                                          ("p.npy", "l.npy"), "cpu", True))
    cls_data, seg_data = {"--data": ["a.npy"], "--labels": ["b.npy"]}, {"--images": ["i"], "--masks": ["m"]}
    for method in ts.METHODS:
        finetune_classification.build_parser().parse_args(
            ts._finetune_argv("classification", method, cfg, cls_data, None, 0, tmp_path, "cpu"))
        args = finetune_segmentation.build_parser().parse_args(
            ts._finetune_argv("segmentation", method, cfg, seg_data, "w.pt", 0, tmp_path, "cpu"))
        assert args.new_decoder == (method == "classification_only")
    seeds = ts._phantom_seeds(cfg)
    assert not (seeds["pretraining"] & (seeds["classification"] | seeds["segmentation"]))


def test_study_plot_is_an_rgb_png_of_the_expected_size(tmp_path):
    rows = ts.summarize({"segmentation": {
        "scratch": {"0.05": [0.1, 0.2], "1": [0.5, 0.6]},
        "restoration_only": {"0.05": [0.2, 0.3], "1": [0.6, 0.6]}}})
    path = ts.plot_results(rows, tmp_path / "plot.png")
    with Image.open(path) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (520, 416))  # one panel + legend
        img = np.asarray(im)
    assert (img == [214, 39, 40]).all(-1).sum() > 100             # the second method's red line


def test_tiny_study_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    """Scratch and semantic_genesis, both tasks, 2 seeds, 2 fractions; a re-run redoes nothing;
    two worker processes give the same values."""
    folds = make_fold_files(tmp_path / "folds", classes=2, instances=4, val_instances=2)
    monkeypatch.setattr(ts, "pretraining_data", lambda out, cfg, device: folds)
    out, results = tmp_path / "study", tmp_path / "results" / "study.json"
    argv = ["--preset", "tiny", "--methods", "scratch", "semantic_genesis", "--device", "cpu",
            "--output_dir", str(out), "--results_json", str(results), "--quiet"]
    assert ts.main(argv) == 0
    study = json.loads(results.read_text())
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
        assert (im.format, im.mode) == ("PNG", "RGB")
    assert "| classification (AUC) | 50% | semantic_genesis |" in (out / "transfer_study.md").read_text()
    cell = json.loads((out / "cells" / "segmentation" / "semantic_genesis" / "f1" / "seed1.json").read_text())
    assert cell["loaded_keys"] > 0 and not (out / "runs" / "finetune" / "segmentation" / "scratch"
                                            / "f1" / "seed1" / "best.pt").exists()
    # the labelled subsets are shared by the methods: one file per (fraction, seed)
    assert len(list((out / "data" / "classification" / "subsets").glob("*_labels.npy"))) == 4

    def boom(*a, **k):
        raise AssertionError("a finished step ran again")
    for module, name in ((train_cli, "train"), (finetune_classification, "run"), (finetune_segmentation, "run")):
        monkeypatch.setattr(module, name, boom)
    assert ts.main(argv) == 0
    assert json.loads(results.read_text())["tasks"] == study["tasks"]
    # the same cells in two worker processes (the subsets are rebuilt the same way)
    monkeypatch.undo()
    par = tmp_path / "parallel"
    assert ts.main(["--preset", "tiny", "--methods", "scratch", "--tasks", "classification",
                    "--device", "cpu", "--output_dir", str(par), "--workers", "2", "--threads", "1",
                    "--quiet"]) == 0
    again = json.loads((par / "transfer_study.json").read_text())["tasks"]["classification"]["results"]
    for f, vals in study["tasks"]["classification"]["results"]["scratch"].items():
        assert again["scratch"][f] == pytest.approx(vals, abs=0.02)


def test_nodule_radius_of_the_classification_cubes():
    small, lab = make_nodule_cubes(16, (32, 32, 16), seed=2)
    big, lab2 = make_nodule_cubes(16, (32, 32, 16), seed=2, radius=(5.0, 5.0))
    assert np.array_equal(lab, lab2)
    centre = (slice(14, 18), slice(14, 18), slice(7, 9))   # inside a radius-5 nodule (z: 2.5)
    dense = lambda c: (c[centre] > 0.45).mean()            # noqa: E731  (soft tissue, not lung)
    assert all(dense(big[i]) > 0.9 for i in np.flatnonzero(lab2))
    assert np.mean([dense(small[i]) for i in np.flatnonzero(lab)]) < 0.9
