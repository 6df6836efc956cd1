"""Target-task networks built on a (pretrained) Semantic Genesis 3D U-Net, plus their losses.

* :class:`Encoder3D` -- the four encoder levels only (keys ``down_tr64.*`` ... ``down_tr512.*``),
  so any Semantic Genesis checkpoint (``YNet3D``, ``UNet3D``, ``ClassificationNet3D``) loads into it.
* :class:`TargetClassifier` -- the original README's ``TargetNet`` with a correct head:
  encoder -> global average pool -> linear -> **logits** (the README applied a ReLU before the
  sigmoid, which clamps every negative logit to probability 0.5 and kills its gradient).
* :func:`build_classifier` / :func:`build_segmentation_model` -- construct and initialise from a
  checkpoint (or from scratch) in one call; the width and BatchNorm mode default to what the
  checkpoint records, and a seed fixes the fresh head / decoder whatever the checkpoint.
* :func:`dice_coef_loss` -- the README's ``torch_dice_coef_loss`` (global soft Dice, smooth 1);
  :func:`binary_dice_iou` -- hard Dice and IoU of thresholded predictions.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (DECODER_PREFIXES, describe_checkpoint, infer_model_config, load_checkpoint,
                         load_pretrained)
from .ynet3d import NormMode, UNet3D, _check_input, _Encoder

__all__ = ["Encoder3D", "TargetClassifier", "build_classifier", "build_segmentation_model",
           "dice_coef_loss", "bce_dice_loss", "binary_dice_iou", "infer_width", "DECODER_PREFIXES",
           "DEFAULT_WIDTH", "DEFAULT_NORM", "checkpoint_architecture", "seeded_init"]


class Encoder3D(_Encoder):
    """The Semantic Genesis encoder alone (same keys as the U-Net's encoder).

    (N, in_channels, X, Y, Z) -> bottleneck (N, 16w, X/8, Y/8, Z/8); also stored as ``out512``
    (so ``base_model(x); base_model.out512`` works as in the README snippet).
    """

    def __init__(self, width: int = 32, in_channels: int = 1, norm: NormMode = "batch_stats") -> None:
        super().__init__(in_channels, width, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        return self.encode(x)  # (N, 16w, X/8, Y/8, Z/8)


class TargetClassifier(nn.Module):
    """Encoder + global average pooling + linear layer -> logits (no ReLU, no sigmoid).

    Args:
        base_model: a ``UNet3D``/``YNet3D``/``Encoder3D`` (anything with ``encode(x)`` returning the
            bottleneck), or any module that sets ``out512`` in ``forward`` as in the README.
        n_class: number of logits: 1 for binary classification with BCE-with-logits, C for C-way
            cross-entropy.

    Attribute names (``base_model``, ``dense_1``) follow the README's ``TargetNet``.
    Shapes: (N, 1, X, Y, Z) -> logits (N, n_class).
    """

    def __init__(self, base_model: nn.Module, n_class: int = 1) -> None:
        super().__init__()
        self.base_model = base_model
        channels = getattr(base_model, "bottleneck_channels", None)
        if channels is None:
            raise ValueError("base_model must be a Semantic Genesis network (UNet3D/YNet3D/Encoder3D)")
        self.dense_1 = nn.Linear(int(channels), n_class, bias=True)
        self.n_class = n_class
        self.encoder_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, X, Y, Z) -> globally pooled bottleneck (N, 16w)."""
        if hasattr(self.base_model, "encode"):
            _check_input(x)
            base_out = self.base_model.encode(x)  # (N, 16w, X/8, Y/8, Z/8); decoder not run
        else:
            self.base_model(x)
            base_out = self.base_model.out512
        return base_out.mean(dim=(2, 3, 4))  # (N, 16w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_1(self.features(x))  # (N, n_class) logits

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.base_model.parameters())

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Stop (or restart) gradient flow into the encoder's parameters; a frozen encoder also
        stays in eval mode under ``train()`` (its BatchNorm running statistics do not move)."""
        self.encoder_frozen = frozen
        for p in self.base_model.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TargetClassifier":
        super().train(mode)
        if self.encoder_frozen:
            self.base_model.eval()
        return self


def infer_width(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Base width w of a Semantic Genesis state dict (first conv's output channels), or None."""
    return infer_model_config(state_dict)[1].get("width")


#: The width of the published networks, used when neither the caller nor a checkpoint says.
DEFAULT_WIDTH = 32
#: The published BatchNorm mode (batch statistics also in eval), likewise.
DEFAULT_NORM: NormMode = "batch_stats"


def checkpoint_architecture(weights: str | os.PathLike | None) -> dict[str, Any]:
    """The architecture a checkpoint records or its weights show (``width``, ``norm``,
    ``in_channels``, ...; see ``models.checkpoint.describe_checkpoint``), {} without one."""
    if weights is None:
        return {}
    return describe_checkpoint(load_checkpoint(weights), str(weights)).config


