"""Pretrain Semantic Genesis (Y-Net 3D) on self-discovered anatomical patterns (stage 4).

    python pytorch/train.py --data_dir self_discovery/Semantic_Genesis_data
    torchrun --nproc_per_node=4 pytorch/train.py --data_dir ...      # DistributedDataParallel

Self-classification + self-restoration: the network sees a perturbed cube (elastic deformation,
then one of local pixel shuffling / non-linear intensity / in-painting / out-painting) and must
name its anatomical-pattern class and restore the original. Loss = lambda_cls * CE + lambda_rec
* MSE; Adam; lr x0.5 every 40 epochs; early stopping on the validation loss. Validation inputs
are perturbed once and visited in one class-mixing order drawn from ``--seed``.

Outputs: ``Checkpoints/<exp>/semantic_genesis_chest_ct.pt`` (best validation loss; the file the
fine-tuning snippet loads), ``..._last.pt`` (after every epoch; ``--resume`` it), the resolved
configuration ``..._config.json`` beside them, TensorBoard logs under ``runs/``, and the
per-epoch pretext diagnostics ``..._diagnostics.json``.

The data flags (cube size, classes, instances, resolutions) default to the pattern generator's
``config.json`` in ``--data_dir`` (``pytorch.manifest``), else to the paper's values; flags given
override both. The values used and where each came from are logged and kept in the configuration.

Diagnostics (every epoch, on the validation cubes, whose patients training never sees): the
self-classification top-1 accuracy against chance (1/C); for each of the four transformations
the restoration gain 1 - MSE(restored, original) / MSE(perturbed, original) (en_de); and, with
``--probe_data``/``--probe_labels``, a linear probe of the frozen, globally pooled encoder
features on a labelled target set (cross-validated logistic regression; epoch 0 = the random
initialisation). They appear on the epoch line and in TensorBoard under ``diag/``.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
import re
import time
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from models.checkpoint import DECODER_PREFIXES, load_pretrained
from pytorch.data import (BatchFeeder, PretrainingCubes, derive_seed, epoch_permutation,
                          fold_data_identity, load_pretraining_data, validation_order)
from pytorch.diagnostics import PretextDiagnostics
from pytorch.engine import (LossConfig, build_model, convert_sync_batchnorm, eval_step,
                            make_optimizer, make_scheduler, perturb_inputs, prepare_model_for_speed,
                            restoration_sums, summarize_stats, train_step)
from pytorch.manifest import resolve_data_flags
from pytorch.perturbations import OPERATIONS
from pytorch.preview import PREVIEW_TAG, restoration_preview
from pytorch.probe import load_probe_set
from pytorch.resume import (PRETRAINING_POLICY, apply_resumed_lr, check_pretraining_checkpoint,
                            describe_identity_changes)
from runtime import distributed as D
from runtime.cli import (ArgumentParser, HelpFormatter, add_amp_flag, add_hu_flags,
                         add_overwrite_flag, add_resume_flag, add_verbosity_flag, check_hu_window,
                         nonneg_float, nonneg_int, positive_float, positive_int, resume_path,
                         run_cli, seed_int)
from runtime.devices import (device_name, enable_fast_math, full_device, resolve_amp,
                             resolve_device, seed_everything)
from runtime.errors import InputError
from runtime.files import output_session, write_run_config
from runtime.training import (DATA_IDENTITY, Decision, EarlyStopping, EpochCheckpoints,
                              MetricLogger, RunState, check_finite_training,
                              check_resume_checkpoint, evaluate, record_epoch,
                              restart_from_checkpoint, train_one_epoch,
                              unfinished_checkpoint)
from self_discovery.fold_files import fold_blocks

CHECKPOINT_NAME = "semantic_genesis_chest_ct"
_VAL_CHUNK = 64  # validation perturbations are drawn per chunk of this many cubes


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults are the paper's / published code's."""
    p = ArgumentParser(
        prog="train.py",
        description="Pretrain Semantic Genesis (Y-Net 3D: self-classification + "
                    "self-restoration) on the fold files of self-discovered anatomical "
                    "patterns. Run with torchrun for multi-GPU (DistributedDataParallel).",
        formatter_class=HelpFormatter)
    _data_flags(p.add_argument_group("data"))
    _model_flags(p.add_argument_group("model and loss"))
    _optimisation_flags(p.add_argument_group("optimisation"))
    _device_flags(p.add_argument_group("device and speed"))
    _diagnostics_flags(p.add_argument_group("diagnostics"))
    _output_flags(p.add_argument_group("outputs and logging"))
    return p


