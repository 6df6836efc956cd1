"""Convert a published (or other Semantic Genesis-shaped) checkpoint to this project's schema.

Reads, without ever unpickling code (weights-only loading plus NumPy scalars):
* the published format of ``pytorch/train.py``: ``epoch``, ``state_dict`` with
  ``nn.DataParallel``'s ``module.`` keys, ``optimizer_state_dict``,
  ``num_epoch_no_improvement``, and ``best_loss``/``best_acc`` stored as NumPy scalars;
* a bare state dict, keys with ``module.`` / ``_orig_mod.`` / ``classficationNet.`` prefixes,
  and Models Genesis-style files whose 3D U-Net uses the same layer names.

Writes ``OUT`` atomically in the schema of ``models/checkpoint.py``: unwrapped keys, plain
Python numbers, ``arch`` and ``model_config`` inferred from the weights (architecture, width,
classes, decoder). ``OUT`` loads with a plain ``torch.load``, so the original README's
fine-tuning snippet runs on it unchanged. Prints what it found and what it dropped.

    python scripts/convert_checkpoint.py semantic_genesis_chest_ct.pt \\
        Checkpoints/en_de/semantic_genesis_chest_ct.pt
"""
from __future__ import annotations

from pathlib import Path


import argparse
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.checkpoint import (IGNORED_PREFIXES, STRIP_PREFIXES, checkpoint_dict, clean_state_dict,
                               infer_model_config, load_state_dict_checked, read_checkpoint_file,
                               save_checkpoint, strip_prefixes)
from models.ynet3d import ClassificationNet3D, UNet3D, YNet3D
from runtime.cli import ArgumentParser, HelpFormatter, add_overwrite_flag, run_cli
from runtime.errors import CheckpointError
from runtime.files import output_session

__all__ = ["ARCHS", "PUBLISHED_NORM", "convert_checkpoint", "describe", "build_parser", "main"]

ARCHS = {"YNet3D": YNet3D, "UNet3D": UNet3D, "ClassificationNet3D": ClassificationNet3D}
#: The published networks normalise with batch statistics also in eval (see models/ynet3d.py);
#: the weights cannot tell, so the converted ``model_config`` says so.
PUBLISHED_NORM = "batch_stats"
#: Published top-level entries that map onto our schema's fields.
SCHEMA_FIELDS = ("epoch", "best_loss", "num_epoch_no_improvement")


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, Any]:
    """Read ``src``, check it fits the inferred network, write ``dst`` in our schema.

    Returns a report: ``arch``, ``model_config``, ``epoch``, ``best_loss``, ``prefixes``
    (stripped wrapper prefixes), ``numpy_scalars`` (top-level entries that were NumPy scalars),
    ``extra`` (published values kept under ``extra``), ``dropped`` (what was left out, with why),
    ``tensors`` (number written). Raises ``CheckpointError`` naming ``src`` when the file is
    refused, unreadable, or its keys fit none of the Semantic Genesis networks.
    """
    raw = read_checkpoint_file(src)
    numpy_scalars = sorted(k for k, v in raw.items() if isinstance(v, np.generic)) \
        if isinstance(raw, Mapping) else []
    ckpt = checkpoint_dict(raw, source=str(src))
    state = ckpt["state_dict"]
    prefixes = sorted({p for k in state for p in STRIP_PREFIXES if k.startswith(p)})
    cleaned = clean_state_dict(state)
    dropped: list[str] = []
    ignored = [strip_prefixes(k) for k in state if strip_prefixes(k).startswith(IGNORED_PREFIXES)]
    for head in sorted({k.split(".")[0] for k in ignored}):
        count = sum(1 for k in ignored if k.startswith(head + "."))
        dropped.append(f"{head}.* ({count} tensors; not part of the Semantic Genesis networks)")
    arch, cfg = infer_model_config(cleaned)
    if arch is None:
        raise CheckpointError(
            f"{src}: its keys fit none of YNet3D, UNet3D, ClassificationNet3D (first keys: "
            f"{', '.join(list(cleaned)[:3]) or 'none'}); expected a Semantic Genesis or Models "
            "Genesis 3D U-Net checkpoint")
    cfg = {**cfg, "norm": PUBLISHED_NORM}
    model = ARCHS[arch](**cfg)
    load_state_dict_checked(model, cleaned, source=str(src))
    extra: dict[str, Any] = {}
    for key, value in ckpt.items():
        if key in ("state_dict", *SCHEMA_FIELDS):
            continue
        if key == "optimizer_state_dict":
            dropped.append("optimizer_state_dict (the original run's optimiser state: the converted "
                           "file initialises weights, it does not --resume)")
        elif _is_plain(value):
            extra[key] = value
        else:
            dropped.append(f"{key} ({type(value).__name__}; not a plain value)")
    epoch = int(ckpt.get("epoch", 0) or 0)
    best_loss = float(ckpt.get("best_loss", math.inf))
    save_checkpoint(dst, model, epoch=epoch, best_loss=best_loss,
                    num_epoch_no_improvement=int(ckpt.get("num_epoch_no_improvement", 0) or 0),
                    arch=arch, model_config=cfg,
                    config={"converted_from": str(src)}, extra=extra)
    return {"arch": arch, "model_config": cfg, "epoch": epoch, "best_loss": best_loss,
            "prefixes": prefixes, "numpy_scalars": numpy_scalars, "extra": extra,
            "dropped": dropped, "tensors": len(model.state_dict())}


