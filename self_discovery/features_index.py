"""The hand-off of stage 2 to stage 3: feature files and the index that says whose they are.

``train_features.npy`` (N_train, D) and ``validation_features.npy`` (N_val, D), float32, row i
the feature of the i-th volume of ``<data_dir>/<split>/`` in sorted file-name order, and
``features_index.json``, written last::

    {"train": [file names in row order], "validation": [...],
     "volumes": {"train": [{"name", "size", "sha256"}, ...], "validation": [...]},
     "feature_files": {"train_features.npy": {"size", "sha256"}, ...},
     "data_dir", "dataset_manifest", "weights", "weights_identity", "source",
     "feature_dim", "input_size", "input_size_from", "model_config"}

``load_features`` (the pattern generator's reader) checks, before any feature is used: both
feature files are the ones the index was written with (size and SHA-256: no train features of
one run beside validation features of another); the folder lists the indexed files in the same
order; and every volume has the recorded size and SHA-256 (the whole file is hashed), so
features of another dataset whose files have the same names are refused.

``import_features`` gives features made elsewhere (the published extractor, say) such an index:
it reorders their rows from the order they were made in to sorted file order and records the
volumes they belong to.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.files import save_json_atomic, save_npy_atomic
from runtime.provenance import file_identity
from self_discovery.volumes import (SPLITS, dataset_manifest_identity, describe_volume_changes,
                                    list_volumes, volume_identities)

__all__ = ["TRAIN_NAME", "VAL_NAME", "INDEX_NAME", "DEFAULT_WEIGHTS", "IMPORT_ORDERS",
           "save_features", "load_features", "import_features"]

TRAIN_NAME = "train_features.npy"
VAL_NAME = "validation_features.npy"
INDEX_NAME = "features_index.json"
DEFAULT_WEIGHTS = "self_discovery/Checkpoints/Autoencoder/Unet_autoencoder.pt"
#: Row orders ``import_features`` understands: ``glob`` = the unsorted ``glob.glob`` order of
#: ``<data_dir>/<split>/*.npy`` on this machine (what the published extractor iterated),
#: ``sorted`` = sorted file names (this project's order).
IMPORT_ORDERS = ("glob", "sorted")


def save_features(save_dir: str | os.PathLike, train_feats: np.ndarray, val_feats: np.ndarray,
                  index: Mapping[str, Any], data_dir: str | os.PathLike | None = None) -> None:
    """Write both feature files, then ``index`` (file names per split, ...) with their sizes
    and SHA-256. With ``data_dir`` the volumes' identities (``volume_identities``) and the
    dataset manifest's are recorded too (unless ``index`` already holds them).

    The old index is removed first and written back last, so a run killed between the writes
    leaves features that :func:`load_features` refuses, never train features of one run next
    to validation features of another.
    """
    save_dir = Path(save_dir)
    index = dict(index)
    if data_dir is not None:
        if "volumes" not in index:
            index["volumes"] = volume_identities(data_dir)
        index.setdefault("data_dir", str(Path(data_dir).resolve()))
        index.setdefault("dataset_manifest", dataset_manifest_identity(data_dir))
    (save_dir / INDEX_NAME).unlink(missing_ok=True)
    save_npy_atomic(save_dir / TRAIN_NAME, train_feats)
    save_npy_atomic(save_dir / VAL_NAME, val_feats)
    index["feature_files"] = {n: file_identity(save_dir / n) for n in (TRAIN_NAME, VAL_NAME)}
    save_json_atomic(save_dir / INDEX_NAME, index)


def _describe_mismatch(split: str, indexed: list[str], current: list[str]) -> str:
    missing = [f for f in current if f not in set(indexed)]
    extra = [f for f in indexed if f not in set(current)]

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

    parts = []
    if missing:
        parts.append(f"not in the features: {names(missing)}")
    if extra:
        parts.append(f"features of files no longer there: {names(extra)}")
    if not parts:
        parts.append("same files in another order")
    return f"{split}/ " + "; ".join(parts)


def _read_array(path: Path, rerun: str) -> np.ndarray:
    """A feature file (N, D) of finite floats, as float32."""
    if not path.is_file():
        raise InputError(f"{path}: features not found; {rerun}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy ({e}); {rerun}") from e
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{path}: expected a float (N, D) array, got {arr.shape} {arr.dtype}; "
                         f"{rerun}")
    if not np.isfinite(arr).all():
        raise InputError(f"{path}: {int((~np.isfinite(arr)).any(axis=1).sum())} feature rows "
                         "hold NaN or inf (a diverged autoencoder?); retrain the autoencoder, "
                         f"then {rerun}")
    return arr.astype(np.float32, copy=False)


def _read_index(index_path: Path, rerun: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """(the index, its file names per split), checked to be an index this project writes."""
    if not index_path.is_file():
        raise InputError(f"{index_path}: no index of which file each feature row belongs to "
                         f"(an interrupted extraction, or features made elsewhere: see "
                         f"--import_features); {rerun} --overwrite")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{index_path}: not readable as JSON ({e}); {rerun} --overwrite") from e
    if not isinstance(index, dict) or not all(
            isinstance(index.get(s), list) and all(isinstance(n, str) for n in index[s])
            for s in SPLITS):
        raise InputError(f"{index_path}: not a features index (it must list the train/ and "
                         f"validation/ file names in row order); {rerun} --overwrite")
    return index, {s: list(index[s]) for s in SPLITS}


def _recorded_identity(index: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The recorded size/SHA-256 of feature file ``name`` (older indexes: SHA-256 only)."""
    files = index.get("feature_files")
    if isinstance(files, dict) and isinstance(files.get(name), dict):
        return files[name]
    older = index.get("sha256")
    if isinstance(older, dict) and isinstance(older.get(name), str):
        return {"sha256": older[name]}
    return None


