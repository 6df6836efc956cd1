"""Tiny, valid fold files of self-discovered patterns for the pretraining tests.

``make_fold_files(folder, classes=3, instances=4, val_instances=2, shape=SHAPE)`` writes
``train_data{1..R}_vwGen_ex_ref_fold{k}.0.npy`` / labels and ``val_*1`` for every block of 50
classes, each class a learnable pattern (a bright blob at a class-specific place on a noisy
background), values in [0, 1]. ``train_args`` gives the matching ``pytorch/train.py`` flags.

``make_volume_dataset(root, n_train=4, n_val=2, shape=(40, 40, 24), seed=0)`` writes prepared
volumes ``root/{train,validation}/patient_{i:03d}.npy`` (smooth random, float32 in [0, 1]) for
the self-discovery stages; ``autoencoder_args`` gives tiny stage-1 flags for them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from self_discovery.fold_files import CLASSES_PER_BLOCK, fold_file_names

SHAPE = (16, 16, 8)  # divisible by 8 (the network pools three times); fast on CPU


def _cubes(rng: np.random.Generator, classes: range, instances: int,
           shape: tuple[int, int, int], dtype) -> tuple[np.ndarray, np.ndarray]:
    X, Y, Z = shape
    xs, ys, zs = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    cubes, labels = [], []
    for c in classes:
        cx, cy = (c * 7) % X, (c * 11) % Y
        blob = np.exp(-(((xs - cx) ** 2 + (ys - cy) ** 2) / 30.0 + (zs - Z / 2) ** 2 / 20.0))
        for _ in range(instances):
            noise = rng.uniform(0.0, 0.3, shape)
            cubes.append(np.clip(0.2 + 0.6 * blob + noise * 0.5, 0.0, 1.0))
            labels.append(c)
    return (np.stack(cubes).astype(dtype),
            np.asarray(labels, dtype=np.int64).reshape(-1, 1))


def make_fold_files(folder: str | Path, classes: int = 3, instances: int = 4,
                    val_instances: int = 2, resolutions: int = 3,
                    shape: tuple[int, int, int] = SHAPE, seed: int = 0,
                    dtype=np.float32) -> Path:
    """Write the fold files for ``classes`` classes into ``folder``; returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(1, math.ceil(classes / CLASSES_PER_BLOCK) + 1):
        block = range((k - 1) * CLASSES_PER_BLOCK, min(classes, k * CLASSES_PER_BLOCK))
        for r in range(1, resolutions + 1):
            x, y = _cubes(rng, block, instances, shape, dtype)
            d, lab = fold_file_names("train", r, k)
            np.save(folder / d, x)
            np.save(folder / lab, y)
        x, y = _cubes(rng, block, val_instances, shape, dtype)
        d, lab = fold_file_names("val", 1, k)
        np.save(folder / d, x)
        np.save(folder / lab, y)
    return folder


def train_args(data_dir: str | Path, out: str | Path, classes: int = 3, instances: int = 4,
               val_instances: int = 2, width: int = 4, epochs: int = 2,
               batch_size: int = 8, resolutions: int = 3,
               shape: tuple[int, int, int] = SHAPE, device: str = "cpu") -> list[str]:
    """``pytorch/train.py`` flags for fold files made by ``make_fold_files``."""
    out = Path(out)
    return ["--data_dir", str(data_dir), "--input_rows", str(shape[0]),
            "--input_cols", str(shape[1]), "--input_deps", str(shape[2]),
            "--nb_multires_patch", str(resolutions),
            "--cls_classes", str(classes), "--nb_instances", str(instances),
            "--nb_instances_val", str(val_instances), "--width", str(width),
            "--nb_epoch", str(epochs), "--batch_size", str(batch_size), "--device", device,
            "--output_dir", str(out / "ckpt"), "--log_dir", str(out / "runs"),
            "--verbose", "1", "--nb_preview", "2"]


def autoencoder_args(data_dir: str | Path, out: str | Path, *extra: str,
                     device: str = "cpu") -> list[str]:
    """``self_discovery/train_autoencoder.py`` flags for tiny runs: 32 x 32 x 16, width 4,
    batch 2, no workers, quiet; checkpoints in out/ckpt, TensorBoard in out/tb."""
    out = Path(out)
    return ["--data_dir", str(data_dir), "--output_dir", str(out / "ckpt"),
            "--log_dir", str(out / "tb"), "--input_rows", "32", "--input_cols", "32",
            "--input_deps", "16", "--width", "4", "--batch_size", "2", "--num_workers", "0",
            "--device", device, "--verbose", "0", *extra]


def make_volume_dataset(root: str | Path, n_train: int = 4, n_val: int = 2,
                        shape: tuple[int, int, int] = (40, 40, 24), seed: int = 0) -> Path:
    """Smooth random volumes in [0, 1], float32, under root/train and root/validation."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("validation", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            v = ndimage.gaussian_filter(rng.random(shape), 3)
            v = (v - v.min()) / (v.max() - v.min())
            np.save(root / split / f"patient_{i:03d}.npy", v.astype(np.float32))
    return root


def tiny_pretraining(root: str | Path, epochs: int = 1) -> list[str]:
    """Fold files of 2 classes (2 train + 1 val cube each, one resolution) under root/folds and
    the ``pytorch/train.py`` flags of a width-4 run on them (checkpoints in root/ckpt)."""
    data = make_fold_files(Path(root) / "folds", classes=2, instances=2, val_instances=1,
                           resolutions=1)
    return train_args(data, root, classes=2, instances=2, val_instances=1, resolutions=1,
                      epochs=epochs, width=4)
