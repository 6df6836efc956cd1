"""Stage 2 of self-discovery: one deep feature vector per patient from the trained autoencoder.

For every volume of ``--data_dir``/train and ``--data_dir``/validation, in sorted file order:
resize to 128 x 128 x 64 as stage 1 (anti-aliased linear), run the autoencoder's encoder,
global-average-pool the bottleneck (N, 16w, 16, 16, 8) -> one 16w-d vector (512-d at the
published width 32).

Outputs in ``--output_dir`` (default ``self_discovery/features/``, where the pattern generator
looks), written atomically:

- ``train_features.npy`` (N_train, 16w) and ``validation_features.npy`` (N_val, 16w), float32;
- ``features_index.json``: ``{"train": [file names in row order], "validation": [...],
  "data_dir", "weights", "feature_dim", "input_size", "sha256"}``, written last;
  ``load_features`` checks it against the folder and both files' checksums, so features are
  never silently paired with the wrong patients nor train and validation features of two runs;
- ``config.json``: the resolved configuration.

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
import hashlib
import json
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.checkpoint import (DECODER_PREFIXES, checked_model_config, infer_model_config,
                               load_checkpoint, load_state_dict_checked)
from models.ynet3d import UNet3D, set_batchnorm
from runtime.cli import (add_verbosity_flag, ArgumentParser, HelpFormatter, add_amp_flag, add_overwrite_flag,
                         run_cli, nonneg_int, positive_int)
from runtime.devices import autocast, device_name, resolve_amp, resolve_device
from runtime.distributed import (DistInfo, all_gather_objects, barrier, distributed_session,
                                 is_main, shard_indices)
from runtime.errors import InputError
from runtime.files import (check_output_outside, output_session, save_json_atomic, save_npy_atomic,
                           write_run_config)
from self_discovery.volumes import SPLITS, ResizedVolumeDataset, list_volumes

__all__ = ["TRAIN_NAME", "VAL_NAME", "INDEX_NAME", "build_parser", "resolve_weights",
           "load_encoder", "extract_features", "save_features", "file_sha256", "load_features", "main"]

TRAIN_NAME = "train_features.npy"
VAL_NAME = "validation_features.npy"
INDEX_NAME = "features_index.json"
DEFAULT_WEIGHTS = "self_discovery/Checkpoints/Autoencoder/Unet_autoencoder.pt"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Self-discovery stage 2: one feature vector per patient (global-average-"
                    "pooled autoencoder bottleneck) for train and validation volumes.",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", required=True,
                   help="folder holding train/ and validation/ with one .npy volume per patient "
                        "(the folder the autoencoder was trained on)")
    g.add_argument("--input_rows", type=positive_int, default=128, help="volumes are resized to this x size")
    g.add_argument("--input_cols", type=positive_int, default=128, help="volumes are resized to this y size")
    g.add_argument("--input_deps", "--input_depth", dest="input_deps", type=positive_int, default=64,
                   help="volumes are resized to this z size (the reference's flag name)")
    g.add_argument("--batch_size", type=positive_int, default=8, help="volumes per forward pass")
    g.add_argument("--num_workers", type=nonneg_int, default=4,
                   help="DataLoader worker processes reading and resizing volumes")
    g = p.add_argument_group("model")
    g.add_argument("--weights", required=True,
                   help=f"autoencoder checkpoint from train_autoencoder.py, e.g. {DEFAULT_WEIGHTS}")
    g.add_argument("--arch", default="Unet", choices=["Unet"], help="autoencoder architecture")
    g.add_argument("--width", type=positive_int, default=32,
                   help="base channels w; ignored when the checkpoint records its model_config")
    g.add_argument("--decoder", default="upsampling", choices=["upsampling", "transpose"],
                   help="decoder type; ignored when the checkpoint records its model_config")
    g.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda (auto: cuda when present)")
    add_amp_flag(g, default="fp32", note="; default fp32: bf16 is faster, but the features "
                 "then carry bf16 rounding")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", "--save_dir", dest="output_dir", default="self_discovery/features/",
                   help=f"where {TRAIN_NAME}, {VAL_NAME}, {INDEX_NAME} and config.json go")
    add_overwrite_flag(g, f"{TRAIN_NAME}, {VAL_NAME} and {INDEX_NAME}")
    add_verbosity_flag(g, "1 and 2: progress bars and a summary")
    return p


def resolve_weights(weights: str | os.PathLike) -> Path:
    """``weights``, or its ``.pt`` sibling when a missing ``.h5`` is given (the original README
    shows the Keras file name ``Unet_autoencoder.h5``)."""
    path = Path(weights)
    if not path.exists() and path.suffix == ".h5" and path.with_suffix(".pt").exists():
        return path.with_suffix(".pt")
    return path


def load_encoder(weights: str | os.PathLike, width: int = 32, decoder: str = "upsampling",
                 device: torch.device | str = "cpu") -> tuple[UNet3D, dict[str, Any]]:
    """Build the autoencoder from a checkpoint and load its encoder weights; eval mode.

    Without ``model_config`` (a published file) width and decoder are read from the weights;
    ``width``/``decoder`` are the fallback when even that fails. Decoder and head weights are
    optional (only the encoder is used). Returns (model, model_config used).
    """
    path = resolve_weights(weights)
    ckpt = load_checkpoint(path)
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


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Extract and save the features as configured by ``args``; returns a summary on rank 0."""
    size = (args.input_rows, args.input_cols, args.input_deps)
    if any(s <= 0 or s % 8 for s in size):
        raise InputError(f"--input_rows/--input_cols/--input_deps {size}: each must be a "
                         "positive multiple of 8")
    if args.batch_size <= 0 or args.num_workers < 0:
        raise InputError("--batch_size must be positive and --num_workers >= 0")
    save = Path(args.output_dir)
    check_output_outside(save, [Path(args.data_dir) / sp for sp in SPLITS], "--output_dir",
                         "--data_dir")
    with distributed_session(resolve_device(args.device)) as (info, device), \
            output_session(save, "--output_dir", [save / n for n in (TRAIN_NAME, VAL_NAME, INDEX_NAME)],
                           args.overwrite, continue_flag=None, enabled=info.is_main):
        return _run(args, info, device, size)


