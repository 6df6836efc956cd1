"""A cheap representation probe: frozen encoder, global average pooling, logistic regression.

While pretraining runs, ``pytorch/train.py --probe_data cubes.npy --probe_labels labels.npy``
encodes a small labelled target set (e.g. nodule / no-nodule cubes of patients that pretraining
never sees) with the current encoder, pools the bottleneck globally, and scores a
scikit-learn logistic regression on those features by stratified k-fold cross-validation. A
rising score means the features become more useful for the target while the pretext task is
learnt; a score that stays at its epoch-0 (random-initialisation) value means they do not.

    feats = encoder_features(model, cubes, batch_size=32)     # (N, 16w)
    probe_score(feats, labels, seed=0)                        # {"metric": "auc", "value": ...}
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import unwrap_model
from pytorch.engine import is_channels_last
from runtime.errors import InputError
from finetune.classification import load_dataset

__all__ = ["load_probe_set", "encoder_features", "probe_score"]


def load_probe_set(data: str, labels: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Cubes (N, X, Y, Z) float32 in [0, 1] and integer labels (N,) from ``--probe_data`` /
    ``--probe_labels`` (the fine-tuning scripts' formats and checks). At least two classes with
    two cubes each are needed for cross-validation."""
    ds = load_dataset([data], labels, None, "probe_")
    cubes = np.stack([ds.cube(i) for i in range(len(ds))]) if len(ds) else np.zeros((0, 8, 8, 8))
    counts = np.bincount(ds.labels) if len(ds) else np.zeros(0)
    if (counts >= 2).sum() < 2:
        raise InputError(f"{data}: the probe needs at least two classes with two cubes each, "
                         f"got class counts {counts.tolist()}")
    return cubes.astype(np.float32), ds.labels


@torch.no_grad()
def encoder_features(model: nn.Module, cubes: np.ndarray | torch.Tensor, batch_size: int = 32,
                     device: torch.device | str | None = None) -> np.ndarray:
    """Globally average-pooled bottleneck features (N, 16w) of cubes (N, X, Y, Z).

    ``model``: anything with ``encode`` (``YNet3D``, ``ClassificationNet3D``, ``UNet3D``),
    evaluated in eval mode (the published batch-statistics BatchNorm normalises each batch, so
    the fixed batch order keeps the features reproducible); its train/eval mode is restored.
    """
    net = unwrap_model(model)
    if device is None:
        device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    cubes = torch.as_tensor(np.asarray(cubes, np.float32))
    layout = torch.channels_last_3d if is_channels_last(net) else torch.contiguous_format
    out = []
    try:
        for s in range(0, len(cubes), batch_size):
            x = cubes[s:s + batch_size, None].to(device).contiguous(memory_format=layout)
            out.append(net.encode(x).float().mean(dim=(2, 3, 4)).cpu().numpy())
    finally:
        net.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def probe_score(features: np.ndarray, labels: np.ndarray, seed: int = 0,
                folds: int = 5) -> dict[str, Any]:
    """Cross-validated logistic regression on standardised ``features`` (N, D).

    Binary labels: ROC AUC of the out-of-fold probabilities; more classes: accuracy.
    Returns {"metric": "auc" | "accuracy", "value": float, "folds": k}.
    """
    from sklearn.linear_model import LogisticRegression  # local: sklearn is slow to import
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels).reshape(-1)
    k = int(min(folds, np.bincount(labels)[np.bincount(labels) > 0].min()))
    if k < 2:
        raise InputError("the probe needs at least two cubes of every class")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=int(seed) % 2**32)
    feats = np.nan_to_num(np.asarray(features, np.float64))
    prob = cross_val_predict(clf, feats, labels, cv=cv, method="predict_proba")
    if prob.shape[1] == 2:
        return {"metric": "auc", "value": float(roc_auc_score(labels, prob[:, 1])), "folds": k}
    classes = np.unique(labels)
    return {"metric": "accuracy", "value": float(accuracy_score(labels, classes[prob.argmax(1)])),
            "folds": k}
