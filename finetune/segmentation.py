"""Fine-tune the whole (pretrained) Semantic Genesis 3D U-Net for binary segmentation.

Training draws random crops (``--crop``, default 64 x 64 x 32) from the training volumes; with
probability ``--foreground_prob`` a crop is centred (with jitter) on a random foreground voxel,
so small structures such as nodules are seen often enough. The loss is the original README's
Dice loss (``--loss dice``; ``bce_dice`` adds binary cross-entropy). Validation and test run
sliding-window inference over whole volumes (windows of ``--crop`` overlapping by
``--overlap``, Gaussian-weighted averaging), threshold 0.5, and report Dice and IoU per case
and their means over the cases whose mask has foreground (Dice is undefined for an empty mask:
such a case is reported with its predicted voxels and left out of the means). Training stops
early when the validation Dice (or loss, ``--monitor``) has not improved for ``--patience``
epochs; the best epoch's weights are kept (the loop, ``--resume`` and the outputs are
``finetune.loop``'s, shared with classification). Refused: ``--foreground_labels`` values no
training mask holds, training masks without foreground, validation or test masks all empty.

Data: ``--images`` / ``--masks`` are folders or lists of volumes, each mask paired with the image
of the same name, optionally followed by ``_mask``/``_seg``/``_label`` (``case1.nii.gz`` and
``case1_mask.nii.gz``); unmatched or ambiguous names are an error listing them. Volumes are
``.npy`` arrays (x, y, z) with images already in [0, 1], or any format SimpleITK reads (NIfTI,
NRRD, MetaImage, a DICOM series folder, ...) with images in HU (clipped to [-1000, 1000] and
scaled to [0, 1] here). A mask must lie on its image's grid (same size, spacing, origin and
direction); foreground = mask > 0 (or ``--foreground_labels``). Validation: ``--val_images`` /
``--val_masks``, else a ``--val_fraction`` of the training volumes; optional test volumes are
evaluated once with the best weights.

Outputs in ``--output_dir``: ``config.json``, ``metrics.json``, ``best.pt`` (``models.checkpoint``
schema, arch ``UNet3D``), ``last.pt`` (for ``--resume``), ``tensorboard/``, and with
``--save_predictions`` the test masks as ``predictions/<name>.npy`` (uint8, (x, y, z)).

    python scripts/finetune_segmentation.py --images data/img --masks data/lbl \
        --weights Checkpoints/en_de/semantic_genesis_chest_ct.pt --output_dir runs/seg
"""
from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune.common import (add_model_flags, add_output_flags, add_training_flags,
                             finetune_optimizer, loss_step)
from finetune.inputs import input_files
from finetune.loop import Prepared, Task, run_finetuning
from models.targets import bce_dice_loss, binary_dice_iou, build_segmentation_model, dice_coef_loss
from preparation.ct_io import CTReadError, find_ct_inputs, read_ct, volume_stem
from runtime.cli import (ArgumentParser, HelpFormatter, run_cli, fraction, nonneg_int,
                         positive_int, probability)
from runtime.errors import InputError
from runtime.files import save_npy_atomic
from runtime.intensity import check_real_array, finite_range, normalize_hu, within_unit_range
from runtime.training import MetricLogger

__all__ = ["Case", "MASK_SUFFIXES", "find_volume_files", "pair_volumes", "load_cases", "sample_crop", "CropDataset",
           "sliding_window_predict", "evaluate_cases", "build_parser", "run", "main"]

#: Largest number of foreground coordinates kept per volume for oversampling.
MAX_FG_COORDS = 20000


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One volume: ``image`` float32 (X, Y, Z) in [0, 1], ``mask`` uint8 (X, Y, Z) in {0, 1},
    ``fg`` int32 (K, 3) foreground coordinates (a seeded subsample of at most MAX_FG_COORDS);
    ``found_labels``: the values of ``--foreground_labels`` present in the mask file."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    fg: np.ndarray
    image_path: str
    mask_path: str
    found_labels: tuple[int, ...] = ()