def _data_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--data_dir", required=True,
                   help="folder with the fold files train_data{r}_vwGen_ex_ref_fold{k}.0.npy, "
                        "train_label{r}_..., val_data1_..., val_label1_... (written by "
                        "self_discovery/pattern_generator_3D.py)")
    # Data flags: None = from the data folder's config.json, else the paper's value (manifest.py)
    g.add_argument("--input_rows", type=positive_int, default=None,
                   help="cube size x (divisible by 8) [default: config.json in --data_dir, "
                        "else 64]")
    g.add_argument("--input_cols", type=positive_int, default=None,
                   help="cube size y (divisible by 8) [default: config.json, else 64]")
    g.add_argument("--input_deps", type=positive_int, default=None,
                   help="cube size z (divisible by 8) [default: config.json, else 32]")
    g.add_argument("--cls_classes", type=positive_int, default=None,
                   help="number of anatomical-pattern classes C used (the paper: 44); the "
                        "first C classes of the fold files, which may hold more [default: "
                        "nb_classes of config.json, else 44]")
    g.add_argument("--nb_instances", type=positive_int, default=None,
                   help="training cubes per class and resolution in the fold files [default: "
                        "config.json, else 200]")
    g.add_argument("--nb_instances_val", "--nb_val_instances", dest="nb_instances_val",
                   type=positive_int, default=None,
                   help="validation cubes per class in the fold files [default: "
                        "nb_instances_val of config.json, else 30]")
    g.add_argument("--nb_multires_patch", type=positive_int, default=None,
                   help="resolutions used: train_data1..N (1 = single resolution) [default: 3 "
                        "or 1 by multi_res of config.json, else 3]")
    # the reference's flag, accepted so its commands run; unused (cubes are held in memory and
    # batches gathered on the device, no loader workers), so not shown in --help
    g.add_argument("--num_workers", type=nonneg_int, default=4, help=argparse.SUPPRESS)
    g.add_argument("--data_device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the cubes live: cuda (GPU memory), cpu (pinned host memory, "
                        "copied per batch); auto = the GPU when they fit in half of its free "
                        "memory")
    g.add_argument("--cube_dtype", choices=("auto", "float16", "float32"), default="auto",
                   help="storage type of the resident cubes; auto = float16 on CUDA (halves "
                        "memory: ~7 GB for 44 classes x 200 x 3), float32 on CPU")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="elastic deformation before the perturbation (published: always on; "
                        "--no-augment leaves only the four perturbations)")
    add_hu_flags(g, " (fold files in Hounsfield units only: the published pattern generator "
                    "saved un-normalised cubes; they are detected and normalised)")


def _model_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--exp", choices=("en_de", "en"), default="en_de",
                   help="en_de: Y-Net 3D (classification + restoration); en: encoder + "
                        "classification head only (cross-entropy, accuracy)")
    g.add_argument("--width", type=positive_int, default=32,
                   help="base channels of the network (32 = published; the bottleneck has "
                        "16x width channels)")
    g.add_argument("--norm", choices=("batch_stats", "standard"), default="batch_stats",
                   help="BatchNorm mode: batch_stats = the published normalisation with batch "
                        "statistics in train and eval mode; standard = running statistics in "
                        "eval mode")
    g.add_argument("--lambda_rec", type=nonneg_float, default=1.0, help="weight of the restoration MSE")
    g.add_argument("--lambda_cls", type=nonneg_float, default=0.01,
                   help="weight of the classification cross-entropy (en_de)")
    g.add_argument("--pre_path", default=None,
                   help="initialise en_de from this checkpoint (e.g. an --exp en run): encoder "
                        "and head are loaded, the decoder is new; mismatched keys are an error")


