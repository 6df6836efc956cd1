"""3D U-Net, Y-Net 3D and the self-classification network of Semantic Genesis.

Layer and attribute names follow the published PyTorch model exactly
(``down_tr64.ops.0.conv1.weight`` ... ``out_tr.final_conv.weight``, ``clc_out.fc1.weight``),
so the published checkpoint and the original README's fine-tuning snippet work unchanged.

Channel plan for ``width`` = w (published: w = 32)::

    down_tr64 : 1    -> w   -> 2w     (then max-pool 2)
    down_tr128: 2w   -> 2w  -> 4w     (then max-pool 2)
    down_tr256: 4w   -> 4w  -> 8w     (then max-pool 2)
    down_tr512: 8w   -> 8w  -> 16w    (no pool: the bottleneck, ``out512``)
    up_tr256  : up 16w->16w, cat 8w, -> 8w -> 8w
    up_tr128  : up 8w->8w,   cat 4w, -> 4w -> 4w
    up_tr64   : up 4w->4w,   cat 2w, -> 2w -> 2w
    out_tr    : 1x1x1 conv 2w -> n_class, sigmoid
    clc_out   : conv3x3x3 16w -> 32w, BN, ReLU, global average pool, linear 32w -> cls_classes

Normalisation. The published model normalises with *batch statistics in train and eval mode*
(its ``ContBatchNorm3d``); this is the default here (``norm="batch_stats"``) so pretrained
weights behave as published. ``norm="standard"`` gives ordinary ``BatchNorm3d`` (running
statistics in eval mode), which is often better for fine-tuning with tiny batches at test time.
Both have identical parameters and buffers, so checkpoints load into either.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import InputError

__all__ = [
    "ContBatchNorm3d",
    "LUConv",
    "DownTransition",
    "UpTransition",
    "OutputTransition",
    "ClassificationHead",
    "UNet3D",
    "YNet3D",
    "ClassificationNet3D",
    "NormMode",
    "set_batchnorm",
]

NormMode = Literal["batch_stats", "standard"]


class ContBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that, with ``norm="batch_stats"``, always normalises with batch statistics.

    Running statistics are still updated in train mode, so a checkpoint carries them and a
    model built with ``norm="standard"`` can use them. Unlike the published class they are not
    updated in eval mode: evaluating never changes the model (outputs are the same either way).
    """

    def __init__(self, num_features: int, norm: NormMode = "batch_stats") -> None:
        super().__init__(num_features)
        if norm not in ("batch_stats", "standard"):
            raise ValueError(f"norm must be 'batch_stats' or 'standard', got {norm!r}")
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training or self.norm == "batch_stats") and x.numel() == x.shape[1]:
            raise InputError(
                f"a batch of one cube reaches a BatchNorm layer as {tuple(x.shape)}: one value per "
                "channel, so batch statistics do not exist; use batches of 2 or more cubes (or "
                "cubes with a side of 16 or more voxels)")
        if self.norm == "standard":
            return super().forward(x)
        self._check_input_dim(x)
        # Batch statistics always; update the running estimates only while training.
        return F.batch_norm(
            x,
            self.running_mean if self.training else None,
            self.running_var if self.training else None,
            self.weight,
            self.bias,
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm={self.norm}"


def set_batchnorm(model: nn.Module, momentum: float, eps: float) -> nn.Module:
    """Set ``momentum`` and ``eps`` (PyTorch terms) of every BatchNorm layer of ``model``;
    returns ``model``. Keras's BatchNormalization(momentum=m, epsilon=e) is momentum 1 - m."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum, m.eps = momentum, eps
    return model


class LUConv(nn.Module):
    """conv3x3x3 + BatchNorm + ReLU. (N, in_ch, X, Y, Z) -> (N, out_ch, X, Y, Z)."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormMode = "batch_stats") -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(out_ch, norm)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    """One encoder level: two LUConvs, then a 2x max-pool unless it is the deepest level.

    (N, in_ch, X, Y, Z) -> (pooled or not, pre-pool skip) with ``out_ch`` channels.
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, pool: bool,
                 norm: NormMode = "batch_stats") -> None:
        super().__init__()
        self.ops = nn.Sequential(LUConv(in_ch, mid_ch, norm), LUConv(mid_ch, out_ch, norm))
        self.maxpool = nn.MaxPool3d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)                       # (N, out_ch, X, Y, Z)
        return self.maxpool(skip), skip          # (N, out_ch, X/2, Y/2, Z/2) when pooling