def _run(args: argparse.Namespace, info: DistInfo, device: torch.device,
         size: tuple[int, int, int]) -> dict[str, Any] | None:
    data_dir = Path(args.data_dir)
    files = {split: list_volumes(data_dir / split) for split in SPLITS}
    model, cfg = load_encoder(args.weights, args.width, args.decoder, device)
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
            "data_dir": str(data_dir.resolve()),
            "weights": str(resolve_weights(args.weights).resolve()),
            "feature_dim": dim, "input_size": list(size), "model_config": cfg})
        write_run_config(dict(vars(args), resolved_device=str(device),
                              world_size=info.world_size, model_config=cfg), save_dir)
        summary = {"train": train_feats.shape, "validation": val_feats.shape,
                   "output_dir": str(save_dir)}
        if args.verbose >= 1:
            print(f"features: train {train_feats.shape}, validation {val_feats.shape} float32 "
                  f"-> {save_dir}", flush=True)
    barrier()
    return summary


def save_features(save_dir: str | os.PathLike, train_feats: np.ndarray, val_feats: np.ndarray,
                  index: dict[str, Any]) -> None:
    """Write both feature files, then ``index`` (file names per split, ...) with their SHA-256.

    The old index is removed first and written back last, so a run killed between the writes
    leaves features that :func:`load_features` refuses, never train features of one run next
    to validation features of another.
    """
    save_dir = Path(save_dir)
    (save_dir / INDEX_NAME).unlink(missing_ok=True)
    save_npy_atomic(save_dir / TRAIN_NAME, train_feats)
    save_npy_atomic(save_dir / VAL_NAME, val_feats)
    sums = {n: file_sha256(save_dir / n) for n in (TRAIN_NAME, VAL_NAME)}
    save_json_atomic(save_dir / INDEX_NAME, {**index, "sha256": sums})


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (features are small: N x 16w float32)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _describe_mismatch(split: str, indexed: list[str], current: list[str]) -> str:
    missing = [f for f in current if f not in set(indexed)]
    extra = [f for f in indexed if f not in set(current)]

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

    parts = []
    if missing:
        parts.append(f"not in the features: {names(missing)}")
    if extra:
        parts.append(f"features of files no longer there: {names(extra)}")
    if not parts:
        parts.append("same files in another order")
    return f"{split}/ " + "; ".join(parts)