def _optimisation_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--batch_size", type=positive_int, default=64,
                   help="effective (global) batch size; under torchrun with N processes each "
                        "process takes batch_size // N cubes per step (the remainder is "
                        "dropped), so the optimisation matches one process")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    g.add_argument("--lr_step", type=positive_int, default=40, help="multiply the lr by --lr_gamma every "
                                                           "this many epochs")
    g.add_argument("--lr_gamma", type=positive_float, default=0.5, help="step-decay factor of the lr")
    g.add_argument("--nb_epoch", type=positive_int, default=10000,
                   help="maximum number of epochs (early stopping usually ends sooner)")
    g.add_argument("--patience", type=positive_int, default=50,
                   help="stop after this many epochs without a lower validation loss")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of initialisation, shuffling and perturbations; the same seed "
                        "gives the same run (on the same device and process count)")


def _device_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--device", type=device_name, default="auto", help="auto (CUDA if available), cpu or cuda")
    add_amp_flag(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last_3d memory format (default: on CUDA only)")
    g.add_argument("--multi_gpu", action="store_true",
                   help="reference flag, kept: multi-GPU training now means launching with "
                        "'torchrun --nproc_per_node=N pytorch/train.py ...' "
                        "(DistributedDataParallel); without torchrun this prints a note and "
                        "trains in one process")
    g.add_argument("--sync_bn", action="store_true",
                   help="under torchrun, synchronise BatchNorm: training-mode batch statistics "
                        "then span the samples of all processes (the effective batch), as with "
                        "one process; without it each process normalises over its own "
                        "batch_size // N cubes. The published batch-statistics mode is kept in "
                        "eval (local batch statistics). CUDA only")


def _diagnostics_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--probe_data", default=None,
                   help="labelled target cubes (.npy (N, X, Y, Z) in [0, 1], sides divisible by "
                        "8) for the representation probe: frozen encoder, global average "
                        "pooling, cross-validated logistic regression (AUC for 2 classes, else "
                        "accuracy), logged every --probe_every epochs; use patients that "
                        "pretraining does not see")
    g.add_argument("--probe_labels", default=None,
                   help="labels of --probe_data (.npy (N,) or text, one integer per cube)")
    g.add_argument("--probe_every", type=positive_int, default=1,
                   help="run the probe every this many epochs (and before the first)")


def _output_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--output_dir", "--checkpoint_dir", dest="output_dir", default=None,
                   help="folder of the checkpoints [default: Checkpoints/<exp>]; best-by-val "
                        f"is {CHECKPOINT_NAME}.pt, the last epoch {CHECKPOINT_NAME}_last.pt, "
                        f"the configuration {CHECKPOINT_NAME}_config.json")
    add_resume_flag(g, f"<output_dir>/{CHECKPOINT_NAME}_last.pt",
                    "weights, optimiser, scheduler, epoch, early-stopping state")
    add_overwrite_flag(g, f"the checkpoints {CHECKPOINT_NAME}.pt / _last.pt (e.g. the "
                          "published file placed in Checkpoints/en_de/)")
    g.add_argument("--log_dir", default="runs",
                   help="TensorBoard logs go to <log_dir>/<exp>_<time>[_<notes>]")
    g.add_argument("--log_every", type=nonneg_int, default=50,
                   help="update the progress bar's loss every this many steps (the only "
                        "in-epoch host synchronisation)")
    g.add_argument("--nb_preview", type=nonneg_int, default=4,
                   help="validation cubes shown each epoch in TensorBoard, one per "
                        "transformation first (original | perturbed | restored middle slices)")
    g.add_argument("--notes", default="", help="free text, appended to the TensorBoard run name "
                                               "and stored in the configuration")
    add_verbosity_flag(g, "1: progress bars and one line per epoch; 2: also the data and "
                          "model summary")


def _check_args(args: argparse.Namespace) -> None:
    """Cross-flag checks (single values are checked by the argparse types)."""
    for name in ("input_rows", "input_cols", "input_deps"):
        v = getattr(args, name)
        if v % 8:
            raise InputError(f"--{name} {v}: the network needs a multiple of 8")
    if args.resume and args.pre_path:
        raise InputError("--resume and --pre_path exclude each other: --resume continues a run "
                         "(weights included), --pre_path starts a new one from weights")
    if bool(args.probe_data) != bool(args.probe_labels):
        raise InputError("--probe_data and --probe_labels go together: give both or neither")
    if args.pre_path and args.exp != "en_de":
        raise InputError("--pre_path initialises --exp en_de from an en (or en_de) checkpoint")
    check_hu_window(args)


