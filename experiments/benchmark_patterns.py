"""Benchmark of stage 3 (self_discovery/pattern_generator_3D.py).

1. Lung test: seconds per candidate of the vectorised ``lung_test_weight_sum`` against the
   reference's per-voxel Python loop on the same 64 x 64 x (32 + 3) window (ratio), and the
   cost of a whole candidate (memory-mapped crop + normalisation + test).
2. End to end: synthetic chest-like volumes (float32 in [0, 1], LUNA16-like size by default) are
   written once to a temporary folder with random features, then the pattern generator runs in a
   child process; reported: seconds in all, seconds per class, peak resident memory of the child.

    python experiments/benchmark_patterns.py                      # 230 x 512x512x120, C=50, 200 inst.
    python experiments/benchmark_patterns.py --patients 230 --shape 512 512 64 --len_border_z 10
    python experiments/benchmark_patterns.py --patients 12 --val_patients 4 --shape 80 80 44 \\
        --len_border 4 --len_border_z 2 --classes 2 --instances 4 --instances_val 2 \\
        --lung_threshold 1                                    # tiny smoke run

Disk needed: patients * X * Y * Z * 4 bytes for the volumes plus the fold files
(classes * (3 * instances + instances_val) * 512 KiB); the volumes are deleted afterwards unless
``--keep``.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from runtime.cli import (ArgumentParser, HelpFormatter, nonneg_int, positive_int, probability,
                         run_cli, seed_int)
from runtime.errors import InputError, ReportedError
from runtime.files import atomic_path, save_json_atomic, save_npy_atomic
from self_discovery.feature_extractor import INDEX_NAME, save_features
from self_discovery.lung_test import lung_test_weight_sum
from self_discovery.volumes import normalize_crop

__all__ = ["naive_weight_sum", "synthetic_volume", "write_dataset", "bench_lung_test",
           "build_parser", "main"]

GENERATOR = Path(__file__).resolve().parents[1] / "self_discovery" / "pattern_generator_3D.py"


def naive_weight_sum(window: np.ndarray, deps: int = 32, threshold: float = 0.425) -> float:
    """The reference's lung test: a Python loop over every voxel indexing the NumPy array, as the
    reference did (for comparison only)."""
    total = 0.0
    rows, cols = window.shape[0], window.shape[1]
    for i in range(rows):
        for j in range(cols):
            for d in range(deps):
                for k in range(3):
                    if window[i, j, d + k] >= threshold:
                        total += 1 - k / 2
                        break
    return total


def synthetic_volume(shape: Sequence[int], rng: np.random.Generator,
                     noise: np.ndarray | None = None) -> np.ndarray:
    """A chest-like volume (x, y, z) in [0, 1]: air outside an elliptic body (soft tissue ~0.52),
    two lungs (~0.1, shrinking towards the apex and the diaphragm) with sparse bright vessels.
    Vectorised; ``noise`` (shape) is added when given (shared between patients for speed)."""
    X, Y, Z = (int(s) for s in shape)
    gx = (np.arange(X, dtype=np.float32) - X / 2)[:, None]
    gy = (np.arange(Y, dtype=np.float32) - Y / 2)[None, :]
    sh = rng.uniform(-0.03, 0.03, 2) * np.array([X, Y])
    scale = rng.uniform(0.9, 1.1)
    body = ((gx - sh[0]) / (0.46 * X)) ** 2 + ((gy - sh[1]) / (0.38 * Y)) ** 2 <= 1.0      # (X, Y)
    zz = (np.arange(Z, dtype=np.float32) - 0.5 * Z) / (0.48 * Z)
    prof = np.clip(1.0 - zz ** 2, 0, None) ** 0.5 * scale                                # (Z,)
    vol = np.where(body, np.float32(0.52), np.float32(0.0))[:, :, None].repeat(Z, axis=2)
    for side in (-1, 1):
        cx, cy = sh[0] + side * 0.2 * X, sh[1]
        d = ((gx - cx) / (0.17 * X)) ** 2 + ((gy - cy) / (0.3 * Y)) ** 2          # (X, Y)
        lung = d[:, :, None] <= (prof ** 2)[None, None, :]                            # (X, Y, Z)
        vol[lung] = np.float32(0.1)
    if noise is not None:
        vol += noise
    np.clip(vol, 0, 1, out=vol)
    return vol


def write_dataset(root: Path, n_train: int, n_val: int, shape: Sequence[int], feat_dim: int = 512,
                  seed: int = 0, distinct: int = 16) -> Path:
    """``root/data/{train,validation}/pNNNN.npy`` volumes and ``root/features`` (with index).

    ``distinct`` different volumes are generated; the others are file copies of them (volume
    synthesis is the slow part on a small machine; reading and cropping costs the same)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(tuple(shape), dtype=np.float32)
    noise *= np.float32(0.03)
    noise[rng.random(tuple(shape), dtype=np.float32) < 0.01] += np.float32(0.5)   # dense specks
    names: dict[str, list[str]] = {}
    made: list[Path] = []
    copies = 0
    bar = tqdm(total=n_train + n_val, desc="writing volumes", disable=None)
    for split, n in (("train", n_train), ("validation", n_val)):
        d = root / "data" / split
        d.mkdir(parents=True, exist_ok=True)
        names[split] = []
        for i in range(n):
            name = f"p{i:04d}.npy"
            if len(made) < max(1, distinct):
                save_npy_atomic(d / name, synthetic_volume(shape, rng, noise))
                made.append(d / name)
            else:
                with atomic_path(d / name) as tmp:
                    shutil.copyfile(made[copies % len(made)], tmp)
                copies += 1
            names[split].append(name)
            bar.update(1)
    bar.close()
    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    save_features(feats, rng.standard_normal((n_train, feat_dim)).astype(np.float32),
                  rng.standard_normal((n_val, feat_dim)).astype(np.float32),
                  {"train": names["train"], "validation": names["validation"],
                   "feature_dim": feat_dim}, data_dir=root / "data")
    return root


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_lung_test(volume_path: Path | None, repeats: int = 50, naive_repeats: int = 3,
                    deps: int = 32, seed: int = 0) -> dict:
    """Seconds per candidate: vectorised vs naive loop on one window (64, 64, deps + 3), and a
    whole candidate (crop from the memory-mapped volume, normalise, test) when a volume is given."""
    rng = np.random.default_rng(seed)
    window = rng.uniform(0.05, 0.2, (64, 64, deps + 3)).astype(np.float32)  # lung-like window
    window[rng.random(window.shape) < 0.1] = 0.6                            # 10% dense voxels
    fast = _best_time(lambda: lung_test_weight_sum(window, deps), repeats)
    slow = _best_time(lambda: naive_weight_sum(window, deps), naive_repeats)
    if naive_weight_sum(window, deps) != lung_test_weight_sum(window, deps):
        raise RuntimeError("vectorised and naive lung tests disagree")
    out = {"lung_test_vectorised_s": fast, "lung_test_naive_s": slow,
           "lung_test_speedup": slow / fast}
    if volume_path is not None:
        vol = np.load(volume_path, mmap_mode="r")
        X, Y, Z = vol.shape

        def candidate():
            x, y = int(rng.integers(0, X - 64 + 1)), int(rng.integers(0, Y - 64 + 1))
            z = int(rng.integers(0, Z - deps - 3 + 1))
            window = normalize_crop(vol[x:x + 64, y:y + 64, z:z + deps + 3], True)
            lung_test_weight_sum(window, deps)

        out["candidate_with_crop_s"] = _best_time(candidate, repeats)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=HelpFormatter)
    g = ap.add_argument_group("synthetic data")
    g.add_argument("--patients", type=positive_int, default=230,
                   help="patients in all (train = patients - val_patients)")
    g.add_argument("--val_patients", type=nonneg_int, default=30, help="validation patients")
    g.add_argument("--shape", type=positive_int, nargs=3, default=[512, 512, 120], metavar=("X", "Y", "Z"),
                   help="volume size (LUNA16-like by default)")
    g.add_argument("--feature_dim", type=positive_int, default=512, help="size of the random features")
    g.add_argument("--distinct_volumes", type=positive_int, default=16,
                   help="volumes synthesised; the other patients are file copies of them")
    g.add_argument("--workdir", default=None,
                   help="folder for volumes and outputs (default: a new temporary folder)")
    g.add_argument("--keep", action="store_true", help="keep the volumes and outputs")
    g.add_argument("--reuse", action="store_true",
                   help="with --workdir: reuse volumes written there by an earlier --keep run")
    g = ap.add_argument_group("generator")
    g.add_argument("--classes", type=positive_int, default=50, help="--nb_classes of the run")
    g.add_argument("--instances", type=positive_int, default=200, help="--nb_instances of the run")
    g.add_argument("--instances_val", type=positive_int, default=30, help="--nb_instances_val of the run")
    g.add_argument("--no_multi_res", action="store_true", help="run without --multi_res")
    g.add_argument("--len_border", type=nonneg_int, default=100, help="--len_border of the run")
    g.add_argument("--len_border_z", type=nonneg_int, default=30, help="--len_border_z of the run")
    g.add_argument("--lung_threshold", type=probability, default=0.15,
                   help="--lung_threshold of the run (1 accepts every window: tiny volumes)")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of the data and of the run")
    g = ap.add_argument_group("lung test")
    g.add_argument("--lung_repeats", type=positive_int, default=200,
                   help="timed repeats of the vectorised test (best is reported)")
    g.add_argument("--skip_end_to_end", action="store_true",
                   help="only the lung-test comparison (no volumes written)")
    g.add_argument("--json", default=None, help="also write the results to this JSON file")
    return ap


