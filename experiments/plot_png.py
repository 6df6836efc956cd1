"""Line plots with error bars drawn in NumPy and written as PNG: no plotting library needed.

Enough for the transfer study's figure: panels side by side, each with axes, ticks, tick
labels, a title, one coloured line per series with markers and vertical error bars, and a
legend. Text uses a built-in 3 x 5 pixel font (upper case, digits, a few signs), scaled up.

    save_panels("plot.png", [Panel("classification AUC (%)", "labelled fraction",
                                   {"scratch": [(0.05, 70.0, 65.0, 75.0), (1.0, 90.0, 88.0, 92.0)]},
                                   log_x=True)])
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.images import save_png

__all__ = ["Panel", "COLORS", "render_panels", "save_panels"]

#: Series colours (RGB, 0-255), in order.
COLORS = [(90, 90, 90), (214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189),
          (255, 127, 14)]

# 3 x 5 glyphs, rows top to bottom, "#" = ink
_FONT = {
    "0": "###|#.#|#.#|#.#|###", "1": ".#.|##.|.#.|.#.|###", "2": "###|..#|###|#..|###",
    "3": "###|..#|###|..#|###", "4": "#.#|#.#|###|..#|..#", "5": "###|#..|###|..#|###",
    "6": "###|#..|###|#.#|###", "7": "###|..#|.#.|.#.|.#.", "8": "###|#.#|###|#.#|###",
    "9": "###|#.#|###|..#|###", "A": ".#.|#.#|###|#.#|#.#", "B": "##.|#.#|##.|#.#|##.",
    "C": ".##|#..|#..|#..|.##", "D": "##.|#.#|#.#|#.#|##.", "E": "###|#..|##.|#..|###",
    "F": "###|#..|##.|#..|#..", "G": ".##|#..|#.#|#.#|.##", "H": "#.#|#.#|###|#.#|#.#",
    "I": "###|.#.|.#.|.#.|###", "J": "..#|..#|..#|#.#|.#.", "K": "#.#|#.#|##.|#.#|#.#",
    "L": "#..|#..|#..|#..|###", "M": "#.#|###|###|#.#|#.#", "N": "##.|#.#|#.#|#.#|#.#",
    "O": ".#.|#.#|#.#|#.#|.#.", "P": "##.|#.#|##.|#..|#..", "Q": ".#.|#.#|#.#|##.|.##",
    "R": "##.|#.#|##.|#.#|#.#", "S": ".##|#..|.#.|..#|##.", "T": "###|.#.|.#.|.#.|.#.",
    "U": "#.#|#.#|#.#|#.#|###", "V": "#.#|#.#|#.#|#.#|.#.", "W": "#.#|#.#|###|###|#.#",
    "X": "#.#|#.#|.#.|#.#|#.#", "Y": "#.#|#.#|.#.|.#.|.#.", "Z": "###|..#|.#.|#..|###",
    " ": "...|...|...|...|...", ".": "...|...|...|...|.#.", "-": "...|...|###|...|...",
    "_": "...|...|...|...|###", "%": "#.#|..#|.#.|#..|#.#", "(": "..#|.#.|.#.|.#.|..#",
    ")": "#..|.#.|.#.|.#.|#..", "/": "..#|..#|.#.|#..|#..", ":": "...|.#.|...|.#.|...",
    "+": "...|.#.|###|.#.|...", ",": "...|...|...|.#.|#..", "=": "...|###|...|###|...",
}


@dataclass
class Panel:
    """One plot: ``series[name] = [(x, y, y_low, y_high), ...]`` (error bar from low to high)."""
    title: str
    xlabel: str
    series: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    log_x: bool = False


def _text(img: np.ndarray, x: int, y: int, text: str, color=(0, 0, 0), scale: int = 2,
          vertical: bool = False) -> int:
    """Draw ``text`` with its top-left corner at (x, y); returns the width drawn (pixels)."""
    cx = x
    for ch in text.upper():
        glyph = _FONT.get(ch, _FONT[" "])
        for r, row in enumerate(glyph.split("|")):
            for c, v in enumerate(row):
                if v == "#":
                    if vertical:   # rotated 90 degrees counter-clockwise, reading upwards
                        py, px = y - (cx - x) - c * scale, x + r * scale
                        img[max(py - scale + 1, 0):py + 1, px:px + scale] = color
                    else:
                        img[y + r * scale:y + (r + 1) * scale, cx + c * scale:cx + (c + 1) * scale] = color
        cx += 4 * scale
    return cx - x


def _text_width(text: str, scale: int = 2) -> int:
    return 4 * scale * len(text)


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 2) -> None:
    """An anti-alias-free line of ``width`` pixels (clipped to the image)."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.round(np.linspace(x0, x1, n)).astype(int)
    ys = np.round(np.linspace(y0, y1, n)).astype(int)
    h, w = img.shape[:2]
    r = width // 2
    for dx in range(-r, width - r):
        for dy in range(-r, width - r):
            px, py = xs + dx, ys + dy
            ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
            img[py[ok], px[ok]] = color


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1 or v == 0 else f"{v:.2g}"