def _check_inputs(args: argparse.Namespace) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Every input, before the output folder is looked at: the fold files (present; their
    content identity returned), the checkpoint of ``--pre_path`` or ``--resume`` (of this
    stage; a resume also with this run's settings under ``PRETRAINING_POLICY`` and on the same
    data by content). Returns (data identity, flag changes a resume applies)."""
    identity = fold_data_identity(args.data_dir, args.cls_classes, args.nb_multires_patch)
    if args.pre_path:
        check_pretraining_checkpoint(args.pre_path, "--pre_path")
    resume = resume_path(args.resume, _checkpoint_paths(args)[1])
    if resume is None:
        return identity, {}
    check_pretraining_checkpoint(str(resume), "--resume")
    applied = check_resume_checkpoint(resume, vars(args), PRETRAINING_POLICY, identity,
                                      describe_identity_changes)
    return identity, applied


def _run_name(args: argparse.Namespace) -> str:
    notes = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.notes).strip("-")[:40]
    return f"{args.exp}_{time.strftime('%Y%m%d-%H%M%S')}" + (f"_{notes}" if notes else "")


def _choose_storage(args, device: torch.device) -> tuple[torch.dtype, torch.device]:
    dtype = {"float16": torch.float16, "float32": torch.float32}.get(
        args.cube_dtype, torch.float16 if device.type == "cuda" else torch.float32)
    if args.data_device == "cuda" and device.type != "cuda":
        raise InputError("--data_device cuda needs --device cuda")
    if args.data_device == "cpu" or device.type != "cuda":
        return dtype, torch.device("cpu")
    if args.data_device == "cuda":
        return dtype, device
    voxels = args.input_rows * args.input_cols * args.input_deps
    cubes = sum(c * (args.nb_instances * args.nb_multires_patch + 2 * args.nb_instances_val)
                for _, c in fold_blocks(args.cls_classes))
    need = cubes * voxels * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return dtype, (device if need < 0.5 * free else torch.device("cpu"))


@torch.no_grad()
def _fixed_val_inputs(val: PretrainingCubes, args: argparse.Namespace, device: torch.device
                      ) -> tuple[PretrainingCubes, torch.Tensor]:
    """Validation cubes with their perturbed inputs stacked on channel 1: (N, 2, X, Y, Z), and
    the (N,) index into ``OPERATIONS`` of each cube's perturbation (on the cubes' device).

    Perturbations are drawn once, chunk c of ``_VAL_CHUNK`` cubes from a generator seeded by
    (seed, c), so they are the same every epoch, for any process count and batch size, and
    early stopping follows the model, not the noise.
    """
    out = torch.empty((len(val), 2, *val.cubes.shape[2:]), dtype=val.cubes.dtype,
                      device=val.cubes.device, pin_memory=val.cubes.is_pinned())
    choices = torch.empty(len(val), dtype=torch.int64, device=val.cubes.device)
    for c, s in enumerate(range(0, len(val), _VAL_CHUNK)):
        e = min(len(val), s + _VAL_CHUNK)
        x = val.cubes[s:e].to(device, torch.float32)
        g = torch.Generator(device).manual_seed(derive_seed(args.seed, c, 0xFA1))
        y, ops = perturb_inputs(x, g, args.augment, return_choices=True)
        out[s:e, 0:1] = x.to(out.device, out.dtype)
        out[s:e, 1:2] = y.to(out.device, out.dtype)
        choices[s:e] = ops.to(choices.device)
    return PretrainingCubes(out, val.labels), choices


def _checkpoint_paths(args) -> tuple[Path, Path, Path]:
    folder = Path(args.output_dir) if args.output_dir else Path("Checkpoints") / args.exp
    return (folder / f"{CHECKPOINT_NAME}.pt", folder / f"{CHECKPOINT_NAME}_last.pt",
            folder / f"{CHECKPOINT_NAME}_config.json")


def _diagnostics_path(config_path: Path) -> Path:
    return config_path.with_name(f"{CHECKPOINT_NAME}_diagnostics.json")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run pretraining with parsed ``args``; returns a summary dict (best loss, epochs, paths).

    Raises a ``ReportedError`` on bad input or a diverged run (``main`` prints it).
    """
    args.data_flags_from = resolve_data_flags(args)  # also kept in the run's configuration
    _check_args(args)
    identity, applied = _check_inputs(args)
    if args.multi_gpu and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        print("note: --multi_gpu: multi-GPU training uses DistributedDataParallel; launch "
              "'torchrun --nproc_per_node=N pytorch/train.py ...'. Training in one process now.",
              file=sys.stderr)
    best_path, last_path, _ = _checkpoint_paths(args)
    with D.distributed_session(resolve_device(args.device)) as (info, device), \
            output_session(best_path.parent, "--output_dir", [best_path, last_path],
                           args.overwrite, continuing=bool(args.resume), enabled=info.is_main,
                           unfinished=unfinished_checkpoint(last_path, args.nb_epoch,
                                                             args.patience)), \
            MetricLogger(Path(args.log_dir) / _run_name(args), args.verbose) as log:
        return _train(args, info, full_device(device), log, identity, applied)


