"""The pattern generator's manifest as the defaults of pretraining's data flags.

``self_discovery/pattern_generator_3D.py`` writes its resolved flags to ``config.json`` in its
``--output_dir`` folder, next to the fold files. ``pytorch/train.py`` reads that folder (``--data_dir``)
and takes from the manifest what describes the fold files: cube size, number of classes,
instances per class (train and validation) and number of resolutions. A flag given on the
command line wins; without a manifest (e.g. the published data) the paper's values apply.

``resolve_data_flags(args) -> {flag: source}`` fills the data flags left at ``None`` in place;
each source is ``"flag"``, ``"manifest"`` or ``"default"``. When a value comes from the
manifest of a finished run (``fold_index.json`` present), the fold files are checked against it
first: files that do not match their manifest (another run's) are a one-line ``InputError``.
An unfinished run is left to the loader, which refuses it and says how to resume.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from self_discovery.fold_files import CLASSES_PER_BLOCK, FOLD_INDEX, fold_blocks, fold_file_names

__all__ = ["MANIFEST_NAME", "DATA_FLAGS", "read_manifest", "resolve_data_flags"]

#: Name of the pattern generator's manifest in its output folder.
MANIFEST_NAME = "config.json"
#: train.py flag -> (manifest key, the paper's value). ``multi_res`` is a switch in the
#: manifest: 3 resolutions when on, else 1.
DATA_FLAGS = {
    "input_rows": ("input_rows", 64),
    "input_cols": ("input_cols", 64),
    "input_deps": ("input_deps", 32),
    "cls_classes": ("nb_classes", 44),
    "nb_instances": ("nb_instances", 200),
    "nb_instances_val": ("nb_instances_val", 30),
    "nb_multires_patch": ("multi_res", 3),
}


def read_manifest(data_dir: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """(path, the manifest's data values as train.py flags) or (path, None) without a file."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        return path, None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: cannot be read as JSON ({e}); re-create the folder with "
                         "self_discovery/pattern_generator_3D.py or remove the file") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object of the pattern generator's flags")
    values = {"classes_per_file": raw.get("classes_per_file", CLASSES_PER_BLOCK)}
    for flag, (key, _) in DATA_FLAGS.items():
        if key not in raw:
            continue
        v = raw[key]
        if key == "multi_res":
            if not isinstance(v, bool):
                raise InputError(f"{path}: multi_res must be true or false, got {v!r}")
            v = 3 if v else 1
        elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{path}: {key} must be an integer >= 1, got {v!r}")
        values[flag] = v
    return path, values


def _check_folds(path: Path, m: dict[str, Any]) -> None:
    """Every fold file the manifest ``m`` (as train.py flags) describes exists with its rows and
    cube size; unreadable files are left to the loader, which names them."""
    if m["classes_per_file"] != CLASSES_PER_BLOCK:
        raise InputError(f"{path}: the fold files hold {m['classes_per_file']} classes per file, "
                         f"but pytorch/train.py reads groups of {CLASSES_PER_BLOCK}; re-create "
                         f"them with --classes_per_file {CLASSES_PER_BLOCK}")
    cube = tuple(m.get(k) for k in ("input_rows", "input_cols", "input_deps"))
    classes = m.get("cls_classes")
    for k, c_k in fold_blocks(classes) if classes else [(1, None)]:
        res = range(1, m.get("nb_multires_patch", 1) + 1)
        for split, r, per_class in ([("train", r, "nb_instances") for r in res]
                                    + [("val", 1, "nb_instances_val")]):
            name = fold_file_names(split, r, k)[0]
            if not (path.parent / name).is_file():
                raise InputError(f"{path}: describes {classes} classes and {len(res)} "
                                 f"resolution(s), but {name} is missing; the folder holds "
                                 "another run's files: re-create it with "
                                 "self_discovery/pattern_generator_3D.py")
            try:
                shape = np.load(path.parent / name, mmap_mode="r", allow_pickle=False).shape
            except (OSError, ValueError):
                continue
            rows = m[per_class] * c_k if c_k and per_class in m else shape[0]
            bad_cube = None not in cube and shape[1:] not in (cube, (1, *cube))
            if shape[0] != rows or bad_cube:
                size = "" if None in cube else " of " + "x".join(map(str, cube))
                raise InputError(
                    f"{path}: by this manifest {name} holds {rows} cubes{size}, but its shape "
                    f"is {shape}; the folder mixes runs: re-create it with "
                    "self_discovery/pattern_generator_3D.py")


def resolve_data_flags(args: argparse.Namespace) -> dict[str, str]:
    """Fill the data flags that are ``None`` in ``args`` from ``<data_dir>/config.json``, else
    from the paper's values; returns where each value came from."""
    if all(getattr(args, flag) is not None for flag in DATA_FLAGS):
        return dict.fromkeys(DATA_FLAGS, "flag")   # the manifest is not consulted
    path, manifest = read_manifest(args.data_dir)
    sources = {}
    for flag, (_, paper) in DATA_FLAGS.items():
        if getattr(args, flag) is not None:
            sources[flag] = "flag"
        elif manifest is not None and flag in manifest:
            setattr(args, flag, manifest[flag])
            sources[flag] = "manifest"
        else:
            setattr(args, flag, paper)
            sources[flag] = "default"
    if "manifest" in sources.values() and (path.parent / FOLD_INDEX).is_file():
        _check_folds(path, manifest)
    return sources
