"""What a quickstart run established, read from the records its stages wrote.

``summarize(layout)`` reads the pretraining's configuration and ``*_diagnostics.json`` (pretext
self-classification top-1 against chance, restoration gain per transformation, the linear probe
of the frozen encoder before and after pretraining), the ``metrics.json`` and ``config.json`` of
a pretrained and a scratch fine-tune (refused unless they ran on the same data, split and seed),
and says where the montages, TensorBoard curves and checkpoints are. It reads files only and
imports no stage.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import ArgumentParser, HelpFormatter, run_cli
from runtime.errors import InputError

__all__ = ["QuickstartLayout", "auc_standard_error", "pretext_lines", "probe_lines", "main",
           "finetune_lines", "location_lines", "summarize", "build_parser", "PAIRED_KEYS"]

#: Settings two fine-tunes must share to be compared (everything but the initial weights).
PAIRED_KEYS = ("data", "labels", "data_dir", "val_data", "val_labels", "val_data_dir",
               "val_fraction", "test_data", "test_labels", "test_data_dir", "seed", "nb_epoch",
               "patience", "monitor", "batch_size", "optimizer", "lr", "weight_decay", "width",
               "norm", "loss", "augment", "freeze_encoder")
_NAMES = {"local_pixel_shuffle": "local pixel shuffling",
          "nonlinear_intensity": "non-linear intensity",
          "in_painting": "in-painting", "out_painting": "out-painting"}
_CKPT = "semantic_genesis_chest_ct"


@dataclass(frozen=True)
class QuickstartLayout:
    """The folders of a quickstart run under ``out`` (``scripts/quickstart.sh`` writes them)."""
    out: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))

    @property
    def montage(self) -> Path:
        return self.out / "patterns" / "montage"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def autoencoder(self) -> Path:
        return self.out / "autoencoder" / "Unet_autoencoder.pt"

    @property
    def pretrain(self) -> Path:
        return self.out / "pretrain"

    @property
    def finetune_pretrained(self) -> Path:
        return self.out / "finetune_pretrained"

    @property
    def finetune_scratch(self) -> Path:
        return self.out / "finetune_scratch"


def _read_json(path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found; {fix}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: {what} cannot be read ({e}); {fix}") from None


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """The standard error of a ROC AUC measured on ``n_pos`` positives and ``n_neg``
    negatives (Hanley and McNeil, Radiology 1982); NaN without both classes."""
    if n_pos < 1 or n_neg < 1 or not math.isfinite(auc):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc)
           + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def pretext_lines(history: list[dict[str, Any]], n_val: int) -> list[str]:
    """The pretext tasks on the validation cubes: top-1 at the last recorded epoch against
    chance (with the probability that guessing does as well), and the restoration gain per
    transformation after the first and the last epoch."""
    from scipy.stats import binomtest  # slow to import; needed only here

    epochs = [d for d in history if "cls_top1" in d]
    if not epochs:
        return ["  pretext: no epoch recorded"]
    first, d = epochs[0], epochs[-1]
    top1, chance = d["cls_top1"], d["cls_chance"]
    right = round(top1 * n_val)
    p = binomtest(right, n_val, chance, alternative="greater").pvalue if n_val else float("nan")
    verdict = ("above chance" if p < 0.05 else "not distinguishable from chance")
    lines = [f"  pretext tasks on {n_val} validation cubes (patients pretraining never trains on):",
             f"    self-classification top-1 after epoch {d['epoch']}: {100 * top1:.1f}% "
             f"({right} of {n_val}; chance {100 * chance:.1f}%, {round(1 / chance)} classes): "
             f"{verdict} (p = {p:.2g}: the chance that guessing does at least as well)"]
    gains = d.get("restoration") or {}
    if gains:
        lines += ["    restoration gain = 1 - MSE(restored) / MSE(perturbed), the share of the "
                  "damage undone (0: no better than returning the input; < 0: worse):",
                  f"      {'':<24}{'epoch ' + str(first['epoch']):>10}{'epoch ' + str(d['epoch']):>10}"]
        order = list(_NAMES)   # the pretraining's order of the transformations
        for op, g in sorted(gains.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                            else len(order)):
            g0 = (first.get("restoration") or {}).get(op)
            start = f"{100 * g0['gain']:+.1f}%" if g0 else "-"
            lines.append(f"      {_NAMES.get(op, op):<24}{start:>10}{100 * g['gain']:+9.1f}%   "
                         f"({g['n']} cube{'s' if g['n'] != 1 else ''})")
    return lines


def probe_lines(history: list[dict[str, Any]]) -> list[str]:
    """The linear probe of the frozen encoder: random initialisation (epoch 0) against the last
    probed epoch, on the same cubes and folds."""
    probes = [d for d in history if "probe" in d]
    if len(probes) < 2 or probes[0]["epoch"] != 0:
        return []
    first, last = probes[0]["probe"], probes[-1]["probe"]
    metric = "AUC" if first["metric"] == "auc" else first["metric"]
    return [f"  representation: linear probe of the frozen encoder ({first['folds']}-fold "
            f"cross-validated {metric}, the same cubes and folds):",
            f"    random initialisation (scratch)  {first['value']:.3f}",
            f"    after pretraining (epoch {probes[-1]['epoch']})     {last['value']:.3f}   "
            f"({last['value'] - first['value']:+.3f})"]


def _label_counts(config: dict[str, Any]) -> tuple[int, int]:
    """(positives, negatives) of a fine-tune's test labels file, (0, 0) when unknown."""
    path = config.get("test_labels")
    if not path or not Path(path).is_file():
        return 0, 0
    labels = (np.load(path) if str(path).endswith(".npy") else np.loadtxt(path)).reshape(-1)
    return int((labels == 1).sum()), int((labels == 0).sum())