def _per_rank_batch(args: argparse.Namespace, info: D.DistInfo, device: torch.device) -> int:
    if args.sync_bn and not info.enabled and info.is_main:
        print("note: --sync_bn only matters under torchrun with several processes",
              file=sys.stderr)
    if args.sync_bn and info.enabled and device.type != "cuda":
        raise InputError("--sync_bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it on CPU")
    if args.batch_size // info.world_size < 1:
        raise InputError(f"--batch_size {args.batch_size} is smaller than the "
                         f"{info.world_size} processes; each process needs at least one cube")
    return args.batch_size // info.world_size


def _build(args: argparse.Namespace, info: D.DistInfo, device: torch.device, log: MetricLogger,
           applied: dict[str, tuple]
           ) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, Any, RunState]:
    """(model, net, optimizer, scheduler, state): the unwrapped model on ``device``, the module
    to train (DDP and/or compiled around it), and the run state (``--resume``d or new; the
    flag changes it ``applied`` are recorded in it, a new --lr takes effect)."""
    model = build_model(args.exp, args.cls_classes, args.width, args.norm)
    resume = resume_path(args.resume, _checkpoint_paths(args)[1])
    if resume is None and args.pre_path:
        loaded = load_pretrained(model, args.pre_path, new_keys=DECODER_PREFIXES)
        log.line(f"initialised {len(loaded)} tensors from {args.pre_path} (decoder new)")
    if args.sync_bn and info.enabled:
        model = convert_sync_batchnorm(model)
    model = prepare_model_for_speed(model, device, args.channels_last, compile=False)
    enable_fast_math(device)
    optimizer = make_optimizer(model, args.lr, device)
    scheduler = make_scheduler(optimizer, args.lr_step, args.lr_gamma)
    state = RunState()
    if resume is not None:
        state = restart_from_checkpoint(resume, model, optimizer, scheduler)
        if "lr" in applied:
            apply_resumed_lr(optimizer, scheduler, *applied["lr"])
        if applied:
            state.extra.setdefault("resumes", []).append(
                {"epoch": state.epoch, "changed": {k: list(v) for k, v in applied.items()}})
        log.line(f"resumed {resume}: {state.epoch} epochs done, best val loss "
                 f"{state.best_loss:.5f}, {state.no_improve} epoch(s) without improvement")
    net: torch.nn.Module = model
    if info.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None, gradient_as_bucket_view=True)
    if args.compile:
        net = torch.compile(net)
    return model, net, optimizer, scheduler, state


def _load_data(args: argparse.Namespace, device: torch.device
               ) -> tuple[tuple[PretrainingCubes, PretrainingCubes, torch.Tensor],
                          tuple[torch.dtype, torch.device]]:
    """((train cubes, validation cubes with their fixed perturbed inputs, each validation
    cube's perturbation), (storage dtype, storage device)): the fold files, resident."""
    dtype, data_device = _choose_storage(args, device)
    train_set, val_set = load_pretraining_data(
        args.data_dir, args.cls_classes, args.nb_instances, args.nb_instances_val,
        args.nb_multires_patch, (args.input_rows, args.input_cols, args.input_deps),
        dtype=dtype, device=data_device, pin_memory=device.type == "cuda",
        hu_min=args.hu_min, hu_max=args.hu_max, check_index=False)   # checked by _check_inputs
    val_set, val_choices = _fixed_val_inputs(val_set, args, device)
    return (train_set, val_set, val_choices), (dtype, data_device)


