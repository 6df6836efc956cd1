"""Pieces shared by the two fine-tuning commands: flags, optimiser, training step, output
folder and reading back ``best.pt`` (the loop itself is ``finetune.loop``)."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import load_checkpoint, load_state_dict_checked
from runtime.cli import (add_verbosity_flag, add_overwrite_flag, add_resume_flag, nonneg_float, positive_float,
                         positive_int, seed_int)
from runtime.devices import device_name
from runtime.files import output_session
from runtime.training import batch_sums

__all__ = ["add_model_flags", "add_training_flags", "add_output_flags", "add_optimizer_flags",
           "finetune_optimizer", "finetune_session", "loss_step", "load_best", "RESULT_NAMES"]

#: What a finished fine-tuning run leaves in --output_dir (kept unless --overwrite/--resume).
RESULT_NAMES = ("metrics.json", "best.pt", "last.pt")


def add_model_flags(ap: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "model" flag group both scripts share (``--weights``, ``--width``, ``--norm``)."""
    m = ap.add_argument_group("model")
    m.add_argument("--weights", default=None,
                   help="pretrained Semantic Genesis checkpoint (ours or published, or Models "
                        "Genesis weights); omit to train from scratch")
    m.add_argument("--width", type=positive_int, default=None,
                   help="base channels of the U-Net [default: as the --weights checkpoint "
                        "records or its weights show, else 32 (published)]")
    m.add_argument("--norm", default=None, choices=["batch_stats", "standard"],
                   help="BatchNorm: batch statistics also in eval (published) or running "
                        "statistics [default: as the --weights checkpoint records, else "
                        "batch_stats]")
    return m


def add_training_flags(ap: argparse.ArgumentParser, *, epochs: int, patience: int,
                       monitor: list[str], batch_size: int, batch_help: str,
                       seed_help: str) -> argparse._ArgumentGroup:
    """The "training" flag group both scripts share; ``monitor[0]`` is the default of
    ``--monitor``."""
    t = ap.add_argument_group("training")
    t.add_argument("--nb_epoch", type=positive_int, default=epochs, help="maximum number of epochs")
    t.add_argument("--patience", type=positive_int, default=patience,
                   help="stop after this many epochs without improvement of --monitor")
    t.add_argument("--monitor", default=monitor[0], choices=monitor,
                   help="validation value for early stopping and the best checkpoint")
    t.add_argument("--batch_size", type=positive_int, default=batch_size, help=batch_help)
    add_optimizer_flags(t)
    t.add_argument("--seed", type=seed_int, default=0, help=seed_help)
    t.add_argument("--device", type=device_name, default="auto", help="auto, cpu or cuda[:i]")
    add_resume_flag(t, "<output_dir>/last.pt", "model, optimizer, epoch, history")
    add_overwrite_flag(t, "metrics.json, best.pt and last.pt")
    return t


def add_output_flags(ap: argparse.ArgumentParser, default_dir: str) -> argparse._ArgumentGroup:
    """The "outputs" flag group: ``--output_dir`` and ``--quiet``."""
    o = ap.add_argument_group("outputs")
    o.add_argument("--output_dir", default=default_dir,
                   help="metrics.json, config.json, best.pt, last.pt and tensorboard/ go here")
    add_verbosity_flag(o, "1: progress bars and one line per epoch; 2: the same")
    return o


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


def loss_step(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
              criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
              ) -> Callable[[Any], torch.Tensor]:
    """A ``runtime.training`` step for batches ``(x, y)``: forward, ``criterion(x_out, y)``,
    backward, optimiser; returns [loss x n, n] on the device (no host read)."""
    def step(batch: Any) -> torch.Tensor:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return batch_sums(loss, x.shape[0])
    return step


def load_best(model: nn.Module, output_dir: Path) -> None:
    """Put the weights of ``output_dir/best.pt`` back into ``model`` (for the test evaluation)."""
    ckpt = load_checkpoint(output_dir / "best.pt")
    load_state_dict_checked(model, ckpt["state_dict"], source=str(output_dir / "best.pt"))
