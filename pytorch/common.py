"""Small utilities shared by every stage: atomic writes, devices, seeding, run configs."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import CheckpointError, InputError, atomic_path, to_plain

__all__ = ["REPO_ROOT", "HelpFormatter", "atomic_path", "save_npy_atomic", "save_json_atomic",
           "resolve_device", "full_device", "seed_everything", "write_run_config",
           "early_stopping_update", "InputError", "call_reporting_errors", "make_output_dir",
           "summary_writer", "middle_slice_grid", "save_png"]

#: The repository root; CLI defaults are relative to the working directory, as in the reference.
REPO_ROOT = Path(__file__).resolve().parents[1]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` formatter of every CLI: shows "(default: ...)" only where a default value
    exists (not for None, "", required options or on/off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.required or action.default == "" \
                or action.default is argparse.SUPPRESS \
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help or ""
        return super()._get_help_string(action)


def make_output_dir(path: str | os.PathLike, flag: str = "output folder") -> Path:
    """``mkdir -p path``; a path that is a file (or under one) is an ``InputError`` naming ``flag``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise InputError(f"{path}: cannot create this folder ({e.strerror}); set {flag} to a "
                         "writable folder") from e
    return path


def summary_writer(log_dir: str | os.PathLike, flag: str = "--log_dir") -> Any:
    """A TensorBoard ``SummaryWriter`` on ``log_dir`` (created; see ``make_output_dir``)."""
    from torch.utils.tensorboard import SummaryWriter  # imported only where curves are written
    return SummaryWriter(str(make_output_dir(log_dir, flag)))


def call_reporting_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """Call ``fn``; bad user input (``InputError``, ``CheckpointError``) becomes one
    ``error: ...`` line on stderr and ``(False, None)``, so every CLI's ``main`` ends the same
    way (exit code 2, no traceback). Returns ``(True, result)`` otherwise."""
    try:
        return True, fn(*args, **kwargs)
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return False, None


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``np.save`` atomically."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


def save_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` (converted to plain types) as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_plain(obj), indent=2, sort_keys=True) + "\n",
                       encoding="utf-8")
    return Path(path)


def write_run_config(args: argparse.Namespace | dict, out_dir: str | os.PathLike,
                     name: str = "config.json") -> Path:
    """Write the resolved configuration of a run next to its outputs."""
    cfg = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return save_json_atomic(Path(out_dir) / name, cfg)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def full_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so devices compare equal to ``tensor.device``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (the reference seeded only ``random``); return a CPU
    ``torch.Generator`` seeded with ``seed`` for code that takes explicit randomness."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def early_stopping_update(val_loss: float, best_loss: float, no_improve: int,
                          patience: int) -> tuple[bool, float, int, bool]:
    """One epoch's early-stopping bookkeeping (the reference's rule), shared by the training CLIs.

    Returns (improved, new best loss, epochs without improvement, stop now).
    """
    if val_loss < best_loss:
        return True, val_loss, 0, False
    return False, best_loss, no_improve + 1, no_improve + 1 >= patience


def middle_slice_grid(rows: list[list[np.ndarray | torch.Tensor]], pad: int = 2) -> np.ndarray:
    """Tile middle z-slices of cubes into one grayscale image.

    ``rows[r][c]`` is a cube (X, Y, Z) or (1, X, Y, Z) with values in [0, 1]; each tile is its
    slice at Z // 2, so a row can show original | perturbed | restored.
    Returns a float32 image (H, W) in [0, 1] (use ``dataformats="HW"`` for TensorBoard).
    """
    tiles = [[np.asarray(c.detach().float().cpu() if isinstance(c, torch.Tensor) else c,
                         dtype=np.float32).reshape(c.shape[-3:]) for c in row] for row in rows]
    h = max(t.shape[0] for row in tiles for t in row)
    w = max(t.shape[1] for row in tiles for t in row)
    ncols = max(len(row) for row in tiles)
    img = np.ones(((h + pad) * len(tiles) + pad, (w + pad) * ncols + pad), np.float32)
    for r, row in enumerate(tiles):
        for c, cube in enumerate(row):
            sl = cube[:, :, cube.shape[2] // 2]
            y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
            img[y0:y0 + sl.shape[0], x0:x0 + sl.shape[1]] = np.clip(sl, 0, 1)
    return img


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a grayscale image (H, W) with values in [0, 1] as an 8-bit PNG, atomically.

    A minimal encoder (zlib + CRC chunks) so no imaging library is needed.
    """
    import struct
    import zlib

    img = (np.clip(np.asarray(image, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    if img.ndim != 2:
        raise ValueError(f"save_png expects (H, W), got {img.shape}")
    raw = np.concatenate([np.zeros((img.shape[0], 1), np.uint8), img], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return Path(path)
