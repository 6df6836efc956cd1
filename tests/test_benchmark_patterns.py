"""experiments/benchmark_patterns.py in a tiny configuration (no timings are asserted).

``naive_weight_sum`` is checked against the vectorised lung test in tests/test_patterns.py.
"""
from __future__ import annotations

import json

import numpy as np

from experiments import benchmark_patterns as bp


def test_synthetic_volume_has_lungs():
    vol = bp.synthetic_volume((96, 96, 40), np.random.default_rng(0))
    assert vol.dtype == np.float32 and vol.shape == (96, 96, 40)
    assert 0 <= vol.min() and vol.max() <= 1
    lung = (vol > 0.05) & (vol < 0.2)
    assert 0.1 < lung.mean() < 0.6


def test_pattern_benchmark_writes_its_numbers_and_removes_its_volumes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    assert bp.main(["--patients", "8", "--val_patients", "3", "--shape", "80", "80", "44",
                    "--len_border", "4", "--len_border_z", "2", "--classes", "2",
                    "--instances", "3", "--instances_val", "2", "--lung_threshold", "1",
                    "--lung_repeats", "3", "--feature_dim", "8", "--workdir", str(work),
                    "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("lung_test_speedup", "seconds_per_class", "peak_rss_gib", "end_to_end_s",
                "candidate_with_crop_s"):
        assert res[key] > 0
    assert "s/class" in capsys.readouterr().out
    assert not (work / "data").exists()  # volumes removed without --keep
