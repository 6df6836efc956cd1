"""Stage 1 of self-discovery: train the 3D U-Net autoencoder on whole volumes.

Every volume of ``--data_dir``/train and ``--data_dir``/validation is resized (anti-aliased
linear, as the published code's scikit-image call: ``self_discovery.volumes.resize_volume``) to
``--input_rows`` x ``--input_cols`` x ``--input_deps`` (128 x 128 x 64) and reconstructed by
``UNet3D(decoder="upsampling")`` (sigmoid output; BatchNorm momentum 0.01, eps 1e-3 as the
published Keras model). Loss MSE, Adam (lr 1e-3), the learning rate
halves after 20 epochs without a validation improvement of 1e-4 (down to 1e-6), training stops
after ``--patience`` (50) epochs without improvement. The best-validation checkpoint is
``<output_dir>/Unet_autoencoder.pt`` (where ``feature_extractor.py --weights`` points by
default), the last one ``Unet_autoencoder_last.pt`` (what ``--resume`` continues).

Run from the repository root::

    python self_discovery/train_autoencoder.py --data_dir dataset/
    torchrun --nproc_per_node=4 self_discovery/train_autoencoder.py --data_dir dataset/

Fixes of the reference script: its undefined ``batch_size`` (now ``--batch_size``); explicit
``--resume`` (optimizer, scheduler, epoch and early-stopping state) distinct from
``--weights`` (initial weights only). Kept on purpose: the last partial batch of an epoch is
trained on (the published code drops it), so every volume counts every epoch.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import time
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from models.checkpoint import load_checkpoint, load_state_dict_checked
from models.ynet3d import UNet3D, set_batchnorm
from pytorch.engine import make_optimizer
from pytorch.resume import apply_resumed_lr
from runtime.cli import (ArgumentParser, HelpFormatter, add_amp_flag, add_overwrite_flag,
                         add_resume_flag, add_verbosity_flag, nonneg_int, positive_float,
                         positive_int, resume_path, run_cli, seed_int)
from runtime.devices import autocast, device_name, resolve_amp, resolve_device, seed_everything
from runtime.distributed import (DistInfo, all_reduce_sum, barrier, distributed_session,
                                 shard_indices)
from runtime.errors import InputError
from runtime.files import output_session, write_run_config
from runtime.provenance import ResumePolicy
from runtime.training import (DATA_IDENTITY, EarlyStopping, EpochCheckpoints, MetricLogger,
                              RunState, batch_sums, check_finite_training,
                              check_resume_checkpoint, evaluate, per_sample_mean, record_epoch,
                              restart_from_checkpoint, train_one_epoch,
                              unfinished_checkpoint)
from self_discovery.volumes import (ResizedVolumeDataset, describe_volume_changes, list_volumes,
                                    volume_identities)
from self_discovery.montage import reconstruction_grid

__all__ = ["BEST_NAME", "LAST_NAME", "ARCH", "build_parser", "build_autoencoder", "model_config",
           "plateau_scheduler", "train_step", "train", "main", "BN_MOMENTUM", "BN_EPS",
           "RESUME_POLICY"]

BEST_NAME = "Unet_autoencoder.pt"
LAST_NAME = "Unet_autoencoder_last.pt"
ARCH = "UNet3D"
#: Normalisation of the autoencoder: ordinary BatchNorm (running statistics in eval mode), as
#: the reference's Keras model, so that a volume's features do not depend on its batch.
NORM = "standard"
#: BatchNorm constants of the published Keras autoencoder (momentum 0.99, epsilon 1e-3) in
#: PyTorch terms; its running statistics are what the features are computed with.
BN_MOMENTUM, BN_EPS = 0.01, 1e-3
#: ``--resume``: more epochs or patience, another learning rate or lr patience (the advice of a
#: diverged run), another precision are applied and said; every other flag must keep its
#: recorded value. The volumes are compared by content (``volume_identities``), not by path;
#: --weights only initialised the run the checkpoint continues.
RESUME_POLICY = ResumePolicy(applied=("nb_epoch", "patience", "lr", "lr_patience", "amp"),
                             ignored=("output_dir", "data_dir", "weights"))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Self-discovery stage 1: train the 3D U-Net autoencoder whose bottleneck "
                    "features rank patients by similarity (feature_extractor.py uses it).",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", required=True,
                   help="folder holding train/ and validation/ with one float32 .npy volume "
                        "(x, y, z) in [0, 1] per patient (scripts/prepare_dataset.py)")
    g.add_argument("--input_rows", type=positive_int, default=128, help="volumes are resized to this x size")
    g.add_argument("--input_cols", type=positive_int, default=128, help="volumes are resized to this y size")
    g.add_argument("--input_deps", type=positive_int, default=64,
                   help="volumes are resized to this z size (all three divisible by 8)")
    g.add_argument("--num_workers", type=nonneg_int, default=4,
                   help="DataLoader worker processes reading and resizing volumes")
    g.add_argument("--cache", action="store_true",
                   help="read and resize every volume once and keep them in memory "
                        "(4 MiB per volume at 128x128x64); faster epochs")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="Unet", choices=["Unet"],
                   help="autoencoder architecture (the reference offers only the 3D U-Net)")
    g.add_argument("--decoder", default="upsampling", choices=["upsampling", "transpose"],
                   help="decoder upsampling: nearest-neighbour (the method) or transposed conv")
    g.add_argument("--width", type=positive_int, default=32,
                   help="base channels w; the bottleneck (feature size) has 16*w channels")
    g.add_argument("--weights", default=None,
                   help="initial weights (a checkpoint of this autoencoder); training starts at "
                        "epoch 0 with a fresh optimizer. Not a resume: see --resume")
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=positive_int, default=8, help="volumes per step (per process)")
    g.add_argument("--nb_epoch", type=nonneg_int, default=10000,
                   help="maximum number of epochs; early stopping usually ends training first")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    g.add_argument("--lr_patience", type=positive_int, default=20,
                   help="halve the learning rate after this many epochs without a validation "
                        "improvement of 1e-4 (minimum lr 1e-6)")
    g.add_argument("--patience", type=positive_int, default=50,
                   help="stop after this many epochs without a validation-loss improvement")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of weights init and shuffling")
    g.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda (auto: cuda when present)")
    add_amp_flag(g)
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", "--checkpoint_dir", dest="output_dir",
                   default="self_discovery/Checkpoints/Autoencoder",
                   help=f"where {BEST_NAME} (best validation loss), {LAST_NAME} (last epoch) "
                        "and config.json are written")
    add_resume_flag(g, f"<output_dir>/{LAST_NAME}",
                    "weights, optimizer, lr schedule, epoch, early stopping")
    add_overwrite_flag(g, f"{BEST_NAME} and {LAST_NAME}")
    g.add_argument("--log_dir", default="runs/autoencoder",
                   help="TensorBoard folder (losses, lr, middle-slice input|reconstruction)")
    add_verbosity_flag(g, "1: one line per epoch and progress bars; 2: also lr changes and "
                          "checkpoint saves")
    return p


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """Constructor arguments of the autoencoder, stored in the checkpoint."""
    return {"n_class": 1, "width": int(args.width), "decoder": args.decoder, "norm": NORM,
            "in_channels": 1, "bn_momentum": BN_MOMENTUM, "bn_eps": BN_EPS}


def build_autoencoder(width: int = 32, decoder: str = "upsampling", norm: str = NORM) -> UNet3D:
    """The stage-1 autoencoder: (N, 1, X, Y, Z) -> (N, 1, X, Y, Z) in [0, 1] (sigmoid), with
    the Keras BatchNorm constants (``BN_MOMENTUM``, ``BN_EPS``)."""
    model = UNet3D(n_class=1, width=width, decoder=decoder, norm=norm)  # type: ignore[arg-type]
    return set_batchnorm(model, BN_MOMENTUM, BN_EPS)


def plateau_scheduler(optimizer: torch.optim.Optimizer, lr_patience: int
                      ) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """Halve the lr after ``lr_patience`` epochs without a validation gain of 1e-4 (min 1e-6).

    Keras counts the epochs without improvement and reduces when the count reaches its
    patience; PyTorch reduces when the count exceeds it, hence ``lr_patience - 1``.
    """
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=lr_patience - 1, threshold=1e-4,
        threshold_mode="abs", min_lr=1e-6)


def _autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """The autocast of ``--amp`` (auto: bf16 on CUDA, a no-op on CPU)."""
    return autocast(device, resolve_amp(amp, device))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               amp: str = "fp32") -> torch.Tensor:
    """One Adam step of MSE reconstruction on a batch x (N, 1, X, Y, Z); returns the detached
    loss (a device tensor: no host synchronisation)."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(x.device, amp):
        out = model(x)                                    # (N, 1, X, Y, Z)
    loss = F.mse_loss(out.float(), x)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _check_args(args: argparse.Namespace) -> None:
    """Cross-flag checks (single values are checked by the argparse types)."""
    size = (args.input_rows, args.input_cols, args.input_deps)
    if any(s % 8 for s in size):
        raise InputError(f"--input_rows/--input_cols/--input_deps {size}: each must be a "
                         "multiple of 8 (three 2x poolings)")
    if args.resume and args.weights:
        raise InputError("--resume and --weights exclude each other: --resume continues a run, "
                         "--weights only initialises a new one")


