"""The one fine-tuning run, shared by classification and segmentation.

A task module (``finetune.classification``, ``finetune.segmentation``) describes itself with a
:class:`Task` (its name, the checkpoint ``arch`` of its network, its data flags and a
``prepare`` function) and ``prepare`` returns a :class:`Prepared` run: the network, optimiser,
training step and loader, and an ``evaluate`` callable returning the validation values (its
data reading and metric stay in the task module). :func:`run_finetuning` then does the rest
the same way for both:

1. inputs before outputs: ``--output_dir`` outside every data folder, the ``--resume``
   checkpoint (a run of the same task), ``--width``/``--norm`` from the ``--weights``
   checkpoint (``finetune.inputs.resolve_model_flags``), the data (``prepare``, which refuses
   what cannot be measured), the content identity of every input, and for ``--resume`` the
   settings and inputs against the run's record (``finetune.inputs.check_resume`` under
   :func:`resume_policy`);
2. the output folder (``finetune.common.finetune_session``), the run state (``--resume``:
   ``runtime.training.restart_from_checkpoint``, which says the applied changes),
   ``config.json`` (what runs: resolved values, their sources, the inputs' identity);
3. :func:`fit`: the epochs, each ending with ``runtime.training.record_epoch`` (one history
   record, the epoch line and its "best" marker, as every training command);
4. :func:`finish`: the test set with the best weights, ``metrics.json`` and the summary line.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.common import finetune_session, load_best
from finetune.inputs import check_resume, data_identity, resolve_model_flags, resume_checkpoint
from models.checkpoint import CheckpointInfo
from runtime.cli import resume_path
from runtime.devices import resolve_device, seed_everything
from runtime.errors import InputError
from runtime.files import check_output_outside, save_json_atomic, write_run_config
from runtime.provenance import ResumePolicy
from runtime.training import (EarlyStopping, EpochCheckpoints, MetricLogger, RunState,
                              StepFn, check_finite_training, per_sample_mean, record_epoch,
                              restart_from_checkpoint, train_one_epoch)

__all__ = ["Task", "Prepared", "RESUME_APPLIED", "resume_policy", "prepare_run",
           "run_finetuning", "fit", "finish", "format_value"]

#: Flags a ``--resume`` may change: applied from the resumed epoch on, and said.
RESUME_APPLIED = frozenset({"nb_epoch", "patience"})
#: Keys of the recorded configuration a ``--resume`` does not compare as flags: the output
#: folder, the sources of defaults, and the inputs, which are compared by content instead.
_NOT_FLAGS = frozenset({"output_dir", "model_flags_from", "data_identity", "weights"})


@dataclass
class Prepared:
    """A run a task module set up (everything on ``device``).

    ``step``: one training batch -> [loss x n, n] on the device. ``set_epoch(e)``: seeds the
    order, crops and flips of epoch e (0-based). ``evaluate(log, epoch)``: the validation
    values with the current weights ({"loss", the task's metrics, ...}). ``test()``: the
    test values (None without a test set). ``history_keys``: validation values kept in the
    epoch record (as ``val_<key>``). ``summary``: (label, key) pairs of the final line.
    ``info``: the task's fields of ``metrics.json``. ``inputs``: {flag: [(name, path)]} of
    every file read (``finetune.inputs.input_files``). ``checkpoint_extra``: plain data stored
    in each checkpoint.
    """
    model: nn.Module
    model_config: dict[str, Any]
    optimizer: torch.optim.Optimizer
    step: StepFn
    train_loader: Iterable[Any]
    set_epoch: Callable[[int], None]
    evaluate: Callable[[MetricLogger, int], dict[str, Any]]
    test: Callable[[], dict[str, Any]] | None
    history_keys: Sequence[str]
    summary: Sequence[tuple[str, str]]
    info: dict[str, Any]
    inputs: dict[str, list[tuple[str, Path]]]
    loaded: list[str]
    device: torch.device
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: ``name`` ("classification" | "segmentation"), ``arch`` of its
    checkpoints, ``data_flags`` (flags naming input files or folders) and
    ``prepare(args, device) -> Prepared``."""
    name: str
    arch: str
    data_flags: tuple[str, ...]
    prepare: Callable[[argparse.Namespace, torch.device], Prepared]


def resume_policy(task: Task) -> ResumePolicy:
    """What a ``--resume`` of ``task`` may change: ``--nb_epoch`` and ``--patience`` are
    applied; every other flag that decides the result (lr, optimiser, seed, loss, monitor,
    width, norm, batch size, split, crops, labels, ...) must keep its recorded value; the
    data and ``--weights`` are compared by content (``finetune.inputs.check_resume``)."""
    return ResumePolicy(applied=RESUME_APPLIED, ignored=_NOT_FLAGS | set(task.data_flags))


def _check_outputs_outside_inputs(args: argparse.Namespace, task: Task) -> None:
    for flag in task.data_flags:
        value = getattr(args, flag, None)
        for p in ([value] if isinstance(value, str) else value or []):
            if Path(p).is_dir():
                check_output_outside(args.output_dir, [p], "--output_dir", f"--{flag}")


def prepare_run(args: argparse.Namespace, task: Task,
                resumed: tuple[Path, Mapping[str, Any]] | None = None
                ) -> tuple[Prepared, CheckpointInfo | None, dict[str, str]]:
    """(the prepared run, what ``--weights`` is, {flag: source}): the architecture flags
    resolved (``finetune.inputs.resolve_model_flags``), every RNG seeded from ``--seed``, then
    ``task.prepare``. Data order, crops, flips and the fresh head or decoder depend on
    ``--seed`` alone, never on ``--weights``: runs from two checkpoints (or from scratch) with
    one seed are paired."""
    weights, sources = resolve_model_flags(args, task.name, resumed)
    seed_everything(args.seed)
    return task.prepare(args, resolve_device(args.device)), weights, sources


def run_finetuning(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    """Fine-tune as ``args`` says (see the module docstring); returns the metrics dict also
    written to ``<output_dir>/metrics.json``."""
    out = Path(args.output_dir)
    _check_outputs_outside_inputs(args, task)
    resume = resume_path(args.resume, out / "last.pt")
    resumed = (resume, resume_checkpoint(resume, task.arch, task.name)) if resume else None
    run, weights, sources = prepare_run(args, task, resumed)
    inputs = dict(run.inputs, **({"weights": [("weights", Path(args.weights))]}
                                 if args.weights else {}))
    config = dict(vars(args), model_flags_from=sources, data_identity=data_identity(inputs))
    if resumed:
        check_resume(resumed[1]["config"], config, resume_policy(task), str(resume))
    with finetune_session(args), \
            MetricLogger(out / "tensorboard", args.verbose, flag="--output_dir") as log:
        log.line(f"model: width {args.width} ({sources['width']}), norm {args.norm} "
                 f"({sources['norm']}); "
                 + (f"{len(run.loaded)} tensors from {weights.description}" if weights
                    else "from scratch"))
        state = RunState()
        if resumed:
            state = restart_from_checkpoint(resume, run.model, run.optimizer, settings=config,
                                            policy=resume_policy(task))
            log.line(f"resumed from {resume}: epoch {state.epoch}")
        write_run_config(config, out)
        checkpoints = EpochCheckpoints(out / "best.pt", out / "last.pt", task.arch,
                                       run.model_config, config)
        t0 = time.time()
        stopped = fit(args, run, state, checkpoints, log)
        return finish(args, task, run, state, stopped, weights, time.time() - t0)


def fit(args: argparse.Namespace, run: Prepared, state: RunState,
        checkpoints: EpochCheckpoints, log: MetricLogger) -> bool:
    """Epochs ``state.epoch`` .. ``--nb_epoch`` of ``run``: train, validate, stop a diverged
    run, early-stop on ``--monitor`` (loss lower, anything else higher, by more than 1e-6,
    ``--patience`` epochs), record the epoch (``record_epoch``), write ``last.pt`` (and
    ``best.pt`` when it improved) and the curves. Returns whether early stopping ended it
    (also when a resumed run had already stopped)."""
    stopper = EarlyStopping(args.patience, "min" if args.monitor == "loss" else "max",
                            min_delta=1e-6)
    stopped = stopper.stopped(state)
    for epoch in range(state.epoch, 0 if stopped else args.nb_epoch):
        t0 = time.perf_counter()
        run.set_epoch(epoch)
        train_loss = per_sample_mean(train_one_epoch(
            run.model, run.step, run.train_loader, log, f"epoch {epoch + 1}/{args.nb_epoch}",
            torch.zeros(2, device=run.device)))
        v = run.evaluate(log, epoch + 1)
        check_finite_training(run.model, epoch + 1, train_loss, v["loss"],
                              "lower --lr, then --resume the last checkpoint")
        if v.get(args.monitor) is None:   # the task's input checks make it defined
            raise InputError(f"epoch {epoch + 1}: the validation {args.monitor} is undefined; "
                             "use --monitor loss")
        decision = stopper.step(state, v[args.monitor], v["loss"])
        if decision.improved:
            state.extra["best_val"] = v
        values = {"train_loss": train_loss, **{f"val_{k}": v.get(k) for k in run.history_keys},
                  "lr": run.optimizer.param_groups[0]["lr"]}
        record_epoch(log, state, decision, values, args.nb_epoch, args.patience,
                     time.perf_counter() - t0)
        checkpoints.save(state, decision.improved, run.model, run.optimizer,
                         extra={**run.checkpoint_extra, "val": v})
        log.scalars({"loss/train": train_loss, "loss/val": v["loss"],
                     **{f"val/{k}": v.get(k) for k in run.history_keys if k != "loss"}},
                    state.epoch)
        log.flush()
        if decision.stop:
            log.line(f"early stopping: {state.no_improve} epochs without a better validation "
                     f"{args.monitor}")
            return True
    return stopped


def format_value(values: Mapping[str, Any], key: str) -> str:
    """``values[key]`` for the summary line: 4 decimals, or "undefined" with the reason the
    task gave (``<key>_undefined``)."""
    v = values.get(key)
    if v is None:
        why = values.get(f"{key}_undefined")
        return "undefined" + (f" ({why})" if why else "")
    return f"{v:.4f}"


def finish(args: argparse.Namespace, task: Task, run: Prepared, state: RunState,
           stopped: bool, weights: CheckpointInfo | None, seconds: float) -> dict[str, Any]:
    """The end of every fine-tuning run: the test set evaluated with the ``best.pt`` weights,
    ``metrics.json`` written (atomically, last) and the summary line printed."""
    out = Path(args.output_dir)
    metrics: dict[str, Any] = {
        "task": task.name, "weights": args.weights, "init": "pretrained" if args.weights else "scratch",
        "weights_kind": weights.description if weights else None, "loaded_keys": len(run.loaded),
        "width": args.width, "norm": args.norm, **run.info,
        "best_epoch": state.best_epoch, "epochs_run": len(state.history),
        "stopped_early": stopped, "monitor": args.monitor, "val": state.extra.get("best_val", {}),
        "history": state.history, "resumes": state.extra.get("resumes", []), "seconds": seconds,
    }
    if run.test is not None:
        load_best(run.model, out)
        metrics["test"] = run.test()
    save_json_atomic(out / "metrics.json", metrics)
    if args.verbose:
        split = "test" if run.test is not None else "val"
        shown = ", ".join(f"{label} {format_value(metrics[split], key)}" for label, key in run.summary)
        if metrics[split].get("n_empty"):
            shown += f" ({metrics[split]['n_empty']} case(s) with an empty mask not in the means)"
        print(f"best epoch {state.best_epoch}; {split} {shown}; wrote {out / 'metrics.json'}")
    return metrics
