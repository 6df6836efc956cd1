"""Pieces shared by the two fine-tuning scripts: optimiser and resumable run state."""
from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import (load_checkpoint, load_state_dict_checked, load_training_state,
                               save_checkpoint, training_counters)
from runtime.cli import nonneg_float, positive_float, positive_int, resume_path
from runtime.errors import CheckpointError
from runtime.files import output_session

__all__ = ["add_model_flags", "add_optimizer_flags", "finetune_optimizer", "FinetuneState",
           "finetune_session", "restore_state", "save_epoch", "load_best"]

#: What a finished fine-tuning run leaves in --output_dir (kept unless --overwrite/--resume).
RESULT_NAMES = ("metrics.json", "best.pt", "last.pt")


def add_model_flags(ap: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "model" flag group both scripts share (``--weights``, ``--width``, ``--norm``)."""
    m = ap.add_argument_group("model")
    m.add_argument("--weights", default=None,
                   help="pretrained Semantic Genesis checkpoint (ours or published); omit to train "
                        "from scratch")
    m.add_argument("--width", type=positive_int, default=32,
                   help="base channels of the U-Net (32 = published)")
    m.add_argument("--norm", default="batch_stats", choices=["batch_stats", "standard"],
                   help="BatchNorm: batch statistics also in eval (published) or running statistics")
    return m


def add_optimizer_flags(group: argparse._ArgumentGroup) -> None:
    """``--optimizer``, ``--lr``, ``--weight_decay`` (see :func:`finetune_optimizer`)."""
    group.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"],
                       help="sgd: momentum 0.9 as in the README snippet; adam")
    group.add_argument("--lr", type=positive_float, default=1e-2, help="learning rate")
    group.add_argument("--weight_decay", type=nonneg_float, default=0.0, help="L2 weight decay")


def finetune_optimizer(params: list[nn.Parameter], name: str, lr: float,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``sgd``: momentum 0.9, no Nesterov, as the original README's snippets; or ``adam``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr, momentum=0.9, weight_decay=weight_decay, nesterov=False)
    if name == "adam":
        return torch.optim.Adam(params, lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be sgd or adam, got {name!r}")


@dataclass
class FinetuneState:
    """Where a fine-tuning run stands; stored in ``last.pt`` (epoch, counters, ``extra``)."""
    start_epoch: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    no_improve: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: dict[str, Any] = field(default_factory=dict)


@contextmanager
def finetune_session(args: argparse.Namespace) -> Iterator[Path]:
    """``output_session`` of a fine-tuning run: ``--output_dir`` locked, an earlier run's
    ``metrics.json``/``best.pt``/``last.pt`` kept unless ``--overwrite`` or ``--resume``. A new
    run removes the old ``metrics.json`` first (it is written last), so a run killed half-way
    never leaves the old metrics beside new checkpoints."""
    out = Path(args.output_dir)
    with output_session(out, "--output_dir", [out / n for n in RESULT_NAMES], args.overwrite,
                        continuing=bool(args.resume)) as folder:
        if not args.resume:
            (folder / "metrics.json").unlink(missing_ok=True)
        yield folder


def restore_state(resume_flag: str | None, model: nn.Module, optimizer: torch.optim.Optimizer,
                  output_dir: Path) -> FinetuneState:
    """Load ``--resume`` (a path, or ``auto`` for ``output_dir/last.pt``: model, optimizer,
    epoch, history) or start fresh (an earlier run's results in ``output_dir`` were refused by
    :func:`finetune_session` unless ``--overwrite``)."""
    resume = resume_path(resume_flag, output_dir / "last.pt")
    if resume is None:
        return FinetuneState()
    ckpt = load_checkpoint(resume)
    load_state_dict_checked(model, ckpt["state_dict"], source=str(resume))
    load_training_state(ckpt, optimizer, source=str(resume))
    epoch, _, no_improve = training_counters(ckpt, str(resume))
    extra = ckpt.get("extra") or {}
    try:
        best_value = extra.get("best_value")
        state = FinetuneState(start_epoch=epoch,
                              best_value=None if best_value is None else float(best_value),
                              best_epoch=int(extra.get("best_epoch", -1)), no_improve=no_improve,
                              history=list(extra.get("history", [])),
                              best_val=dict(extra.get("best_val", {})))
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{resume}: the run state in 'extra' is damaged ({e}); resume "
                              "from another last.pt or start again with --overwrite") from e
    return state


def save_epoch(state: FinetuneState, epoch: int, current: float, val: dict[str, Any], *,
               higher_is_better: bool, output_dir: Path, model: nn.Module,
               optimizer: torch.optim.Optimizer, arch: str, model_config: dict[str, Any],
               config: dict[str, Any], best_extra: dict[str, Any]) -> bool:
    """Book-keeping after validating ``epoch`` (1-based); returns whether it improved.

    ``current`` (the monitored value) improves on ``state.best_value`` by more than 1e-6 ->
    ``best.pt`` (``extra=best_extra``) and the counter resets, else ``state.no_improve`` grows.
    ``last.pt`` is written every epoch with what :func:`restore_state` reads back.
    """
    best = state.best_value
    improved = best is None or (current > best + 1e-6 if higher_is_better
                                else current < best - 1e-6)
    common = dict(optimizer=optimizer, epoch=epoch, arch=arch, model_config=model_config,
                  config=config)
    if improved:
        state.best_value, state.best_epoch, state.best_val = current, epoch, val
        state.no_improve = 0
        save_checkpoint(output_dir / "best.pt", model, best_loss=val["loss"],
                        num_epoch_no_improvement=0, extra=best_extra, **common)
    else:
        state.no_improve += 1
    save_checkpoint(output_dir / "last.pt", model, best_loss=state.best_val.get("loss", math.inf),
                    num_epoch_no_improvement=state.no_improve,
                    extra={"history": state.history, "best_value": state.best_value,
                           "best_epoch": state.best_epoch, "best_val": state.best_val}, **common)
    return improved


def load_best(model: nn.Module, output_dir: Path) -> None:
    """Put the weights of ``output_dir/best.pt`` back into ``model`` (for the test evaluation)."""
    ckpt = load_checkpoint(output_dir / "best.pt")
    load_state_dict_checked(model, ckpt["state_dict"], source=str(output_dir / "best.pt"))
