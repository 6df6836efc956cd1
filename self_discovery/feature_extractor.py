"""Stage 2 of self-discovery: one deep feature vector per patient from the trained autoencoder.

For every volume of ``--data_dir``/train and ``--data_dir``/validation, in sorted file order:
resize to the size the autoencoder was trained at (its checkpoint's recorded
``--input_rows/--input_cols/--input_deps``, 128 x 128 x 64 for files that record none) as
stage 1 does (anti-aliased linear), run the autoencoder's encoder, global-average-pool the
bottleneck (N, 16w, X/8, Y/8, Z/8) -> one 16w-d vector (512-d at the published width 32).

Outputs in ``--output_dir`` (default ``self_discovery/features/``, where the pattern generator
looks), written atomically (``self_discovery/features_index.py``):

- ``train_features.npy`` (N_train, 16w) and ``validation_features.npy`` (N_val, 16w), float32;
- ``features_index.json``, written last: the file names per split in row order, every volume's
  size and SHA-256, the autoencoder checkpoint's path and identity, both feature files' sizes
  and SHA-256; the pattern generator checks all of it;
- ``config.json``: the resolved configuration.

``--import_features TRAIN VAL`` writes the same outputs for features made elsewhere (the
published extractor): their rows are put in sorted file order and the index is written.

Run from the repository root::

    python self_discovery/feature_extractor.py --data_dir dataset/ \\
        --weights self_discovery/Checkpoints/Autoencoder/Unet_autoencoder.pt
    torchrun --nproc_per_node=4 self_discovery/feature_extractor.py --data_dir dataset/ \\
        --weights self_discovery/Checkpoints/Autoencoder/Unet_autoencoder.pt
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.checkpoint import (DECODER_PREFIXES, checked_model_config, infer_model_config,
                               load_checkpoint, load_state_dict_checked, resolve_checkpoint_path)
from models.ynet3d import UNet3D, set_batchnorm
from runtime.cli import (ArgumentParser, HelpFormatter, add_amp_flag, add_overwrite_flag,
                         add_verbosity_flag, nonneg_int, positive_int, run_cli)
from runtime.devices import autocast, device_name, resolve_amp, resolve_device
from runtime.distributed import (DistInfo, all_gather_objects, barrier, distributed_session,
                                 is_main, shard_indices)
from runtime.errors import InputError
from runtime.files import check_output_outside, output_session, write_run_config
from runtime.provenance import file_identity, file_sha256
from self_discovery.features_index import (DEFAULT_WEIGHTS, IMPORT_ORDERS, INDEX_NAME, TRAIN_NAME,
                                           VAL_NAME, import_features, load_features,
                                           save_features)
from self_discovery.volumes import SPLITS, ResizedVolumeDataset, list_volumes

__all__ = ["TRAIN_NAME", "VAL_NAME", "INDEX_NAME", "SIZE_FLAGS", "DEFAULT_SIZE", "build_parser",
           "resolve_weights", "resolve_input_size", "load_encoder", "extract_features",
           "save_features", "file_sha256", "load_features", "import_features", "main"]

#: The input-size flags, in (x, y, z) order.
SIZE_FLAGS = ("input_rows", "input_cols", "input_deps")
#: The published input size, used for checkpoints that record none.
DEFAULT_SIZE = (128, 128, 64)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Self-discovery stage 2: one feature vector per patient (global-average-"
                    "pooled autoencoder bottleneck) for train and validation volumes.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", required=True,
                   help="folder holding train/ and validation/ with one .npy volume per patient "
                        "(the folder the autoencoder was trained on)")
    for flag, axis, default in zip(SIZE_FLAGS, "xyz", DEFAULT_SIZE):
        names = [f"--{flag}"] + (["--input_depth"] if flag == "input_deps" else [])
        g.add_argument(*names, dest=flag, type=positive_int, default=None,
                       help=f"volumes are resized to this {axis} size [default: the size the "
                            f"autoencoder was trained at, recorded in its checkpoint; else "
                            f"{default}]; another size than the recorded one is refused")
    g.add_argument("--batch_size", type=positive_int, default=8, help="volumes per forward pass")
    g.add_argument("--num_workers", type=nonneg_int, default=4,
                   help="DataLoader worker processes reading and resizing volumes")
    g = p.add_argument_group("model")
    g.add_argument("--weights", default=None,
                   help=f"autoencoder checkpoint from train_autoencoder.py, e.g. "
                        f"{DEFAULT_WEIGHTS} (required unless --import_features)")
    g.add_argument("--arch", default="Unet", choices=["Unet"], help="autoencoder architecture")
    g.add_argument("--width", type=positive_int, default=32,
                   help="base channels w; ignored when the checkpoint records its model_config")
    g.add_argument("--decoder", default="upsampling", choices=["upsampling", "transpose"],
                   help="decoder type; ignored when the checkpoint records its model_config")
    g.add_argument("--device", type=device_name, default="auto",
                   help="auto | cpu | cuda (auto: cuda when present)")
    add_amp_flag(g, default="fp32", note="; default fp32: bf16 is faster, but the features "
                 "then carry bf16 rounding")
    g = p.add_argument_group("features made elsewhere")
    g.add_argument("--import_features", nargs=2, metavar=("TRAIN", "VAL"), default=None,
                   help="instead of extracting: take these (N, D) feature files (e.g. from the "
                        "published extractor), put their rows in sorted file order and write "
                        "them with the index the pattern generator needs")
    g.add_argument("--import_order", choices=IMPORT_ORDERS, default="glob",
                   help="the volume order of the imported rows: glob = the unsorted order "
                        "glob.glob gives for <data_dir>/<split>/*.npy on this machine (the "
                        "published extractor's; valid only on the folder and file system it "
                        "ran on); sorted = sorted file names")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", "--save_dir", dest="output_dir",
                   default="self_discovery/features/",
                   help=f"where {TRAIN_NAME}, {VAL_NAME}, {INDEX_NAME} and config.json go")
    add_overwrite_flag(g, f"{TRAIN_NAME}, {VAL_NAME} and {INDEX_NAME}")
    add_verbosity_flag(g, "1 and 2: progress bars and a summary")
    return p


def resolve_weights(weights: str | os.PathLike) -> Path:
    """``weights``, or its ``.pt`` sibling when a missing ``.h5`` is given (the one rule of
    every stage: ``models.checkpoint.resolve_checkpoint_path``)."""
    return resolve_checkpoint_path(weights)


def resolve_input_size(args: argparse.Namespace, ckpt: Mapping[str, Any], source: str
                       ) -> tuple[tuple[int, int, int], dict[str, str]]:
    """(size (x, y, z), {flag: where its value came from}): the size the autoencoder was trained
    at (its checkpoint's ``config``), else ``DEFAULT_SIZE``; a flag given must agree with the
    recorded size (an encoder run at a size it never saw ranks patients differently)."""
    cfg = ckpt.get("config")
    cfg = cfg if isinstance(cfg, Mapping) else {}
    recorded = [cfg.get(f) for f in SIZE_FLAGS]
    known = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in recorded)
    given = [getattr(args, f) for f in SIZE_FLAGS]
    if known and any(g is not None and g != r for g, r in zip(given, recorded)):
        flags = " ".join(f"--{f} {g}" for f, g in zip(SIZE_FLAGS, given) if g is not None)
        raise InputError(f"{source}: the autoencoder was trained at "
                         f"{'x'.join(map(str, recorded))} (its recorded --input_rows/--input_cols/"
                         f"--input_deps), but {flags} was given; leave these flags out (the "
                         "trained size is used) or train the autoencoder at that size")
    base = recorded if known else list(DEFAULT_SIZE)
    where = "autoencoder checkpoint" if known else "default"
    size = tuple(int(g if g is not None else b) for g, b in zip(given, base))
    sources = {f: ("flag" if g is not None else where) for f, g in zip(SIZE_FLAGS, given)}
    if any(v % 8 for v in size):
        raise InputError(f"--input_rows/--input_cols/--input_deps {size}: each must be a "
                         "multiple of 8 (three 2x poolings)")
    return size, sources  # type: ignore[return-value]


def _encoder(ckpt: Mapping[str, Any], path: Path, width: int, decoder: str,
             device: torch.device | str) -> tuple[UNet3D, dict[str, Any]]:
    inferred = {} if ckpt.get("model_config") else infer_model_config(ckpt["state_dict"])[1]
    # BatchNorm constants: recorded by train_autoencoder.py; older checkpoints were trained
    # with PyTorch's defaults (momentum 0.1, eps 1e-5), which eps must then stay.
    cfg = checked_model_config(ckpt, str(path), {"width": width, "decoder": decoder,
                                                 "norm": "standard", "n_class": 1,
                                                 "bn_momentum": 0.1, "bn_eps": 1e-5, **inferred})
    cfg = {k: cfg[k] for k in ("width", "decoder", "norm", "n_class", "bn_momentum", "bn_eps")}
    model = UNet3D(n_class=cfg["n_class"], width=cfg["width"], decoder=cfg["decoder"],
                   norm=cfg["norm"])
    set_batchnorm(model, cfg["bn_momentum"], cfg["bn_eps"])
    load_state_dict_checked(model, ckpt["state_dict"], source=str(path),
                            new_keys=DECODER_PREFIXES,
                            ignore_unexpected=(*DECODER_PREFIXES, "clc_out"))
    return model.to(device).eval(), cfg


def load_encoder(weights: str | os.PathLike, width: int = 32, decoder: str = "upsampling",
                 device: torch.device | str = "cpu") -> tuple[UNet3D, dict[str, Any]]:
    """Build the autoencoder from a checkpoint and load its encoder weights; eval mode.

    Without ``model_config`` (a published file) width and decoder are read from the weights;
    ``width``/``decoder`` are the fallback when even that fails. Decoder and head weights are
    optional (only the encoder is used). Returns (model, model_config used).
    """
    path = resolve_weights(weights)
    return _encoder(load_checkpoint(path), path, width, decoder, device)


@torch.no_grad()
def extract_features(model: UNet3D, dataset: ResizedVolumeDataset | Subset, batch_size: int = 8,
                     device: torch.device | str = "cpu", num_workers: int = 0, amp: str = "fp32",
                     progress: bool = False, desc: str = "features"
                     ) -> tuple[np.ndarray, list[int]]:
    """Global-average-pooled bottleneck of every item of ``dataset``.

    Items are (volume (1, X, Y, Z), index in the file list). Returns (features (N, 16w)
    float32, the items' indices in row order). With ``norm="batch_stats"`` models each volume runs alone, so a feature
    never depends on which volumes share its batch.
    """
    device = torch.device(device)
    if getattr(model.down_tr64.ops[0].bn1, "norm", "standard") == "batch_stats" and batch_size > 1:
        warnings.warn("model normalises with batch statistics: extracting one volume at a time "
                      "so features do not depend on the batch", stacklevel=2)
        batch_size = 1
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats: list[torch.Tensor] = []
    order: list[int] = []
    ctx = autocast(device, resolve_amp(amp, device))
    for x, idx in tqdm(loader, desc=desc, disable=None if progress else True):
        x = x.to(device, non_blocking=True)                       # (B, 1, X, Y, Z)
        with ctx:
            bottleneck = model.encode(x)                          # (B, 16w, X/8, Y/8, Z/8)
        feats.append(bottleneck.float().mean(dim=(2, 3, 4)))      # (B, 16w), stays on device
        order += [int(i) for i in idx]
    dim = model.bottleneck_channels
    out = torch.cat(feats).cpu().numpy() if feats else np.zeros((0, dim), np.float32)
    return out.astype(np.float32, copy=False), order


def _gather_in_order(feats: np.ndarray, order: list[int], n: int, dim: int) -> np.ndarray | None:
    """Collect every rank's rows; rank 0 gets (n, dim) in file order, the others None."""
    parts = all_gather_objects((feats, order))
    if is_main():
        full = np.full((n, dim), np.nan, np.float32)
        for part_feats, part_order in parts:
            if len(part_order):
                full[np.asarray(part_order)] = part_feats
        if np.isnan(full).any():
            raise RuntimeError("feature gathering left rows empty")
        return full
    return None


def _check_inputs(args: argparse.Namespace) -> None:
    """Cross-flag checks and the inputs, before any output is touched."""
    if args.import_features and args.weights:
        raise InputError("--import_features takes features made elsewhere and --weights "
                         "extracts them here: give one of the two")
    if not args.import_features and not args.weights:
        raise InputError(f"--weights is required: the autoencoder checkpoint of "
                         f"train_autoencoder.py (e.g. {DEFAULT_WEIGHTS}), or --import_features "
                         "for features made elsewhere")
    for split in SPLITS:   # a mistyped --data_dir is named before the output folder is looked at
        list_volumes(Path(args.data_dir) / split)
    check_output_outside(args.output_dir, [Path(args.data_dir) / sp for sp in SPLITS],
                         "--output_dir", "--data_dir")


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Extract (or import) and save the features as configured by ``args``; returns a summary
    on rank 0."""
    _check_inputs(args)
    save = Path(args.output_dir)
    outputs = [save / n for n in (TRAIN_NAME, VAL_NAME, INDEX_NAME)]
    unfinished = (f"no {INDEX_NAME}: the extraction was interrupted"
                  if not outputs[2].exists() else None)
    if args.import_features:
        with output_session(save, "--output_dir", outputs, args.overwrite, continue_flag=None,
                            unfinished=unfinished):
            shapes = import_features(tuple(args.import_features), args.data_dir, save,
                                     args.import_order)
            write_run_config(dict(vars(args), input_size_from="imported"), save)
        if args.verbose >= 1:
            print(f"features imported: train {shapes['train']}, validation "
                  f"{shapes['validation']} in sorted file order -> {save}", flush=True)
        return {**shapes, "output_dir": str(save)}
    weights = resolve_weights(args.weights)
    ckpt = load_checkpoint(weights)
    size, sources = resolve_input_size(args, ckpt, str(weights))
    with distributed_session(resolve_device(args.device)) as (info, device), \
            output_session(save, "--output_dir", outputs, args.overwrite, continue_flag=None,
                           enabled=info.is_main, unfinished=unfinished):
        if info.is_main and args.verbose >= 1:
            print("input size: " + ", ".join(f"--{f} {v} ({sources[f]})"
                                             for f, v in zip(SIZE_FLAGS, size)), flush=True)
        model, cfg = _encoder(ckpt, weights, args.width, args.decoder, device)
        return _run(args, info, device, size, sources, model, cfg, weights)


def _run(args: argparse.Namespace, info: DistInfo, device: torch.device,
         size: tuple[int, int, int], sources: dict[str, str], model: UNet3D,
         cfg: dict[str, Any], weights: Path) -> dict[str, Any] | None:
    data_dir = Path(args.data_dir)
    files = {split: list_volumes(data_dir / split) for split in SPLITS}
    dim = model.bottleneck_channels
    progress = info.is_main and args.verbose >= 1
    results: dict[str, np.ndarray | None] = {}
    for split in SPLITS:
        ds = ResizedVolumeDataset(files[split], size)
        part = Subset(ds, shard_indices(len(ds), info.rank, info.world_size))
        feats, order = extract_features(model, part, args.batch_size, device, args.num_workers,
                                        args.amp, progress, desc=f"{split} features")
        results[split] = _gather_in_order(feats, order, len(ds), dim)
    summary = None
    if info.is_main:
        save_dir = Path(args.output_dir)
        train_feats, val_feats = results["train"], results["validation"]
        assert train_feats is not None and val_feats is not None
        save_features(save_dir, train_feats, val_feats, {
            "train": [f.name for f in files["train"]],
            "validation": [f.name for f in files["validation"]],
            "source": "feature_extractor.py", "weights": str(weights.resolve()),
            "weights_identity": file_identity(weights), "feature_dim": dim,
            "input_size": list(size), "input_size_from": sources, "model_config": cfg},
            data_dir=data_dir)
        write_run_config(dict(vars(args), **dict(zip(SIZE_FLAGS, size)),
                              input_size_from=sources, resolved_device=str(device),
                              world_size=info.world_size, model_config=cfg), save_dir)
        summary = {"train": train_feats.shape, "validation": val_feats.shape,
                   "output_dir": str(save_dir)}
        if args.verbose >= 1:
            print(f"features: train {train_feats.shape}, validation {val_feats.shape} float32 "
                  f"-> {save_dir}", flush=True)
    barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
