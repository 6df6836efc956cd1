"""Target-task runs (target_tasks/run.py): protocols, statistics on known numbers, cells keyed
by settings, checkpoint kinds, the prepared-folder check, and ``--preset tiny`` end to end on
tiny prepared folders of a classification (NCC) and a segmentation (LCS-like) task.

The prepared folders are written here in the format ``scripts/prepare_target.py`` writes
(``manifest.json`` with every file's size and SHA-256), with small cubes and volumes and
``--input 16 16 8`` so that each cell takes seconds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import classification as finetune_classification
from finetune.cells import Cell, finish_cell, plan_cells, settings_differences, start_cell
from finetune.stats import mean_ci, mean_std, paired_difference, summary_rows
from models.checkpoint import save_checkpoint
from models.ynet3d import ClassificationNet3D, UNet3D, YNet3D
from runtime.errors import CheckpointError, InputError
from runtime.provenance import file_identity
from target_tasks import run as target_run
from target_tasks.inits import inspect_checkpoint, parse_inits, resolve_width
from target_tasks.protocols import PAPER, PROTOCOLS
from tests.checkpoint_fixtures import save_published

INPUT = ["--input", "16", "16", "8"]
FAST = ["--preset", "tiny", "--device", "cpu"] + INPUT


# ------------------------------------------------------------------------------------------
# tiny prepared folders
# ------------------------------------------------------------------------------------------
def write_manifest(out: Path, task: str, complete: bool = True) -> Path:
    files = {p.relative_to(out).as_posix(): file_identity(p) for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    manifest = {"task": task, "format_version": 1, "complete": complete, "source": "phantoms",
                "settings": {"hu_min": -1000.0, "hu_max": 1000.0},
                "splits": {"train": ["a"], "val": ["b"], "test": ["c"]}, "counts": {},
                "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def prepared_ncc(out: Path, n=(8, 4, 4), size=(16, 16, 8), seed=0) -> Path:
    """NCC layout: {split}_cubes.npy (N, X, Y, Z) float16 in [0, 1] with a bright centre for
    label 1, {split}_labels.npy, {split}_candidates.csv."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, k in zip(("train", "val", "test"), n):
        labels = (np.arange(k) % 2).astype(np.int64)
        cubes = (rng.random((k, *size)) * 0.3).astype(np.float16)
        c = [s // 2 for s in size]
        cubes[labels == 1, c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 2:c[2] + 2] = 0.9
        np.save(out / f"{split}_cubes.npy", cubes)
        np.save(out / f"{split}_labels.npy", labels)
        (out / f"{split}_candidates.csv").write_text(
            "seriesuid,coordX,coordY,coordZ,class\n" + "".join(f"s{i},0,0,0,{v}\n" for i, v in enumerate(labels)))
    return write_manifest(out, "ncc")


def prepared_seg(out: Path, task: str = "lcs", n=(4, 1, 2), shape=(24, 24, 16), seed=0) -> Path:
    """Segmentation layout: {split}/images/<case>.npy float32 [0, 1] and {split}/masks/<case>.npy
    uint8 {0, 1}, the same names; a bright box is the foreground."""
    rng = np.random.default_rng(seed)
    for split, k in zip(("train", "val", "test"), n):
        for i in range(k):
            img = (rng.random(shape) * 0.3).astype(np.float32)
            mask = np.zeros(shape, np.uint8)
            x, y, z = (int(rng.integers(2, s - 10)) for s in shape)
            mask[x:x + 8, y:y + 8, z:z + 6] = 1
            img[mask == 1] += 0.6
            for what, arr in (("images", img), ("masks", mask)):
                (out / split / what).mkdir(parents=True, exist_ok=True)
                np.save(out / split / what / f"case_{split}_{i}.npy", arr)
    return write_manifest(out, task)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    paths = {"en_de": save_checkpoint(root / "en_de.pt", YNet3D(cls_classes=4, width=2)),
             "en": save_checkpoint(root / "en.pt", ClassificationNet3D(cls_classes=4, width=2))}
    unet = UNet3D(width=2)   # Models Genesis: a 3D U-Net saved from DataParallel, no schema
    torch.save({"state_dict": {"module." + k: v for k, v in unet.state_dict().items()}},
               root / "mg.pt")
    paths["mg"] = root / "mg.pt"
    save_published(root / "published.pt", YNet3D(cls_classes=4, width=2))
    paths["published"] = root / "published.pt"
    paths["wide"] = save_checkpoint(root / "wide.pt", YNet3D(cls_classes=4, width=4))
    return paths


# ------------------------------------------------------------------------------------------
# protocols, statistics, cells, checkpoints
# ------------------------------------------------------------------------------------------
def test_protocols_are_the_published_ones():
    ncc, ncs, lcs, bms = (PROTOCOLS[t] for t in ("ncc", "ncs", "lcs", "bms"))
    assert (ncc.lr, ncc.batch_size, ncc.patience, ncc.loss, ncc.metric) == (1e-3, 24, 10, "bce", "auc")
    assert (ncs.lr, ncs.batch_size, ncs.patience, ncs.loss, ncs.metric) == (1e-3, 16, 50, "dice", "iou")
    assert (lcs.lr, lcs.batch_size, lcs.patience, lcs.metric) == (1e-2, 16, 20, "iou")
    assert (bms.lr, bms.batch_size, bms.patience, bms.metric) == (1e-3, 16, 30, "iou")
    for p in (ncc, ncs, lcs, bms):
        assert p.optimizer == "adam" and p.input_size == (64, 64, 32) and p.nb_epoch == 10000
    assert ncc.hu_window == lcs.hu_window == (-1000.0, 1000.0) and bms.hu_window is None
    assert PAPER["ncc"]["semantic_genesis"] == (98.46, 0.30)
    assert PAPER["ncs"]["models_genesis"] == (77.41, 0.40)
    assert PAPER["lcs"]["classification_only"] == (84.14, 1.78)
    assert PAPER["bms"]["scratch"] == (59.87, 4.04)


def test_statistics_on_known_numbers():
    m, lo, hi = mean_ci([0.5, 0.7, 0.9])
    half = 4.302652729911275 * 0.2 / math.sqrt(3)          # t(0.975, 2) * s / sqrt(n)
    assert (m, lo, hi) == pytest.approx((0.7, 0.7 - half, 0.7 + half))
    assert mean_std([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))
    assert math.isnan(mean_std([0.5])[1]) and math.isnan(mean_ci([0.5, float("nan")])[1])
    d, dlo, dhi = paired_difference([0.6, 0.8, 0.9], [0.5, 0.7, 0.9])
    s = np.std([0.1, 0.1, 0.0], ddof=1)
    assert d == pytest.approx(0.2 / 3)
    assert dhi - d == pytest.approx(4.302652729911275 * s / math.sqrt(3))
    # paired: a seed-to-seed spread that the unpaired intervals cannot see
    rows = summary_rows({"scratch": {"1": [0.5, 0.7, 0.9]}, "sg": {"1": [0.52, 0.72, 0.92]}})
    sg = rows[1]
    assert sg["init"] == "sg" and sg["diff"] == pytest.approx(0.02)
    assert sg["diff_ci"] == pytest.approx([0.02, 0.02]) and sg["ci"][0] < 0.5
    with pytest.raises(ValueError, match="one per seed"):
        paired_difference([0.1], [0.1, 0.2])


def test_cells_are_keyed_by_settings(tmp_path):
    cell = Cell("a", tmp_path / "a", {"lr": 0.001, "data": {"sha256": "x"}}, ("metrics.json",))
    assert plan_cells([cell]) == {"a": "run"}
    start_cell(cell, "run")
    assert plan_cells([cell], unfinished="resume") == {"a": "resume"}
    with pytest.raises(InputError, match="interrupted before it finished.*continue with --resume"):
        plan_cells([cell])
    (cell.folder / "metrics.json").write_text("{}")
    finish_cell(cell, {"value": 0.5})
    assert plan_cells([cell]) == {"a": "reuse"} and cell.result() == {"value": 0.5}
    other = Cell("a", cell.folder, {"lr": 0.01, "data": {"sha256": "y"}}, ("metrics.json",))
    with pytest.raises(InputError, match=r"other settings \(lr: 0.001 -> 0.01, data.sha256: x -> y\)"
                                         r".*--overwrite"):
        plan_cells([other])
    assert plan_cells([other], overwrite=True) == {"a": "redo"}
    (cell.folder / "metrics.json").unlink()                # a finished record without its result
    assert plan_cells([cell], overwrite=True) == {"a": "redo"}
    stray = Cell("b", tmp_path / "b", {})
    stray.folder.mkdir()
    (stray.folder / "metrics.json").write_text("{}")
    with pytest.raises(InputError, match="holds files but no cell.json"):
        plan_cells([stray])
    assert settings_differences({"a": 1}, {"a": 1.0, "b": 2}) == {"b": ("(not recorded)", 2)}


def test_checkpoint_kinds_and_width(ckpts, capsys):
    assert inspect_checkpoint(ckpts["en_de"]) == ("ours_en_de", 2)
    assert inspect_checkpoint(ckpts["en"]) == ("ours_en", 2)
    assert inspect_checkpoint(ckpts["published"]) == ("published_sg", 2)
    assert inspect_checkpoint(ckpts["mg"]) == ("models_genesis", 2)
    inits = parse_inits([f"sg={ckpts['published']}", f"models_genesis={ckpts['mg']}",
                         f"cls={ckpts['en']}"])
    assert [(i.name, i.kind, i.column, i.has_decoder) for i in inits] == [
        ("scratch", "scratch", "scratch", False),
        ("sg", "published_sg", "semantic_genesis", True),
        ("models_genesis", "models_genesis", "models_genesis", True),
        ("cls", "ours_en", "classification_only", False)]
    assert "the published Semantic Genesis file" in capsys.readouterr().out
    assert resolve_width(inits, None, 32, "preset") == (2, "the checkpoints")
    assert resolve_width(inits[:1], None, 32, "preset paper") == (32, "preset paper")
    with pytest.raises(InputError, match="pass --width 2"):
        resolve_width(inits, 8, 32, "preset")
    with pytest.raises(InputError, match="different widths"):
        resolve_width(parse_inits([f"a={ckpts['en']}", f"b={ckpts['wide']}"]), None, 32, "p")
    for bad, msg in ((f"scratch={ckpts['en']}", "not 'scratch'"), ("x", "NAME=CHECKPOINT"),
                     ("x=missing.pt", "not found")):
        with pytest.raises(InputError, match=msg):
            parse_inits([bad])
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, ckpts["en"].parent / "other.pt")
    with pytest.raises(CheckpointError, match="fit none of"):
        inspect_checkpoint(ckpts["en"].parent / "other.pt")


