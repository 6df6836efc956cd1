"""Pictures a run writes: grids of middle slices of cubes, labelled so a person can read them
(class montages, TensorBoard previews), and PNG files, drawn and written with Pillow.

A labelled grid has a title, a header over each column, a label left of each row, an optional
label under each tile and a caption saying what the rows and columns are; text is drawn with
Pillow's default font. Tiles are enlarged by an integer factor (nearest neighbour: every voxel
a square of pixels) to at least ``TILE_PX`` pixels a side.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from runtime.files import atomic_path

__all__ = ["TILE_PX", "LabelledGrid", "labelled_grid", "save_png",
           "tile_scale", "wrap_text"]

#: Smallest side, in pixels, of a tile of a labelled grid (small cubes are enlarged).
TILE_PX = 128
#: Canvas width below which the caption would wrap into too many lines.
_MIN_WIDTH = 520
_Cube = np.ndarray | torch.Tensor


def _cube_array(cube: _Cube) -> np.ndarray:
    """A cube (X, Y, Z) or (1, X, Y, Z), tensor or array, as a float32 array (X, Y, Z)."""
    if isinstance(cube, torch.Tensor):
        cube = cube.detach().float().cpu().numpy()
    cube = np.asarray(cube, dtype=np.float32)
    return cube.reshape(cube.shape[-3:])


def tile_scale(side: int, min_tile: int = TILE_PX) -> int:
    """The smallest integer factor that makes a slice whose shorter side is ``side`` voxels
    at least ``min_tile`` pixels a side."""
    return max(1, -(-min_tile // max(1, side)))


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at ``size`` pixels (its bitmap font where FreeType is missing)."""
    return ImageFont.load_default(size=size)


def _line_height(font) -> int:
    ascent, descent = font.getmetrics()
    return int(ascent + descent + 2)


def _break_word(word: str, width: float, font) -> list[str]:
    """``word`` cut into pieces no wider than ``width`` pixels (a long file name, say)."""
    pieces = []
    while len(word) > 1 and font.getlength(word) > width:
        cut = len(word) - 1
        while cut > 1 and font.getlength(word[:cut]) > width:
            cut -= 1
        pieces.append(word[:cut])
        word = word[cut:]
    return pieces + [word]


def wrap_text(text: str, width: float, font) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels in ``font``: at spaces,
    inside a word only where the word alone is too wide; ``\\n`` always breaks."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            for piece in _break_word(word, width, font):
                trial = f"{line} {piece}" if line else piece
                if line and font.getlength(trial) > width:
                    lines.append(line)
                    trial = piece
                line = trial
        lines.append(line)
    return lines


@dataclass(frozen=True)
class LabelledGrid:
    """A labelled grid: ``image`` float32 (H, W) in [0, 1] (TensorBoard: ``dataformats="HW"``;
    file: :func:`save_png`) and ``tiles[r][c]`` = (top, left, height, width) of each tile."""
    image: np.ndarray
    tiles: tuple[tuple[tuple[int, int, int, int], ...], ...]


@dataclass(frozen=True)
class _Layout:
    """Where the parts of a labelled grid go (pixels)."""
    width: int
    left: int                     # x of the first column
    tile: tuple[int, int]         # (height, width) of every tile cell
    title: list[str]
    header: list[list[str]]       # lines per column
    rows: list[list[str]]         # lines per row label
    under: list[list[list[str]]]  # lines under each tile
    caption: list[str]
    pad: int
    line: int


def _layout(shape: tuple[int, int], ncols: int, nrows: int, title: str,
            col_labels: Sequence[str], row_labels: Sequence[str],
            tile_labels: Sequence[Sequence[str]] | None, caption: str, pad: int) -> _Layout:
    font = _font(13)
    th, tw = shape
    rows = [str(s).split("\n") for s in row_labels]
    left = pad + (max((font.getlength(x) for r in rows for x in r), default=0) + pad
                  if rows else 0)
    left = int(np.ceil(left))
    width = max(left + ncols * (tw + pad) + pad, _MIN_WIDTH)
    text_w = width - 2 * pad
    under = [[wrap_text(str(s), tw, font) for s in r] for r in (tile_labels or [])]
    under += [[] for _ in range(nrows - len(under))]
    return _Layout(width, left, (th, tw), wrap_text(title, text_w, _font(15)) if title else [],
                   [wrap_text(str(s), tw, font) for s in col_labels], rows, under,
                   wrap_text(caption, text_w, font) if caption else [], pad,
                   _line_height(font))


