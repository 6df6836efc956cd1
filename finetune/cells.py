"""Repeated fine-tuning runs as cells keyed by their settings, and the labelled subsets they
share.

A *cell* is one step of a table of runs (one initialisation, seed and label fraction of a target
task, one pretraining of a study, ...): a folder that holds what the step wrote and a record,
``cell.json``, of the settings it was made with: ``{"settings": {...}, "finished": bool,
"result": {...}}``. A re-run decides per cell from the record, never from the folder's name:

* no folder (or an empty one): ``run``;
* the same settings, finished: ``reuse`` (its result is read back, nothing runs);
* the same settings, not finished (interrupted): ``resume`` or ``redo``, as the caller's
  ``unfinished`` policy says, or refused when the policy is ``refuse`` (the caller names the
  flag that continues it);
* other settings, or files without a record: refused, listing the differing settings, unless
  ``overwrite`` (then ``redo``).

:func:`plan_cells` decides for every cell before anything runs, so a refusal leaves every folder
as it was. Settings are JSON-plain mappings (nested dicts are compared key by key; a key present
on one side only is a difference). Results and settings never hold absolute paths (content is
identified by ``runtime.provenance.file_identity``), so a moved output folder keeps its cells.

:func:`label_subset` is the seeded labelled subset of one (fraction, seed): stratified by class,
nested across fractions and the same for every initialisation, so comparisons are paired.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.files import save_json_atomic, to_plain
from runtime.provenance import RUNTIME_FLAGS

__all__ = ["RECORD_NAME", "Cell", "flatten_settings", "settings_differences",
           "format_differences", "decide", "plan_cells", "start_cell", "clear_cell",
           "finish_cell", "relative_to", "run_config", "run_finetune_cell", "label_subset",
           "subset_digest"]

#: The record every cell folder holds.
RECORD_NAME = "cell.json"
#: What ``decide`` may answer.
ACTIONS = ("run", "reuse", "resume", "redo")


@dataclass
class Cell:
    """One step: ``name`` (printed, e.g. ``"init sg, fraction 1, seed 0"``), the ``folder`` it
    writes into, the ``settings`` that decide its result (JSON-plain), and optionally
    ``result_files`` (names inside ``folder``) that must exist for a finished cell to be reused."""

    name: str
    folder: Path
    settings: dict[str, Any]
    result_files: Sequence[str] = field(default_factory=tuple)

    @property
    def record_path(self) -> Path:
        return self.folder / RECORD_NAME

    def read_record(self) -> dict[str, Any] | None:
        """The cell's record, or None when there is none; an unreadable record is an
        ``InputError`` naming it."""
        path = self.record_path
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: unreadable cell record ({e}); pass --overwrite to redo "
                             "this cell, or choose another --output_dir") from e
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise InputError(f"{path}: not a cell record (no settings); pass --overwrite to redo "
                             "this cell, or choose another --output_dir")
        return record

    def result(self) -> dict[str, Any]:
        """The result a finished cell recorded."""
        record = self.read_record() or {}
        return dict(record.get("result") or {})


def flatten_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"a.b": value}`` (lists and tuples stay values), JSON-plain."""
    flat: dict[str, Any] = {}
    for key, value in to_plain(dict(settings)).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_settings(value, name + "."))
        else:
            flat[name] = value
    return flat


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    return a == b


_MISSING = "(not recorded)"