def _check_feature_files(index: dict[str, Any], index_path: Path, paths: dict[str, Path],
                         rerun: str) -> None:
    for name, path in paths.items():
        recorded = _recorded_identity(index, name)
        if recorded is None:
            raise InputError(f"{index_path}: records no checksum of {name} (written by hand or "
                             f"by an older version?), so it cannot tell whether {path} belongs "
                             f"to it; {rerun} --overwrite, or for features made elsewhere write "
                             "the index with feature_extractor.py --import_features")
        ident = file_identity(path)
        if any(k in recorded and str(recorded[k]) != str(ident[k]) for k in ("size", "sha256")):
            raise InputError(f"{path}: not the file {index_path} was written with (an "
                             "interrupted or mixed extraction: train and validation features "
                             f"must come from one run); {rerun} --overwrite")


def _check_volumes(index: dict[str, Any], index_path: Path, data_dir: Path, rerun: str) -> None:
    """The volumes of ``data_dir`` must be the recorded ones, byte for byte."""
    recorded = index.get("volumes")
    if recorded is None:
        print(f"note: {index_path} records no content identity of the volumes (an older "
              "index): they are matched by file name only; re-extract the features (or "
              "--import_features) to record it", file=sys.stderr)
        return
    changes = describe_volume_changes(recorded, volume_identities(data_dir))
    if changes:
        raise InputError(f"{index_path}: the features were made from other volumes than those "
                         f"now in {data_dir} ({changes}: another dataset's files with the same "
                         f"names?); {rerun} --overwrite")