def _check_paired(pre_cfg: dict, scr_cfg: dict, pre_dir: Path, scr_dir: Path) -> None:
    differ = [k for k in PAIRED_KEYS if pre_cfg.get(k) != scr_cfg.get(k)]
    if differ:
        raise InputError(f"{scr_dir / 'config.json'}: this scratch fine-tune differs from "
                         f"{pre_dir} in {', '.join('--' + k for k in differ)}, so the two are not "
                         "a paired comparison; run both with the same data, split and seed")
    if not pre_cfg.get("weights") or scr_cfg.get("weights"):
        raise InputError(f"{pre_dir / 'config.json'}: the first fine-tune must start from "
                         "--weights and the second from scratch; pass them in that order")


def finetune_lines(pre_dir: Path, scr_dir: Path) -> list[str]:
    """Pretrained against scratch fine-tuning, side by side (same data, split and seed)."""
    fix = "run the fine-tune again (scripts/finetune_classification.py)"
    dirs = (pre_dir, scr_dir)
    cfg = [_read_json(d / "config.json", "fine-tuning configuration", fix) for d in dirs]
    met = [_read_json(d / "metrics.json", "fine-tuning metrics", fix) for d in dirs]
    _check_paired(*cfg, pre_dir, scr_dir)
    n_pos, n_neg = _label_counts(cfg[0])

    def value(m: dict, split: str, key: str) -> float:
        v = (m.get(split) or {}).get(key)
        return float("nan") if v is None else float(v)

    rows = [("epochs run (best)", [f"{m['epochs_run']} ({m['best_epoch']})" for m in met]),
            ("validation AUC", [f"{value(m, 'val', 'auc'):.3f}" for m in met])]
    auc = [value(m, "test", "auc") for m in met]
    se = [auc_standard_error(a, n_pos, n_neg) for a in auc]
    if all(math.isfinite(a) for a in auc):
        rows += [("test AUC (+- 1 SE)", [f"{a:.3f}" + (f" +- {s:.3f}" if math.isfinite(s) else "")
                                         for a, s in zip(auc, se)]),
                 ("test accuracy", [f"{value(m, 'test', 'accuracy'):.3f}" for m in met])]
    c = cfg[0]
    lines = [f"  fine-tuning, pretrained against scratch (seed {c.get('seed')}, "
             f"{met[0].get('n_train')} train / {met[0].get('n_val')} validation cubes, the same "
             f"split; {c.get('nb_epoch')} epochs at most):",
             f"    {'':<22}{'pretrained':>18}{'scratch':>18}"]
    lines += [f"    {name:<22}{a:>18}{b:>18}" for name, (a, b) in rows]
    if all(math.isfinite(a) for a in auc):
        diff, both = auc[0] - auc[1], math.hypot(*se)
        if not math.isfinite(both):
            lines.append(f"    test AUC difference {diff:+.3f} (no standard error: the test "
                         "labels were not found)")
        else:
            verdict = ("within noise: this run cannot tell them apart" if abs(diff) < 2 * both
                       else f"{'pretrained' if diff > 0 else 'scratch'} higher by more than 2 SE")
            lines.append(f"    test AUC difference {diff:+.3f} (SE of the difference about "
                         f"{both:.3f}, on {n_pos + n_neg} test cubes): {verdict}")
    return lines