def load_features(train_features_path: str | os.PathLike, val_features_path: str | os.PathLike,
                  data_dir: str | os.PathLike
                  ) -> tuple[np.ndarray, np.ndarray, list[Path], list[Path]]:
    """Load features and check they belong to the volumes now in ``data_dir``.

    The index (``features_index.json`` beside ``train_features_path``) must list exactly the
    sorted ``.npy`` files of ``data_dir``/train and ``data_dir``/validation, one per row.

    Returns:
        (train_feats (N_train, D) float32, val_feats (N_val, D) float32, train_files,
        val_files): the files are the volume paths in row order.

    Raises:
        InputError naming the mismatching files (re-run feature_extractor.py to fix).
    """
    train_features_path, val_features_path = Path(train_features_path), Path(val_features_path)
    data_dir = Path(data_dir)
    rerun = (f"re-run: python self_discovery/feature_extractor.py --data_dir {data_dir} "
             f"--weights {DEFAULT_WEIGHTS} --output_dir {train_features_path.parent}")
    feats = []
    for path in (train_features_path, val_features_path):
        if not path.is_file():
            raise InputError(f"{path}: features not found; {rerun}")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a readable .npy ({e}); {rerun}") from e
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"{path}: expected a float (N, D) array, got {arr.shape} {arr.dtype}; "
                             f"{rerun}")
        if not np.isfinite(arr).all():
            raise InputError(f"{path}: {int((~np.isfinite(arr)).any(axis=1).sum())} feature rows hold "
                             f"NaN or inf (a diverged autoencoder?); retrain the autoencoder, then "
                             f"{rerun}")
        feats.append(arr.astype(np.float32, copy=False))
    train_feats, val_feats = feats
    index_path = train_features_path.parent / INDEX_NAME
    if not index_path.is_file():
        raise InputError(f"{index_path}: no index of which file each feature row belongs to "
                         f"(an interrupted extraction, or features from an older extractor); "
                         f"{rerun} --overwrite")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        indexed = {split: list(index[split]) for split in SPLITS}
        sums = dict(index["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index_path}: unreadable features index ({e}); {rerun} --overwrite") from e
    for path, name in ((train_features_path, TRAIN_NAME), (val_features_path, VAL_NAME)):
        if sums.get(name) != file_sha256(path):
            raise InputError(f"{path}: not the file {index_path} was written with (an interrupted "
                             f"or mixed extraction: train and validation features must come from "
                             f"one run); {rerun} --overwrite")
    current = {split: list_volumes(data_dir / split) for split in SPLITS}
    problems = [_describe_mismatch(split, indexed[split], [f.name for f in current[split]])
                for split in SPLITS if indexed[split] != [f.name for f in current[split]]]
    if problems:
        raise InputError(f"{index_path}: features do not match the volumes in {data_dir}: "
                         + " | ".join(problems) + f"; {rerun}")
    for split, arr, path in (("train", train_feats, train_features_path),
                             ("validation", val_feats, val_features_path)):
        if arr.shape[0] != len(indexed[split]):
            raise InputError(f"{path}: {arr.shape[0]} rows but {index_path} lists "
                             f"{len(indexed[split])} {split} files; {rerun}")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise InputError(f"{train_features_path} and {val_features_path}: feature sizes differ "
                         f"({train_feats.shape[1]} vs {val_feats.shape[1]}); {rerun}")
    return train_feats, val_feats, current["train"], current["validation"]


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
