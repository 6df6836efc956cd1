"""What a training command checks before it continues or starts from a checkpoint.

* ``PRETRAINING_POLICY``: which ``pytorch/train.py`` flags a ``--resume`` may change (applied and
  said) and which it refuses (everything that decides the result: the model, the loss, the
  schedule, the seed, the data); ``check_resume_checkpoint`` applies it.
* ``describe_identity_changes``: the data a run trained on, compared by content ({file name:
  size and SHA-256}), for a resume on other data.
* ``apply_resumed_lr``: a resumed run given another ``--lr`` (what the divergence message asks
  for) continues with it: the optimiser state restored from the checkpoint carries the old
  learning rate, so it is scaled here, keeping the reductions the schedule already made.
* ``checkpoint_kind`` / ``check_pretraining_checkpoint``: what a checkpoint file is (the stage-1
  autoencoder, a pretraining en / en_de network, ...), so that a file of the wrong stage is
  named as such instead of as a list of missing keys.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from models.checkpoint import describe_checkpoint, load_checkpoint
from runtime.errors import InputError
from runtime.provenance import ResumePolicy

__all__ = ["PRETRAINING_POLICY", "describe_identity_changes", "apply_resumed_lr",
           "checkpoint_kind", "check_pretraining_checkpoint"]

#: ``pytorch/train.py --resume``: more epochs or patience, another learning rate (the advice of
#: a diverged run), precision and where the cubes are stored, the diagnostics; every other
#: flag must keep its recorded value. The data folder is compared by content, not by path;
#: --pre_path only initialised the run the checkpoint continues.
PRETRAINING_POLICY = ResumePolicy(
    applied=("nb_epoch", "patience", "lr", "amp", "cube_dtype", "data_device", "probe_data",
             "probe_labels", "probe_every", "nb_preview"),
    ignored=("output_dir", "data_dir", "pre_path"))


def describe_identity_changes(recorded: Any, current: Mapping[str, Mapping[str, Any]]
                              ) -> str | None:
    """None when ``current`` ({name: {"size", "sha256"}}) holds the files ``recorded`` with the
    same content; else which differ, for a message."""
    if not isinstance(recorded, Mapping):
        return "the record is unreadable"
    changed = [n for n in sorted(set(recorded) | set(current))
               if not isinstance(recorded.get(n), Mapping) or n not in current
               or any(str(recorded[n].get(k)) != str(current[n].get(k))
                      for k in ("size", "sha256"))]
    if not changed:
        return None
    more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
    return f"{', '.join(changed[:3])}{more}: other content than recorded"


def apply_resumed_lr(optimizer: torch.optim.Optimizer, scheduler: Any, old: float,
                     new: float) -> None:
    """Continue a restored run at learning rate ``new`` instead of ``old`` (its ``--lr``): the
    current learning rate and the schedule's base are multiplied by new / old, so reductions
    already made (a step or a plateau halving) are kept."""
    factor = float(new) / float(old)
    for group in optimizer.param_groups:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr.mul_(factor)
        else:
            group["lr"] = lr * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [float(g["lr"]) for g in optimizer.param_groups]


def checkpoint_kind(ckpt: Mapping[str, Any], source: str = "checkpoint") -> str:
    """What wrote a checkpoint, in pretraining's words: "autoencoder" (stage 1), "en" / "en_de"
    (stage 4), "unet" (a U-Net without a head: segmentation), or "other"
    (``models.checkpoint.describe_checkpoint`` decides)."""
    kind = describe_checkpoint(ckpt, source).kind
    return {"pretraining": "en_de", "pretraining_en": "en", "autoencoder": "autoencoder",
            "segmentation": "unet", "unet": "unet"}.get(kind, "other")


def check_pretraining_checkpoint(path: str, flag: str) -> None:
    """Refuse a checkpoint of another stage given to ``flag`` (``--pre_path``/``--resume``) with
    one line naming what the file is and the right file for the flag."""
    kind = checkpoint_kind(load_checkpoint(path), path)
    want = ("a checkpoint of pytorch/train.py (e.g. Checkpoints/en/semantic_genesis_chest_ct.pt "
            "of an --exp en run)" if flag == "--pre_path" else
            "the run's own <output_dir>/semantic_genesis_chest_ct_last.pt")
    if kind == "autoencoder":
        raise InputError(f"{path}: an autoencoder checkpoint of stage 1 (self_discovery/"
                         f"train_autoencoder.py), not a pretraining network; {flag} takes {want}; "
                         "the autoencoder's file is for self_discovery/feature_extractor.py "
                         "--weights")
    if kind == "unet":
        raise InputError(f"{path}: a U-Net without the classification head (a segmentation "
                         f"model?), not a pretraining network; {flag} takes {want}")
