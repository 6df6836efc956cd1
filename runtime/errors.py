"""The project's errors. Every CLI's ``main`` prints a ``ReportedError`` as one ``error: ...``
line (exit code 2, no traceback); anything else is a bug and keeps its traceback.

* ``InputError``: bad user input (a file, shape, value or flag); the message names the file
  and the fix.
* ``CheckpointError``: a checkpoint cannot be read or does not fit the model.
* ``TrainingDiverged``: a run's loss or weights stopped being finite; the last good
  checkpoints are kept and the message says what to change before ``--resume``.

Stage-specific errors derive from these: ``preparation.ct_io.CTReadError`` (an input that is not a
readable CT: an ``InputError`` that stage 0 skips with its line) and
``preparation.sample_ct.FetchError`` (the sample CTs could not be downloaded or verified).
"""
from __future__ import annotations

__all__ = ["ReportedError", "InputError", "CheckpointError", "TrainingDiverged"]


class ReportedError(Exception):
    """An error a CLI reports as one line: its message names what failed and the fix."""


class InputError(ReportedError, ValueError):
    """Bad user input (files, shapes, values, flags). The message names the file and the fix."""


class CheckpointError(ReportedError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names file and fix."""


class TrainingDiverged(ReportedError, RuntimeError):
    """The loss or the weights of a run stopped being finite (the last good checkpoints stay)."""
