"""Numerics check: does bf16 autocast pretraining track fp32 within noise?

Trains the same Y-Net 3D twice, from the same initial weights, on the same seeded batches and the
same seeded perturbations (computed in fp32 before the forward pass, so both runs see
byte-identical inputs): once in fp32, once under bf16 autocast. Each step is the real
pretraining step of ``pytorch/train.py`` (``pytorch.engine.train_step`` after
``prepare_model_for_speed``/``make_optimizer``/``perturb_inputs``); only ``amp_dtype`` differs.

Data: synthetic cubes (smooth random background + a class-specific Gaussian blob, values in
[0, 1], so the classification loss can fall) or, with ``--data_dir``, the training cubes of the
fold files written by the pattern generator.

Reported for each loss curve (total, cls, rec) of the two runs:

- ``noise``: std of ``fp32 - moving_average(fp32)`` (the step-to-step noise of the fp32 curve;
  centred moving average over ``--window`` steps, valid part only);
- ``gap``: mean |moving_average(bf16) - moving_average(fp32)|;
- ``ratio`` = gap / noise. bf16 "tracks fp32 within noise" when every ratio <= ``--threshold``.

With ``--reseed_baseline`` a third run (fp32, same initial weights, other batch order and
perturbations: seed + 1) gives the gap between two equally valid fp32 runs for context
(``baseline_ratio``). Prints a table and the verdict line
``bf16 tracks fp32 within noise: yes/no (ratio X)``; ``--json`` writes both curves and all numbers.

    python experiments/compare_precision.py --device auto --width 32 --batch_size 64 \\
        --input 64x64x32 --cls_classes 44 --steps 200 --seed 0 --json precision.json
    python experiments/compare_precision.py --device cpu --width 8 --batch_size 8 \\
        --input 32x32x16 --cls_classes 44 --steps 60 --json precision_cpu.json
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import copy
import math
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pytorch.data import derive_seed, epoch_permutation, load_pretraining_data
from pytorch.engine import (LossConfig, build_model, make_optimizer, perturb_inputs,
                            prepare_model_for_speed, train_step)
from runtime.cli import (ArgumentParser, HelpFormatter, run_cli, positive_float,
                         positive_int, seed_int)
from runtime.devices import device_name, enable_fast_math, resolve_device
from runtime.errors import InputError
from runtime.files import save_json_atomic
from experiments.benchmark_pretrain import machine_name, parse_input

CURVES = ("loss", "cls", "rec")  # columns 0..2 of engine.train_step's stats


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu or cuda")
    g.add_argument("--steps", type=positive_int, default=200, help="training steps per precision")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the initial weights, synthetic data, batch order and "
                        "perturbations (shared by both runs)")
    g.add_argument("--json", default=None, help="write curves and numbers as JSON to this file")
    g.add_argument("--reseed_baseline", action="store_true",
                   help="also train fp32 with seed + 1 batches/perturbations (same initial "
                        "weights) and report the fp32-vs-fp32 gap for context")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=positive_int, default=32, help="base channels (32 = published)")
    g.add_argument("--cls_classes", type=positive_int, default=44, help="classes of the head (paper: 44)")
    g.add_argument("--exp", choices=("en", "en_de"), default="en_de",
                   help="en_de: full Y-Net (published pretraining); en: encoder + head")
    g.add_argument("--input", default="64x64x32",
                   help="cube size XxYxZ (each divisible by 8; paper: 64x64x32)")
    g.add_argument("--batch_size", type=positive_int, default=64, help="cubes per step (published: 64)")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (paper: 1e-3)")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="skip the elastic deformation before each perturbation (the default shown "
                        "is whether it is applied)")
    g.add_argument("--tf32", action="store_true",
                   help="on CUDA, let fp32 convolutions/matmuls use TF32 (pytorch/train.py does; "
                        "default off here so the reference is true fp32)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last_3d layout (default: on CUDA only, as pytorch/train.py)")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=None,
                   help="folder of fold files (train_data*_vwGen_ex_ref_fold*.0.npy); "
                        "default: synthetic cubes")
    g.add_argument("--n_cubes", type=positive_int, default=1024,
                   help="synthetic cubes (spread evenly over the classes)")
    g.add_argument("--nb_instances", type=positive_int, default=200,
                   help="with --data_dir: training cubes per class and resolution")
    g.add_argument("--nb_multires_patch", type=positive_int, default=3,
                   help="with --data_dir: resolutions of fold files to load")
    g = p.add_argument_group("analysis")
    g.add_argument("--window", type=positive_int, default=None,
                   help="moving-average window in steps (default: max(5, steps // 10))")
    g.add_argument("--threshold", type=positive_float, default=1.0,
                   help="verdict yes when gap / noise <= this for every curve")
    return p


def class_blob_cubes(n: int, classes: int, shape: tuple[int, int, int], seed: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable synthetic cubes: (n, 1, X, Y, Z) float32 in [0, 1] and labels (n,) int64.

    Each cube is a smooth random background (low-resolution uniform noise, trilinearly
    upsampled) plus a Gaussian blob whose centre and radius depend on the class; class c has
    cubes c, c + classes, ... (labels ``arange(n) % classes``).
    """
    X, Y, Z = shape
    g = torch.Generator(device).manual_seed(seed)
    labels = torch.arange(n, device=device) % classes
    centres = 0.25 + 0.5 * torch.rand(classes, 3, generator=g, device=device)  # fractions
    radius = 0.12 + 0.10 * torch.rand(classes, generator=g, device=device)  # fraction of size
    axes = [(torch.arange(s, device=device, dtype=torch.float32) + 0.5) / s for s in shape]
    cubes = torch.empty(n, 1, X, Y, Z, device=device)
    for s in range(0, n, 128):  # chunks bound the peak memory
        lab = labels[s:s + 128]
        m = lab.numel()
        coarse = torch.rand(m, 1, max(X // 8, 2), max(Y // 8, 2), max(Z // 8, 2), generator=g,
                            device=device)
        bg = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear",
                                             align_corners=False)
        c, r = centres[lab], radius[lab]  # (m, 3), (m,)
        dx = (axes[0].view(1, -1, 1, 1) - c[:, 0].view(-1, 1, 1, 1)) ** 2
        dy = (axes[1].view(1, 1, -1, 1) - c[:, 1].view(-1, 1, 1, 1)) ** 2
        dz = (axes[2].view(1, 1, 1, -1) - c[:, 2].view(-1, 1, 1, 1)) ** 2
        d2 = dx + dy + dz  # (m, X, Y, Z)
        blob = torch.exp(-d2 / (2 * r.view(-1, 1, 1, 1) ** 2))
        cubes[s:s + m, 0] = (0.15 + 0.45 * bg[:, 0] + 0.4 * blob).clamp(0.0, 1.0)
    return cubes, labels