def location_lines(layout: QuickstartLayout, finetune: bool) -> list[str]:
    """Where the pictures, curves and checkpoints of the run are."""
    montages = sorted(layout.montage.glob("class_*.png"))
    runs = sorted(p.name for p in layout.runs.iterdir() if p.is_dir()) \
        if layout.runs.is_dir() else []
    lines = ["  montages (one per class)  " + (f"{layout.montage}/ ({montages[0].name} .. "
                                               f"{montages[-1].name})" if montages else "none"),
             f"  curves and pictures       tensorboard --logdir {layout.out}   "
             f"({', '.join(f'runs/{r}' for r in runs) or 'no runs'}"
             + (", finetune_*/tensorboard" if finetune else "") + ")",
             f"  pretext diagnostics       {layout.pretrain / (_CKPT + '_diagnostics.json')}",
             f"  checkpoints               autoencoder {layout.autoencoder}",
             f"                            pretrained  {layout.pretrain / (_CKPT + '.pt')}"]
    if finetune:
        lines += [f"{'':28}fine-tuned  {layout.finetune_pretrained / 'best.pt'}, "
                  f"{layout.finetune_scratch / 'best.pt'}"]
    return lines


def summarize(layout: QuickstartLayout) -> str:
    """The end summary of a quickstart run in ``layout.out``."""
    fix = "run the pretraining (pytorch/train.py) to the end first"
    config = _read_json(layout.pretrain / f"{_CKPT}_config.json", "pretraining configuration", fix)
    history = _read_json(layout.pretrain / f"{_CKPT}_diagnostics.json", "pretext diagnostics", fix)
    finetune = (layout.finetune_pretrained / "metrics.json").is_file() or \
        (layout.finetune_scratch / "metrics.json").is_file()
    lines = ["What this run established"]
    lines += pretext_lines(history, int(config.get("n_val", 0)))
    lines += probe_lines(history)
    if finetune:
        lines += finetune_lines(layout.finetune_pretrained, layout.finetune_scratch)
    lines += ["  (a quick run on small data: it shows that every stage works and what each one "
              "measured, not how much pretraining helps; see docs/transfer_study.md)", "",
              "Where things are"]
    lines += location_lines(layout, finetune)
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    """The command line of ``python scripts/quickstart_summary.py``."""
    ap = ArgumentParser(description="Print what a quickstart run established (pretext top-1 "
                                    "against chance, restoration gain per transformation, the "
                                    "probe, pretrained against scratch fine-tuning) and where "
                                    "its pictures, curves and checkpoints are.",
                        formatter_class=HelpFormatter)
    ap.add_argument("--out", required=True,
                    help="the quickstart's output folder (scripts/quickstart.sh --out)")
    return ap


def _run(args) -> None:
    print(summarize(QuickstartLayout(Path(args.out))))


def main(argv: list[str] | None = None) -> int:
    """CLI: print the summary of the quickstart run in ``--out``."""
    return run_cli(build_parser, _run, argv)
