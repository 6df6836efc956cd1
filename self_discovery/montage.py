"""The pictures of stages 1-3: a labelled montage per pattern class (``montage/class_NNN.png``)
and the autoencoder's input | reconstruction grid for TensorBoard."""
from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np
import torch

from runtime.images import TILE_PX, LabelledGrid, labelled_grid, tile_scale
from self_discovery.discovery import ClassPlan, CubeSpec

__all__ = ["MONTAGE_TILE", "class_montage", "montage_rows", "reconstruction_grid"]

#: Montage tiles are enlarged (nearest neighbour) to at least this many pixels a side.
MONTAGE_TILE = TILE_PX


def montage_rows(keys: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The montage's row order: train resolutions 1, 2, 3, then validation."""
    return sorted(keys, key=lambda k: (k[0] != "train", k[1]))


def _row_label(split: str, res: int, cube_size: tuple[int, int, int]) -> str:
    if split == "validation":
        return "validation\n(other patients)"
    if res == 1:
        return f"train\nresolution 1\n(crop {cube_size[0]}x{cube_size[1]})"
    return f"train\nresolution {res}\n(larger crop,\nresized)"


def _tile_label(spec: CubeSpec) -> str:
    name = PurePosixPath(spec.file).stem
    return name if spec.resolution == 1 else f"{name}\ncrop {spec.size[0]}x{spec.size[1]}"


def class_montage(plan: ClassPlan, cubes: dict[tuple[str, int], list[np.ndarray]],
                  cube_size: tuple[int, int, int], min_tile: int = MONTAGE_TILE) -> LabelledGrid:
    """The montage of class ``plan.cls``: ``cubes[(split, resolution)]`` holds the first cubes
    (X, Y, Z) in [0, 1] of each row, in ``plan.cubes`` order (train patients nearest the
    reference first); each row is labelled, each tile named after its patient."""
    keys = montage_rows(list(cubes))
    specs = {k: [s for s in plan.cubes if (s.split, s.resolution) == k][:len(cubes[k])]
             for k in keys}
    ncols = max(len(cubes[k]) for k in keys)
    x, y, z = plan.coord
    sx, sy, sz = cube_size
    k = tile_scale(min(sx, sy), min_tile)
    title = f"class {plan.cls}: reference {plan.reference}, coordinate (x, y, z) = ({x}, {y}, {z})"
    caption = (f"Rows: the cubes of this class. Train rows: the train patients nearest the "
               f"reference by autoencoder features (column 1 is the reference itself), cropped "
               f"at the coordinate (resolution 1) and as larger crops around it resized to "
               f"{sx}x{sy}x{sz} (resolutions 2 and 3). Validation row: the nearest validation "
               f"patients. Columns: patients in order of feature distance, named under each "
               f"tile. Each tile: the middle z-slice of a cube (x across, y down), a voxel drawn "
               f"as {k}x{k} pixels, 0 black to 1 white.")
    return labelled_grid([cubes[key] for key in keys], title=title,
                         col_labels=["1: reference" if c == 0 else f"{c + 1}"
                                     for c in range(ncols)],
                         row_labels=[_row_label(s, r, cube_size) for s, r in keys],
                         tile_labels=[[_tile_label(s) for s in specs[key]] for key in keys],
                         caption=caption, min_tile=min_tile)


def reconstruction_grid(rows: list[list[torch.Tensor]]) -> np.ndarray:
    """The autoencoder's TensorBoard picture: ``rows[i]`` = [input, reconstruction], volumes
    (X, Y, Z) of the first validation volumes of the epoch; returns (H, W) in [0, 1]."""
    return labelled_grid(
        rows, title="Autoencoder: validation volumes and their reconstructions",
        col_labels=["input", "reconstruction"],
        row_labels=[f"validation\nvolume {i + 1}" for i in range(len(rows))],
        caption="Each tile: the middle z-slice of a volume as the network sees it (resized to "
                "its input size; x across, y down), 0 black to 1 white. A good autoencoder "
                "keeps the lungs, vessels and bones of the input.").image
