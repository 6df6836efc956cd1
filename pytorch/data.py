"""Fold files of self-discovered anatomical patterns: validation and resident loading.

The file names, layout and ``fold_index.json`` are the contract of
``self_discovery/fold_files.py``, shared with the pattern generator that writes them.

``load_pretraining_data`` opens every file memory-mapped, validates shapes, labels and values,
and copies only the rows it needs, chunk by chunk, into one resident tensor (pinned host memory
or the GPU, float16 or float32). Peak extra memory is one chunk, never a float64 copy of a file.

Intensities: cubes in [0, 1] (this project's pattern generator) are used as they are; a file in
Hounsfield units (the published pattern generator saved un-normalised cubes) is detected from
its value range and mapped to [0, 1] with the one HU window of every stage
(``runtime.intensity.normalize_hu``, default [-1000, 1000]), with a note naming the file;
anything else is an error naming the file.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.devices import full_device
from runtime.errors import InputError
from runtime.intensity import (HU_DETECT_MAX, HU_MAX, HU_MIN, finite_range, normalize_hu,
                               within_unit_range)
from self_discovery.fold_files import (CLASSES_PER_BLOCK, check_fold_index, file_keys, fold_blocks,
                                       fold_file_names, recorded_fold_identities)

__all__ = ["PretrainingCubes", "read_fold_cubes", "load_pretraining_data", "fold_pairs",
           "check_fold_files_present", "fold_data_identity", "BatchFeeder",
           "epoch_permutation", "validation_order", "derive_seed"]

_CHUNK = 256  # cubes copied per chunk while loading


@dataclass
class PretrainingCubes:
    """Cubes and labels resident in memory.

    ``cubes``: (N, 1, X, Y, Z), float16/float32, values in [0, 1], on ``cubes.device``
    (pinned when on the host and CUDA is used). ``labels``: (N,) int64 on the same device.
    """
    cubes: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.cubes.shape[0])


def _open(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: cannot be read as a .npy array ({e}); re-create it with "
                         "self_discovery/pattern_generator_3D.py") from e


def _class_rows(data_path: Path, label_path: Path, lab: np.ndarray, classes: range,
                per_class: int) -> np.ndarray:
    """File rows of the first ``per_class`` cubes of every class in ``classes``, read from the
    labels (so files with more cubes per class than asked, e.g. 200 for --nb_instances 100,
    give every class, not the first classes' extra cubes). Files of the reference code lack the
    last cube of each block: that one missing cube is accepted with a warning."""
    rows = []
    for c in classes:
        idx = np.flatnonzero(lab == c)
        if len(idx) >= per_class:
            rows.append(idx[:per_class])
            continue
        if c == classes[-1] and len(idx) == per_class - 1 and len(idx) and idx[-1] == len(lab) - 1:
            # The reference pattern generator sliced every block with ``[:-1]`` and so dropped
            # the last cube; the published data was written by it.
            warnings.warn(f"{data_path}: class {c} has {len(idx)} cubes, expected {per_class}; "
                          "using them (files written by the reference code lack the last cube "
                          "of each block)", stacklevel=3)
            rows.append(idx)
            continue
        found, counts = np.unique(lab, return_counts=True)
        listing = ", ".join(f"{int(v)}: {int(n)}" for v, n in zip(found[:12], counts[:12]))
        raise InputError(
            f"{data_path} ({label_path.name}): class {c} has {len(idx)} cube(s) but {per_class} "
            f"are needed (cubes per label found: {listing}"
            + (f", ... {len(found) - 12} more labels" if len(found) > 12 else "") + "); lower "
            "--nb_instances / --nb_instances_val / --cls_classes or re-create the data")
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def _checked_labels(data_path: Path, label_path: Path, data: np.ndarray, labels: np.ndarray,
                    cube_shape: tuple[int, int, int], cls_classes: int) -> np.ndarray:
    """The labels of a fold file pair as int64 (N,), after checking both files' shapes and
    types (an ``InputError`` naming the file)."""
    shape = tuple(data.shape[1:])
    if shape not in (tuple(cube_shape), (1, *cube_shape)):
        raise InputError(
            f"{data_path}: cubes of shape {shape}, expected {tuple(cube_shape)}; set "
            "--input_rows/--input_cols/--input_deps to the size the data was made with")
    if data.dtype.kind not in "uif":
        raise InputError(f"{data_path}: cubes of dtype {data.dtype}, expected real numbers; "
                         "re-create the file")
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        raise InputError(f"{label_path}: labels of shape {labels.shape}, expected (N, 1)")
    if labels.shape[0] != data.shape[0]:
        raise InputError(f"{label_path}: {labels.shape[0]} labels for {data.shape[0]} cubes "
                         f"in {data_path.name}; the two files must come from the same run")
    lab = np.asarray(labels).reshape(-1)
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise InputError(f"{label_path}: labels must be integer class indices")
    elif lab.dtype.kind not in "iu":
        raise InputError(f"{label_path}: labels of dtype {lab.dtype}, expected integers")
    lab = lab.astype(np.int64)
    if lab.size and lab.min() < 0:
        raise InputError(f"{label_path}: negative label {lab.min()}; labels are class indices "
                         f"in [0, --cls_classes {cls_classes})")
    return lab


def _chunks(data: np.ndarray, take: np.ndarray, cube_shape: tuple[int, int, int]):
    """(start, float32 (n, 1, X, Y, Z) copy) of the rows ``take`` of ``data``, ``_CHUNK`` at a
    time (a contiguous run of rows is one slice of the memory map)."""
    for s in range(0, len(take), _CHUNK):
        part = take[s:s + _CHUNK]
        contiguous = part[-1] - part[0] == len(part) - 1
        block = data[part[0]:part[-1] + 1] if contiguous else data[part]
        yield s, np.array(block, dtype=np.float32).reshape(len(part), 1, *cube_shape)


def _intensity_is_hu(data_path: Path, data: np.ndarray, take: np.ndarray,
                     cube_shape: tuple[int, int, int]) -> bool:
    """Whether the rows ``take`` hold Hounsfield units (False: [0, 1]); finite values are
    required, and a range that is neither is an error naming the file."""
    lo, hi = np.inf, -np.inf
    for s, chunk in _chunks(data, take, cube_shape):
        c_lo, c_hi = finite_range(chunk, data_path, "re-create the file", rows="cube",
                                  row_index=take[s:s + _CHUNK])
        lo, hi = min(lo, c_lo), max(hi, c_hi)
    if not len(take) or within_unit_range(lo, hi):
        return False
    if hi > HU_DETECT_MAX:
        return True
    raise InputError(f"{data_path}: values in [{lo:.4g}, {hi:.4g}] are neither normalised [0, 1] "
                     "intensities nor Hounsfield units; re-create the cubes with "
                     "self_discovery/pattern_generator_3D.py")


def read_fold_cubes(pairs: list[tuple[Path, Path, range, int]], cube_shape: tuple[int, int, int],
               cls_classes: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", pin_memory: bool = False,
               hu_min: float = HU_MIN, hu_max: float = HU_MAX) -> PretrainingCubes:
    """Validate and concatenate, for every (data, label, classes, per_class) file pair, the
    first ``per_class`` cubes of each class in ``classes`` (found by label).

    Checks: data shape (N, X, Y, Z) or (N, 1, X, Y, Z) with (X, Y, Z) == ``cube_shape``; labels
    (N, 1) or (N,) of integer values >= 0; enough cubes per class; finite cube values, in [0, 1]
    or (a file of the published pattern generator) in Hounsfield units, which are clipped to
    [``hu_min``, ``hu_max``] and scaled to [0, 1] with a note. Every error is an
    ``InputError`` naming the file.
    """
    device = torch.device(device)
    arrays, total = [], 0
    for data_path, label_path, classes, per_class in pairs:
        data, labels = _open(data_path), _open(label_path)
        lab = _checked_labels(data_path, label_path, data, labels, cube_shape, cls_classes)
        take = _class_rows(data_path, label_path, lab, classes, per_class)
        arrays.append((data_path, data, lab[take], take))
        total += len(take)
    pin = pin_memory and device.type == "cpu" and torch.cuda.is_available()
    cubes = torch.empty((total, 1, *cube_shape), dtype=dtype, device=device, pin_memory=pin)
    labels_out = torch.empty(total, dtype=torch.int64)
    at = 0
    for data_path, data, lab, take in arrays:
        hu = _intensity_is_hu(data_path, data, take, cube_shape)
        if hu:
            print(f"note: {data_path}: values in Hounsfield units (cubes of the published "
                  f"pattern generator, which saved them un-normalised): clipped to "
                  f"[{hu_min:g}, {hu_max:g}] and scaled to [0, 1], as every stage does",
                  file=sys.stderr)
        for s, chunk in _chunks(data, take, cube_shape):
            chunk = normalize_hu(chunk, hu_min, hu_max) if hu else np.clip(chunk, 0.0, 1.0)
            cubes[at + s:at + s + len(chunk)].copy_(torch.from_numpy(chunk))
        labels_out[at:at + len(take)] = torch.from_numpy(lab)
        at += len(take)
    return PretrainingCubes(cubes, labels_out.to(device))


def fold_pairs(data_dir: str | Path, cls_classes: int, nb_instances: int, nb_val_instances: int,
               nb_multires_patch: int) -> dict[str, list[tuple[Path, Path, range, int]]]:
    """{"train": [...], "validation": [...]}: per fold file, (data file, label file, classes
    taken from it, cubes per class) for C classes and the resolutions used."""
    data_dir = Path(data_dir)
    pairs: dict[str, list] = {"train": [], "validation": []}
    per_class = {"train": nb_instances, "validation": nb_val_instances}
    for k, c_k in fold_blocks(cls_classes):
        classes = range((k - 1) * CLASSES_PER_BLOCK, (k - 1) * CLASSES_PER_BLOCK + c_k)
        for split, prefix, r in file_keys(nb_multires_patch):
            d, lab = fold_file_names(prefix, r, k)
            pairs[split].append((data_dir / d, data_dir / lab, classes, per_class[split]))
    return pairs


def check_fold_files_present(data_dir: str | Path, cls_classes: int,
                             nb_multires_patch: int) -> list[str]:
    """The names of the fold files C classes and the resolutions need (data and labels);
    an ``InputError`` naming every missing one and the flags that set them."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: folder not found; set --data_dir to the folder of the fold "
                         "files (self_discovery/pattern_generator_3D.py --output_dir)")
    pairs = fold_pairs(data_dir, cls_classes, 1, 1, nb_multires_patch)
    names = [p.name for d, lab, _, _ in pairs["train"] + pairs["validation"] for p in (d, lab)]
    missing = [n for n in names if not (data_dir / n).is_file()]
    if missing:
        raise InputError(
            f"{data_dir}: missing fold file(s) {', '.join(missing)}; expected for "
            f"--cls_classes {cls_classes} and --nb_multires_patch {nb_multires_patch} in "
            "--data_dir (make them with self_discovery/pattern_generator_3D.py)")
    return names


