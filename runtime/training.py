"""placeholder"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from runtime.errors import TrainingDiverged
from runtime.files import make_output_dir

__all__ = ["summary_writer", "check_finite_training", "early_stopping_update"]


def summary_writer(log_dir: str | os.PathLike, flag: str = "--log_dir") -> Any:
    """A TensorBoard ``SummaryWriter`` on ``log_dir`` (created; see ``make_output_dir``)."""
    from torch.utils.tensorboard import SummaryWriter  # imported only where curves are written
    return SummaryWriter(str(make_output_dir(log_dir, flag)))


def check_finite_training(model: torch.nn.Module, epoch: int, train_loss: float,
                          val_loss: float, fix: str) -> None:
    """Stop a run whose loss or weights stopped being finite: ``TrainingDiverged`` (one line,
    ``fix`` says what to change) raised before the epoch's checkpoints are written, so the
    last good ones stay. One host read for all weights."""
    sums = [p.detach().float().sum() for p in model.parameters()]
    weights_ok = bool(torch.isfinite(torch.stack(sums)).all()) if sums else True
    if not (math.isfinite(train_loss) and math.isfinite(val_loss) and weights_ok):
        what = "weights" if weights_ok is False else "loss"
        raise TrainingDiverged(f"epoch {epoch}: non-finite {what} (train loss {train_loss:.4g}, val "
                         f"loss {val_loss:.4g}); the checkpoints of the last good epoch are kept; "
                         f"{fix}")


def early_stopping_update(val_loss: float, best_loss: float, no_improve: int,
                          patience: int) -> tuple[bool, float, int, bool]:
    """One epoch's early-stopping bookkeeping (the reference's rule), shared by the training CLIs.

    Returns (improved, new best loss, epochs without improvement, stop now).
    """
    if val_loss < best_loss:
        return True, val_loss, 0, False
    return False, best_loss, no_improve + 1, no_improve + 1 >= patience
