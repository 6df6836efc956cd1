"""The initialisations a target-task table compares: ``scratch`` and pretrained checkpoints,
each recognised by what its weights hold.

Kinds (:func:`inspect_checkpoint`):

================== ===================================================== =============
kind               what the file is                                      decoder
================== ===================================================== =============
``ours_en_de``     our pretraining, ``--exp en_de`` (Y-Net: encoder,     pretrained
                   decoder and classification head)
``ours_en``        our pretraining, ``--exp en`` (encoder and head)      fresh
``ours_unet``      a 3D U-Net in our schema (e.g. a converted Models     pretrained
                   Genesis file)
``published_sg``   the published Semantic Genesis file (Y-Net)           pretrained
``published_sg_en`` a published-format encoder-only file                  fresh
``models_genesis`` Models Genesis weights (3D U-Net, PyTorch file, read  pretrained
                   as ``models/convert.py`` reads it)
================== ===================================================== =============

Classification always takes the encoder; segmentation takes the whole U-Net, or the encoder and
a fresh decoder (``--new_decoder``) when the file has no decoder. The file's content identity
(size and SHA-256) is what a table's cells record, not its name.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.checkpoint import infer_model_config, load_checkpoint
from runtime.errors import CheckpointError, InputError
from runtime.provenance import file_identity
from target_tasks.protocols import PAPER_COLUMNS

__all__ = ["Init", "KINDS", "inspect_checkpoint", "parse_inits", "resolve_width"]

#: kind -> (description, has a pretrained decoder, the paper's column it is compared with)
KINDS: dict[str, tuple[str, bool, str | None]] = {
    "scratch": ("random initialisation", False, "scratch"),
    "ours_en_de": ("our pretraining, en_de (Y-Net: encoder + decoder + head)", True,
                   "semantic_genesis"),
    "ours_en": ("our pretraining, en (encoder + head; the decoder starts fresh)", False,
                "classification_only"),
    "ours_unet": ("3D U-Net in our checkpoint schema (encoder + decoder)", True, None),
    "published_sg": ("the published Semantic Genesis file (Y-Net: encoder + decoder + head)",
                     True, "semantic_genesis"),
    "published_sg_en": ("a published-format encoder-only file (encoder + head; the decoder "
                        "starts fresh)", False, "classification_only"),
    "models_genesis": ("Models Genesis weights (3D U-Net: encoder + decoder)", True,
                       "models_genesis"),
}

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Init:
    """One initialisation of a table: ``name`` (its cells' folder), the checkpoint ``path``
    (None for scratch), ``kind`` (see :data:`KINDS`), ``width`` read from the weights,
    ``identity`` (size and SHA-256 of the file) and the paper's ``column`` it is compared with
    (None: none)."""

    name: str
    path: str | None
    kind: str
    width: int | None
    identity: dict[str, Any] | None
    column: str | None

    @property
    def has_decoder(self) -> bool:
        return KINDS[self.kind][1]

    @property
    def description(self) -> str:
        return KINDS[self.kind][0]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint": self.path, "kind": self.kind,
                "description": self.description, "width": self.width,
                "identity": self.identity, "paper_column": self.column}


def inspect_checkpoint(path: str | os.PathLike) -> tuple[str, int]:
    """(kind, width) of a checkpoint file, read weights-only; a ``CheckpointError`` naming the
    file when its weights are no Semantic Genesis / Models Genesis network."""
    ckpt = load_checkpoint(path)
    arch, cfg = infer_model_config(ckpt["state_dict"])
    ours = "schema_version" in ckpt
    if arch == "YNet3D":
        kind = "ours_en_de" if ours else "published_sg"
    elif arch == "ClassificationNet3D":
        kind = "ours_en" if ours else "published_sg_en"
    elif arch == "UNet3D" and cfg.get("decoder") == "transpose":
        kind = "ours_unet" if ours else "models_genesis"
    elif arch == "UNet3D":
        raise CheckpointError(f"{path}: a 3D U-Net with an upsampling decoder (e.g. the "
                              "self-discovery autoencoder), not a pretrained Semantic Genesis or "
                              "Models Genesis network; give a pretraining checkpoint "
                              "(pytorch/train.py) or the published file")
    else:
        raise CheckpointError(f"{path}: its weights fit none of the Semantic Genesis / Models "
                              "Genesis networks (a fine-tuned model or another network?); give a "
                              "pretraining checkpoint (pytorch/train.py) or the published file")
    if cfg.get("in_channels", 1) != 1:
        raise CheckpointError(f"{path}: a network with {cfg['in_channels']} input channels; the "
                              "target tasks give one channel")
    return kind, int(cfg["width"])


def parse_inits(items: list[str]) -> list[Init]:
    """``scratch`` followed by one :class:`Init` per ``NAME=CHECKPOINT`` (``--init``); the kind
    and width of each are printed. A name that is one of the paper's columns
    (``semantic_genesis``, ``models_genesis``, ``classification_only``) is compared with that
    column, any other name with the column of its kind."""
    inits = [Init("scratch", None, "scratch", None, None, "scratch")]
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise InputError(f"--init {item}: expected NAME=CHECKPOINT, e.g. "
                             "sg=Checkpoints/en_de/semantic_genesis_chest_ct.pt")
        if not _NAME.match(name) or name == "scratch":
            raise InputError(f"--init {item}: NAME must start with a letter and hold only "
                             "letters, digits, '_', '-', '.', and is not 'scratch' (always run)")
        if any(i.name == name for i in inits):
            raise InputError(f"--init {item}: the name {name} is given twice; give each "
                             "initialisation its own name")
        if not Path(path).is_file():
            raise InputError(f"--init {item}: {path} not found; check the checkpoint path")
        kind, width = inspect_checkpoint(path)
        column = name if name in PAPER_COLUMNS and name != "scratch" else KINDS[kind][2]
        init = Init(name, str(path), kind, width, file_identity(path), column)
        print(f"init {name}: {path}: {init.description}, width {width}")
        inits.append(init)
    return inits


def resolve_width(inits: list[Init], width: int | None, default: int, source: str
                  ) -> tuple[int, str]:
    """(width, where it comes from) for every network of the table: the checkpoints' width
    (they must agree), or ``width`` (``--width``) which must then equal it, or ``default``
    (``source``, e.g. the preset) without checkpoints."""
    widths = {i.width for i in inits if i.width is not None}
    if len(widths) > 1:
        listed = ", ".join(f"{i.name} {i.width}" for i in inits if i.width is not None)
        raise InputError(f"--init checkpoints of different widths ({listed}): a paired table "
                         "needs one network width; give checkpoints of one width")
    if widths:
        ckpt_width = widths.pop()
        if width is not None and width != ckpt_width:
            raise InputError(f"--width {width}: the checkpoints have width {ckpt_width}; pass "
                             f"--width {ckpt_width} or omit it")
        return ckpt_width, "the checkpoints"
    if width is not None:
        return width, "--width"
    return default, source