def labelled_grid(rows: list[list[_Cube]], *, title: str = "", col_labels: Sequence[str] = (),
                  row_labels: Sequence[str] = (),
                  tile_labels: Sequence[Sequence[str]] | None = None, caption: str = "",
                  min_tile: int = TILE_PX, pad: int = 6) -> LabelledGrid:
    """Middle z-slices of cubes in a grid with a title, column headers, row labels, labels
    under the tiles and a caption.

    ``rows[r][c]`` is a cube (X, Y, Z) or (1, X, Y, Z) with values in [0, 1] (0 black, 1
    white); tile (r, c) shows its slice at Z // 2 with x across and y down (the usual axial
    view: anterior up for scans in the LPS convention), enlarged by one integer factor for the
    whole grid (nearest neighbour) to at least ``min_tile`` pixels a side. Text may hold
    ``\\n``; it is wrapped to the tile (headers, tile labels) or image (title, caption) width.
    """
    slices = [[_cube_array(c) for c in row] for row in rows]
    slices = [[c[:, :, c.shape[2] // 2].T for c in row] for row in slices]   # (Y, X)
    h = max(s.shape[0] for row in slices for s in row)
    w = max(s.shape[1] for row in slices for s in row)
    k = tile_scale(min(min(s.shape) for row in slices for s in row), min_tile)
    ncols = max(len(row) for row in slices)
    lay = _layout((h * k, w * k), ncols, len(slices), title, col_labels, row_labels,
                  tile_labels, caption, pad)
    font, line, (th, tw) = _font(13), lay.line, lay.tile
    y = pad + len(lay.title) * _line_height(_font(15)) + (pad if lay.title else 0)
    head_h = max((len(x) for x in lay.header), default=0) * line
    grid_top = y + head_h + (pad // 2 if head_h else 0)
    row_h = [th + max((len(u) for u in lay.under[r]), default=0) * line + pad
             for r in range(len(slices))]
    height = grid_top + sum(row_h) + len(lay.caption) * line + 2 * pad
    img = Image.new("L", (lay.width, height), 255)
    draw = ImageDraw.Draw(img)
    ty = pad
    for text in lay.title:
        draw.text((pad, ty), text, fill=0, font=_font(15))
        ty += _line_height(_font(15))
    for c, lines in enumerate(lay.header):
        for i, text in enumerate(lines):
            draw.text((lay.left + c * (tw + pad), y + i * line), text, fill=0, font=font)
    boxes = []
    top = grid_top
    for r, row in enumerate(slices):
        row_lines = lay.rows[r] if r < len(lay.rows) else []
        label_y = top + (th - len(row_lines) * line) // 2
        for i, text in enumerate(row_lines):
            draw.text((pad, label_y + i * line), text, fill=0, font=font)
        boxes.append([])
        for c, sl in enumerate(row):
            x0 = lay.left + c * (tw + pad)
            tile = np.clip(sl, 0, 1).repeat(k, axis=0).repeat(k, axis=1)
            img.paste(Image.fromarray(_to_uint8(tile)), (x0, top))
            boxes[-1].append((top, x0, tile.shape[0], tile.shape[1]))
            for i, text in enumerate(lay.under[r][c] if c < len(lay.under[r]) else []):
                draw.text((x0, top + th + i * line), text, fill=0, font=font)
        top += row_h[r]
    for i, text in enumerate(lay.caption):
        draw.text((pad, top + pad + i * line), text, fill=0, font=font)
    image = np.asarray(img, dtype=np.float32) / 255.0
    return LabelledGrid(image, tuple(tuple(b) for b in boxes))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 0..255 (rounded; out-of-range values clipped)."""
    return (np.clip(np.asarray(image, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, image: np.ndarray | LabelledGrid) -> Path:
    """Write a grayscale (H, W) or RGB (H, W, 3) image with values in [0, 1] (or a
    :class:`LabelledGrid`) as an 8-bit PNG, atomically."""
    if isinstance(image, LabelledGrid):
        image = image.image
    img = _to_uint8(image)
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"save_png expects (H, W) or (H, W, 3), got {img.shape}")
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
    return Path(path)
