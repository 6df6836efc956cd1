"""The pretraining benchmark runs end to end on the CPU with tiny settings (no timing checks)."""
import json

from experiments import benchmark_pretrain as bench
from experiments.published_style import PublishedStyleDataset, perturb_cube_numpy

import numpy as np


def test_benchmark_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--width", "4", "--batch_size", "2", "--steps", "1",
                     "--warmup", "1", "--workers", "0", "--input", "16x16x8", "--n_cubes", "4",
                     "--cls_classes", "5", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["machine"]
    assert set(report["results"]) == set(bench.PATHS)
    for name, r in report["results"].items():
        assert r["cubes_per_s"] > 0 and r["peak_memory_bytes"] > 0, name
        assert r["memory_kind"] == "process_peak_rss"
    assert report["results"]["published"]["ratio_vs_published"] == 1.0
    assert report["config"]["amp_ours"] == "fp32" and report["config"]["input"] == [16, 16, 8]
    goals = {g["goal"]: g for g in report["goals"]}
    assert set(goals) == {"end-to-end cubes/s", "ours / model_only", "ours / published"}
    ours, res = report["results"]["ours"], report["results"]
    assert goals["ours / model_only"]["value"] == ours["cubes_per_s"] / res["model_only"]["cubes_per_s"]
    assert goals["ours / published"]["target"] == ">= 4"
    assert all(isinstance(g["met"], bool) for g in goals.values())
    table = capsys.readouterr().out
    assert "cubes/s" in table and "ours" in table and "published" in table
    assert "goal ours / model_only" in table


def test_goal_checks_verdicts():
    def path(cps, mem=100):
        return {"cubes_per_s": cps, "peak_memory_bytes": mem,
                "memory_kind": "cuda_max_memory_allocated"}
    met = bench.goal_checks({"ours": path(470, 90), "model_only": path(500),
                             "published": path(100, 100)})
    assert [g["met"] for g in met] == [True, True, True, True]
    missed = bench.goal_checks({"ours": path(400, 120), "model_only": path(500),
                                "published": path(110, 100)})
    assert [g["met"] for g in missed] == [False, False, False, False]
    assert bench.goal_checks({"model_only": path(1)}) == []
    cpu = {k: dict(v, memory_kind="process_peak_rss") for k, v in
           {"ours": path(470, 90), "published": path(100, 100)}.items()}
    assert "peak memory ours / published fp32" not in [g["goal"] for g in bench.goal_checks(cpu)]
    assert [g["goal"] for g in bench.goal_checks({"ours": path(1)})] == ["end-to-end cubes/s"]


def test_benchmark_bad_input_is_an_error(capsys):
    assert bench.main(["--device", "cpu", "--input", "30x32x16"]) == 2
    assert "--input" in capsys.readouterr().err


def test_published_style_dataset_sample():
    cubes = np.random.default_rng(0).random((3, 16, 16, 8), dtype=np.float32)
    ds = PublishedStyleDataset(cubes, np.arange(3), seed=1)
    x, y, label = ds[2]
    assert x.shape == y.shape == (1, 16, 16, 8) and label == 2
    assert np.array_equal(y[0].numpy(), cubes[2])
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    x2, _, _ = ds[2]
    assert np.array_equal(x.numpy(), x2.numpy())                 # seeded per index
    out = perturb_cube_numpy(cubes[0], np.random.default_rng(3))
    assert out.shape == cubes[0].shape