class UpTransition(nn.Module):
    """One decoder level: 2x upsampling, concatenate the skip, two LUConvs.

    ``mode="transpose"`` (Y-Net, published) uses ``up_conv`` = ConvTranspose3d(k=2, s=2);
    ``mode="upsampling"`` (stage-1 autoencoder) uses nearest-neighbour upsampling, no weights.
    (N, in_ch, X, Y, Z), skip (N, skip_ch, 2X, 2Y, 2Z) -> (N, out_ch, 2X, 2Y, 2Z).
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int,
                 mode: Literal["transpose", "upsampling"] = "transpose",
                 norm: NormMode = "batch_stats") -> None:
        super().__init__()
        if mode == "transpose":
            self.up_conv: nn.Module = nn.ConvTranspose3d(in_ch, in_ch, kernel_size=2, stride=2)
        elif mode == "upsampling":
            self.up_conv = nn.Upsample(scale_factor=2, mode="nearest")
        else:
            raise ValueError(f"mode must be 'transpose' or 'upsampling', got {mode!r}")
        self.ops = nn.Sequential(LUConv(in_ch + skip_ch, out_ch, norm), LUConv(out_ch, out_ch, norm))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up_conv(x)                      # (N, in_ch, 2X, 2Y, 2Z)
        return self.ops(torch.cat((up, skip), 1))  # (N, out_ch, 2X, 2Y, 2Z)


class OutputTransition(nn.Module):
    """1x1x1 conv + sigmoid. (N, in_ch, X, Y, Z) -> (N, n_class, X, Y, Z) in [0, 1]."""

    def __init__(self, in_ch: int, n_class: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(in_ch, n_class, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.final_conv(x))


class ClassificationHead(nn.Module):
    """Self-classification head on the bottleneck.

    (N, in_ch, x, y, z) -> logits (N, cls_classes). Returns *logits*: the loss applies
    ``cross_entropy`` (the reference took ``log`` of a softmax, unstable at log(0)).
    """

    def __init__(self, in_ch: int, hidden: int, cls_classes: int,
                 norm: NormMode = "batch_stats") -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, hidden, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(hidden, norm)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(hidden, cls_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))   # (N, hidden, x, y, z)
        x = x.mean(dim=(2, 3, 4))                # (N, hidden)
        return self.fc1(x)                       # (N, cls_classes)


class _Encoder(nn.Module):
    """The four encoder levels shared by every network here. Sets ``out512`` on forward
    (the bottleneck, read by the README's fine-tuning snippet); every other activation is local."""

    def __init__(self, in_channels: int, width: int, norm: NormMode) -> None:
        super().__init__()
        w = width
        self.down_tr64 = DownTransition(in_channels, w, 2 * w, pool=True, norm=norm)
        self.down_tr128 = DownTransition(2 * w, 2 * w, 4 * w, pool=True, norm=norm)
        self.down_tr256 = DownTransition(4 * w, 4 * w, 8 * w, pool=True, norm=norm)
        self.down_tr512 = DownTransition(8 * w, 8 * w, 16 * w, pool=False, norm=norm)
        self.width = width

    @property
    def bottleneck_channels(self) -> int:
        return 16 * self.width

    def encode_with_skips(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(N, C, X, Y, Z) -> (bottleneck (N, 16w, X/8, Y/8, Z/8), skips for ``decode``)."""
        out64, skip64 = self.down_tr64(x)         # (N, 2w, X/2, ...), (N, 2w, X, ...)
        out128, skip128 = self.down_tr128(out64)  # (N, 4w, X/4, ...), (N, 4w, X/2, ...)
        out256, skip256 = self.down_tr256(out128)  # (N, 8w, X/8, ...), (N, 8w, X/4, ...)
        self.out512 = self.down_tr512(out256)[0]  # (N, 16w, X/8, ...)
        return self.out512, (skip64, skip128, skip256)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y, Z) -> bottleneck (N, 16w, X/8, Y/8, Z/8)."""
        return self.encode_with_skips(x)[0]


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 5 or any(s % 8 for s in x.shape[2:]):
        raise ValueError(
            f"expected input (N, C, X, Y, Z) with X, Y, Z divisible by 8, got {tuple(x.shape)}")


class UNet3D(_Encoder):
    """The 3D U-Net of the fine-tuning snippet.

    Args:
        n_class: output channels of ``out_tr`` (1 for restoration / binary segmentation).
        act: kept for signature compatibility with the published code; only ``"relu"``.
        width: base channels w (32 = published; smaller for tests).
        in_channels: input channels (1 for CT).
        norm: ``"batch_stats"`` (published) or ``"standard"``; see module docstring.
        decoder: ``"transpose"`` (published Y-Net) or ``"upsampling"`` (stage-1 autoencoder).

    Shapes: (N, in_channels, X, Y, Z) -> (N, n_class, X, Y, Z) in [0, 1]; after ``forward``,
    ``self.out512`` holds the bottleneck (N, 16w, X/8, Y/8, Z/8), e.g. (N, 512, 8, 8, 4) for
    a 64x64x32 cube at w = 32.
    """

    def __init__(self, n_class: int = 1, act: str = "relu", width: int = 32, in_channels: int = 1,
                 norm: NormMode = "batch_stats",
                 decoder: Literal["transpose", "upsampling"] = "transpose") -> None:
        if act != "relu":
            raise ValueError(f"only act='relu' is published, got {act!r}")
        super().__init__(in_channels, width, norm)
        w = width
        self.up_tr256 = UpTransition(16 * w, 8 * w, 8 * w, decoder, norm)
        self.up_tr128 = UpTransition(8 * w, 4 * w, 4 * w, decoder, norm)
        self.up_tr64 = UpTransition(4 * w, 2 * w, 2 * w, decoder, norm)
        self.out_tr = OutputTransition(2 * w, n_class)

    def decode(self, bottleneck: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Bottleneck (N, 16w, X/8, Y/8, Z/8) and the skips of ``encode_with_skips`` ->
        (N, n_class, X, Y, Z)."""
        skip64, skip128, skip256 = skips
        up256 = self.up_tr256(bottleneck, skip256)  # (N, 8w, X/4, ...)
        up128 = self.up_tr128(up256, skip128)       # (N, 4w, X/2, ...)
        up64 = self.up_tr64(up128, skip64)          # (N, 2w, X, ...)
        return self.out_tr(up64)                    # (N, n_class, X, ...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        return self.decode(*self.encode_with_skips(x))


class YNet3D(UNet3D):
    """Y-Net 3D: the U-Net plus a classification head on the bottleneck.

    (N, 1, X, Y, Z) -> (restored (N, n_class, X, Y, Z) in [0, 1], logits (N, cls_classes)).
    """

    def __init__(self, cls_classes: int = 44, n_class: int = 1, width: int = 32,
                 in_channels: int = 1, norm: NormMode = "batch_stats") -> None:
        super().__init__(n_class=n_class, width=width, in_channels=in_channels, norm=norm)
        self.clc_out = ClassificationHead(16 * width, 32 * width, cls_classes, norm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input(x)
        bottleneck, skips = self.encode_with_skips(x)  # (N, 16w, X/8, Y/8, Z/8)
        return self.decode(bottleneck, skips), self.clc_out(bottleneck)


class ClassificationNet3D(_Encoder):
    """Encoder + classification head, for ``--exp en`` (self-classification only).

    Its keys are a subset of ``YNet3D``'s, so an ``en`` checkpoint initialises ``en_de``.
    (N, 1, X, Y, Z) -> logits (N, cls_classes).
    """

    def __init__(self, cls_classes: int = 44, width: int = 32, in_channels: int = 1,
                 norm: NormMode = "batch_stats") -> None:
        super().__init__(in_channels, width, norm)
        self.clc_out = ClassificationHead(16 * width, 32 * width, cls_classes, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        return self.clc_out(self.encode(x))
