"""The paper's four target tasks as data: the published fine-tuning protocol of each and the
paper's table.

The protocol values (learning rate, batch, patience, epochs, optimizer, input size, HU window,
data splits) are those of the fine-tuning configurations the same group published for these
tasks (the Models Genesis downstream configurations; the Semantic Genesis paper compares on the
same tasks and datasets). Where this implementation has to choose something those
configurations do not state, the field says so (``ours``).

The paper's table (Haghighi et al., MICCAI 2020): test metric in %, mean ± standard deviation
over runs, for four initialisations (:data:`PAPER_COLUMNS`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Protocol", "PROTOCOLS", "TASKS", "PAPER_COLUMNS", "PAPER_COLUMN_LABELS", "PAPER",
           "paper_row"]

TASKS = ("ncc", "ncs", "lcs", "bms")


@dataclass(frozen=True)
class Protocol:
    """One target task's published fine-tuning protocol.

    ``kind``: ``classification`` (encoder + global pooling + one logit) or ``segmentation``
    (the whole U-Net). ``metric``: the key of the test metric in the fine-tuning
    ``metrics.json`` (``auc`` or ``iou``). ``steps_per_epoch``: training batches per epoch of a
    segmentation run, None for one pass over the training cases. ``ours``: the values that are
    this implementation's choice, not the published configuration's, with why.
    """

    task: str
    title: str
    dataset: str
    kind: str
    metric: str
    metric_label: str
    lr: float
    batch_size: int
    patience: int
    loss: str
    splits: str
    intensity: str
    nb_epoch: int = 10000
    optimizer: str = "adam"
    monitor: str = "loss"
    input_size: tuple[int, int, int] = (64, 64, 32)
    hu_window: tuple[float, float] | None = (-1000.0, 1000.0)
    steps_per_epoch: int | None = None
    ours: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        """The protocol as plain data (for results files)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


_SEG_OURS = ("Dice loss and sliding-window evaluation (windows of the input size, overlap 0.5) "
             "over whole volumes, threshold 0.5",
             "random training crops of the input size, half of them centred on the foreground")

PROTOCOLS: dict[str, Protocol] = {
    "ncc": Protocol(
        task="ncc", title="lung nodule false-positive reduction", dataset="LUNA16",
        kind="classification", metric="auc", metric_label="AUC", lr=1e-3, batch_size=24,
        patience=10, loss="bce",
        splits="subsets 0-4 train, 5-6 validation, 7-9 test",
        intensity="HU window [-1000, 1000] scaled to [0, 1]",
        ours=("one epoch is one pass over the training cubes",)),
    "ncs": Protocol(
        task="ncs", title="lung nodule segmentation", dataset="LIDC-IDRI",
        kind="segmentation", metric="iou", metric_label="IoU", lr=1e-3, batch_size=16,
        patience=50, loss="dice",
        splits="the authors' processed train / validation / test arrays",
        intensity="HU window [-1000, 1000] scaled to [0, 1]", steps_per_epoch=None,
        ours=_SEG_OURS[:1] + ("one epoch is one pass over the training crops (the cases are "
                              "64 x 64 x 32 crops, so a training crop is a whole case)",)),
    "lcs": Protocol(
        task="lcs", title="liver segmentation", dataset="LiTS 2017",
        kind="segmentation", metric="iou", metric_label="IoU", lr=1e-2, batch_size=16,
        patience=20, loss="dice",
        splits="volumes 0-99 train, 100-114 validation, 115-129 test",
        intensity="HU window [-1000, 1000] scaled to [0, 1]", steps_per_epoch=50,
        ours=_SEG_OURS + ("50 training batches per epoch (the published configuration does not "
                          "state it)",)),
    "bms": Protocol(
        task="bms", title="brain tumour segmentation", dataset="BraTS 2018 (FLAIR)",
        kind="segmentation", metric="iou", metric_label="IoU", lr=1e-3, batch_size=16,
        patience=30, loss="dice",
        splits="the authors' folds 1-2 train (1/8 of them validation), fold 3 test",
        intensity="z-score over the brain, scaled to [0, 1] (MRI has no HU)", hu_window=None,
        steps_per_epoch=50,
        ours=_SEG_OURS + ("50 training batches per epoch (the published configuration does not "
                          "state it)",)),
}

#: The paper's initialisations, in the order of its table.
PAPER_COLUMNS = ("semantic_genesis", "models_genesis", "classification_only", "scratch")
PAPER_COLUMN_LABELS = {"semantic_genesis": "Semantic Genesis", "models_genesis": "Models Genesis",
                       "classification_only": "self-classification only",
                       "scratch": "random initialisation"}

#: The paper's table: task -> column -> (mean, std) of the test metric in %.
PAPER: dict[str, dict[str, tuple[float, float]]] = {
    "ncc": {"semantic_genesis": (98.46, 0.30), "models_genesis": (98.07, 0.59),
            "classification_only": (97.49, 0.45), "scratch": (94.25, 5.07)},
    "ncs": {"semantic_genesis": (77.33, 0.52), "models_genesis": (77.41, 0.40),
            "classification_only": (76.93, 0.87), "scratch": (74.05, 1.97)},
    "lcs": {"semantic_genesis": (86.53, 1.30), "models_genesis": (85.10, 2.15),
            "classification_only": (84.14, 1.78), "scratch": (79.76, 5.42)},
    "bms": {"semantic_genesis": (68.82, 0.38), "models_genesis": (67.96, 1.29),
            "classification_only": (64.02, 0.98), "scratch": (59.87, 4.04)},
}


def paper_row(task: str) -> str:
    """The paper's row of ``task`` as text: ``Semantic Genesis 98.46 ± 0.30; ...``."""
    return "; ".join(f"{PAPER_COLUMN_LABELS[c]} {m:.2f} ± {s:.2f}"
                     for c, (m, s) in PAPER[task].items())
