"""Tiny inputs for the fine-tuning tests: nodule cubes of 16 x 16 x 8 with labels, phantom
volumes with nodule masks, width-2 checkpoints of every kind, and the flags of a one-epoch CPU
run without worker processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.checkpoint import save_checkpoint
from models.ynet3d import ClassificationNet3D, UNet3D, YNet3D
from preparation.phantoms import make_nodule_cubes, write_phantom_dataset
from self_discovery import train_autoencoder as ta

CUBE = (16, 16, 8)
WIDTH = 2


def run_flags(out: Path, epochs: int = 1, verbose: bool = False) -> list[str]:
    """Flags of a short CPU run writing into ``out`` (the width comes from the weights)."""
    return ["--nb_epoch", str(epochs), "--patience", "5", "--num_workers", "0", "--device", "cpu",
            "--output_dir", str(out)] + ([] if verbose else ["--quiet"])


def write_cubes(root: Path, n: int = 12, seed: int = 0, name: str = "cubes") -> list[str]:
    """``root/<name>.npy`` (n, 16, 16, 8) nodule / no-nodule cubes and ``<name>_labels.npy``;
    returns the ``--data``/``--labels`` flags."""
    root.mkdir(parents=True, exist_ok=True)
    cubes, labels = make_nodule_cubes(n, CUBE, seed=seed)
    np.save(root / f"{name}.npy", cubes)
    np.save(root / f"{name}_labels.npy", labels)
    return ["--data", str(root / f"{name}.npy"), "--labels", str(root / f"{name}_labels.npy")]


def write_volumes(root: Path, n: int = 3, seed: int = 0) -> list[str]:
    """``root/img`` and ``root/msk``: n phantoms (24 x 24 x 16, one nodule each) and their
    masks; returns the ``--images``/``--masks`` flags with a 16 x 16 x 8 crop."""
    write_phantom_dataset(root / "img", n, (24, 24, 16), seed=seed, fmt="npy", nodules=1,
                          mask_dir=root / "msk")
    return ["--images", str(root / "img"), "--masks", str(root / "msk"), "--crop", "16", "16",
            "8", "--steps_per_epoch", "1", "--batch_size", "2"]


def save_kinds(root: Path, seed: int = 0) -> dict[str, Path]:
    """Width-2 checkpoints as this project writes them: ``en_de`` (pretraining Y-Net), ``en``
    (encoder + head), ``autoencoder`` (stage 1, its model_config), ``unet`` (a U-Net)."""
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, model, arch, cfg in (
            ("en_de", YNet3D(cls_classes=3, width=WIDTH), "YNet3D", {"cls_classes": 3}),
            ("en", ClassificationNet3D(cls_classes=3, width=WIDTH), "ClassificationNet3D",
             {"cls_classes": 3}),
            ("autoencoder", ta.build_autoencoder(width=WIDTH), "UNet3D",
             ta.model_config(type("A", (), {"width": WIDTH, "decoder": "upsampling"}))),
            ("unet", UNet3D(width=WIDTH), "UNet3D", {"n_class": 1})):
        out[name] = save_checkpoint(root / f"{name}.pt", model, arch=arch,
                                    model_config={"width": WIDTH, "in_channels": 1,
                                                  "norm": "batch_stats", **cfg})
    return out