def _announce(log: MetricLogger, args: argparse.Namespace, config: dict[str, Any],
              model: torch.nn.Module, cube: tuple[int, ...], seconds: float) -> None:
    """The data and model summary (verbose 2) and the data flags with their sources."""
    log.line(f"data: {config['n_train']} train / {config['n_val']} val cubes {tuple(cube)} "
             f"({config['cube_dtype_resolved']} on {config['data_device_resolved']}, "
             f"{seconds:.1f} s); {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
             f"parameters; {config['world_size']} process(es) x batch "
             f"{config['per_rank_batch']}; amp {config['amp_resolved']}", 2)
    log.line("data flags: " + ", ".join(f"--{k} {getattr(args, k)} ({src})"
                                        for k, src in args.data_flags_from.items()))


def _train(args: argparse.Namespace, info: D.DistInfo, device: torch.device,
           log: MetricLogger, identity: dict[str, dict], applied: dict[str, tuple]
           ) -> dict[str, Any]:
    ws, rank = info.world_size, info.rank
    per_rank_batch = _per_rank_batch(args, info, device)
    amp_dtype = resolve_amp(args.amp, device)
    best_path, last_path, config_path = _checkpoint_paths(args)
    seed_everything(args.seed)

    t0 = time.time()
    (train_set, val_set, val_choices), (dtype, data_device) = _load_data(args, device)
    probe = load_probe_set(args.probe_data, args.probe_labels) if args.probe_data else None
    model, net, optimizer, scheduler, state = _build(args, info, device, log, applied)
    loss_cfg = LossConfig(args.exp, args.lambda_cls, args.lambda_rec)
    config = dict(vars(args), world_size=ws, per_rank_batch=per_rank_batch,
                  device_resolved=str(device), amp_resolved=str(amp_dtype or "fp32"),
                  cube_dtype_resolved=str(dtype).replace("torch.", ""),
                  data_device_resolved=str(data_device), n_train=len(train_set),
                  n_val=len(val_set), checkpoint=str(best_path), last_checkpoint=str(last_path),
                  resumes=state.extra.get("resumes", []), **{DATA_IDENTITY: identity})
    if info.is_main:
        write_run_config(config, config_path.parent, name=config_path.name)
    stopper = EarlyStopping(args.patience)
    checkpoints = EpochCheckpoints(best_path, last_path, type(model).__name__,
                                   {"cls_classes": args.cls_classes, "width": args.width,
                                    "norm": args.norm, "n_class": 1, "in_channels": 1}, config)
    diagnostics = PretextDiagnostics(args.cls_classes, _diagnostics_path(config_path),
                                     state.extra.setdefault("diagnostics", []), probe,
                                     args.probe_every, args.batch_size, args.seed)
    _announce(log, args, config, model, train_set.cubes.shape[2:], time.time() - t0)

    feeder = BatchFeeder(train_set, device, per_rank_batch)
    val_feeder = BatchFeeder(val_set, device, per_rank_batch)
    # One class-mixing order drawn from the seed, fixed for the run (as the inputs).
    val_idx = validation_order(len(val_set), args.seed, rank, ws).to(val_feeder.index_device)
    val_choices = val_choices.to(val_feeder.index_device)
    start_epoch, stopped_early = state.epoch, stopper.stopped(state)
    if stopped_early:
        log.line(f"early stopping already reached ({state.no_improve} >= --patience "
                 f"{args.patience})")
    elif info.is_main and state.epoch == 0:
        diagnostics.initial(model, device, log)
    restoration = torch.zeros(3, len(OPERATIONS), device=device)  # per-transform val sums
    generator = torch.Generator(device)                  # reseeded every epoch

    def train_batch(idx: torch.Tensor) -> torch.Tensor:
        original, labels = feeder(idx)                       # (B, 1, X, Y, Z), (B,)
        inputs = perturb_inputs(original, generator, args.augment)
        return train_step(net, optimizer, inputs, original, labels, loss_cfg, amp_dtype)

    def val_batch(idx: torch.Tensor) -> torch.Tensor:
        both, labels = val_feeder(idx)                       # (B, 2, X, Y, Z): original|input
        stats, restored = eval_step(model, both[:, 1:2], both[:, 0:1], labels, loss_cfg,
                                    amp_dtype)
        if restored is not None:
            ops = val_choices.index_select(0, idx).to(device, non_blocking=True)
            restoration.add_(restoration_sums(restored, both[:, 1:2], both[:, 0:1], ops))
        return stats

    for epoch in range(state.epoch, 0 if stopped_early else args.nb_epoch):
        t_epoch = time.time()
        generator.manual_seed(derive_seed(args.seed, epoch, rank, 0xA11))
        order = epoch_permutation(len(train_set), args.seed, epoch, rank, ws)
        batches = order.to(feeder.index_device).split(per_rank_batch)
        sums = train_one_epoch(net, train_batch, batches, log, f"epoch {epoch + 1} train",
                               torch.zeros(5, device=device), args.log_every)
        restoration.zero_()
        vsums = evaluate(model, val_batch, val_idx.split(per_rank_batch), log,  # per rank, no DDP
                         f"epoch {epoch + 1} val", torch.zeros(5, device=device))
        for t in (sums, vsums, restoration):
            D.all_reduce_sum(t)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        tr, va = summarize_stats(sums), summarize_stats(vsums)  # one host sync per epoch
        check_finite_training(model, epoch + 1, tr["loss"], va["loss"],
                              "lower --lr or use --amp fp32, then --resume the last checkpoint")
        decision = stopper.step(state, va["loss"])
        stopped_early, seconds = decision.stop, time.time() - t_epoch
        _log_epoch(log, state, decision, tr, va, lr, seconds, args)
        if info.is_main:  # the diagnostics line goes under the epoch line
            diagnostics.epoch(epoch + 1, va["acc"], restoration, model, device,
                              decision.stop or epoch + 1 == args.nb_epoch, log)
        checkpoints.save(state, decision.improved, model, optimizer, scheduler,
                         extra={"world_size": ws, "train": tr, "val": va, "lr": lr})
        if args.nb_preview > 0 and log.curves:
            log.image(PREVIEW_TAG, restoration_preview(model, val_set, val_choices, args.nb_preview,
                                                       device, amp_dtype, loss_cfg), epoch + 1)
        if decision.stop:
            log.line(f"early stopping: no lower validation loss for {args.patience} epochs")
            break
    D.barrier()
    if info.is_main and args.verbose >= 0:
        print(f"done: {state.epoch} epochs, best val loss {state.best_loss:.5f}; "
              f"best checkpoint {best_path}")
    return {"best_loss": state.best_loss, "epochs_run": state.epoch - start_epoch,
            "epoch": state.epoch, "stopped_early": stopped_early,
            "best_checkpoint": str(best_path), "last_checkpoint": str(last_path),
            "config": str(config_path), "diagnostics": diagnostics.history}


def _log_epoch(log: MetricLogger, state: RunState, decision: Decision, tr: dict[str, float],
               va: dict[str, float], lr: float, seconds: float, args: argparse.Namespace) -> None:
    """The history record, epoch line and TensorBoard curves of one pretraining epoch."""
    record_epoch(log, state, decision, {
        "train_loss": tr["loss"], "train_cls": tr["cls"], "train_rec": tr["rec"],
        "val_loss": va["loss"], "val_cls": va["cls"], "val_rec": va["rec"], "val_acc": va["acc"],
        "lr": lr}, args.nb_epoch, args.patience, seconds)
    log.scalars({"loss/train": tr["loss"], "loss/val": va["loss"], "cls/train": tr["cls"],
                 "cls/val": va["cls"], "rec/train": tr["rec"], "rec/val": va["rec"],
                 "acc/train": tr["acc"], "acc/val": va["acc"], "lr": lr,
                 "time/epoch_s": seconds,
                 "time/train_cubes_per_s": tr["n"] / max(seconds, 1e-9)}, state.epoch)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, train, argv, interrupted="continue with --resume")


if __name__ == "__main__":
    raise SystemExit(main())