def find_volume_files(paths: Sequence[str | os.PathLike], flag: str) -> list[dict[str, Any]]:
    """Volumes under ``paths`` (files, folders of files, DICOM series folders), sorted by name."""
    items: list[dict[str, Any]] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise InputError(f"{p}: no such file or folder; check {flag}")
        try:
            found = find_ct_inputs(p)
        except CTReadError as e:
            raise InputError(f"{e}; check {flag}") from e
        if not found:
            raise InputError(f"{p}: holds no volumes; check {flag}")
        items += found
    return sorted(items, key=lambda it: (volume_stem(it["path"]), str(it["path"])))


def _finite_range(arr: np.ndarray, path: Path) -> tuple[float, float]:
    return finite_range(arr, path, "re-create the volume (or give the HU volume in a SimpleITK "
                        "format)")


def _read(item: dict[str, Any], is_mask: bool) -> tuple[np.ndarray, dict[str, Any] | None]:
    """(array (X, Y, Z), grid facts or None for .npy). Images come back in [0, 1]."""
    path = Path(item["path"])
    if item["kind"] == "file" and path.name.lower().endswith(".npy"):
        try:
            arr = np.load(path)
        except (ValueError, OSError) as e:
            raise InputError(f"{path}: not a readable .npy file ({e})") from e
        check_real_array(arr, path, "save the volume as real numbers", allow_bool=is_mask)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3:
            raise InputError(f"{path}: expected a volume (X, Y, Z), got shape {arr.shape}")
        lo, hi = _finite_range(arr, path)
        if not is_mask:
            arr = arr.astype(np.float32, copy=False)
            # The shared rule (one tolerance): fine-tuning images come from the same [0, 1]
            # preparation as the pretraining cubes.
            if not within_unit_range(lo, hi):
                raise InputError(f"{path}: .npy image values in [{lo:.4g}, {hi:.4g}], expected [0, 1]; "
                                 "clip HU to [-1000, 1000] and scale to [0, 1], or give the HU volume "
                                 "in a SimpleITK format (.nii.gz, .nrrd, .mhd)")
        return arr, None
    arr, spacing, meta = read_ct(path, item.get("files"))
    grid = {"spacing": list(spacing), "origin": meta.get("origin"),
            "direction": meta.get("original_direction"), "shape": list(arr.shape)}
    _finite_range(arr, path)
    if not is_mask:
        arr = normalize_hu(arr)
    return arr, grid


def _check_grid(img: np.ndarray, img_grid: dict | None, msk: np.ndarray, msk_grid: dict | None,
                img_path: str, msk_path: str) -> None:
    """Raise InputError naming both files when the mask is not on the image's voxel grid."""
    problems = []
    if img.shape != msk.shape:
        problems.append(f"size {tuple(img.shape)} vs {tuple(msk.shape)}")
    if img_grid is not None and msk_grid is not None:
        if not np.allclose(img_grid["spacing"], msk_grid["spacing"], rtol=1e-3, atol=1e-4):
            problems.append(f"spacing {tuple(img_grid['spacing'])} vs {tuple(msk_grid['spacing'])}")
        tol = 0.5 * min(img_grid["spacing"])
        if img_grid["origin"] is not None and msk_grid["origin"] is not None and \
                not np.allclose(img_grid["origin"], msk_grid["origin"], atol=tol):
            problems.append(f"origin {tuple(img_grid['origin'])} vs {tuple(msk_grid['origin'])}")
        if img_grid["direction"] is not None and msk_grid["direction"] is not None and \
                not np.allclose(img_grid["direction"], msk_grid["direction"], atol=1e-3):
            problems.append("direction differs")
    if problems:
        raise InputError(f"mask {msk_path} is not on the grid of image {img_path} ("
                         + "; ".join(problems) + "); resample the mask onto the image grid")


#: Mask file names may add one of these to the image's name (``case1.nii.gz`` and
#: ``case1_mask.nii.gz``); a mask with exactly the image's name (in another folder) also pairs.
MASK_SUFFIXES = ("_mask", "_seg", "_label")


