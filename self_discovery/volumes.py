"""Prepared volumes on disk: one float32 ``.npy`` per patient, axes (x, y, z), values in [0, 1].

Shared by the autoencoder, the feature extractor and the pattern generator. Volumes are opened
memory-mapped so that a crop reads only its region.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from runtime.errors import InputError
from runtime.provenance import file_identities, file_identity
from runtime.intensity import (HU_MAX, HU_MIN, check_real_array, finite_range, is_unit_range,
                               normalize_hu, within_unit_range)

__all__ = ["SPLITS", "check_dataset_complete", "list_volumes", "open_volume",
           "volume_identities", "describe_volume_changes", "dataset_manifest_identity",
           "to_unit_range", "GAUSS_TRUNCATE",
           "resize_matrix", "resize_volume", "load_resized", "ResizedVolumeDataset",
           "normalize_crop", "VolumeCrops"]

SPLITS = ("train", "validation")
#: The anti-aliasing Gaussian is cut at this many standard deviations (radius int(4 sigma + 0.5)).
GAUSS_TRUNCATE = 4.0


def check_dataset_complete(data_dir: str | os.PathLike) -> None:
    """Refuse a dataset whose ``manifest.json`` says ``scripts/prepare_dataset.py`` has not
    finished writing it (killed, or still running); datasets without a manifest are read."""
    manifest = Path(data_dir) / "manifest.json"
    try:
        complete = json.loads(manifest.read_text(encoding="utf-8")).get("complete", True)
    except (OSError, ValueError, AttributeError):
        return
    if complete is False:
        raise InputError(f"{manifest}: scripts/prepare_dataset.py has not finished this dataset "
                         "(interrupted or still running); run it again with the same flags to "
                         "complete it")


def list_volumes(folder: str | os.PathLike, flag: str = "--data_dir") -> list[Path]:
    """The ``.npy`` volumes of ``folder`` in sorted file-name order (the order features use)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found; set {flag} to a folder holding train/ and "
                         "validation/ with one .npy volume per patient "
                         "(scripts/prepare_dataset.py makes them)")
    check_dataset_complete(folder.parent)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".npy" and p.is_file()
                   and not p.name.startswith("."))  # ".name.*.tmp.npy": a killed atomic write
    if not files:
        raise InputError(f"{folder}: no .npy volumes; run scripts/prepare_dataset.py or set {flag}")
    return files


def volume_identities(data_dir: str | os.PathLike, flag: str = "--data_dir"
                      ) -> dict[str, list[dict[str, Any]]]:
    """What identifies the volumes of ``data_dir`` by content: per split, in sorted file order
    (``list_volumes``), ``{"name", "size", "sha256"}`` of every file (``file_identity``: every
    byte is hashed, one read of each file)."""
    out = {}
    for split in SPLITS:
        files = list_volumes(Path(data_dir) / split, flag)
        out[split] = [{"name": f.name, **ident}
                      for f, ident in zip(files, file_identities(files))]
    return out


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def describe_volume_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]
                            ) -> str | None:
    """None when ``current`` (``volume_identities``) holds the volumes ``recorded``, in the
    same order; else what differs, for a message (names missing or added, files whose content
    differs, or another order)."""
    parts = []
    for split in SPLITS:
        try:
            old = [(str(v["name"]), int(v["size"]), str(v["sha256"])) for v in recorded[split]]
        except (KeyError, TypeError, ValueError):
            return f"the record of {split}/ is unreadable"
        new = [(v["name"], int(v["size"]), v["sha256"]) for v in current[split]]
        if old == new:
            continue
        old_by, new_by = {n: (z, h) for n, z, h in old}, {n: (z, h) for n, z, h in new}
        missing = [n for n in old_by if n not in new_by]
        added = [n for n in new_by if n not in old_by]
        changed = [n for n in new_by if n in old_by and old_by[n] != new_by[n]]
        if missing:
            parts.append(f"{split}/ lacks {_names(missing)}")
        if added:
            parts.append(f"{split}/ has new {_names(added)}")
        if changed:
            parts.append(f"{split}/ {_names(changed)}: other content under the same name")
        if not (missing or added or changed):
            parts.append(f"{split}/: the same files in another order")
    return "; ".join(parts) or None


