"""Pictures a run writes: middle-slice montages of cubes and an 8-bit PNG writer that needs no
imaging library."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from runtime.files import atomic_path

__all__ = ["middle_slice_grid", "save_png"]


def middle_slice_grid(rows: list[list[np.ndarray | torch.Tensor]], pad: int = 2,
                      min_tile: int = 0) -> np.ndarray:
    """Tile middle z-slices of cubes into one grayscale image.

    ``rows[r][c]`` is a cube (X, Y, Z) or (1, X, Y, Z) with values in [0, 1]; each tile is its
    slice at Z // 2, so a row can show original | perturbed | restored. With ``min_tile``, the
    slices are enlarged by the smallest integer factor (nearest neighbour: every voxel a square)
    that makes each tile at least ``min_tile`` pixels on a side.
    Returns a float32 image (H, W) in [0, 1] (use ``dataformats="HW"`` for TensorBoard).
    """
    tiles = [[np.asarray(c.detach().float().cpu() if isinstance(c, torch.Tensor) else c,
                         dtype=np.float32).reshape(c.shape[-3:]) for c in row] for row in rows]
    h = max(t.shape[0] for row in tiles for t in row)
    w = max(t.shape[1] for row in tiles for t in row)
    ncols = max(len(row) for row in tiles)
    k = max(1, -(-min_tile // min(h, w)))  # ceil(min_tile / smallest side)
    h, w = h * k, w * k
    img = np.ones(((h + pad) * len(tiles) + pad, (w + pad) * ncols + pad), np.float32)
    for r, row in enumerate(tiles):
        for c, cube in enumerate(row):
            sl = cube[:, :, cube.shape[2] // 2].repeat(k, axis=0).repeat(k, axis=1)
            y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
            img[y0:y0 + sl.shape[0], x0:x0 + sl.shape[1]] = np.clip(sl, 0, 1)
    return img


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a grayscale (H, W) or RGB (H, W, 3) image with values in [0, 1] as an 8-bit PNG,
    atomically.

    A minimal encoder (zlib + CRC chunks) so no imaging library is needed.
    """
    img = (np.clip(np.asarray(image, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"save_png expects (H, W) or (H, W, 3), got {img.shape}")
    color_type = 0 if img.ndim == 2 else 2
    rows = img.reshape(img.shape[0], -1)
    raw = np.concatenate([np.zeros((img.shape[0], 1), np.uint8), rows], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, color_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return Path(path)