def _names(items: Sequence[dict[str, Any]], limit: int = 8) -> str:
    shown = [str(it["path"]) for it in items[:limit]]
    return ", ".join(shown) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def pair_volumes(img_items: Sequence[dict[str, Any]], msk_items: Sequence[dict[str, Any]],
                 what: str = "") -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pair every image with its mask by name, never by order.

    The rule: a mask pairs with the image whose name (without the volume suffix) equals the
    mask's name, or the mask's name without a trailing ``_mask``, ``_seg`` or ``_label``
    (``case1.nii.gz`` <- ``case1_mask.nii.gz`` or ``case1.nii.gz`` in the mask folder).
    Two images with one name (in different folders), a mask that fits several images or
    none, and an image without a mask are errors listing the files.
    """
    by_name: dict[str, list[dict[str, Any]]] = {}
    for it in img_items:
        by_name.setdefault(volume_stem(it["path"]), []).append(it)
    dup = [it for group in by_name.values() if len(group) > 1 for it in group]
    if dup:
        raise InputError(f"--{what}images: several images share a name ({_names(dup)}); images "
                         "pair with masks by file name, so rename them to be unique")
    mask_of: dict[str, list[dict[str, Any]]] = {}
    unmatched = []
    for it in msk_items:
        stem = volume_stem(it["path"])
        keys = {stem} | {stem[: -len(s)] for s in MASK_SUFFIXES if stem.endswith(s)}
        hits = [k for k in keys if k in by_name]
        if len(hits) != 1:
            unmatched.append(it)
            continue
        mask_of.setdefault(hits[0], []).append(it)
    several = [it for group in mask_of.values() if len(group) > 1 for it in group]
    no_mask = [by_name[k][0] for k in sorted(by_name) if k not in mask_of]
    problems = []
    if no_mask:
        problems.append(f"image(s) without a mask: {_names(no_mask)}")
    if unmatched:
        problems.append(f"mask(s) matching no image: {_names(unmatched)}")
    if several:
        problems.append(f"several masks for one image: {_names(several)}")
    if problems:
        raise InputError(f"--{what}images / --{what}masks: " + "; ".join(problems) + "; a mask "
                         "is named like its image, optionally followed by _mask, _seg or _label "
                         "(case1.nii.gz -> case1_mask.nii.gz)")
    return [(by_name[k][0], mask_of[k][0]) for k in sorted(by_name)]


def load_cases(images: Sequence[str], masks: Sequence[str], seed: int = 0,
               foreground_labels: Sequence[int] | None = None, what: str = "") -> list[Case]:
    """Read image/mask pairs (paired by name, see :func:`pair_volumes`), check grids, find
    foreground voxels."""
    pairs = pair_volumes(find_volume_files(images, f"--{what}images"),
                         find_volume_files(masks, f"--{what}masks"), what)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF0E9]))
    cases = []
    for it_img, it_msk in pairs:
        img, img_grid = _read(it_img, is_mask=False)
        msk, msk_grid = _read(it_msk, is_mask=True)
        _check_grid(img, img_grid, msk, msk_grid, str(it_img["path"]), str(it_msk["path"]))
        fgmask = np.isin(msk, list(foreground_labels)) if foreground_labels else msk > 0
        found = tuple(v for v in foreground_labels or () if (msk == v).any())
        fg = np.argwhere(fgmask).astype(np.int32)                      # (K, 3)
        if len(fg) > MAX_FG_COORDS:
            fg = fg[np.sort(rng.choice(len(fg), MAX_FG_COORDS, replace=False))]
        cases.append(Case(volume_stem(it_img["path"]), np.ascontiguousarray(img, dtype=np.float32),
                          fgmask.astype(np.uint8), fg, str(it_img["path"]), str(it_msk["path"]),
                          found))
    return cases


def sample_crop(case: Case, crop: Sequence[int], rng: np.random.Generator,
                foreground_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """A random (image, mask) crop of size ``crop`` (zero-padded where the volume is smaller).

    With probability ``foreground_prob`` (and when the case has foreground) the crop is centred
    on a random foreground voxel, shifted by up to a quarter of the crop per axis.
    """
    shape, c = np.array(case.image.shape), np.array(crop)
    room = np.maximum(shape - c, 0)
    if len(case.fg) and rng.random() < foreground_prob:
        centre = case.fg[rng.integers(len(case.fg))] + rng.integers(-(c // 4), c // 4 + 1)
        start = centre - c // 2
    else:
        start = rng.integers(0, room + 1)
    start = np.clip(start, 0, room)
    sl = tuple(slice(int(s), int(s + k)) for s, k in zip(start, c))
    img, msk = case.image[sl], case.mask[sl]
    if img.shape != tuple(c):
        pad = [(0, int(k - n)) for k, n in zip(c, img.shape)]
        img, msk = np.pad(img, pad), np.pad(msk, pad)
    return img, msk


class CropDataset(Dataset):
    """``length`` random crops per epoch: ((1, *crop) float32 image, (1, *crop) float32 mask).

    Randomness depends only on (seed, epoch, index); set ``.epoch`` before each epoch.
    """

    def __init__(self, cases: list[Case], crop: Sequence[int], length: int, foreground_prob: float,
                 augment: bool = False, seed: int = 0) -> None:
        self.cases, self.crop, self.length = cases, tuple(crop), length
        self.foreground_prob, self.augment, self.seed, self.epoch = foreground_prob, augment, seed, 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        case = self.cases[int(rng.integers(len(self.cases)))]
        img, msk = sample_crop(case, self.crop, rng, self.foreground_prob)
        if self.augment:
            axes = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
            if axes:
                img, msk = np.flip(img, axes), np.flip(msk, axes)
        return (torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)[None]),
                torch.from_numpy(np.ascontiguousarray(msk, dtype=np.float32)[None]))


# ------------------------------------------------------------------------------------------
# inference and metrics
# ------------------------------------------------------------------------------------------
def _starts(length: int, size: int, step: int) -> list[int]:
    if length <= size:
        return [0]
    s = list(range(0, length - size + 1, step))
    if s[-1] != length - size:
        s.append(length - size)
    return s


def _gaussian_weights(crop: Sequence[int]) -> np.ndarray:
    """Importance map (crop) peaking at the window centre (sigma = size / 8), min 1e-3."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2.0) / (n / 8.0)) ** 2) for n in crop]
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