def load_data(args: argparse.Namespace, shape: tuple[int, int, int],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(cubes (N, 1, X, Y, Z) float32, labels (N,) int64, description) on ``device``."""
    if args.data_dir is None:
        x, y = class_blob_cubes(args.n_cubes, args.cls_classes, shape, args.seed, device)
        return x, y, f"synthetic ({args.n_cubes} cubes, {args.cls_classes} classes)"
    train, _ = load_pretraining_data(args.data_dir, args.cls_classes, args.nb_instances, 1,
                                     args.nb_multires_patch, shape, torch.float32, device)
    return train.cubes.float(), train.labels, f"fold files in {args.data_dir} ({len(train)} cubes)"


def build_model_state(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Fresh initial weights of the network (from the global torch RNG; seed it first)."""
    return copy.deepcopy(build_model(args.exp, args.cls_classes, args.width).state_dict())


def train_run(init_state: dict[str, torch.Tensor], args: argparse.Namespace,
              amp_dtype: torch.dtype | None, cubes: torch.Tensor, labels: torch.Tensor,
              data_seed: int, device: torch.device) -> dict[str, Any]:
    """Train ``args.steps`` steps from ``init_state``; per-step curves and timing.

    Batches: consecutive slices of seeded permutations of the cubes (a new permutation each
    pass, last partial batch dropped so every step has ``batch_size`` cubes); perturbations
    from a generator seeded with ``data_seed`` on ``device``. Same ``data_seed`` -> same inputs.
    """
    model = build_model(args.exp, args.cls_classes, args.width)
    model.load_state_dict(init_state)
    model = prepare_model_for_speed(model, device, args.channels_last)
    enable_fast_math(device, tf32=args.tf32)  # without --tf32 the reference is true fp32
    model.train()
    optimizer = make_optimizer(model, args.lr, device)
    loss_cfg = LossConfig(exp=args.exp)
    gen = torch.Generator(device).manual_seed(derive_seed(data_seed, 0xB16))
    n, b = cubes.shape[0], args.batch_size
    per_pass = n // b
    hist = torch.zeros(args.steps, 5, device=device)
    idx = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"{str(amp_dtype or 'fp32')} run", leave=False,
                     dynamic_ncols=True, disable=None):
        k = step % per_pass
        if k == 0:
            idx = epoch_permutation(n, data_seed, step // per_pass).to(device)
        sel = idx[k * b:(k + 1) * b]
        original, lab = cubes.index_select(0, sel), labels.index_select(0, sel)
        inputs = perturb_inputs(original, gen, args.augment)
        hist[step] = train_step(model, optimizer, inputs, original, lab, loss_cfg, amp_dtype)
    h = hist.double().cpu().numpy()  # the only host synchronisation
    wall = time.perf_counter() - t0
    curves = {name: (h[:, i] / h[:, 4]).tolist() for i, name in enumerate(CURVES)}
    curves["acc"] = (h[:, 3] / h[:, 4]).tolist()
    return {"amp": str(amp_dtype or "fp32").replace("torch.", ""), "curves": curves,
            "wall_s": wall, "cubes_per_s": args.steps * b / wall}  # timing includes warm-up


def first_nonfinite_step(curves: dict[str, list[float]]) -> int | None:
    """Index of the first step with a non-finite loss in any curve, or None."""
    bad = [int(np.flatnonzero(~np.isfinite(np.asarray(curves[c])))[0]) for c in CURVES
           if not np.all(np.isfinite(curves[c]))]
    return min(bad) if bad else None


def moving_average(v: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average, valid part only: (T,) -> (T - window + 1,)."""
    return np.convolve(v, np.ones(window) / window, mode="valid")


def compare_curves(ref: list[float], other: list[float], window: int) -> dict[str, float]:
    """Gap of ``other`` to ``ref`` relative to the step-to-step noise of ``ref``.

    noise = std(ref[t] - MA(ref)[t]) over the valid centred window; gap = mean |MA(other) -
    MA(ref)|; also the mean and max raw |other - ref| and the last smoothed values.
    """
    a, b = np.asarray(ref, np.float64), np.asarray(other, np.float64)
    ma, mb = moving_average(a, window), moving_average(b, window)
    lo = (window - 1) // 2
    centred = a[lo:lo + ma.size]
    noise = float(np.std(centred - ma))
    gap = float(np.mean(np.abs(mb - ma)))
    return {"noise": noise, "gap": gap,
            "ratio": gap / noise if noise > 0 else (0.0 if gap == 0 else math.inf),
            "mean_abs_diff_raw": float(np.mean(np.abs(b - a))),
            "max_abs_diff_raw": float(np.max(np.abs(b - a))),
            "final_smoothed_ref": float(ma[-1]), "final_smoothed_other": float(mb[-1]),
            "first_ref": float(a[0]), "first_other": float(b[0])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both trainings and the comparison; returns the JSON-ready result."""
    shape = parse_input(args.input)
    for name in ("steps", "batch_size", "width", "cls_classes", "n_cubes"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    device = resolve_device(args.device)
    cubes, labels, data_desc = load_data(args, shape, device)
    if cubes.shape[0] < args.batch_size:
        raise InputError(f"{data_desc}: fewer cubes than --batch_size {args.batch_size}; "
                         "lower --batch_size or raise --n_cubes / --nb_instances")
    window = args.window if args.window is not None else max(5, args.steps // 10)
    if not 2 <= window <= args.steps:
        raise InputError(f"--window {window} must be in [2, --steps {args.steps}]")
    torch.manual_seed(args.seed)
    init = build_model_state(args)

    plan = [("fp32", None, args.seed), ("bf16", torch.bfloat16, args.seed)]
    if args.reseed_baseline:
        plan.append(("fp32_reseed", None, args.seed + 1))
    runs = {}
    for name, amp_dtype, data_seed in plan:
        runs[name] = r = train_run(init, args, amp_dtype, cubes, labels, data_seed, device)
        print(f"{name} run: {args.steps} steps in {r['wall_s']:.1f} s, loss "
              f"{r['curves']['loss'][0]:.5f} -> {r['curves']['loss'][-1]:.5f}", flush=True)
    nonfinite = {name: first_nonfinite_step(r["curves"]) for name, r in runs.items()}
    nonfinite = {k: v for k, v in nonfinite.items() if v is not None}
    if not nonfinite:
        comparison = {c: compare_curves(runs["fp32"]["curves"][c], runs["bf16"]["curves"][c],
                                        window) for c in CURVES}
        if args.reseed_baseline:
            for c in CURVES:
                base = compare_curves(runs["fp32"]["curves"][c],
                                      runs["fp32_reseed"]["curves"][c], window)
                comparison[c]["baseline_gap"] = base["gap"]
                comparison[c]["baseline_ratio"] = base["ratio"]
        worst = max(CURVES, key=lambda c: comparison[c]["ratio"])
        ratio = comparison[worst]["ratio"]
        tracks = all(comparison[c]["ratio"] <= args.threshold for c in CURVES)
        detail = f"ratio {ratio:.3f}, worst curve: {worst}"
    else:  # a diverged run cannot track anything; keep the curves for inspection
        comparison, worst, ratio, tracks = {}, None, math.inf, False
        detail = "non-finite loss: " + ", ".join(f"{k} run from step {v + 1}"
                                                 for k, v in nonfinite.items())
    for r in runs.values():  # strict JSON: NaN/inf -> null
        r["curves"] = {k: [x if math.isfinite(x) else None for x in v]
                       for k, v in r["curves"].items()}
    return {"config": {k: v for k, v in vars(args).items()},
            "device": str(device), "machine": machine_name(device), "torch": torch.__version__,
            "data": data_desc, "window": window, "threshold": args.threshold,
            "runs": runs, "comparison": comparison,
            "worst_curve": worst, "ratio": ratio if math.isfinite(ratio) else None,
            "nonfinite_from_step": {k: v + 1 for k, v in nonfinite.items()},
            "tracks_within_noise": tracks,
            "verdict": f"bf16 tracks fp32 within noise: {'yes' if tracks else 'no'} ({detail})"}


def format_report(res: dict[str, Any]) -> str:
    """The human-readable table and verdict."""
    cfg = res["config"]
    lines = [f"device {res['device']}: {res['machine']}; torch {res['torch']}",
             f"Y-Net 3D ({cfg['exp']}) width {cfg['width']}, batch {cfg['batch_size']}, "
             f"input {cfg['input']}, {cfg['cls_classes']} classes, {cfg['steps']} steps, "
             f"seed {cfg['seed']}; data: {res['data']}; moving average {res['window']} steps",
             " | ".join(f"{n}: {r['wall_s']:.1f} s ({r['cubes_per_s']:.1f} cubes/s)"
                        for n, r in res["runs"].items()),
             f"{'curve':<6}{'fp32 first->last':>22}{'bf16 first->last':>22}"
             f"{'noise':>11}{'gap':>11}{'ratio':>8}"
             + (f"{'reseed ratio':>14}" if cfg["reseed_baseline"] else "")]
    for c in CURVES if res["comparison"] else ():
        m = res["comparison"][c]
        row = (f"{c:<6}{m['first_ref']:>10.5f} ->{m['final_smoothed_ref']:>9.5f}"
               f"{m['first_other']:>11.5f} ->{m['final_smoothed_other']:>9.5f}"
               f"{m['noise']:>11.2e}{m['gap']:>11.2e}{m['ratio']:>8.3f}")
        if cfg["reseed_baseline"]:
            row += f"{m['baseline_ratio']:>14.3f}"
        lines.append(row)
    lines.append("(first = step 1 raw, last = final moving average; noise = std of fp32 minus its "
                 "moving average; gap = mean |MA(bf16) - MA(fp32)|)")
    lines.append(res["verdict"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, run, argv, _report)


def _report(args: argparse.Namespace, res: dict[str, Any]) -> None:
    print(format_report(res))
    if args.json:
        save_json_atomic(args.json, res)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    raise SystemExit(main())