def dataset_manifest_identity(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``file_identity`` of the stage-0 ``manifest.json`` of ``data_dir`` (None without one)."""
    path = Path(data_dir) / "manifest.json"
    return file_identity(path) if path.is_file() else None


def open_volume(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Open a volume (X, Y, Z) memory-mapped (read-only) and check it is a 3D numeric array."""
    path = Path(path)
    try:
        vol = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy volume ({e}); re-create it with "
                         "scripts/prepare_dataset.py") from e
    if vol.ndim != 3:
        raise InputError(f"{path}: expected a 3D numeric volume (x, y, z), got shape {vol.shape} "
                         f"dtype {vol.dtype}")
    return check_real_array(vol, path, "re-create it with scripts/prepare_dataset.py")


def to_unit_range(vol: np.ndarray | torch.Tensor, path: str | os.PathLike = "volume",
                  hu_min: float = HU_MIN, hu_max: float = HU_MAX,
                  value_range: tuple[float, float] | None = None) -> np.ndarray | torch.Tensor:
    """Return ``vol`` unchanged when it is normalised (``is_unit_range``); otherwise treat it as
    HU: ``normalize_hu`` (float32) and warn naming ``path``. ``value_range``: its (min, max)
    when already known (e.g. from ``finite_range``), so the volume is not read again."""
    lo, hi = value_range if value_range is not None else (float(vol.min()), float(vol.max()))
    if is_unit_range(lo, hi, path):
        return vol
    warnings.warn(f"{path}: values up to {hi:.0f} look like Hounsfield units; "
                  f"clipping to [{hu_min:g}, {hu_max:g}] and scaling to [0, 1] (prepare volumes "
                  "with scripts/prepare_dataset.py to avoid this)", stacklevel=2)
    return normalize_hu(vol, hu_min, hu_max)


def _mirror(c: np.ndarray, n: int) -> np.ndarray:
    """Indices or coordinates reflected into [0, n - 1] about the edge samples
    (``... 2 1 | 0 1 2 ... n-1 | n-2 ...``, NumPy's ``pad(mode="reflect")``), repeatedly."""
    if n == 1:
        return np.zeros_like(c)
    period = 2 * (n - 1)
    c = np.mod(c, period)
    return np.where(c > n - 1, period - c, c)