@torch.no_grad()
def sliding_window_predict(model: nn.Module, image: np.ndarray, crop: Sequence[int],
                           overlap: float = 0.5, batch_size: int = 4,
                           device: torch.device | str = "cpu") -> np.ndarray:
    """Foreground probability (X, Y, Z) float32 of a whole volume (X, Y, Z) in [0, 1].

    Windows of size ``crop`` step by ``crop * (1 - overlap)`` (the last one flush with the
    border); overlapping outputs are averaged with Gaussian weights. Volumes smaller than the
    crop are zero-padded (air) and the result cropped back.
    """
    model.eval()
    orig = image.shape
    pad = [(0, max(0, k - n)) for k, n in zip(crop, orig)]
    vol = np.pad(image, pad) if any(p[1] for p in pad) else image
    steps = [max(1, int(round(k * (1.0 - overlap)))) for k in crop]
    starts = [_starts(n, k, s) for n, k, s in zip(vol.shape, crop, steps)]
    weight = _gaussian_weights(crop)
    acc = np.zeros(vol.shape, np.float32)
    wsum = np.zeros(vol.shape, np.float32)
    windows = [tuple(slice(a, a + k) for a, k in zip(st, crop)) for st in itertools.product(*starts)]
    for b in range(0, len(windows), batch_size):
        batch = windows[b:b + batch_size]
        x = torch.from_numpy(np.stack([vol[sl] for sl in batch])[:, None]).to(device)  # (B, 1, *crop)
        p = model(x)[:, 0].float().cpu().numpy()                                         # (B, *crop)
        for sl, pw in zip(batch, p):
            acc[sl] += pw * weight
            wsum[sl] += weight
    prob = acc / np.maximum(wsum, 1e-8)
    return prob[: orig[0], : orig[1], : orig[2]]