def _render_panel(p: Panel, width: int, height: int) -> np.ndarray:
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 40, 60
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    pts = [pt for s in p.series.values() for pt in s]
    xs = [pt[0] for pt in pts] or [1.0]
    ys = [v for pt in pts for v in pt[1:] if math.isfinite(v)] or [0.0, 1.0]
    fx = (lambda v: math.log10(v)) if p.log_x else (lambda v: v)
    xlo, xhi = fx(min(xs)), fx(max(xs))
    if xhi - xlo < 1e-9:
        xlo, xhi = xlo - 1, xhi + 1
    pad = 0.08 * (xhi - xlo)
    xlo, xhi = xlo - pad, xhi + pad
    ylo, yhi = min(ys), max(ys)
    if yhi - ylo < 1e-9:
        ylo, yhi = ylo - 1, yhi + 1
    ypad = 0.08 * (yhi - ylo)
    ylo, yhi = ylo - ypad, yhi + ypad

    def X(v: float) -> float:
        return x0 + (fx(v) - xlo) / (xhi - xlo) * (x1 - x0)

    def Y(v: float) -> float:
        return y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)

    grid, ink = (225, 225, 225), (0, 0, 0)
    for t in _nice_ticks(ylo, yhi):
        _line(img, x0, Y(t), x1, Y(t), grid, 1)
        label = _fmt(t)
        _text(img, x0 - 8 - _text_width(label), int(Y(t)) - 5, label, ink)
    for t in sorted(set(xs)):
        _line(img, X(t), y0, X(t), y1, grid, 1)
        label = _fmt(t)
        _text(img, int(X(t)) - _text_width(label) // 2, y1 + 8, label, ink)
    _line(img, x0, y1, x1, y1, ink, 2)
    _line(img, x0, y0, x0, y1, ink, 2)
    _text(img, (x0 + x1 - _text_width(p.xlabel)) // 2, y1 + 30, p.xlabel, ink)
    _text(img, (x0 + x1 - _text_width(p.title)) // 2, 12, p.title, ink)
    n = max(len(p.series), 1)
    for k, (name, s) in enumerate(p.series.items()):
        color = COLORS[k % len(COLORS)]
        s = sorted(s)
        shift = (k - (n - 1) / 2) * 4   # spread the error bars of overlapping points
        for (xa, ya, *_), (xb, yb, *_) in zip(s, s[1:]):
            _line(img, X(xa) + shift, Y(ya), X(xb) + shift, Y(yb), color, 2)
        for xv, yv, lo, hi in s:
            cx = X(xv) + shift
            _line(img, cx, Y(lo), cx, Y(hi), color, 2)
            _line(img, cx - 4, Y(lo), cx + 4, Y(lo), color, 2)
            _line(img, cx - 4, Y(hi), cx + 4, Y(hi), color, 2)
            iy, ix = int(round(Y(yv))), int(round(cx))
            img[max(iy - 3, 0):iy + 4, max(ix - 3, 0):ix + 4] = color
    return img


def render_panels(panels: list[Panel], panel_size: tuple[int, int] = (520, 380)) -> np.ndarray:
    """Panels side by side plus a legend row below: an RGB image (H, W, 3) uint8."""
    w, h = panel_size
    legend_h = 36
    img = np.full((h + legend_h, w * max(len(panels), 1), 3), 255, np.uint8)
    for k, p in enumerate(panels):
        img[:h, k * w:(k + 1) * w] = _render_panel(p, w, h)
    names = list(dict.fromkeys(n for p in panels for n in p.series))
    x = 20
    for k, name in enumerate(names):
        color = COLORS[k % len(COLORS)]
        _line(img, x, h + 16, x + 24, h + 16, color, 3)
        x += 32 + _text(img, x + 32, h + 11, name, (0, 0, 0)) + 24
    return img


def save_panels(path: str | os.PathLike, panels: list[Panel]) -> Path:
    """Render ``panels`` and write them as an RGB PNG (``runtime.images.save_png``)."""
    return save_png(path, render_panels(panels).astype(np.float32) / 255.0)