def load_features(train_features_path: str | os.PathLike, val_features_path: str | os.PathLike,
                  data_dir: str | os.PathLike
                  ) -> tuple[np.ndarray, np.ndarray, list[Path], list[Path]]:
    """Load features and check they belong to the volumes now in ``data_dir``: the index
    (``features_index.json`` beside ``train_features_path``) must list exactly the sorted
    ``.npy`` files of ``data_dir``/train and ``data_dir``/validation, one per row, with the
    recorded content (size and SHA-256 of every volume), and both feature files must be the
    ones it was written with.

    Returns:
        (train_feats (N_train, D) float32, val_feats (N_val, D) float32, train_files,
        val_files): the files are the volume paths in row order.

    Raises:
        InputError naming what does not match and the command that fixes it.
    """
    train_path, val_path = Path(train_features_path), Path(val_features_path)
    data_dir = Path(data_dir)
    rerun = (f"re-run: python self_discovery/feature_extractor.py --data_dir {data_dir} "
             f"--weights {DEFAULT_WEIGHTS} --output_dir {train_path.parent}")
    train_feats, val_feats = _read_array(train_path, rerun), _read_array(val_path, rerun)
    index_path = train_path.parent / INDEX_NAME
    index, indexed = _read_index(index_path, rerun)
    if isinstance(index.get("weights"), str):   # the checkpoint these features came from
        rerun = rerun.replace(f"--weights {DEFAULT_WEIGHTS}", f"--weights {index['weights']}")
    _check_feature_files(index, index_path, {TRAIN_NAME: train_path, VAL_NAME: val_path}, rerun)
    current = {split: list_volumes(data_dir / split) for split in SPLITS}
    problems = [_describe_mismatch(split, indexed[split], [f.name for f in current[split]])
                for split in SPLITS if indexed[split] != [f.name for f in current[split]]]
    if problems:
        raise InputError(f"{index_path}: features do not match the volumes in {data_dir}: "
                         + " | ".join(problems) + f"; {rerun}")
    for split, arr, path in (("train", train_feats, train_path),
                             ("validation", val_feats, val_path)):
        if arr.shape[0] != len(indexed[split]):
            raise InputError(f"{path}: {arr.shape[0]} rows but {index_path} lists "
                             f"{len(indexed[split])} {split} files; {rerun}")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise InputError(f"{train_path} and {val_path}: feature sizes differ "
                         f"({train_feats.shape[1]} vs {val_feats.shape[1]}); {rerun}")
    _check_volumes(index, index_path, data_dir, rerun)
    return train_feats, val_feats, current["train"], current["validation"]


def _made_order(folder: Path, order: str) -> list[str]:
    """File names of ``folder``'s ``.npy`` volumes in the order features were made in."""
    if order == "glob":   # what the published extractor iterated, on this file system
        return [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(str(folder)),
                                                                    "*.npy"))]
    return [f.name for f in list_volumes(folder)]


def import_features(sources: tuple[str | os.PathLike, str | os.PathLike],
                    data_dir: str | os.PathLike, output_dir: str | os.PathLike,
                    order: str = "glob") -> dict[str, tuple[int, int]]:
    """Give features made elsewhere an index the pattern generator accepts.

    ``sources``: (train, validation) ``.npy`` files (N, D), row i the feature of the i-th
    volume of ``<data_dir>/<split>/`` in ``order`` (``IMPORT_ORDERS``; ``glob``: the published
    extractor's unsorted order, reproducible only on the folder and file system it ran on).
    The rows are written in sorted file order to ``output_dir`` with ``features_index.json``
    recording the volumes by content. Returns the shapes written per split.
    """
    if order not in IMPORT_ORDERS:
        raise ValueError(f"order must be one of {IMPORT_ORDERS}, got {order!r}")
    data_dir, out = Path(data_dir), Path(output_dir)
    fix = "give the feature files made from the volumes of --data_dir"
    rows, names = {}, {}
    for split, src in zip(SPLITS, sources):
        made = _made_order(data_dir / split, order)
        arr = _read_array(Path(src), fix)
        if len(arr) != len(made):
            raise InputError(f"{src}: {len(arr)} feature rows but {data_dir / split} holds "
                             f"{len(made)} volumes; {fix}")
        perm = np.argsort(np.asarray(made, dtype=object), kind="stable")
        rows[split], names[split] = arr[perm], [made[i] for i in perm]
    if rows["train"].shape[1] != rows["validation"].shape[1]:
        raise InputError(f"{sources[0]} and {sources[1]}: feature sizes differ "
                         f"({rows['train'].shape[1]} vs {rows['validation'].shape[1]}); {fix}")
    save_features(out, rows["train"], rows["validation"], {
        **names, "source": f"imported ({order} order)",
        "imported_from": [str(Path(s).resolve()) for s in sources],
        "imported_identity": [file_identity(s) for s in sources],
        "weights": None, "feature_dim": int(rows["train"].shape[1])}, data_dir=data_dir)
    return {s: tuple(rows[s].shape) for s in SPLITS}