def evaluate_cases(model: nn.Module, cases: list[Case], crop: Sequence[int], overlap: float,
                   batch_size: int, device: torch.device,
                   save_dir: Path | None = None, preview: list | None = None) -> dict[str, Any]:
    """Sliding-window Dice/IoU (threshold 0.5) per case and their means over the cases whose
    mask has foreground (for an empty mask they are undefined: None, counted in ``n_empty``;
    its predicted voxels are still reported), plus the mean soft Dice loss of the
    probabilities over every case. With ``save_dir``, predicted masks are written there; with
    ``preview`` (a list), an image (X, 3Y) of the first case's image | mask | probability is
    appended to it."""
    per_case = []
    first_prob = None
    for case in cases:
        prob = sliding_window_predict(model, case.image, crop, overlap, batch_size, device)
        if first_prob is None:
            first_prob = prob
        pred = prob >= 0.5
        # Dice and IoU are undefined for an empty mask (None): such cases count in the loss only
        dice, iou = binary_dice_iou(pred, case.mask) if case.mask.any() else (None, None)
        loss = float(dice_coef_loss(torch.from_numpy(case.mask.astype(np.float32)), torch.from_numpy(prob)))
        per_case.append({"name": case.name, "dice": dice, "iou": iou, "dice_loss": loss,
                         "foreground_voxels": int(case.mask.sum()), "predicted_voxels": int(pred.sum())})
        if save_dir is not None:
            save_npy_atomic(save_dir / f"{case.name}.npy", pred.astype(np.uint8))

    def mean(key: str) -> float | None:
        values = [c[key] for c in per_case if c[key] is not None]
        return float(np.mean(values)) if values else None
    result = {"dice": mean("dice"), "iou": mean("iou"), "loss": mean("dice_loss"),
              "n": len(per_case), "n_empty": sum(c["dice"] is None for c in per_case),
              "per_case": per_case}
    if preview is not None and cases:
        preview.append(_preview(cases[0], first_prob))
    return result


def _preview(case: Case, prob: np.ndarray) -> np.ndarray:
    """Image | mask | probability, axial slice through the most foreground (or the middle)."""
    counts = case.mask.sum(axis=(0, 1))
    z = int(counts.argmax()) if counts.any() else case.image.shape[2] // 2
    return np.concatenate([case.image[:, :, z], case.mask[:, :, z].astype(np.float32),
                           prob[:, :, z]], axis=1).clip(0, 1)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def crop_side(text: str) -> int:
    """argparse type of ``--crop``: a positive multiple of 8 (the encoder pools three times)."""
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple of 8 (the encoder pools "
                                         "three times)")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        description="Fine-tune the whole Semantic Genesis 3D U-Net for binary segmentation "
                    "(random crops with foreground oversampling, Dice loss, sliding-window evaluation).",
        formatter_class=HelpFormatter)
    g = ap.add_argument_group("data (.npy in [0, 1] or HU volumes in any SimpleITK format; axes (x, y, z))")
    g.add_argument("--images", nargs="+", default=None,
                   help="training images: folders and/or files; each pairs with the mask of the same "
                        "name, optionally followed by _mask, _seg or _label (case1 <- case1_mask)")
    g.add_argument("--masks", nargs="+", default=None,
                   help="training masks on the same grids as the images (foreground = value > 0)")
    g.add_argument("--val_images", nargs="+", default=None, help="explicit validation images")
    g.add_argument("--val_masks", nargs="+", default=None, help="masks for --val_images")
    g.add_argument("--val_fraction", type=fraction, default=0.2,
                   help="without explicit validation volumes: fraction of training volumes held out (>= 1 volume)")
    g.add_argument("--test_images", nargs="+", default=None,
                   help="optional test images, evaluated once with the best weights")
    g.add_argument("--test_masks", nargs="+", default=None, help="masks for --test_images")
    g.add_argument("--foreground_labels", type=nonneg_int, nargs="+", default=None,
                   help="mask values counted as foreground; when omitted, every value > 0")
    g.add_argument("--crop", type=crop_side, nargs=3, default=[64, 64, 32], metavar=("X", "Y", "Z"),
                   help="training crop and sliding-window size; each side divisible by 8")
    g.add_argument("--foreground_prob", type=probability, default=0.5,
                   help="probability that a training crop is centred on a foreground voxel")
    g.add_argument("--overlap", type=fraction, default=0.5,
                   help="sliding-window overlap between neighbouring windows, in [0, 1)")
    g.add_argument("--augment", action="store_true", help="random flips along x, y, z while training")
    g.add_argument("--num_workers", type=nonneg_int, default=2, help="DataLoader worker processes")

    m = add_model_flags(ap)
    m.add_argument("--new_decoder", action="store_true",
                   help="take only the encoder from --weights; the decoder starts fresh (for "
                        "encoder-only checkpoints such as pretraining with --exp en)")
    m.add_argument("--loss", default="dice", choices=["dice", "bce_dice"],
                   help="dice: the README's Dice loss; bce_dice: binary cross-entropy + Dice")

    t = add_training_flags(ap, epochs=200, patience=20, monitor=["dice", "loss"], batch_size=8,
                           batch_help="crops per batch (also windows per inference batch)",
                           seed_help="seed of the split, the crops and the initialisation")
    t.add_argument("--steps_per_epoch", type=positive_int, default=50,
                   help="training batches per epoch")
    o = add_output_flags(ap, "runs/finetune_segmentation")
    o.add_argument("--save_predictions", action="store_true",
                   help="write the test predictions as predictions/<name>.npy (uint8, (x, y, z))")
    return ap