@contextmanager
def seeded_init(seed: int | None, part: int) -> Iterator[None]:
    """Modules created inside take their initial weights from (``seed``, ``part``) alone, not
    from what ran before (the global RNG is restored afterwards); ``seed`` None: the global
    RNG, as usual. Fine-tuning builds its network this way so that, for one seed, the fresh
    head or decoder is the same whatever checkpoint initialises the rest."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([int(seed), 0x1417, part]).generate_state(1)[0]))
        yield


def build_classifier(width: int | None = None, weights: str | os.PathLike | None = None,
                     n_class: int = 1, norm: NormMode | None = None,
                     freeze_encoder: bool = False, in_channels: int = 1,
                     seed: int | None = None) -> tuple[TargetClassifier, list[str]]:
    """Encoder3D (loaded from ``weights`` unless None) wrapped in a :class:`TargetClassifier`.

    ``width``/``norm`` None: as the checkpoint records (or its weights show), else the
    published 32 / ``batch_stats``. ``seed``: the encoder's and the head's initial weights come
    from it alone (``seeded_init``), so the head is the same whatever ``weights`` is.
    Returns (model, loaded_keys). Raises ``CheckpointError`` (one line: what the file is and
    what does not fit) when the checkpoint's encoder does not fit.
    """
    arch = checkpoint_architecture(weights) if width is None or norm is None else {}
    width = width or arch.get("width", DEFAULT_WIDTH)
    norm = norm or arch.get("norm", DEFAULT_NORM)
    with seeded_init(seed, 0):
        encoder = Encoder3D(width=width, in_channels=in_channels, norm=norm)
    loaded = load_pretrained(encoder, weights) if weights is not None else []
    with seeded_init(seed, 1):
        model = TargetClassifier(encoder, n_class=n_class)
    if freeze_encoder:
        model.freeze_encoder(True)
    return model, loaded


def build_segmentation_model(width: int | None = None, weights: str | os.PathLike | None = None,
                             norm: NormMode | None = None, n_class: int = 1,
                             in_channels: int = 1, new_decoder: bool = False,
                             seed: int | None = None) -> tuple[UNet3D, list[str]]:
    """The whole ``UNet3D`` (transposed-conv decoder, as pretrained), loaded from ``weights``.

    ``width``/``norm`` None: as the checkpoint records (or its weights show), else the
    published 32 / ``batch_stats``. With ``n_class != 1`` the output layer ``out_tr`` is
    declared new (fresh initialisation). ``new_decoder``: only the encoder comes from
    ``weights`` (e.g. an ``--exp en`` checkpoint, which has no decoder; a decoder in the file
    is not used); the decoder keeps its fresh initialisation, which with ``seed`` comes from
    the seed alone (``seeded_init``).
    Returns (model, loaded_keys); raises ``CheckpointError`` (one line: what the file is and
    what does not fit) when the checkpoint does not fit.
    """
    arch = checkpoint_architecture(weights) if width is None or norm is None else {}
    width = width or arch.get("width", DEFAULT_WIDTH)
    norm = norm or arch.get("norm", DEFAULT_NORM)
    with seeded_init(seed, 0):
        model = UNet3D(n_class=n_class, width=width, in_channels=in_channels, norm=norm)
    if weights is None:
        return model, []
    if new_decoder:   # the encoder alone, even from a checkpoint that has a decoder
        with torch.random.fork_rng(devices=[]):
            encoder = Encoder3D(width=width, in_channels=in_channels, norm=norm)
        loaded = load_pretrained(encoder, weights)
        model.load_state_dict(encoder.state_dict(), strict=False)
        return model, loaded
    return model, load_pretrained(model, weights, new_keys=["out_tr"] if n_class != 1 else [])


def dice_coef_loss(y_true: torch.Tensor, y_pred: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """The README's Dice loss: 1 - (2 |T.P| + s) / (|T| + |P| + s) over the whole batch.

    ``y_true`` and ``y_pred`` (probabilities in [0, 1]) of the same number of elements, e.g.
    (N, 1, X, Y, Z). Returns a scalar.
    """
    t = torch.flatten(y_true)
    p = torch.flatten(y_pred)
    intersection = torch.sum(t * p)
    return 1.0 - (2.0 * intersection + smooth) / (torch.sum(t) + torch.sum(p) + smooth)


def binary_dice_iou(pred: Any, target: Any) -> tuple[float, float]:
    """Hard Dice and IoU of two boolean (or 0/1) arrays/tensors of the same shape.

    Both empty -> (1.0, 1.0): nothing to find and nothing found is a perfect result.
    """
    p = torch.as_tensor(pred).bool()
    t = torch.as_tensor(target).bool()
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    inter = float((p & t).sum())
    ps, ts = float(p.sum()), float(t.sum())
    union = ps + ts - inter
    if ps + ts == 0:
        return 1.0, 1.0
    return 2.0 * inter / (ps + ts), inter / union


def bce_dice_loss(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + README Dice loss, on probabilities (for ``--loss bce_dice``)."""
    return F.binary_cross_entropy(y_pred.clamp(1e-6, 1 - 1e-6), y_true) + dice_coef_loss(y_true, y_pred)
