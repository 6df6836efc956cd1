"""The pretraining's TensorBoard picture: validation cubes, what the network was given and what
it restored, one row per transformation."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pytorch.data import PretrainingCubes
from pytorch.engine import LossConfig, eval_step
from pytorch.perturbations import OPERATIONS
from runtime.images import labelled_grid, tile_scale

__all__ = ["PREVIEW_TAG", "preview_rows", "restoration_preview"]

#: The TensorBoard tag of the picture: its columns.
PREVIEW_TAG = "val/original|perturbed|restored"
_NAMES = {"local_pixel_shuffle": "local pixel\nshuffling",
          "nonlinear_intensity": "non-linear\nintensity",
          "in_painting": "in-painting", "out_painting": "out-painting"}


def preview_rows(choices: torch.Tensor, n: int) -> list[int]:
    """``n`` validation cubes to show: the first cube of each transformation in ``OPERATIONS``
    order (``choices`` (N,): each cube's transformation, -1 for none), then the next cubes in
    order."""
    ops = choices.cpu().tolist()
    rows = [ops.index(k) for k in range(len(OPERATIONS)) if k in ops][:n]
    rows += [i for i in range(len(ops)) if i not in rows][:n - len(rows)]
    return rows


def _op_name(op: int) -> str:
    if op < 0:
        return "no transformation"
    return _NAMES.get(OPERATIONS[op], OPERATIONS[op])


@torch.no_grad()
def restoration_preview(model: nn.Module, val_set: PretrainingCubes, choices: torch.Tensor,
                        n: int, device: torch.device, amp_dtype: torch.dtype | None,
                        loss_cfg: LossConfig) -> np.ndarray:
    """The picture of ``n`` validation cubes (``val_set.cubes`` (N, 2, X, Y, Z): original |
    perturbed input): rows as :func:`preview_rows`, columns original | perturbed | restored
    (no restored column for an encoder-only model). Returns (H, W) in [0, 1]."""
    idx = preview_rows(choices, min(n, len(val_set)))
    sel = torch.tensor(idx, dtype=torch.int64)
    both = val_set.cubes[sel.to(val_set.cubes.device)].to(device, torch.float32)
    labels = val_set.labels[sel.to(val_set.labels.device)].to(device)
    was_training = model.training
    model.eval()   # a picture must not move the normalisation statistics
    try:
        _, restored = eval_step(model, both[:, 1:2], both[:, 0:1], labels, loss_cfg, amp_dtype)
    finally:
        model.train(was_training)
    rows = [[both[i, 0], both[i, 1]] + ([restored[i, 0].float()] if restored is not None else [])
            for i in range(len(idx))]
    ops = choices.cpu().tolist()
    row_labels = [f"val cube {j}\nclass {int(labels[i])}\n" + _op_name(ops[j])
                  for i, j in enumerate(idx)]
    k = tile_scale(min(both.shape[2], both.shape[3]))
    cols = ["original (target)", "perturbed (input)"]
    cols += ["restored (output)"] if restored is not None else []
    caption = ("Validation cubes (patients training never sees), one per transformation first; the "
               "transformation each input received is named on the left (the same every epoch). "
               "Each tile: the middle z-slice of a cube (x across, y down), a voxel drawn as "
               f"{k}x{k} pixels, 0 black to 1 white.")
    return labelled_grid(rows, title="Pretraining: what the network is given and what it restores",
                         col_labels=cols, row_labels=row_labels, caption=caption).image