def _check_args(args: argparse.Namespace) -> None:
    """Cross-flag checks (the argparse types check each flag)."""
    for a, b in (("images", "masks"), ("val_images", "val_masks"), ("test_images", "test_masks")):
        if bool(getattr(args, a)) != bool(getattr(args, b)):
            raise InputError(f"--{a} and --{b} go together: give both or neither")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune as configured by ``args`` (see :func:`build_parser`); return the metrics dict
    that is also written to ``output_dir/metrics.json`` (``finetune.loop.run_finetuning``)."""
    _check_args(args)
    return run_finetuning(args, TASK)


def _refuse_unmeasurable(args: argparse.Namespace, train: list[Case], val: list[Case],
                         test: list[Case] | None) -> None:
    """Refuse what Dice cannot measure: a ``--foreground_labels`` value no training mask
    holds, training masks without any foreground, a validation or test set whose masks are
    all empty (Dice is defined on cases with foreground only)."""
    if args.foreground_labels:
        found = {v for c in train for v in c.found_labels}
        absent = [v for v in args.foreground_labels if v not in found]
        if absent:
            values = sorted({int(v) for c in train for v in np.unique(_raw_mask(c))})
            raise InputError(f"--foreground_labels {' '.join(map(str, absent))}: no training "
                             f"mask holds this value (the masks hold {', '.join(map(str, values))}); "
                             "give the values of the structure to segment")
    if not any(len(c.fg) for c in train):
        shown = ", ".join(Path(c.mask_path).name for c in train[:5]) + (", ..." if len(train) > 5 else "")
        raise InputError(f"none of the {len(train)} training masks ({shown}) has a foreground voxel "
                         f"({'values ' + ' '.join(map(str, args.foreground_labels)) if args.foreground_labels else 'value > 0'}), "
                         "so nothing can be learned or measured; check --masks")
    for name, cases, flags in (("validation", val, "--val_images/--val_masks, --val_fraction or --seed"),
                               ("test", test, "--test_images/--test_masks")):
        if cases and not any(c.mask.any() for c in cases):
            raise InputError(f"every {name} mask is empty ({', '.join(c.name for c in cases[:5])}): "
                             f"Dice is undefined without foreground; change {flags}")


def _raw_mask(case: Case) -> np.ndarray:
    """The mask file of ``case`` as read (for the message naming the values it holds)."""
    item = {"path": Path(case.mask_path), "kind": "dicom" if Path(case.mask_path).is_dir() else "file"}
    return _read(item, is_mask=True)[0]


def _splits(args: argparse.Namespace) -> tuple[list[Case], list[Case], list[Case] | None]:
    """(train, validation, test or None) volumes from the data flags; without explicit
    validation volumes a seeded ``--val_fraction`` of the training volumes (at least one)."""
    if not args.images:
        raise InputError("no training data: give --images and --masks")
    cases = load_cases(args.images, args.masks, args.seed, args.foreground_labels)
    if args.val_images:
        train = cases
        val = load_cases(args.val_images, args.val_masks, args.seed, args.foreground_labels, "val_")
    else:
        if len(cases) < 2 or args.val_fraction <= 0:
            raise InputError(f"{len(cases)} training volume(s) and --val_fraction {args.val_fraction}: "
                             "give --val_images/--val_masks, or at least 2 volumes and --val_fraction > 0")
        order = np.random.default_rng(np.random.SeedSequence([int(args.seed), 0x5A11])).permutation(len(cases))
        k = min(max(1, int(round(args.val_fraction * len(cases)))), len(cases) - 1)
        val = [cases[i] for i in sorted(order[:k])]
        train = [cases[i] for i in sorted(order[k:])]
    test = (load_cases(args.test_images, args.test_masks, args.seed, args.foreground_labels, "test_")
            if args.test_images else None)
    _refuse_unmeasurable(args, train, val, test)
    return train, val, test


def _inputs(args: argparse.Namespace) -> dict[str, list[tuple[str, Path]]]:
    """{flag: [(name, path)]} of every volume the run reads (``finetune.inputs.input_files``):
    the files each flag's folders and files hold (DICOM folders by their slices)."""
    out = {}
    for flag in ("images", "masks", "val_images", "val_masks", "test_images", "test_masks"):
        paths = getattr(args, flag)
        if paths:
            items = find_volume_files(paths, f"--{flag}")
            files = [f for it in items for f in (it["files"] or [it["path"]])]
            out[flag] = input_files(files, paths)
    return out