def fold_data_identity(data_dir: str | Path, cls_classes: int, nb_multires_patch: int
                       ) -> dict[str, dict]:
    """{file name: {"size", "sha256"}} of the fold files a run reads, after checking them
    (present; as the pattern generator's ``fold_index.json`` records them): what identifies
    its data by content (``recorded_fold_identities``)."""
    names = check_fold_files_present(data_dir, cls_classes, nb_multires_patch)
    check_fold_index(Path(data_dir), names)
    return recorded_fold_identities(Path(data_dir), names)


def load_pretraining_data(data_dir: str | Path, cls_classes: int, nb_instances: int,
                          nb_val_instances: int, nb_multires_patch: int,
                          cube_shape: tuple[int, int, int], dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu", pin_memory: bool = False,
                          hu_min: float = HU_MIN, hu_max: float = HU_MAX,
                          check_index: bool = True) -> tuple[PretrainingCubes, PretrainingCubes]:
    """Load the train (all resolutions) and validation (resolution 1) cubes of C classes.

    For block k with c_k classes used, the first ``nb_instances`` cubes of each of those classes
    in each train file and ``nb_val_instances`` in each val file are taken, located by label
    (files with more classes, e.g. the published 50-class data for C = 44, or more cubes per
    class than asked are fine). A missing file is one error naming every expected file and the
    flags that set them; files of a pattern-generator run are checked against its
    ``fold_index.json`` (sizes and SHA-256; ``check_index=False``: the caller did it, e.g. with
    ``fold_data_identity``). HU files: see ``read_fold_cubes``.
    """
    data_dir = Path(data_dir)
    if nb_multires_patch < 1:
        raise InputError(f"--nb_multires_patch must be >= 1, got {nb_multires_patch}")
    names = check_fold_files_present(data_dir, cls_classes, nb_multires_patch)
    if check_index:
        check_fold_index(data_dir, names)
    pairs = fold_pairs(data_dir, cls_classes, nb_instances, nb_val_instances, nb_multires_patch)
    kw = dict(cube_shape=cube_shape, cls_classes=cls_classes, dtype=dtype, device=device,
              pin_memory=pin_memory, hu_min=hu_min, hu_max=hu_max)
    return read_fold_cubes(pairs["train"], **kw), read_fold_cubes(pairs["validation"], **kw)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. seed, epoch, rank, stream) by SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def epoch_permutation(n: int, seed: int, epoch: int, rank: int = 0,
                      world_size: int = 1) -> torch.Tensor:
    """This rank's shuffled sample indices for ``epoch`` (CPU int64).

    One permutation of ``range(n)`` per (seed, epoch), identical on every rank, truncated to a
    multiple of ``world_size`` (at most world_size - 1 samples skipped, different ones each
    epoch) and sharded ``perm[rank::world_size]``, so every rank runs the same number of steps.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x5EED))
    perm = torch.randperm(n, generator=g)
    usable = (n // world_size) * world_size
    return perm[:usable][rank::world_size]


def validation_order(n: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's validation indices (CPU int64): one permutation of ``range(n)`` drawn from
    ``seed`` alone (the same every epoch and every run with that seed), sharded
    ``perm[rank::world_size]``, every sample kept.

    Validation batches then mix classes as the published loader's shuffled ones do. It matters
    because the published network normalises with batch statistics in eval mode too: batches of
    one or two classes (file order) give another validation loss and accuracy.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, 0x7A1))
    return torch.randperm(n, generator=g)[rank::world_size]


class BatchFeeder:
    """Gathers batches of a ``PretrainingCubes`` onto ``device`` without host synchronisation.

    Data on the GPU: indexing stays on the GPU. Data in (pinned) host memory: the batch is
    gathered into one of two pinned staging buffers and copied asynchronously; a CUDA event
    guards reuse of each buffer. Returns (cubes float32 (n, 1, X, Y, Z), labels int64 (n,)).
    """

    def __init__(self, data: PretrainingCubes, device: torch.device, max_batch: int) -> None:
        self.data, self.device = data, full_device(device)
        self.on_device = (full_device(data.cubes.device) == self.device
                          or self.device.type == "cpu")
        self._bufs: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        self._i = 0
        #: put an epoch's index tensor here once (``idx.to(feeder.index_device)``)
        self.index_device = data.cubes.device if self.on_device else torch.device("cpu")
        if not self.on_device and self.device.type == "cuda":
            shape = (max_batch, *data.cubes.shape[1:])
            self._bufs = [torch.empty(shape, dtype=data.cubes.dtype, pin_memory=True)
                          for _ in range(2)]
            self._events = [None, None]

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_device:
            idx = idx.to(self.data.cubes.device)  # a no-op when already on index_device
            x = self.data.cubes.index_select(0, idx)
            y = self.data.labels.index_select(0, idx.to(self.data.labels.device))
            return (x.to(self.device, torch.float32, non_blocking=True),
                    y.to(self.device, non_blocking=True))
        i, self._i = self._i, 1 - self._i
        ev = self._events[i]
        if ev is not None:
            ev.synchronize()  # the copy out of this buffer (two steps ago) has finished
        buf = self._bufs[i][: idx.numel()]
        torch.index_select(self.data.cubes, 0, idx.cpu(), out=buf)
        x = buf.to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._events[i] = ev
        y = self.data.labels.index_select(0, idx.cpu()).to(self.device, non_blocking=True)
        return x.float(), y