def run(a: argparse.Namespace) -> dict:
    """Time the lung test (and, unless ``--skip_end_to_end``, the generator end to end);
    return the results (also what ``--json`` writes)."""
    n_train = a.patients - a.val_patients
    if n_train < 1 or a.val_patients < 1:
        raise InputError("--patients must exceed --val_patients >= 1")
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                f"{platform.python_implementation()} {platform.python_version()}",
                     "config": vars(a)}
    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_patterns_"))
    try:
        if a.skip_end_to_end:
            results.update(bench_lung_test(None, a.lung_repeats, seed=a.seed))
        else:
            t = time.perf_counter()
            results["volumes_reused"] = a.reuse and (root / "features" / INDEX_NAME).is_file()
            if not results["volumes_reused"]:
                shutil.rmtree(root / "data", ignore_errors=True)
                write_dataset(root, n_train, a.val_patients, a.shape, a.feature_dim, a.seed,
                              a.distinct_volumes)
            results["write_volumes_s"] = time.perf_counter() - t
            results["volumes_gib"] = a.patients * int(np.prod(a.shape)) * 4 / 2**30
            results.update(bench_lung_test(root / "data" / "train" / "p0000.npy", a.lung_repeats,
                                           seed=a.seed))
            save = root / "out"
            cmd = [sys.executable, str(GENERATOR), "--data_dir", str(root / "data"),
                   "--output_dir", str(save), "--is_normalized",
                   "--train_features", str(root / "features" / "train_features.npy"),
                   "--val_features", str(root / "features" / "validation_features.npy"),
                   "--nb_classes", str(a.classes), "--nb_instances", str(a.instances),
                   "--nb_instances_val", str(a.instances_val), "--len_border", str(a.len_border),
                   "--len_border_z", str(a.len_border_z), "--lung_threshold",
                   str(a.lung_threshold), "--seed", str(a.seed), "--overwrite"]
            if not a.no_multi_res:
                cmd.append("--multi_res")
            t = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  encoding="utf-8", errors="replace")
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                print(proc.stdout[-2000:], file=sys.stderr)
                raise ReportedError(f"the pattern generator failed (exit {proc.returncode}); "
                                    "its output is above")
            results["end_to_end_s"] = wall
            results["seconds_per_class"] = wall / a.classes
            # ru_maxrss: KiB on Linux, the largest child waited for (only the generator here)
            results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            results["output_gib"] = sum(p.stat().st_size for p in save.glob("*.npy")) / 2**30
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(root, ignore_errors=True)
        elif not a.keep:
            shutil.rmtree(root / "data", ignore_errors=True)
            shutil.rmtree(root / "out", ignore_errors=True)
    if a.json:
        save_json_atomic(a.json, results)
    return results


def _report(a: argparse.Namespace, results: dict) -> None:
    print(f"machine: {results['machine']}")
    print(f"lung test per candidate: vectorised {results['lung_test_vectorised_s'] * 1e3:.3f} ms, "
          f"naive loop {results['lung_test_naive_s']:.3f} s, speed-up "
          f"{results['lung_test_speedup']:.0f}x")
    if "end_to_end_s" in results:
        print("candidate incl. memory-mapped crop: "
              f"{results['candidate_with_crop_s'] * 1e3:.3f} ms")
        print(f"volumes: {a.patients} x {tuple(a.shape)} float32 = {results['volumes_gib']:.1f} "
              "GiB, " + ("reused from an earlier --keep run" if results["volumes_reused"]
                         else f"written in {results['write_volumes_s']:.0f} s"))
        print(f"end to end: C={a.classes}, {a.instances} + {a.instances_val} instances, "
              f"multi_res={not a.no_multi_res}: {results['end_to_end_s']:.1f} s, "
              f"{results['seconds_per_class']:.2f} s/class, peak RSS "
              f"{results['peak_rss_gib']:.2f} GiB, output {results['output_gib']:.2f} GiB")


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, run, argv, report=_report)


if __name__ == "__main__":
    raise SystemExit(main())
