"""Checkpoints as the published code wrote them, and a malicious one, for the loading tests.

``save_published(path, model)`` writes what the published ``pytorch/train.py`` saved:
``{'epoch', 'state_dict' (nn.DataParallel, 'module.' keys), 'optimizer_state_dict' (Adam),
'num_epoch_no_improvement', 'best_loss', 'best_acc'}`` with ``best_loss``/``best_acc`` from
``np.average`` (NumPy scalars). ``legacy=True`` (default) uses the pre-1.6 file format the
published file has, and names the NumPy scalar constructor as NumPy 1.x pickles it
(``numpy.core.multiarray.scalar``) whatever NumPy is installed.

``save_malicious(path, marker)`` writes a checkpoint holding an object whose ``__reduce__``
would create ``marker`` when unpickled by plain ``pickle``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

NUMPY2_SCALAR = b"cnumpy._core.multiarray\nscalar\n"
NUMPY1_SCALAR = b"cnumpy.core.multiarray\nscalar\n"


def save_published(path: str | Path, model: nn.Module, *, epoch: int = 57,
                   legacy: bool = True) -> dict[str, torch.Tensor]:
    """Write ``model`` as the published training script did; return its unwrapped state dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = nn.DataParallel(model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-3)
    for p in wrapped.parameters():  # one step fills the Adam state without a forward pass
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad()
    valid_losses, accuracies = [0.25, 0.5], [0.75, 1.0]
    torch.save({"epoch": epoch, "state_dict": wrapped.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(), "num_epoch_no_improvement": 3,
                "best_loss": np.average(valid_losses), "best_acc": np.average(accuracies)},
               path, _use_new_zipfile_serialization=not legacy)
    if legacy:  # the pickle's GLOBAL lines are newline-delimited: the new name fits in place
        data = path.read_bytes()
        if NUMPY2_SCALAR in data:
            path.write_bytes(data.replace(NUMPY2_SCALAR, NUMPY1_SCALAR))
        assert NUMPY1_SCALAR in path.read_bytes()  # memoised: named once for both scalars
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class WritesMarker:
    """Unpickled by plain ``pickle``, this would run ``exec`` and create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def save_malicious(path: str | Path, marker: str | Path, *, legacy: bool = False) -> Path:
    """A checkpoint-shaped file whose ``epoch`` would run code when unpickled."""
    path = Path(path)
    torch.save({"state_dict": {"down_tr64.ops.0.conv1.weight": torch.zeros(4, 1, 3, 3, 3)},
                "epoch": WritesMarker(Path(marker))}, path,
               _use_new_zipfile_serialization=not legacy)
    return path
