"""Pretext diagnostics of pretraining: is the network learning the pretext tasks, and are its
features becoming useful?

Every epoch, on the validation cubes (whose patients training never sees): the
self-classification top-1 accuracy against chance (1/C); for each of the four transformations
the restoration gain 1 - MSE(restored, original) / MSE(perturbed, original) (en_de only); and,
with a probe set, a linear probe of the frozen, globally pooled encoder features
(``pytorch.probe``; epoch 0 = the random initialisation). They are printed under the epoch
line, written to TensorBoard under ``diag/`` and kept in ``<name>_diagnostics.json`` and in the
checkpoints, so a resumed run continues the same history.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pytorch.engine import restoration_gains
from pytorch.probe import encoder_features, probe_score
from runtime.files import save_json_atomic
from runtime.training import MetricLogger

__all__ = ["PretextDiagnostics", "format_diagnostics"]

_SHORT = {"local_pixel_shuffle": "shuffle", "nonlinear_intensity": "intensity",
          "in_painting": "in-paint", "out_painting": "out-paint"}


def format_diagnostics(diag: dict[str, Any]) -> str:
    """One epoch's diagnostics as the indented line printed under the epoch line."""
    parts = [f"top-1 {100 * diag['cls_top1']:.1f}% (chance {100 * diag['cls_chance']:.1f}%)"]
    if diag.get("restoration"):
        parts.append("restoration gain " + " ".join(
            f"{_SHORT.get(k, k)} {100 * v['gain']:.0f}%" for k, v in diag["restoration"].items()))
    if diag.get("probe"):
        parts.append(f"probe {diag['probe']['metric']} {diag['probe']['value']:.3f}")
    return "    diag: " + "; ".join(parts)


class PretextDiagnostics:
    """The diagnostics of one pretraining run (rank 0 computes and writes them).

    ``history``: the records so far (a resumed run's, from its checkpoint), extended in place.
    ``probe``: (cubes (N, X, Y, Z), labels (N,)) or None; run every ``probe_every`` epochs and
    at the last one, with ``batch_size`` cubes per forward pass.
    """

    def __init__(self, cls_classes: int, path: Path, history: list[dict[str, Any]],
                 probe: tuple[np.ndarray, np.ndarray] | None = None, probe_every: int = 1,
                 batch_size: int = 2, seed: int = 0) -> None:
        self.chance = 1.0 / cls_classes
        self.path, self.history, self.probe = path, history, probe
        self.probe_every, self.batch_size, self.seed = probe_every, max(2, batch_size), seed

    def _probe(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        assert self.probe is not None
        cubes, labels = self.probe
        return probe_score(encoder_features(model, cubes, self.batch_size, device), labels,
                           seed=self.seed)

    def initial(self, model: nn.Module, device: torch.device, log: MetricLogger) -> None:
        """Probe the random initialisation (epoch 0) when a probe set is given."""
        if self.probe is None:
            return
        result = self._probe(model, device)
        self.history.append({"epoch": 0, "probe": result})
        log.line(f"    diag: epoch 0 (initialisation) probe {result['metric']} "
                 f"{result['value']:.3f}")
        log.scalars({f"diag/probe_{result['metric']}": result["value"]}, 0)

    def epoch(self, epoch: int, top1: float, restoration_sum: torch.Tensor, model: nn.Module,
              device: torch.device, last: bool, log: MetricLogger) -> dict[str, Any]:
        """Record epoch ``epoch`` (1-based): validation top-1 ``top1`` and the epoch's
        ``restoration_sums`` (3, 4); probe when due or ``last``. Logs and writes the JSON."""
        diag: dict[str, Any] = {"epoch": epoch, "cls_top1": top1, "cls_chance": self.chance,
                                "restoration": restoration_gains(restoration_sum)}
        if self.probe is not None and (epoch % self.probe_every == 0 or last):
            diag["probe"] = self._probe(model, device)
        self.history.append(diag)
        scalars = {"diag/cls_top1": top1, "diag/cls_chance": self.chance}
        for op, v in diag["restoration"].items():
            scalars.update({f"diag/restoration_gain/{op}": v["gain"],
                            f"diag/mse_restored/{op}": v["mse_restored"],
                            f"diag/mse_perturbed/{op}": v["mse_perturbed"]})
        if "probe" in diag:
            scalars[f"diag/probe_{diag['probe']['metric']}"] = diag["probe"]["value"]
        log.line(format_diagnostics(diag))
        log.scalars(scalars, epoch)
        save_json_atomic(self.path, self.history)
        return diag
