"""The loop runtime of every training CLI: the autoencoder (stage 1), pretraining (stage 4)
and both fine-tuning scripts run their epochs over these pieces, so resuming, early stopping,
checkpointing and logging behave the same everywhere.

* ``RunState``: where a run stands (epochs done, best value, epochs without improvement, the
  per-epoch history); stored in every checkpoint the loop writes and read back by
  ``restart_from_checkpoint`` (``--resume``).
* ``EarlyStopping``: the one improvement / stop decision, taken from rank 0's value so every
  process of a distributed run agrees.
* ``EpochCheckpoints``: after each epoch, ``best`` when it improved and ``last`` always, written
  by rank 0 only (atomically, the unwrapped model; ``models.checkpoint`` schema).
* ``MetricLogger``: console lines (rank 0, through tqdm so bars stay intact), tqdm progress bars
  and TensorBoard scalars and images.
* ``train_one_epoch`` / ``evaluate``: one pass over batches, summing per-batch statistics on the
  device (no host read per step); the progress bar shows the running loss every
  ``log_every`` steps, the only host reads inside the loop.
* ``check_finite_training``: stop a diverged run before its checkpoints are written.

A driver's epoch loop reads::

    state = restart_from_checkpoint(path, model, optimizer, scheduler) if resuming else RunState()
    for epoch in range(state.epoch, epochs):
        train = train_one_epoch(net, train_step, batches, log, f"epoch {epoch + 1}", zeros)
        val = evaluate(model, eval_step, val_batches, log, f"epoch {epoch + 1} val", zeros)
        check_finite_training(model, epoch + 1, train_loss, val_loss, fix)
        decision = stopper.step(state, val_loss)
        checkpoints.save(state, decision.improved, model, optimizer, scheduler)
        log.line(...); log.scalars(...)
        if decision.stop:
            break
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.checkpoint import (checked_model_config, load_checkpoint, load_state_dict_checked,
                               load_training_state, save_checkpoint, training_counters)
from runtime import distributed as D
from runtime.errors import CheckpointError, InputError, TrainingDiverged
from runtime.files import make_output_dir
from runtime.provenance import ResumePolicy, check_resume_settings

__all__ = ["RunState", "restart_from_checkpoint", "EarlyStopping", "Decision",
           "EpochCheckpoints", "MetricLogger", "summary_writer", "train_one_epoch", "evaluate",
           "batch_sums", "per_sample_mean", "check_finite_training", "record_epoch",
           "format_epoch_line", "check_resume_checkpoint", "DATA_IDENTITY",
           "unfinished_checkpoint"]

#: Keys of a checkpoint's ``extra`` that hold the run state (besides the published counters).
_STATE_KEYS = ("history", "best_value", "best_epoch")


@dataclass
class RunState:
    """Where a training run stands; what ``--resume`` restores.

    ``epoch``: epochs completed. ``best_value``: the monitored validation value at
    ``best_epoch`` (None before the first epoch); ``best_loss``: the validation loss of that
    epoch (the published checkpoint field). ``no_improve``: epochs since the last improvement.
    ``history``: one plain dict per epoch. ``extra``: stage-specific plain data kept across a
    resume (e.g. pretraining diagnostics).
    """
    epoch: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    best_loss: float = math.inf
    no_improve: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def checkpoint_fields(self) -> dict[str, Any]:
        """The ``save_checkpoint`` keyword arguments that record this state."""
        extra = dict(self.extra, history=self.history, best_value=self.best_value,
                     best_epoch=self.best_epoch)
        return {"epoch": self.epoch, "best_loss": self.best_loss,
                "num_epoch_no_improvement": self.no_improve, "extra": extra}

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], source: str) -> "RunState":
        """The state recorded by ``checkpoint_fields`` (checked; a ``CheckpointError`` naming
        ``source`` when damaged). Checkpoints of the published code carry only the counters:
        their best value is their ``best_loss``."""
        epoch, best_loss, no_improve = training_counters(ckpt, source)
        extra = ckpt.get("extra") or {}
        try:
            if not isinstance(extra, Mapping):
                raise TypeError(f"'extra' is a {type(extra).__name__}")
            best_value = extra.get("best_value", best_loss if math.isfinite(best_loss) else None)
            return cls(epoch=epoch, best_loss=best_loss, no_improve=no_improve,
                       best_value=None if best_value is None else float(best_value),
                       best_epoch=int(extra.get("best_epoch", -1)),
                       history=[dict(row) for row in extra.get("history", [])],
                       extra={k: v for k, v in extra.items() if k not in _STATE_KEYS})
        except (AttributeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: the run state in 'extra' is damaged ({e}); resume "
                                  "from another checkpoint or start again with --overwrite") from e


def restart_from_checkpoint(path: str | os.PathLike, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                            expect: Mapping[str, Any] | None = None,
                            settings: Mapping[str, Any] | None = None,
                            policy: ResumePolicy | None = None) -> RunState:
    """Continue a run (``--resume``): weights into ``model``, optimiser and scheduler states,
    and the ``RunState``. ``expect``: model_config values the run must share with the
    checkpoint ({key: this run's value}; a mismatch names ``--key``). ``settings``: this run's
    flags, compared with the configuration the checkpoint records under ``policy``
    (``runtime.provenance.check_resume_settings``: changes refused, or applied and said); the
    applied changes are kept in ``state.extra["resumes"]``."""
    source = str(path)
    ckpt = load_checkpoint(path)
    applied = {}
    if settings is not None:
        recorded = ckpt.get("config")
        applied = check_resume_settings(recorded if isinstance(recorded, Mapping) else None,
                                        settings, policy or ResumePolicy(), source)
    if expect:
        cfg = checked_model_config(ckpt, source)
        for key, value in expect.items():
            if key in cfg and cfg[key] != value:
                raise InputError(f"{source}: made with --{key} {cfg[key]}, this run has "
                                 f"--{key} {value}; use the same value to resume")
    load_state_dict_checked(model, ckpt["state_dict"], source=source)
    load_training_state(ckpt, optimizer, scheduler, source=source)
    state = RunState.from_checkpoint(ckpt, source)
    if applied:
        state.extra.setdefault("resumes", []).append(
            {"epoch": state.epoch, "changed": {k: list(v) for k, v in applied.items()}})
    return state


#: Key of a run's configuration holding the content identity of the data it trains on.
DATA_IDENTITY = "data_identity"


def check_resume_checkpoint(path: str | os.PathLike, settings: Mapping[str, Any],
                            policy: ResumePolicy, data: Any = None,
                            describe: Callable[[Any, Any], str | None] | None = None,
                            data_flag: str = "--data_dir") -> dict[str, tuple[Any, Any]]:
    """What a ``--resume`` checks before anything is loaded or written: this run's flags
    ``settings`` against the configuration the checkpoint ``path`` records (``policy``:
    refused with the list of differing flags, or applied and said; returns the applied
    changes), and this run's data identity ``data`` against the recorded
    ``config[DATA_IDENTITY]``: ``describe(recorded, data)`` names the difference (None: the
    same data), which is refused naming ``data_flag``. Checkpoints without a record (older
    versions, the published files) are not compared."""
    ckpt = load_checkpoint(path)
    recorded = ckpt.get("config")
    recorded = recorded if isinstance(recorded, Mapping) else None
    applied = check_resume_settings(recorded, settings, policy, str(path))
    old = (recorded or {}).get(DATA_IDENTITY)
    if old is not None and data is not None and describe is not None:
        diff = describe(old, data)
        if diff:
            where = (recorded or {}).get(data_flag.lstrip("-"))
            raise InputError(f"{path}: --resume continues a run trained on other data ({diff}); "
                             f"resume with that run's {data_flag}"
                             + (f" ({where})" if where else "")
                             + ", or start again without --resume (with --overwrite)")
    return applied


def unfinished_checkpoint(last: str | os.PathLike, nb_epoch: int, patience: int) -> str | None:
    """Why the run whose last checkpoint is ``last`` was interrupted, for ``output_session``'s
    ``unfinished`` ("<name> stopped after epoch N"): it stopped before its ``nb_epoch``
    epochs (as it recorded them; else this run's) and before its ``patience`` ran out. None
    for a finished run, no file or an unreadable one (the message then stays the general
    one)."""
    last = Path(last)
    if not last.is_file():
        return None
    try:
        ckpt = load_checkpoint(last)
        cfg = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
        epoch = int(ckpt.get("epoch", 0))
        done = epoch >= int(cfg.get("nb_epoch", nb_epoch)) or \
            int(ckpt.get("num_epoch_no_improvement", 0)) >= int(cfg.get("patience", patience))
    except (CheckpointError, TypeError, ValueError):
        return None
    return None if done else f"{last.name} stopped after epoch {epoch}"


@dataclass(frozen=True)
class Decision:
    """The outcome of one epoch, the same on every rank."""
    improved: bool
    stop: bool
    value: float


class EarlyStopping:
    """The improvement / stop rule of a run: ``mode`` "min" (a loss) or "max" (AUC, Dice); an
    epoch improves when its value beats the best by more than ``min_delta``; the run stops
    after ``patience`` epochs without improvement."""

    def __init__(self, patience: int, mode: str = "min", min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience, self.mode, self.min_delta = patience, mode, min_delta

    def improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def stopped(self, state: RunState) -> bool:
        """Whether ``state`` already ran out of patience (a finished run being resumed)."""
        return state.no_improve >= self.patience

    def step(self, state: RunState, value: float, loss: float | None = None) -> Decision:
        """Count epoch ``state.epoch + 1`` with its monitored validation ``value`` (and
        validation ``loss``, default ``value``) into ``state``. Rank 0's numbers are broadcast
        first, so every process takes the same decision from the same values."""
        value, loss = D.broadcast_object((float(value), float(value if loss is None else loss)))
        state.epoch += 1
        improved = self.improves(value, state.best_value)
        if improved:
            state.best_value, state.best_epoch, state.best_loss = value, state.epoch, loss
            state.no_improve = 0
        else:
            state.no_improve += 1
        return Decision(improved, self.stopped(state), value)


@dataclass
class EpochCheckpoints:
    """The two checkpoints of a run: ``best`` (written when an epoch improves) and ``last``
    (every epoch; what ``--resume`` continues). Only rank 0 writes."""
    best: Path
    last: Path
    arch: str
    model_config: dict[str, Any]
    config: dict[str, Any]

    def save(self, state: RunState, improved: bool, model: nn.Module,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             extra: Mapping[str, Any] | None = None) -> None:
        """Write ``last`` (and ``best`` when ``improved``) with ``state``; ``extra``: plain data
        of this epoch stored beside the state (not restored)."""
        if not D.is_main():
            return
        fields = state.checkpoint_fields()
        fields["extra"].update(extra or {})
        kw = dict(optimizer=optimizer, scheduler=scheduler, arch=self.arch,
                  model_config=self.model_config, config=self.config, **fields)
        if improved:
            save_checkpoint(self.best, model, **kw)
        save_checkpoint(self.last, model, **kw)


def summary_writer(log_dir: str | os.PathLike, flag: str = "--log_dir") -> Any:
    """A TensorBoard ``SummaryWriter`` on ``log_dir`` (created; see ``make_output_dir``)."""
    from torch.utils.tensorboard import SummaryWriter  # slow import, only where curves are written
    return SummaryWriter(str(make_output_dir(log_dir, flag)))


class MetricLogger:
    """One logger for a run: console lines, progress bars and TensorBoard, on rank 0 only.

    ``verbose``: 0 errors only, 1 epoch lines and progress bars, 2 also details (a line's
    ``level``). ``log_dir``: TensorBoard folder (None: no curves). Bars switch themselves off
    when the output is not a terminal (a log file, a batch job); a long pass then prints a
    plain progress line every ``heartbeat_s`` seconds instead, so a slow first epoch is never
    silent. Use as a context manager (closes the writer).
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, verbose: int = 1,
                 enabled: bool | None = None, flag: str = "--log_dir",
                 heartbeat_s: float = 60.0) -> None:
        self.enabled = D.is_main() if enabled is None else enabled
        self.verbose, self.log_dir, self.flag = verbose, log_dir, flag
        self.heartbeat_s = heartbeat_s
        self._writer: Any = None

    @property
    def curves(self) -> bool:
        """Whether this process writes TensorBoard curves (rank 0 with a ``log_dir``)."""
        return self.enabled and self.log_dir is not None

    @property
    def writer(self) -> Any:
        """The TensorBoard writer, created at its first use (a run that fails before its
        first epoch leaves no empty log folder); None where ``curves`` is False."""
        if self._writer is None and self.curves:
            self._writer = summary_writer(self.log_dir, self.flag)
        return self._writer

    def line(self, message: str, level: int = 1) -> None:
        """Print ``message`` (through tqdm, so an open bar is redrawn below it), flushed: a
        batch job's log file shows it at once."""
        if self.enabled and self.verbose >= level:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def progress(self, iterable: Iterable[Any], desc: str, total: int | None = None) -> tqdm:
        """A progress bar over ``iterable`` (inert on other ranks and with ``verbose`` 0)."""
        show = self.enabled and self.verbose >= 1
        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                    disable=None if show else True)

    def scalars(self, values: Mapping[str, float | None], step: int) -> None:
        """TensorBoard scalars (None values are skipped: undefined metrics)."""
        if self.writer is not None:
            for tag, value in values.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A grayscale (H, W) image in [0, 1] (e.g. ``runtime.images.labelled_grid(...).image``)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HW")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: What a step returns: a detached float tensor (K,) on the device, summed over the epoch;
#: entry 0 is the summed loss, the last entry the number of samples.
StepFn = Callable[[Any], torch.Tensor]


def _accumulate(step: StepFn, batches: Iterable[Any], log: MetricLogger, desc: str,
                sums: torch.Tensor, log_every: int, total: int | None) -> torch.Tensor:
    bar = log.progress(batches, desc, total)
    heartbeat = bar.disable and log.enabled and log.verbose >= 1   # no bar: plain lines
    total = bar.total if total is None else total
    last = time.monotonic()
    try:
        for i, batch in enumerate(bar):
            sums += step(batch)
            if log_every > 0 and (i + 1) % log_every == 0 and not bar.disable:
                bar.set_postfix(loss=f"{(sums[0] / sums[-1].clamp_min(1)).item():.4f}")  # display
            if heartbeat and time.monotonic() - last >= log.heartbeat_s:
                loss = (sums[0] / sums[-1].clamp_min(1)).item()   # one read a heartbeat
                log.line(f"  {desc}: {i + 1}/{total if total else '?'} batches, loss {loss:.4f}")
                last = time.monotonic()
    finally:
        bar.close()
    return sums


def train_one_epoch(model: nn.Module, step: StepFn, batches: Iterable[Any], log: MetricLogger,
                    desc: str, sums: torch.Tensor, log_every: int = 20,
                    total: int | None = None) -> torch.Tensor:
    """``model.train()``, then ``step(batch)`` for every batch (the step runs forward,
    backward and the optimiser), its statistics added into ``sums`` (zeros (K,) on the device,
    as the step returns); returns ``sums``."""
    model.train()
    return _accumulate(step, batches, log, desc, sums, log_every, total)


@torch.no_grad()
def evaluate(model: nn.Module, step: StepFn, batches: Iterable[Any], log: MetricLogger,
             desc: str, sums: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``model.eval()`` and ``step(batch)`` for every batch without gradients, its statistics
    added into ``sums``; returns ``sums`` (a process with no batch returns them unchanged)."""
    model.eval()
    return _accumulate(step, batches, log, desc, sums, 0, total)


def batch_sums(loss: torch.Tensor, n: int, summed: bool = False) -> torch.Tensor:
    """What a step returns for a batch of ``n`` samples: [loss x n, n] (float32, on the loss's
    device, no host copy) from the batch's mean ``loss``, or [loss, n] when ``summed``."""
    count = torch.full((), n, dtype=torch.float32, device=loss.device)
    total = loss.detach().float()
    return torch.stack([total if summed else total * count, count])


def per_sample_mean(sums: torch.Tensor) -> float:
    """Entry 0 of summed step statistics over their sample count (the last entry): the epoch's
    mean loss. One host read."""
    total, n = sums[0].item(), sums[-1].item()
    return total / max(n, 1.0)


def check_finite_training(model: nn.Module, epoch: int, train_loss: float, val_loss: float,
                          fix: str) -> None:
    """Stop a run whose loss or weights stopped being finite: ``TrainingDiverged`` (one line,
    ``fix`` says what to change) raised before the epoch's checkpoints are written, so the
    last good ones stay. One host read for all weights."""
    sums = [p.detach().float().sum() for p in model.parameters()]
    weights_ok = bool(torch.isfinite(torch.stack(sums)).all()) if sums else True
    if not (math.isfinite(train_loss) and math.isfinite(val_loss) and weights_ok):
        what = "weights" if not weights_ok else "loss"
        raise TrainingDiverged(f"epoch {epoch}: non-finite {what} (train loss {train_loss:.4g}, "
                               f"val loss {val_loss:.4g}); the checkpoints of the last good epoch "
                               f"are kept; {fix}")


def _value(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.5f}"
    return str(v)


def format_epoch_line(row: Mapping[str, Any], nb_epoch: int, patience: int,
                      no_improve: int) -> str:
    """The one epoch line of every training command::

        epoch 3/100  train_loss 0.12345  val_loss 0.23456  val_auc 0.81234  lr 1.00e-03  12.3 s  * best
        epoch 4/100  train_loss 0.11111  val_loss 0.24000  val_auc 0.80000  lr 1.00e-03  12.1 s  (1/10)

    ``row``: the history record (``epoch``, the values in order, ``lr``, ``seconds``, ``best``);
    the tail is ``* best`` for an improving epoch, else epochs without improvement / patience.
    """
    values = "  ".join(f"{k} {v:.2e}" if k == "lr" and isinstance(v, float) else f"{k} {_value(v)}"
                       for k, v in row.items() if k not in ("epoch", "seconds", "best"))
    tail = "* best" if row.get("best") else f"({no_improve}/{patience})"
    return (f"epoch {row['epoch']}/{nb_epoch}  {values}  {row.get('seconds', 0.0):.1f} s  {tail}")


def record_epoch(log: MetricLogger, state: RunState, decision: Decision,
                 values: Mapping[str, Any], nb_epoch: int, patience: int,
                 seconds: float) -> dict[str, Any]:
    """The end of every driver's epoch (after ``EarlyStopping.step``): one history record
    ``{"epoch", **values, "seconds", "best"}`` appended to ``state.history`` and the epoch line
    (``format_epoch_line``) printed. Returns the record."""
    row = {"epoch": state.epoch, **values, "seconds": seconds, "best": decision.improved}
    state.history.append(row)
    log.line(format_epoch_line(row, nb_epoch, patience, state.no_improve))
    return row