def settings_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]
                         ) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (recorded, current)}`` for every setting that differs; a key on one side
    only is a difference (shown as ``(not recorded)`` / ``(not set)``)."""
    old, new = flatten_settings(recorded), flatten_settings(current)
    keys = list(new) + [k for k in old if k not in new]
    return {k: (old.get(k, _MISSING), new.get(k, "(not set)")) for k in keys
            if k not in old or k not in new or not _same(old[k], new[k])}


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_differences(diff: Mapping[str, tuple[Any, Any]], limit: int = 6) -> str:
    """``key: recorded -> current, ...`` (at most ``limit`` entries, then ``(and N more)``)."""
    parts = [f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in list(diff.items())[:limit]]
    more = len(diff) - limit
    return ", ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != ".lock" for p in folder.iterdir())


def decide(cell: Cell, overwrite: bool = False, unfinished: str = "refuse"
           ) -> tuple[str, str | None]:
    """(action, why refused or None) for one cell; see the module docstring. ``unfinished``:
    ``"resume"``, ``"redo"`` or ``"refuse"``: what an interrupted cell with the same settings
    gets."""
    record = cell.read_record()
    if record is None:
        if not _has_files(cell.folder):
            return "run", None
        if overwrite:
            return "redo", None
        return "redo", f"{cell.folder}: holds files but no {RECORD_NAME} (not made by this command)"
    diff = settings_differences(record["settings"], cell.settings)
    if diff:
        if overwrite:
            return "redo", None
        return "redo", f"{cell.folder}: made with other settings ({format_differences(diff)})"
    finished = record.get("finished") is True and all(
        (cell.folder / name).is_file() for name in cell.result_files)
    if finished:
        return "reuse", None
    if unfinished in ("resume", "redo"):
        return unfinished, None
    if overwrite:
        return "redo", None
    return "resume", f"{cell.folder}: interrupted before it finished"


def plan_cells(cells: Iterable[Cell], overwrite: bool = False, unfinished: str = "refuse",
               continue_flag: str = "--resume", what: str = "cell") -> dict[str, str]:
    """``{cell.name: action}`` for every cell, decided before anything runs; an ``InputError``
    when any cell is refused: it names the first such cell and why (the differing settings),
    how many more there are, and the fixes (``--overwrite`` to redo them, ``continue_flag`` for
    interrupted ones, or another ``--output_dir``)."""
    cells = list(cells)
    if len({c.name for c in cells}) != len(cells):
        raise ValueError("cell names must be unique")
    plan, refused = {}, []
    for cell in cells:
        action, why = decide(cell, overwrite, unfinished)
        plan[cell.name] = action
        if why is not None:
            refused.append((cell, why))
    if refused:
        cell, why = refused[0]
        more = f" (and {len(refused) - 1} more {what}s)" if len(refused) > 1 else ""
        interrupted = all("interrupted" in w for _, w in refused)
        fix = (f"continue with {continue_flag}, or pass --overwrite to start again"
               if interrupted else f"pass --overwrite to redo them ({what}s with the same "
               "settings are kept), or choose another --output_dir")
        raise InputError(f"{what} {cell.name}: {why}{more}; {fix}")
    return plan


def start_cell(cell: Cell, action: str) -> None:
    """Before a cell runs (``action`` from :func:`plan_cells`): its record is (re)written as
    unfinished with this run's settings, so an interrupted run is recognised as one. Nothing is
    removed here (see :func:`clear_cell`)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    cell.folder.mkdir(parents=True, exist_ok=True)
    save_json_atomic(cell.record_path, {"settings": cell.settings, "finished": False,
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S")})


def clear_cell(cell: Cell) -> None:
    """Remove everything in the cell's folder (a ``redo`` of a step that cannot overwrite its
    own outputs); only ever called after :func:`plan_cells` allowed the redo."""
    if cell.folder.is_dir():
        shutil.rmtree(cell.folder)


def finish_cell(cell: Cell, result: Mapping[str, Any]) -> dict[str, Any]:
    """Record the cell as finished with ``result`` (JSON-plain, no absolute paths); returns it."""
    result = to_plain(dict(result))
    save_json_atomic(cell.record_path, {"settings": cell.settings, "finished": True,
                                        "result": result,
                                        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    return result


def relative_to(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` (POSIX separators), for records that must not depend on
    where the output folder lies."""
    return Path(os.path.relpath(Path(path), Path(root))).as_posix()


def _under(value: Any, root: str) -> bool:
    if isinstance(value, str):
        return value == root or value.startswith(root + os.sep)
    if isinstance(value, list) and value:
        return all(_under(v, root) for v in value)
    return False


def run_config(parser: argparse.ArgumentParser, argv: list[str], drop: Iterable[str] = (),
               under: str | os.PathLike | None = None) -> dict[str, Any]:
    """The settings of a command line: ``parser.parse_args(argv)`` as a dict without the flags
    that change nothing in the result (``runtime.provenance.RUNTIME_FLAGS``), the names in
    ``drop`` (paths whose content the caller identifies otherwise) and every value that is a
    path inside ``under`` (files the study itself made from recorded settings): what a cell
    records, independent of where its folder lies."""
    ns = vars(parser.parse_args(argv))
    root = str(Path(under)) if under is not None else None
    drop = set(drop) | RUNTIME_FLAGS
    return {k: to_plain(v) for k, v in sorted(ns.items())
            if k not in drop and not (root is not None and _under(v, root))}


def run_finetune_cell(cell: Cell, module: Any, argv: list[str], action: str, metric: str,
                      keep_checkpoints: bool = True) -> dict[str, Any]:
    """Run one fine-tuning cell through its stable interface (``module.build_parser()`` and
    ``module.run(args)``, ``finetune.classification`` or ``finetune.segmentation``; ``argv``
    names ``cell.folder`` as ``--output_dir``) and record its result: ``value`` (the test
    ``metric``, NaN when undefined), the test and best validation metrics (without per-case
    lists), best epoch, epochs run, training size, loaded keys and seconds. Without
    ``keep_checkpoints`` the run's ``best.pt``/``last.pt`` are removed once it finished."""
    start_cell(cell, action)
    t0 = time.time()
    metrics = module.run(module.build_parser().parse_args(argv))
    test = {k: v for k, v in (metrics.get("test") or {}).items() if k != "per_case"}
    value = test.get(metric)
    if not keep_checkpoints:
        for name in ("best.pt", "last.pt"):
            (cell.folder / name).unlink(missing_ok=True)
    return finish_cell(cell, {
        "value": float("nan") if value is None else float(value), "test": test,
        "val": {k: v for k, v in (metrics.get("val") or {}).items() if k != "per_case"},
        "best_epoch": metrics.get("best_epoch"), "epochs_run": metrics.get("epochs_run"),
        "n_train": metrics.get("n_train"), "loaded_keys": metrics.get("loaded_keys"),
        "seconds": time.time() - t0})


# ------------------------------------------------------------------------------------------
# labelled subsets
# ------------------------------------------------------------------------------------------
def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices (sorted) of the labelled subset of one (``fraction``, ``seed``).

    ``labels`` (N,): a class per item (all zeros for items without classes, e.g. segmentation
    cases). Stratified: ``round(fraction * n_c)`` items of each class c, at least one; nested
    across fractions (a seed's 5 % subset lies inside its 10 % subset); independent of the
    initialisation, so every initialisation fine-tunes on the same items.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1ABE1]))
    picked = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        picked.append(idx[:min(idx.size, max(1, int(round(fraction * idx.size))))])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def subset_digest(items: Sequence[Any]) -> str:
    """SHA-256 of a subset (indices or case names, in order): what a cell records to show which
    items it was trained on."""
    return hashlib.sha256(json.dumps([to_plain(v) for v in items]).encode()).hexdigest()