def _check_inputs(args: argparse.Namespace) -> tuple[dict, dict[str, tuple]]:
    """Every input, before the output folder is looked at: the volumes (their content
    identity returned, so a mistyped --data_dir is named first) and, for ``--resume``, the
    checkpoint's recorded settings (``RESUME_POLICY``) and volumes. Returns (identity, flag
    changes the resume applies)."""
    identity = volume_identities(args.data_dir)
    resume = resume_path(args.resume, Path(args.output_dir) / LAST_NAME)
    if resume is None:
        return identity, {}
    applied = check_resume_checkpoint(resume, vars(args), RESUME_POLICY, identity,
                                      describe_volume_changes)
    return identity, applied


def _loader(ds: ResizedVolumeDataset | Subset, sampler, batch_size: int, workers: int,
            device: torch.device) -> DataLoader:
    """DataLoader over ``ds`` in ``sampler`` order (None: file order); no workers once the
    volumes are preloaded (``--cache``)."""
    base = ds.dataset if isinstance(ds, Subset) else ds
    workers = 0 if base.preloaded else workers
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      drop_last=False)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run stage 1 as configured by ``args`` (see ``build_parser``).

    Returns ``{"history": [{"epoch", "train_loss", "val_loss", "lr", "seconds"}, ...],
    "best_loss", "epoch", "best_path", "last_path"}`` (the history of this invocation only).
    """
    _check_args(args)
    identity, applied = _check_inputs(args)
    ckpt_dir = Path(args.output_dir)
    with distributed_session(resolve_device(args.device)) as (info, device), \
            output_session(ckpt_dir, "--output_dir", [ckpt_dir / BEST_NAME, ckpt_dir / LAST_NAME],
                           args.overwrite, continuing=bool(args.resume), enabled=info.is_main,
                           unfinished=unfinished_checkpoint(ckpt_dir / LAST_NAME, args.nb_epoch,
                                                            args.patience)), \
            MetricLogger(args.log_dir, args.verbose) as log:  # rank 0 only
        return _train(args, info, device, log, identity, applied)


def _build(args: argparse.Namespace, info: DistInfo, device: torch.device, log: MetricLogger,
           applied: dict[str, tuple]
           ) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, Any, RunState]:
    """(model, net, optimizer, scheduler, state): the autoencoder on ``device``, the module to
    train (DDP around it under torchrun), and the run state (``--resume``d or new; the flag
    changes it ``applied`` take effect and are recorded in it)."""
    seed_everything(args.seed)   # same initial weights on every rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_autoencoder(args.width, args.decoder).to(device)
    optimizer = make_optimizer(model, args.lr, device)  # fused Adam: no per-step host reads
    scheduler = plateau_scheduler(optimizer, args.lr_patience)
    state = RunState()
    resume = resume_path(args.resume, Path(args.output_dir) / LAST_NAME)
    if resume is not None:
        state = restart_from_checkpoint(resume, model, optimizer, scheduler,
                                        expect={"width": args.width, "decoder": args.decoder})
        if "lr" in applied:
            apply_resumed_lr(optimizer, scheduler, *applied["lr"])
        scheduler.patience = args.lr_patience - 1      # the restored state holds the old one
        if applied:
            state.extra.setdefault("resumes", []).append(
                {"epoch": state.epoch, "changed": {k: list(v) for k, v in applied.items()}})
        log.line(f"resumed from {resume}: epoch {state.epoch}, best val loss "
                 f"{state.best_loss:.6f}")
    elif args.weights:
        ckpt = load_checkpoint(args.weights)
        load_state_dict_checked(model, ckpt["state_dict"], source=str(args.weights),
                                ignore_unexpected=["clc_out"])
        log.line(f"initial weights from {args.weights} (epoch counter and optimizer start fresh)")
    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, net, optimizer, scheduler, state


def _loaders(args: argparse.Namespace, info: DistInfo, device: torch.device, log: MetricLogger
             ) -> tuple[DistributedSampler, DataLoader, DataLoader]:
    """(train sampler, train loader, this rank's validation loader) over the resized volumes
    of ``--data_dir``/train and /validation."""
    data_dir = Path(args.data_dir)
    size = (args.input_rows, args.input_cols, args.input_deps)
    train_ds = ResizedVolumeDataset(list_volumes(data_dir / "train"), size)
    val_ds = ResizedVolumeDataset(list_volumes(data_dir / "validation"), size)
    if args.cache:
        train_ds.preload(log.enabled and args.verbose >= 1, "caching train", device)
        val_ds.preload(log.enabled and args.verbose >= 1, "caching validation", device)
    # DistributedSampler also for one process: epoch-seeded shuffles, reproducible on resume.
    train_sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                       shuffle=True, seed=args.seed, drop_last=False)
    train_loader = _loader(train_ds, train_sampler, args.batch_size, args.num_workers, device)
    val_part = Subset(val_ds, shard_indices(len(val_ds), info.rank, info.world_size))
    val_loader = _loader(val_part, None, args.batch_size, args.num_workers, device)
    log.line(f"autoencoder: {len(train_ds)} train / {len(val_ds)} validation volumes resized "
             f"to {size}, width {args.width}, device {device}"
             + (f" x {info.world_size} processes" if info.enabled else ""))
    return train_sampler, train_loader, val_loader


def _train(args: argparse.Namespace, info: DistInfo, device: torch.device,
           log: MetricLogger, identity: dict, applied: dict[str, tuple]) -> dict[str, Any]:
    ckpt_dir = Path(args.output_dir)
    model, net, optimizer, scheduler, state = _build(args, info, device, log, applied)
    train_sampler, train_loader, val_loader = _loaders(args, info, device, log)
    config = dict(vars(args), world_size=info.world_size,
                  resumes=state.extra.get("resumes", []), **{DATA_IDENTITY: identity})
    if info.is_main:
        write_run_config(dict(config, resolved_device=str(device),
                              n_train=len(train_loader.dataset),
                              n_val=len(val_loader.dataset.dataset)), ckpt_dir)
    stopper = EarlyStopping(args.patience)
    checkpoints = EpochCheckpoints(ckpt_dir / BEST_NAME, ckpt_dir / LAST_NAME, ARCH,
                                   model_config(args), config)
    grid_rows: list[list[torch.Tensor]] = []   # input | reconstruction of the first val volumes

    def train_batch(batch: Any) -> torch.Tensor:
        x = batch[0].to(device, non_blocking=True)                      # (N, 1, X, Y, Z)
        return batch_sums(train_step(net, optimizer, x, args.amp), x.shape[0])

    def val_batch(batch: Any) -> torch.Tensor:
        x = batch[0].to(device, non_blocking=True)
        with _autocast(device, args.amp):
            out = model(x)                                              # (N, 1, X, Y, Z)
        if log.curves and len(grid_rows) < 4:
            grid_rows.extend([x[i, 0].cpu(), out[i, 0].float().cpu()]
                             for i in range(min(4 - len(grid_rows), x.shape[0])))
        mse = F.mse_loss(out.float(), x, reduction="none").mean(dim=(1, 2, 3, 4)).sum()
        return batch_sums(mse, x.shape[0], summed=True)

    for epoch in range(state.epoch, 0 if stopper.stopped(state) else args.nb_epoch):
        t0 = time.perf_counter()
        train_sampler.set_epoch(epoch)
        sums = torch.zeros(4, device=device)               # train loss sum, n, val sum, n
        train_one_epoch(net, train_batch, train_loader, log, f"epoch {epoch + 1} train", sums[:2])
        if info.enabled:  # BatchNorm running statistics of rank 0 everywhere before validating
            for buf in model.buffers():
                torch.distributed.broadcast(buf, 0)
        grid_rows.clear()
        # unwrapped model: validation shards may differ in length between ranks
        evaluate(model, val_batch, val_loader, log, f"epoch {epoch + 1} val", sums[2:])
        train_loss, val_loss = (per_sample_mean(part) for part in all_reduce_sum(sums).split(2))
        check_finite_training(model, epoch + 1, train_loss, val_loss,
                              "lower --lr or try --amp fp32, then --resume the last checkpoint")
        decision = stopper.step(state, val_loss)
        old_lr = optimizer.param_groups[0]["lr"]
        scheduler.step(decision.value)                    # rank 0's value: the same on every rank
        lr = optimizer.param_groups[0]["lr"]
        if lr != old_lr:
            log.line(f"learning rate {old_lr:.2e} -> {lr:.2e}", 2)
        record_epoch(log, state, decision, {"train_loss": train_loss, "val_loss": val_loss,
                                            "lr": lr}, args.nb_epoch, args.patience,
                     time.perf_counter() - t0)
        checkpoints.save(state, decision.improved, model, optimizer, scheduler)
        if decision.improved:
            log.line(f"saved {checkpoints.best}", 2)
        log.scalars({"loss/train": train_loss, "loss/val": val_loss, "lr": lr}, state.epoch)
        if grid_rows:
            log.image("val/input|reconstruction", reconstruction_grid(grid_rows), state.epoch)
        log.flush()
        if decision.stop:
            log.line(f"early stopping: {state.no_improve} epochs without validation improvement")
            break
    barrier()
    return {"history": state.history, "best_loss": state.best_loss, "epoch": state.epoch,
            "is_main": info.is_main, "best_path": str(checkpoints.best),
            "last_path": str(checkpoints.last)}


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, train, argv, _report, "continue with --resume")


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if result["is_main"] and result["epoch"] and args.verbose >= 1:
        print(f"best validation loss {result['best_loss']:.6f}; checkpoint {result['best_path']}",
              flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