def _prepare(args: argparse.Namespace, device: torch.device) -> Prepared:
    """Volumes, U-Net (seeded initialisation, see ``models.targets.seeded_init``), crop loader
    and the sliding-window validation and test evaluations of a segmentation run."""
    crop = tuple(args.crop)
    train, val, test = _splits(args)
    model, loaded = build_segmentation_model(width=args.width, weights=args.weights, norm=args.norm,
                                             new_decoder=args.new_decoder, seed=args.seed)
    model.to(device)
    optimizer = finetune_optimizer(list(model.parameters()), args.optimizer, args.lr, args.weight_decay)
    criterion = dice_coef_loss if args.loss == "dice" else bce_dice_loss
    workers = args.num_workers
    train_ds = CropDataset(train, crop, args.steps_per_epoch * args.batch_size, args.foreground_prob,
                           args.augment, args.seed)
    loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def set_epoch(epoch: int) -> None:
        train_ds.epoch = epoch

    def validate(log: MetricLogger, epoch: int) -> dict[str, Any]:
        preview: list[np.ndarray] = []
        v = evaluate_cases(model, val, crop, args.overlap, args.batch_size, device, preview=preview)
        log.image("val/image_mask_probability", preview[0], epoch)
        return v

    def test_set() -> dict[str, Any]:
        return evaluate_cases(model, test, crop, args.overlap, args.batch_size, device,
                              Path(args.output_dir) / "predictions" if args.save_predictions else None)

    return Prepared(
        model=model, model_config={"width": args.width, "n_class": 1, "norm": args.norm,
                                   "in_channels": 1},
        optimizer=optimizer, step=loss_step(model, optimizer, device, lambda pred, y: criterion(y, pred)),
        train_loader=loader, set_epoch=set_epoch, evaluate=validate,
        test=test_set if test is not None else None, history_keys=("loss", "dice", "iou"),
        summary=(("Dice", "dice"), ("IoU", "iou")),
        info={"n_train": len(train), "n_val": len(val), "n_test": len(test) if test is not None else 0,
              "train_cases": [c.name for c in train], "val_cases": [c.name for c in val]},
        inputs=_inputs(args), loaded=loaded, device=device)


#: Segmentation fine-tuning for ``finetune.loop.run_finetuning``.
TASK = Task("segmentation", "UNet3D",
            ("images", "masks", "val_images", "val_masks", "test_images", "test_masks"), _prepare)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser, run, argv,
                   interrupted="continue from the last complete epoch with --resume")


if __name__ == "__main__":
    raise SystemExit(main())