def describe(report: Mapping[str, Any], src: str, dst: str) -> list[str]:
    """The lines printed by the CLI for a :func:`convert_checkpoint` report."""
    cfg = report["model_config"]
    found = f"found: {report['arch']}, width {cfg['width']}"
    if "cls_classes" in cfg:
        found += f", {cfg['cls_classes']} classes"
    if cfg.get("decoder"):
        found += f", {cfg['decoder']} decoder"
    found += f", epoch {report['epoch']}"
    if math.isfinite(report["best_loss"]):
        found += f", best_loss {report['best_loss']:.6g}"
    notes = []
    if report["prefixes"]:
        notes.append("key prefixes " + ", ".join(repr(p) for p in report["prefixes"]) + " removed")
    if report["numpy_scalars"]:
        notes.append("NumPy scalars " + ", ".join(report["numpy_scalars"])
                     + " stored as Python numbers")
    if report["extra"]:
        notes.append("kept under 'extra': " + ", ".join(sorted(report["extra"])))
    lines = [f"read {src}", found]
    if notes:
        lines.append("converted: " + "; ".join(notes))
    lines.append("dropped: " + ("; ".join(report["dropped"]) if report["dropped"] else "nothing"))
    lines.append(f"wrote {dst} ({report['tensors']} tensors; loads with plain torch.load)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
                        formatter_class=HelpFormatter)
    ap.add_argument("input", metavar="IN",
                    help="checkpoint to convert (published format, bare state dict, or Models "
                         "Genesis-style); it is read weights-only, never executed")
    ap.add_argument("output", metavar="OUT",
                    help="where to write the converted checkpoint (written atomically; e.g. "
                         "Checkpoints/en_de/semantic_genesis_chest_ct.pt)")
    add_overwrite_flag(ap, "an existing OUT file")
    return ap


def run(args: argparse.Namespace) -> dict[str, Any]:
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise CheckpointError(f"{args.output}: same file as the input; give another OUT path so "
                              "the original stays as downloaded")
    out = Path(args.output)
    with output_session(out.parent, "OUT", [out], args.overwrite, continue_flag=None):
        report = convert_checkpoint(args.input, args.output)
    print("\n".join(describe(report, str(args.input), str(args.output))))
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI: 0 converted, 2 refused or unreadable input (one ``error:`` line)."""
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
