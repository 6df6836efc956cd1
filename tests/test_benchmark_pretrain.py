"""The pretraining benchmark runs end to end on the CPU with tiny settings (no timing checks)."""
import json

from scripts import benchmark_pretrain as bench
from scripts.published_style import PublishedStyleDataset, perturb_cube_numpy

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
    table = capsys.readouterr().out
    assert "cubes/s" in table and "ours" in table and "published" in table


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