# ------------------------------------------------------------------------------------------
# the prepared folder is checked before anything runs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "manifest.json").unlink(), "manifest.json: missing"),
    (lambda d: write_manifest(d, "lcs"), "prepared for task 'lcs', not ncc"),
    (lambda d: write_manifest(d, "ncc", complete=False), "did not finish"),
    (lambda d: (d / "val_labels.npy").unlink(), "val_labels.npy: recorded in"),
    (lambda d: (d / "test_cubes.npy").write_bytes(b"short"), "recorded in the manifest"),
])
def test_a_bad_prepared_folder_is_one_line_before_anything_runs(damage, needle, tmp_path, capsys):
    data = prepared_ncc(tmp_path / "ncc")
    damage(data)
    res = tmp_path / "res"
    assert target_run.main(["ncc", "--prepared", str(data), "--output_dir", str(res)] + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1
    assert not res.exists()


def test_prepared_shape_and_stray_cases_are_refused(tmp_path, capsys):
    data = prepared_ncc(tmp_path / "ncc")
    assert target_run.main(["ncc", "--prepared", str(data), "--output_dir", str(tmp_path / "r"),
                            "--preset", "tiny"]) == 2
    assert "pass --input 16 16 8" in capsys.readouterr().err
    seg = prepared_seg(tmp_path / "lcs")
    np.save(seg / "train" / "images" / "extra.npy", np.zeros((24, 24, 16), np.float32))
    assert target_run.main(["lcs", "--prepared", str(seg), "--output_dir", str(tmp_path / "r")]
                           + FAST) == 2
    assert "extra.npy: not recorded in the manifest" in capsys.readouterr().err
    (seg / "train" / "images" / "extra.npy").unlink()
    assert target_run.main(["lcs", "--prepared", str(seg), "--output_dir", str(seg / "res")]
                           + FAST) == 2
    assert "overlap" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------
def _cells(res: Path) -> list[dict]:
    return json.loads((res / "results.json").read_text(encoding="utf-8"))["cells"]


def test_ncc_tiny_end_to_end_paired_and_keyed_by_settings(ckpts, tmp_path, monkeypatch, capsys):
    data = prepared_ncc(tmp_path / "ncc")
    res = tmp_path / "res"
    argv = ["ncc", "--prepared", str(data), "--init", f"sg={ckpts['en_de']}", "--seeds", "0", "1",
            "--label_fractions", "0.5", "1", "--output_dir", str(res)] + FAST
    assert target_run.main(argv) == 0
    printed = capsys.readouterr().out
    assert "lr 0.001 [published]" in printed and "nb_epoch 1 [preset tiny]" in printed
    assert "width 2 [the checkpoints]" in printed and "sg seed 1 fraction 0.5: test AUC" in printed
    out = json.loads((res / "results.json").read_text(encoding="utf-8"))
    assert set(out["results"]) == {"scratch", "sg"}
    assert all(len(v) == 2 for by_f in out["results"].values() for v in by_f.values())
    assert out["paper"]["semantic_genesis"] == [98.46, 0.30]
    cells = out["cells"]
    assert len(cells) == 8 and all(math.isfinite(c["value"]) for c in cells)
    assert all((c["loaded_keys"] > 0) == (c["init"] == "sg") for c in cells)
    # paired: one (fraction, seed) -> one subset, one seed, one fine-tuning configuration
    for f in (0.5, 1.0):
        for s in (0, 1):
            pair = [c["settings"] for c in cells if c["fraction"] == f and c["seed"] == s]
            assert len(pair) == 2 and pair[0]["subset"] == pair[1]["subset"]
            assert pair[0]["finetune"] == pair[1]["finetune"] and pair[0]["finetune"]["seed"] == s
            assert pair[0]["init"]["checkpoint"] is None and pair[1]["init"]["checkpoint"] is not None
    half = [c["settings"]["subset"] for c in cells if c["fraction"] == 0.5]
    assert half[0]["n"] == 4 and half[0]["sha256"] != half[2]["sha256"]   # seeds differ
    labels = np.load(res / "subsets" / "f0.5_seed0" / "train_labels.npy")
    assert np.bincount(labels).tolist() == [2, 2]                         # stratified
    table = (res / "results.md").read_text(encoding="utf-8")
    assert "| sg | ours_en_de | 100% | 2 |" in table and "98.46 ± 0.30 (Semantic Genesis)" in table
    with Image.open(res / "results.png") as im:
        assert im.format == "PNG" and im.size[0] > 300

    # the same settings: every cell reused, nothing runs
    monkeypatch.setattr(finetune_classification, "run",
                        lambda a: (_ for _ in ()).throw(AssertionError("ran again")))
    assert target_run.main(argv) == 0
    assert "(reused)" in capsys.readouterr().out
    assert [c["value"] for c in _cells(res)] == [c["value"] for c in cells]
    # another setting: refused before anything runs, naming it and the fixes
    assert target_run.main(argv + ["--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "finetune.lr: 0.001 -> 0.01" in err and "--overwrite" in err and "--output_dir" in err
    assert json.loads((res / "results.json").read_text(encoding="utf-8"))["values"]["lr"] == 1e-3


def test_an_interrupted_cell_continues_with_resume(ckpts, tmp_path, monkeypatch, capsys):
    data = prepared_ncc(tmp_path / "ncc")
    res = tmp_path / "res"
    argv = ["ncc", "--prepared", str(data), "--seeds", "0", "1", "--output_dir", str(res)] + FAST
    assert target_run.main(argv) == 0
    folder = res / "cells" / "scratch" / "f1" / "seed1"
    record = json.loads((folder / "cell.json").read_text(encoding="utf-8"))
    (folder / "cell.json").write_text(json.dumps({"settings": record["settings"], "finished": False}))
    (folder / "metrics.json").unlink()                     # killed after its last epoch
    capsys.readouterr()
    assert target_run.main(argv) == 2
    assert "interrupted before it finished; continue with --resume" in capsys.readouterr().err
    seen = []
    real = finetune_classification.run
    monkeypatch.setattr(finetune_classification, "run", lambda a: seen.append(a.resume) or real(a))
    assert target_run.main(argv + ["--resume"]) == 0
    assert seen == ["auto"] and json.loads((folder / "cell.json").read_text(encoding="utf-8"))["finished"]
    assert "scratch seed 1 fraction 1" in capsys.readouterr().out


def test_lcs_tiny_end_to_end_encoder_only_and_models_genesis(ckpts, tmp_path, capsys):
    data = prepared_seg(tmp_path / "lcs")
    res = tmp_path / "res"
    assert target_run.main(["lcs", "--prepared", str(data), "--init", f"cls={ckpts['en']}",
                            f"models_genesis={ckpts['mg']}", "--seeds", "0", "1",
                            "--output_dir", str(res)] + FAST) == 0
    out = json.loads((res / "results.json").read_text(encoding="utf-8"))
    assert out["metric"] == "iou" and out["values"]["lr"] == 1e-2
    by_init = {c["init"]: c for c in out["cells"] if c["seed"] == 0}
    assert by_init["cls"]["settings"]["finetune"]["new_decoder"] is True      # no decoder in en
    assert by_init["models_genesis"]["settings"]["finetune"]["new_decoder"] is False
    assert by_init["models_genesis"]["loaded_keys"] == len(UNet3D(width=2).state_dict())
    assert by_init["scratch"]["settings"]["finetune"]["crop"] == [16, 16, 8]
    assert all(0.0 <= c["value"] <= 1.0 and "iou" in c["test"] for c in out["cells"])
    assert {i["name"]: i["paper_column"] for i in out["inits"]} == {
        "scratch": "scratch", "cls": "classification_only", "models_genesis": "models_genesis"}
    table = (res / "results.md").read_text(encoding="utf-8")
    assert "84.14 ± 1.78 (self-classification only)" in table
    assert "85.10 ± 2.15 (Models Genesis)" in table and "test IoU" in table
