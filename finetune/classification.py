"""Fine-tune a (pretrained) Semantic Genesis encoder for 3D cube classification.

The network is the original README's ``TargetNet`` with a correct head: encoder -> global
average pooling -> linear -> logits (the README applied ReLU before the sigmoid). Two classes
train one logit with binary cross-entropy (``--loss bce``), more classes one logit per class with
cross-entropy (``--loss ce``). Validation reports loss, ROC AUC and accuracy (scikit-learn);
training stops early when the monitored validation value has not improved for ``--patience``
epochs, and the best epoch's weights are kept (the loop, ``--resume`` and the outputs are
``finetune.loop``'s, shared with segmentation). Sets whose metric would mean nothing are
refused: training or validation cubes of one class, ``--monitor auc`` with a validation set
lacking a class, a test set of one class.

Data (cubes in [0, 1], axes (x, y, z), sides divisible by 8, e.g. 64 x 64 x 32):
  * ``--data a.npy [b.npy ...] --labels labels.npy``: stacked cubes (N, X, Y, Z) (or (N, 1, X,
    Y, Z)) or one cube (X, Y, Z) per file, or folders of such files; labels as ``.npy``
    (N,) / (N, 1) or a text file with one integer per line (``.txt``/``.csv``).
  * ``--data_dir root``: one sub-folder per class (class index = sorted folder order), each
    holding cube ``.npy`` files.
Validation: ``--val_data``/``--val_labels`` or ``--val_data_dir``, else a stratified
``--val_fraction`` of the training data. An optional test set is evaluated with the best weights.

Outputs in ``--output_dir``: ``config.json``, ``metrics.json`` (per-epoch history, best
validation and test metrics), ``best.pt`` (``models.checkpoint`` schema, arch
``TargetClassifier``), ``last.pt`` (for ``--resume``), ``tensorboard/``.

    python scripts/finetune_classification.py --data_dir cubes/ \
        --weights Checkpoints/en_de/semantic_genesis_chest_ct.pt --output_dir runs/ncc
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune.common import (add_model_flags, add_output_flags, add_training_flags,
                             finetune_optimizer, loss_step)
from finetune.inputs import input_files
from finetune.loop import Prepared, Task, run_finetuning
from models.targets import build_classifier
from runtime.cli import (ArgumentParser, HelpFormatter, run_cli, fraction, nonneg_int,
                         positive_int)
from runtime.errors import InputError
from runtime.intensity import check_real_array, finite_range, within_unit_range
from runtime.training import MetricLogger, batch_sums, evaluate

__all__ = ["CubeFiles", "open_cube_files", "load_labels", "count_classes", "load_class_folders", "split_stratified",
           "classification_metrics", "build_parser", "run", "main"]


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
class CubeFiles:
    """Cubes from one or more ``.npy`` files (memory-mapped), with integer labels.

    ``arrays[k]`` is (n_k, X, Y, Z); ``index[i] = (k, j)`` locates cube i; ``labels`` (N,) int64.
    """

    def __init__(self, arrays: list[np.ndarray], sources: list[str], labels: np.ndarray,
                 class_names: list[str] | None = None) -> None:
        self.arrays = arrays
        self.sources = sources
        counts = [a.shape[0] for a in arrays]
        self.index = np.concatenate(
            [np.stack([np.full(n, k), np.arange(n)], 1) for k, n in enumerate(counts)]
            or [np.zeros((0, 2))]).astype(np.int64)                 # (N, 2): (file, row)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.class_names = class_names
        shapes = {a.shape[1:] for a in arrays}
        self.cube_shape: tuple[int, int, int] = tuple(arrays[0].shape[1:]) if arrays else (0, 0, 0)
        if len(shapes) > 1:
            raise InputError("cubes of different shapes: " + ", ".join(
                f"{s} {tuple(a.shape[1:])}" for s, a in zip(sources, arrays)) + "; crop/resize them to one size")

    def __len__(self) -> int:
        return len(self.index)

    def cube(self, i: int) -> np.ndarray:
        """Cube i as float32 (X, Y, Z)."""
        k, j = self.index[i]
        return np.array(self.arrays[k][j], dtype=np.float32)  # a writable copy

    def subset(self, idx: Sequence[int]) -> "CubeFiles":
        idx = np.asarray(idx, dtype=np.int64)
        out = CubeFiles.__new__(CubeFiles)
        out.arrays, out.sources, out.class_names = self.arrays, self.sources, self.class_names
        out.index, out.labels, out.cube_shape = self.index[idx], self.labels[idx], self.cube_shape
        return out


def _npy_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npy" and not p.name.startswith("."))
        if not files:
            raise InputError(f"{path}: folder holds no .npy cube files")
        return files
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder; check --data/--data_dir")
    if path.suffix != ".npy":
        raise InputError(f"{path}: cubes must be .npy files (N, X, Y, Z) or (X, Y, Z)")
    return [path]


def _open_cubes(path: Path) -> np.ndarray:
    """A ``.npy`` file as (n, X, Y, Z), memory-mapped; checks sides and value range."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: not a readable .npy file ({e}); re-create it") from e
    check_real_array(arr, path, "save the cubes as float32 in [0, 1]")
    if arr.ndim == 5 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise InputError(f"{path}: expected cubes (N, X, Y, Z), (N, 1, X, Y, Z) or one cube (X, Y, Z), "
                         f"got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InputError(f"{path}: holds no cubes")
    if any(s % 8 for s in arr.shape[1:]):
        raise InputError(f"{path}: cube sides {arr.shape[1:]} must be divisible by 8 (the encoder "
                         "pools three times); crop or pad the cubes, e.g. to 64 x 64 x 32")
    lo, hi = finite_range(arr, path, "re-create the cubes or drop those rows", rows="cube")
    # The shared rule (one tolerance): fine-tuning cubes come from the same [0, 1]
    # preparation as the pretraining cubes.
    if not within_unit_range(lo, hi):
        raise InputError(f"{path}: values in [{lo:.4g}, {hi:.4g}], expected [0, 1]; clip CT to "
                         "[-1000, 1000] HU and scale to [0, 1] (runtime.intensity.normalize_hu)")
    return arr


def open_cube_files(paths: Sequence[str | os.PathLike]) -> tuple[list[np.ndarray], list[str]]:
    """Open every cube file under ``paths`` (files or folders, folders in sorted order)."""
    files = [f for p in paths for f in _npy_files(Path(p))]
    return [_open_cubes(f) for f in files], [str(f) for f in files]


def load_labels(path: str | os.PathLike) -> np.ndarray:
    """Integer labels (N,) from ``.npy`` ((N,) or (N, 1); one-hot (N, C) is arg-maxed) or text."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: labels file not found; check --labels")
    try:
        if path.suffix == ".npy":
            lab = check_real_array(np.load(path), path, "save integer class indices",
                                   allow_bool=True)
            if lab.ndim == 2 and lab.shape[1] > 1:
                lab = lab.argmax(1)
        else:
            text = path.read_text(encoding="utf-8").replace(",", " ").split()
            lab = np.array([float(t) for t in text])
    except ValueError as e:
        raise InputError(f"{path}: cannot read labels ({e}); use .npy or one integer per line") from e
    lab = np.asarray(lab).reshape(-1)
    if lab.size and (not np.all(np.isfinite(lab)) or np.any(lab < 0) or np.any(lab != np.round(lab))):
        raise InputError(f"{path}: labels must be integers >= 0 (class indices)")
    return lab.astype(np.int64)


def count_classes(labels: np.ndarray, num_classes: int | None = None) -> int:
    """Number of classes of integer ``labels``: they must be 0..K-1 with every class present
    (at least 2 classes), or lie in [0, ``num_classes``) when that is given (--num_classes).
    Never sized from the largest label alone: an error lists the labels found."""
    found = np.unique(np.asarray(labels, dtype=np.int64))
    shown = ", ".join(str(int(v)) for v in found[:10]) + (
        f", ... ({found.size - 10} more)" if found.size > 10 else "")
    if num_classes is not None:
        if num_classes < 2:
            raise InputError(f"--num_classes {num_classes}: a classifier needs at least 2 classes")
        outside = found[(found < 0) | (found >= num_classes)]
        if outside.size:
            raise InputError(f"labels {shown} do not all lie in [0, --num_classes {num_classes}); "
                             "fix the labels or --num_classes")
        return num_classes
    if not np.array_equal(found, np.arange(found.size)):
        raise InputError(f"labels must be the class indices 0..K-1 with every class present, "
                         f"found {found.size} distinct label(s): {shown}; renumber them, or give "
                         "--num_classes K when some classes are absent")
    return max(2, int(found.size))


def load_class_folders(root: str | os.PathLike) -> CubeFiles:
    """``root/<class>/*.npy``: one sub-folder per class, class index = sorted folder order."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: --data_dir must be a folder with one sub-folder per class")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise InputError(f"{root}: found {len(classes)} class sub-folder(s); need at least 2 "
                         f"(e.g. {root}/nodule and {root}/no_nodule)")
    arrays, sources, labels = [], [], []
    for c, folder in enumerate(classes):
        arr, src = open_cube_files([folder])
        arrays += arr
        sources += src
        labels += [np.full(a.shape[0], c, np.int64) for a in arr]
    return CubeFiles(arrays, sources, np.concatenate(labels), [p.name for p in classes])


def load_dataset(data: Sequence[str] | None, labels: str | None, data_dir: str | None,
                 what: str = "") -> CubeFiles | None:
    """Build a :class:`CubeFiles` from ``--{what}data``/``--{what}labels`` or ``--{what}data_dir``."""
    if data_dir and data:
        raise InputError(f"give either --{what}data_dir or --{what}data/--{what}labels, not both")
    if data_dir:
        return load_class_folders(data_dir)
    if not data:
        if labels:
            raise InputError(f"--{what}labels {labels} given without --{what}data")
        return None
    if not labels:
        raise InputError(f"--{what}data needs --{what}labels (one integer per cube)")
    arrays, sources = open_cube_files(data)
    lab = load_labels(labels)
    n = sum(a.shape[0] for a in arrays)
    if lab.size != n:
        raise InputError(f"{labels} has {lab.size} labels but {', '.join(sources)} hold{'s' if len(sources) == 1 else ''} "
                         f"{n} cube(s); give one label per cube, in file order")
    return CubeFiles(arrays, sources, lab)


def split_stratified(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): ``fraction`` of each class (at least one when it has >= 2 cubes)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A11]))
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * idx.size))
        if fraction > 0 and idx.size >= 2:
            k = min(max(k, 1), idx.size - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class CubeDataset(Dataset):
    """(1, X, Y, Z) float32 cube and its integer label; optional seeded random flips.

    Augmentation randomness depends only on (seed, epoch, index): same seed -> same bytes,
    with any number of workers. Set ``.epoch`` before each epoch.
    """

    def __init__(self, cubes: CubeFiles, augment: bool = False, seed: int = 0) -> None:
        self.cubes, self.augment, self.seed, self.epoch = cubes, augment, seed, 0

    def __len__(self) -> int:
        return len(self.cubes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        cube = self.cubes.cube(i)                                    # (X, Y, Z)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            axes = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
            if axes:
                cube = np.flip(cube, axes)
        x = torch.from_numpy(np.ascontiguousarray(cube)[None])    # (1, X, Y, Z)
        return x, torch.tensor(self.cubes.labels[i], dtype=torch.int64)


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation of range(n) that depends only on (seed, epoch): a resumed run sees the same
    order as an uninterrupted one. Set ``.epoch`` before each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 0x5F1E])
        return iter(rng.permutation(self.n).tolist())


# ------------------------------------------------------------------------------------------
# metrics and training
# ------------------------------------------------------------------------------------------
def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """AUC and accuracy. ``probs``: (N,) probability of class 1, or (N, C) class probabilities.

    AUC is None when the labels hold a single class (it is undefined); multi-class AUC is the
    one-vs-rest macro average.
    """
    from sklearn.metrics import accuracy_score, roc_auc_score  # local: sklearn is slow to import

    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    pred = (probs >= 0.5).astype(np.int64) if probs.ndim == 1 else probs.argmax(1)
    auc: float | None = None
    present = np.unique(labels)
    if present.size >= 2:
        if probs.ndim == 1 or probs.shape[1] == 2:
            auc = float(roc_auc_score(labels, probs if probs.ndim == 1 else probs[:, 1]))
        elif present.size == probs.shape[1]:
            auc = float(roc_auc_score(labels, probs, multi_class="ovr"))
    return {"auc": auc, "accuracy": float(accuracy_score(labels, pred))}


def _loss_and_probs(logits: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, 1) or (N, C), labels (N,) -> (mean loss, probabilities (N,) or (N, C))."""
    if loss == "bce":
        z = logits[:, 0]
        return F.binary_cross_entropy_with_logits(z, y.float()), torch.sigmoid(z)
    return F.cross_entropy(logits, y), torch.softmax(logits, 1)


def evaluate_classifier(model: nn.Module, loader: DataLoader, loss: str, device: torch.device,
                        log: MetricLogger | None = None, desc: str = "evaluate",
                        n_classes: int | None = None) -> dict[str, Any]:
    """Mean loss, AUC and accuracy of ``model`` over ``loader`` (one host read at the end).
    Where the AUC is undefined (the labels lack a class of the ``n_classes`` the head
    predicts), ``auc`` is None and ``auc_undefined`` says why."""
    probs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []

    def step(batch: Any) -> torch.Tensor:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        value, p = _loss_and_probs(model(x), y, loss)
        probs.append(p.float())
        labels.append(y)
        return batch_sums(value, y.numel())

    total, n = evaluate(model, step, loader, log or MetricLogger(verbose=0), desc,
                        torch.zeros(2, device=device)).tolist()
    lab, pr = torch.cat(labels).cpu().numpy(), torch.cat(probs).cpu().numpy()
    result = {"loss": total / max(n, 1), **classification_metrics(lab, pr), "n": int(n)}
    if result["auc"] is None:
        lacking = sorted(set(range(n_classes or 2)) - set(np.unique(lab).tolist()))
        result["auc_undefined"] = "the labels lack class(es) " + ", ".join(map(str, lacking))
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        description="Fine-tune a Semantic Genesis encoder (encoder + global pooling + linear head) "
                    "for 3D cube classification.",
        formatter_class=HelpFormatter)
    g = ap.add_argument_group("data (cubes in [0, 1], axes (x, y, z), sides divisible by 8)")
    g.add_argument("--data", nargs="+", default=None,
                   help=".npy files (N, X, Y, Z) or one cube (X, Y, Z) per file, or folders of them")
    g.add_argument("--labels", default=None,
                   help="labels for --data: .npy (N,) / (N, 1) or text, one integer per cube in file order")
    g.add_argument("--data_dir", default=None,
                   help="instead of --data/--labels: a folder with one sub-folder of .npy cubes per class")
    g.add_argument("--val_data", nargs="+", default=None, help="explicit validation cubes (as --data)")
    g.add_argument("--val_labels", default=None, help="labels for --val_data")
    g.add_argument("--val_data_dir", default=None, help="explicit validation set, one sub-folder per class")
    g.add_argument("--val_fraction", type=fraction, default=0.2,
                   help="without explicit validation data: stratified fraction of the training cubes held out")
    g.add_argument("--test_data", nargs="+", default=None,
                   help="optional test cubes, evaluated once with the best weights")
    g.add_argument("--test_labels", default=None, help="labels for --test_data")
    g.add_argument("--test_data_dir", default=None, help="optional test set, one sub-folder per class")
    g.add_argument("--augment", action="store_true", help="random flips along x, y, z while training")
    g.add_argument("--num_workers", type=nonneg_int, default=2, help="DataLoader worker processes")
    g.add_argument("--num_classes", type=positive_int, default=None,
                   help="number of classes K when some never occur in the data (labels in [0, K)); "
                        "without it the labels must be exactly 0..K-1")

    m = add_model_flags(ap)
    m.add_argument("--freeze_encoder", action="store_true",
                   help="train only the linear head (the encoder keeps its pretrained weights)")
    m.add_argument("--loss", default="auto", choices=["auto", "bce", "ce"],
                   help="bce: one logit, binary cross-entropy (2 classes); ce: one logit per class, "
                        "cross-entropy; auto: bce for 2 classes else ce")

    add_training_flags(ap, epochs=100, patience=10, monitor=["loss", "auc"], batch_size=16,
                       batch_help="cubes per batch",
                       seed_help="seed of the split, the shuffling and the head")
    add_output_flags(ap, "runs/finetune_classification")
    return ap


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune as configured by ``args`` (see :func:`build_parser`); return the metrics dict
    that is also written to ``output_dir/metrics.json`` (``finetune.loop.run_finetuning``)."""
    return run_finetuning(args, TASK)


def _refuse_unmeasurable(train: CubeFiles, val: CubeFiles, test: CubeFiles | None,
                         n_classes: int, monitor: str, where: dict[str, str]) -> None:
    """Refuse sets whose results would mean nothing: training or validation cubes of a single
    class, ``--monitor auc`` with a validation set lacking a class (its AUC is undefined), a
    test set of a single class. ``where``: the flags each set came from, for the message."""
    for name, ds in (("training", train), ("validation", val), ("test", test)):
        if ds is not None and np.unique(ds.labels).size < 2:
            raise InputError(f"{where[name]}: every {name} cube has label {int(ds.labels[0])}; "
                             f"a single class cannot be learned or measured (its AUC is "
                             f"undefined, its accuracy says nothing); give cubes of at least "
                             f"two classes")
    lacking = sorted(set(range(n_classes)) - set(np.unique(val.labels).tolist()))
    if monitor == "auc" and lacking:
        raise InputError(f"{where['validation']}: the validation cubes lack class(es) "
                         f"{', '.join(map(str, lacking))}, so their AUC is undefined; use "
                         "--monitor loss or a validation set with every class")


def _splits(args: argparse.Namespace) -> tuple[CubeFiles, CubeFiles, CubeFiles | None,
                                                 list[str], str, int]:
    """(train, validation, test or None, class names, loss "bce" | "ce", number of logits) from
    the data flags; without explicit validation data a stratified ``--val_fraction`` of the
    training cubes."""
    full = load_dataset(args.data, args.labels, args.data_dir)
    if full is None:
        raise InputError("no training data: give --data and --labels, or --data_dir")
    val = load_dataset(args.val_data, args.val_labels, args.val_data_dir, "val_")
    test = load_dataset(args.test_data, args.test_labels, args.test_data_dir, "test_")
    where = {"training": args.data_dir or args.labels, "test": args.test_data_dir or args.test_labels,
             "validation": args.val_data_dir or args.val_labels
             or f"--val_fraction {args.val_fraction} of {args.data_dir or args.labels}"}
    if val is None:
        if args.val_fraction <= 0:
            raise InputError("no validation data: give --val_data/--val_labels or --val_data_dir, "
                             "or --val_fraction > 0")
        tr_idx, va_idx = split_stratified(full.labels, args.val_fraction, args.seed)
        train, val = full.subset(tr_idx), full.subset(va_idx)
    else:
        train = full
    for name, ds in (("validation", val), ("test", test)):
        if ds is not None and ds.cube_shape != train.cube_shape:
            raise InputError(f"{name} cubes {ds.cube_shape} differ from training cubes {train.cube_shape}")
    if len(train) == 0 or len(val) == 0:
        raise InputError(f"need training and validation cubes, got {len(train)} and {len(val)}; "
                         "add data or change --val_fraction")
    all_labels = np.concatenate([train.labels, val.labels] + ([test.labels] if test is not None else []))
    n_classes = count_classes(all_labels, args.num_classes)
    _refuse_unmeasurable(train, val, test, n_classes, args.monitor, where)
    loss = args.loss if args.loss != "auto" else ("bce" if n_classes == 2 else "ce")
    if loss == "bce" and n_classes > 2:
        raise InputError(f"--loss bce needs 2 classes, the labels have {n_classes}; use --loss ce")
    class_names = full.class_names or [str(c) for c in range(n_classes)]
    return train, val, test, class_names, loss, 1 if loss == "bce" else n_classes


def _inputs(args: argparse.Namespace, sets: dict[str, CubeFiles | None]
            ) -> dict[str, list[tuple[str, Path]]]:
    """{flag: [(name, path)]} of every file the run reads (``finetune.inputs.input_files``)."""
    out: dict[str, list[tuple[str, Path]]] = {}
    for prefix, ds in sets.items():
        if ds is None:
            continue
        folders = getattr(args, f"{prefix}data") or [getattr(args, f"{prefix}data_dir")]
        flag = f"{prefix}data" if getattr(args, f"{prefix}data") else f"{prefix}data_dir"
        out[flag] = input_files(sorted(set(ds.sources), key=ds.sources.index), folders)
        if getattr(args, f"{prefix}labels"):
            out[f"{prefix}labels"] = input_files([getattr(args, f"{prefix}labels")], [])
    return out


def _prepare(args: argparse.Namespace, device: torch.device) -> Prepared:
    """Data, classifier (seeded head, see ``models.targets.seeded_init``), loaders and the
    validation and test evaluations of a classification run."""
    train, val, test, class_names, loss, n_out = _splits(args)
    model, loaded = build_classifier(width=args.width, weights=args.weights, n_class=n_out,
                                     norm=args.norm, freeze_encoder=args.freeze_encoder,
                                     seed=args.seed)
    model.to(device)
    optimizer = finetune_optimizer([p for p in model.parameters() if p.requires_grad],
                                   args.optimizer, args.lr, args.weight_decay)
    pin, workers = device.type == "cuda", args.num_workers
    train_ds = CubeDataset(train, augment=args.augment, seed=args.seed)
    sampler = EpochShuffle(len(train), args.seed)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler,
                              num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                              drop_last=len(train) > args.batch_size and len(train) % args.batch_size == 1)
    eval_kw = dict(batch_size=args.batch_size, shuffle=False, num_workers=workers, pin_memory=pin)
    val_loader = DataLoader(CubeDataset(val), persistent_workers=workers > 0, **eval_kw)
    n_classes = max(2, n_out)

    def set_epoch(epoch: int) -> None:
        train_ds.epoch = sampler.epoch = epoch

    def validate(log: MetricLogger, epoch: int) -> dict[str, Any]:
        return evaluate_classifier(model, val_loader, loss, device, log, f"epoch {epoch} val",
                                   n_classes)

    def test_set() -> dict[str, Any]:
        return evaluate_classifier(model, DataLoader(CubeDataset(test), **eval_kw), loss, device,
                                   n_classes=n_classes)

    return Prepared(
        model=model, model_config={"width": args.width, "n_class": n_out, "norm": args.norm,
                                   "in_channels": 1},
        optimizer=optimizer, step=loss_step(model, optimizer, device,
                                            lambda out, y: _loss_and_probs(out, y, loss)[0]),
        train_loader=train_loader, set_epoch=set_epoch, evaluate=validate,
        test=test_set if test is not None else None, history_keys=("loss", "auc", "accuracy"),
        summary=(("AUC", "auc"), ("accuracy", "accuracy")),
        info={"classes": class_names, "loss": loss, "n_train": len(train), "n_val": len(val),
              "n_test": len(test) if test is not None else 0},
        inputs=_inputs(args, {"": train, "val_": val if args.val_data or args.val_data_dir
                              else None, "test_": test}),
        loaded=loaded, device=device, checkpoint_extra={"classes": class_names, "loss": loss})


#: Classification fine-tuning for ``finetune.loop.run_finetuning``.
TASK = Task("classification", "TargetClassifier",
            ("data", "labels", "data_dir", "val_data", "val_labels", "val_data_dir",
             "test_data", "test_labels", "test_data_dir"), _prepare)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, run, argv,
                   interrupted="continue from the last complete epoch with --resume")


if __name__ == "__main__":
    raise SystemExit(main())