@functools.lru_cache(maxsize=128)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) float64 matrix of 1D resizing, ``out = M @ in``.

    Two linear steps, both reflecting at the border (``_mirror``):

    * anti-aliasing when shrinking: a Gaussian of sigma = max(0, (n_in / n_out - 1) / 2),
      taps -r..r with r = int(``GAUSS_TRUNCATE`` * sigma + 0.5), weights normalised to 1
      (none when sigma is 0 or r is 0);
    * linear interpolation at half-pixel centres: output j samples the input at
      (j + 0.5) * n_in / n_out - 0.5.

    Applied along every axis, this is scikit-image's ``resize(..., order=1, mode="reflect",
    preserve_range=True)`` with its default anti-aliasing (what the published code calls).
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
    factor = n_in / n_out
    sigma = max(0.0, (factor - 1.0) / 2.0)
    radius = int(GAUSS_TRUNCATE * sigma + 0.5)
    rows = np.arange(n_in)[:, None]
    if sigma > 0 and radius > 0:
        taps = np.arange(-radius, radius + 1)
        w = np.exp(-0.5 * (taps / sigma) ** 2)
        w /= w.sum()
        cols = _mirror(rows + taps[None], n_in)                      # (n_in, 2r + 1)
        gauss = np.zeros((n_in, n_in))
        np.add.at(gauss, (np.broadcast_to(rows, cols.shape), cols), np.broadcast_to(w, cols.shape))
    else:
        gauss = np.eye(n_in)
    coord = _mirror((np.arange(n_out) + 0.5) * factor - 0.5, n_in)  # (n_out,) in [0, n_in - 1]
    i0 = np.minimum(np.floor(coord).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = coord - i0
    lin = np.zeros((n_out, n_in))
    j = np.arange(n_out)
    np.add.at(lin, (j, i0), 1.0 - frac)
    np.add.at(lin, (j, i1), frac)
    return lin @ gauss


@functools.lru_cache(maxsize=128)
def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """``resize_matrix`` as taps: (indices (n_out, K), float32 weights (n_out, K)), K the most
    non-zero entries of a row (2 for linear interpolation alone, ~2 + 8 sigma with the filter);
    rows with fewer pad with weight 0."""
    m = resize_matrix(n_in, n_out)
    nonzero = m != 0
    k = int(nonzero.sum(1).max())
    idx = np.argsort(~nonzero, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(m, idx, 1).astype(np.float32)


def _resize_numpy(vol: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    out = np.asarray(vol, dtype=np.float32)
    for axis, n in enumerate(size):
        if out.shape[axis] == n:
            continue
        idx, w = _resize_taps(out.shape[axis], n)
        shape = [1] * out.ndim
        shape[axis] = n
        acc = np.take(out, idx[:, 0], axis=axis) * w[:, 0].reshape(shape)
        for k in range(1, idx.shape[1]):
            acc += np.take(out, idx[:, k], axis=axis) * w[:, k].reshape(shape)
        out = acc
    return np.ascontiguousarray(out)


def _resize_matmul(vol: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    t = vol.float()
    for axis, n in enumerate(size):
        if t.shape[axis] == n:
            continue
        m = torch.from_numpy(resize_matrix(int(t.shape[axis]), n)).to(t.device, torch.float32)
        t = torch.movedim(torch.tensordot(m, torch.movedim(t, axis, 0), dims=1), 0, axis)
    return t.contiguous()


def resize_volume(vol: np.ndarray | torch.Tensor, size: Sequence[int]
                  ) -> np.ndarray | torch.Tensor:
    """Resize a volume (X, Y, Z) to ``size`` as the published code does with scikit-image.

    ``resize_matrix`` along every axis whose size changes (Gaussian anti-aliasing when
    shrinking, linear interpolation, reflection at the border), in float32. On the host it is
    applied as a few weighted gathers per axis (its non-zero taps: NumPy, fastest there); a
    tensor on a GPU is resized there by one matrix product per axis. A NumPy array gives a
    float32 NumPy array, a tensor a float32 tensor on its device.
    """
    size = tuple(int(s) for s in size)
    if vol.ndim != len(size):
        raise ValueError(f"volume of shape {tuple(vol.shape)} cannot be resized to {size}")
    if isinstance(vol, torch.Tensor):
        if vol.device.type != "cpu":
            return _resize_matmul(vol, size)
        return torch.from_numpy(_resize_numpy(vol.detach().float().numpy(), size))
    return _resize_numpy(vol, size)


def load_resized(path: str | os.PathLike, size: Sequence[int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Read a volume (X, Y, Z) and resize it to ``size`` = (rows, cols, depth) (``resize_volume``:
    anti-aliased linear resizing, as the published stages 1 and 2).

    Returns a float32 tensor (1, rows, cols, depth) with values in [0, 1] on ``device`` (the
    resizing runs there). Raises InputError naming the file when it holds NaN or inf values.
    """
    path = Path(path)
    arr = np.ascontiguousarray(open_volume(path, mmap=False), dtype=np.float32)
    if arr.size == 0 or min(arr.shape) < 1:
        raise InputError(f"{path}: empty volume {tuple(arr.shape)}; re-create it with "
                         "scripts/prepare_dataset.py")
    value_range = finite_range(arr, path, "re-create it with scripts/prepare_dataset.py or "
                               "remove it from the folder")
    vol = to_unit_range(torch.from_numpy(arr).to(device), path, value_range=value_range)
    return resize_volume(vol, size).unsqueeze(0).contiguous()      # (1, rows, cols, depth)


class ResizedVolumeDataset(Dataset):
    """Whole volumes resized to one size: item ``i`` is ``(volume (1, X, Y, Z), i)``.

    Args:
        files: volume paths (e.g. ``list_volumes(data_dir / "train")``), order kept.
        size: (rows, cols, depth) after resizing (``resize_volume``).

    ``preload()`` reads and resizes every volume once and keeps them in memory (for many epochs
    over a dataset that fits in RAM: 4 MiB per volume at 128 x 128 x 64); afterwards items come
    from memory and a DataLoader needs no workers.
    """

    def __init__(self, files: Sequence[str | os.PathLike], size: Sequence[int]) -> None:
        self.files = [Path(f) for f in files]
        self.size = tuple(int(s) for s in size)
        self._memory: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def preloaded(self) -> bool:
        return self._memory is not None

    def preload(self, progress: bool = False, desc: str = "loading volumes",
                device: torch.device | str = "cpu") -> None:
        """Read and resize every volume now, resizing on ``device`` (e.g. the GPU), keeping the
        results in host memory (tqdm bar when ``progress``)."""
        self._memory = [load_resized(f, self.size, device).cpu()
                        for f in tqdm(self.files, desc=desc, disable=not progress or None)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._memory is not None:
            return self._memory[i], i
        return load_resized(self.files[i], self.size), i          # (1, X, Y, Z)


def normalize_crop(crop: np.ndarray, is_normalized: bool, hu_min: float = HU_MIN,
                   hu_max: float = HU_MAX) -> np.ndarray:
    """float32 copy of ``crop`` (X, Y, Z) in [0, 1]: as is when normalised, else
    ``normalize_hu``. Either reads only this region of a memory map."""
    if is_normalized:
        return np.array(crop, dtype=np.float32)
    return normalize_hu(crop, hu_min, hu_max)


class VolumeCrops:
    """Normalised crops of the volumes of ``data_dir``, with per-volume intensity detection.

    A volume is opened for each crop (a header read) so no mapping stays alive; a crop reads only
    its region. Whether a volume is HU or already in [0, 1] is decided once per volume from all
    its values (read slab by slab), which must be finite.
    """

    def __init__(self, data_dir: Path, is_normalized: bool, hu_min: float, hu_max: float) -> None:
        self.data_dir = data_dir
        self.is_normalized = is_normalized
        self.hu_min, self.hu_max = hu_min, hu_max
        self._unit: dict[str, bool] = {}
        self.detected: list[str] = []   # volumes found in [0, 1] without --is_normalized

    def path(self, rel: str) -> Path:
        return self.data_dir / rel

    def _is_unit(self, rel: str, vol: np.ndarray) -> bool:
        if rel in self._unit:
            return self._unit[rel]
        lo, hi = finite_range(vol, self.path(rel))      # the whole volume, slab by slab
        if self.is_normalized:
            if not within_unit_range(lo, hi):
                raise InputError(
                    f"{self.path(rel)}: --is_normalized is set but the volume holds values in "
                    f"[{lo:.4g}, {hi:.4g}], not [0, 1]; drop --is_normalized to window HU volumes "
                    "to [--hu_min, --hu_max], or re-create the volume with "
                    "scripts/prepare_dataset.py")
            unit = True
        else:
            unit = is_unit_range(lo, hi, self.path(rel))  # the rule of stages 1 and 2
            if unit:
                self.detected.append(rel)
                if len(self.detected) == 1:
                    print(f"note: {self.path(rel)} holds values in [{lo:.3g}, {hi:.3g}]: "
                          "treating volumes already in [0, 1] as normalised (pass "
                          "--is_normalized to say so)", file=sys.stderr)
        self._unit[rel] = unit
        return unit

    def crop(self, rel: str, x: int, y: int, z: int, size: Sequence[int]) -> np.ndarray:
        """Normalised float32 crop [x:x+sx, y:y+sy, z:z+sz] of volume ``rel``."""
        vol = open_volume(self.path(rel))
        sx, sy, sz = size
        if x < 0 or y < 0 or z < 0 or x + sx > vol.shape[0] or y + sy > vol.shape[1] \
                or z + sz > vol.shape[2]:
            raise InputError(f"{self.path(rel)}: crop at ({x}, {y}, {z}) of size {tuple(size)} "
                             f"does not fit the volume {vol.shape}")
        unit = self._is_unit(rel, vol)
        return normalize_crop(vol[x:x + sx, y:y + sy, z:z + sz], unit, self.hu_min, self.hu_max)
