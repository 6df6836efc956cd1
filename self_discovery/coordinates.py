"""``coordinates.csv``: the provenance of every cube of stage 3, and resuming from it.

One row per cube, in fold-file order: its class, split, resolution, volume (relative to
--data_dir), crop start and size before resizing, the class's reference volume and where the
cube lies in the fold files (block ``fold``, row ``row``). ``--prev_coordinates`` resumes a run
from it in one of two ways:

* the file lies in --output_dir and that run used the same cube flags (``same_cube_config``): blocks
  complete in --output_dir are kept as they are, the others re-cropped from the recorded coordinates;
* anywhere else, or another cube size: every recorded class is re-cropped from its coordinates.

Either way discovery then continues up to --nb_classes. The run continued must have been made
with the same settings (``RESUME_POLICY``, checked against the ``config.json`` beside the
coordinates file by ``check_continuation``) and from the same features and volumes (the
identity of the features index it recorded): classes discovered under other thresholds, seed or
features would sit beside the recorded ones under a configuration claiming one setting for all.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
from pathlib import Path

from typing import Any

from runtime.errors import InputError
from runtime.files import atomic_path
from runtime.provenance import ResumePolicy, check_resume_settings
from self_discovery.discovery import ClassPlan, CubeSpec

__all__ = ["CSV_COLUMNS", "SPLITS", "read_coordinates", "plans_from_csv", "write_coordinates",
           "CUBE_FLAGS", "same_cube_config", "RESUME_POLICY", "read_run_config",
           "check_continuation"]

#: Columns of coordinates.csv. ``file`` and ``reference`` are relative to --data_dir; x, y, z is the
#: crop start and size_* its size before resizing; ``fold``/``row`` locate the cube in the files.
CSV_COLUMNS = ("class", "split", "resolution", "file", "x", "y", "z", "size_x", "size_y", "size_z",
               "reference", "fold", "row")
#: Splits of a cube (also the folders of --data_dir).
SPLITS = ("train", "validation")
_INTS = ("class", "resolution", "x", "y", "z", "size_x", "size_y", "size_z", "fold", "row")


def read_coordinates(path: str | os.PathLike) -> dict[int, list[dict]]:
    """Parse a coordinates.csv into ``{class: [row, ...]}`` (rows in file order, ints converted).

    Raises InputError naming the file (and line) when it cannot be read or is malformed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"--prev_coordinates {path}: cannot be read ({e.strerror}); give the "
                         "coordinates.csv written by an earlier run") from e
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"--prev_coordinates {path}: missing column(s) {', '.join(missing)}; give "
                         "the coordinates.csv written by pattern_generator_3D.py")
    out: dict[int, list[dict]] = {}
    for line, row in enumerate(reader, start=2):
        try:
            rec = {k: int(row[k]) for k in _INTS}
        except (TypeError, ValueError):
            raise InputError(f"--prev_coordinates {path}: line {line}: expected integers in "
                             f"columns {', '.join(_INTS)}; the file is damaged") from None
        rec["split"], rec["file"], rec["reference"] = row["split"], row["file"], row["reference"]
        if rec["split"] not in SPLITS:
            raise InputError(f"--prev_coordinates {path}: line {line}: split {rec['split']!r} is "
                             "not train/validation; the file is damaged")
        out.setdefault(rec["class"], []).append(rec)
    return out


def _class_cubes(path: Path, c: int, rows: list[dict], counts: dict[str, int],
                 resolutions: tuple[int, ...]) -> list[CubeSpec]:
    """The cubes of recorded class ``c`` in file order, checked against the cube counts."""
    cubes = []
    for split, res, flag in [("train", r, "--nb_instances") for r in resolutions] + \
                            [("validation", 1, "--nb_instances_val")]:
        sel = [r for r in rows if r["split"] == split and r["resolution"] == res]
        if len(sel) != counts[split]:
            raise InputError(
                f"--prev_coordinates {path}: class {c} has {len(sel)} {split} cubes of "
                f"resolution {res} but {flag} is {counts[split]}"
                + ("" if sel or res == 1 else " (the earlier run had no --multi_res)")
                + "; resume with the flags of the earlier run")
        cubes += [CubeSpec(split, res, r["file"], r["x"], r["y"], r["z"],
                           (r["size_x"], r["size_y"], r["size_z"])) for r in sel]
    extra = [r for r in rows if r["split"] == "train" and r["resolution"] not in resolutions]
    if extra:
        raise InputError(f"--prev_coordinates {path}: class {c} has resolution "
                         f"{extra[0]['resolution']} cubes but --multi_res is off; resume with "
                         "--multi_res")
    return cubes


def plans_from_csv(path: Path, rows_by_class: dict[int, list[dict]], nb_classes: int,
                   nb_instances: int, nb_instances_val: int, multi_res: bool,
                   train_rel: list[str]) -> list[ClassPlan]:
    """ClassPlans of the first ``nb_classes`` classes recorded in a coordinates file (checked
    against the flags and the train volumes ``train_rel``)."""
    classes = sorted(rows_by_class)
    if classes != list(range(len(classes))):
        raise InputError(f"--prev_coordinates {path}: classes {classes[:5]}... are not 0, 1, 2, "
                         "...; the file is damaged")
    resolutions = (1, 2, 3) if multi_res else (1,)
    counts = {"train": nb_instances, "validation": nb_instances_val}
    known = set(train_rel)
    plans = []
    for c in classes[:nb_classes]:
        rows = rows_by_class[c]
        ref = rows[0]["reference"]
        if ref not in known:
            raise InputError(f"--prev_coordinates {path}: class {c}: reference {ref} is not a "
                             "train volume of --data_dir; resume with the same --data_dir")
        cubes = _class_cubes(path, c, rows, counts, resolutions)
        first = cubes[0]
        if first.file != ref:
            raise InputError(f"--prev_coordinates {path}: class {c}: the first train cube is not "
                             "from the reference; the file is damaged")
        plans.append(ClassPlan(c, ref, (first.x, first.y, first.z), cubes))
    return plans


def write_coordinates(path: Path, plans: list[ClassPlan], per_file: int,
                      counts: dict[str, int]) -> None:
    """Write the provenance of ``plans`` atomically (rows in file order; ``per_file`` classes
    per block, ``counts[split]`` cubes per class)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for p in plans:
        k, within = p.cls // per_file + 1, p.cls % per_file
        index: dict[tuple[str, int], int] = {}
        for s in p.cubes:
            j = index.get((s.split, s.resolution), 0)
            index[(s.split, s.resolution)] = j + 1
            row = within * counts[s.split] + j
            w.writerow([p.cls, s.split, s.resolution, s.file, s.x, s.y, s.z, *s.size,
                        p.reference, k, row])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


#: Flags that must match for the files of an earlier run in --output_dir to be kept when resuming.
CUBE_FLAGS = ("data_dir", "is_normalized", "hu_min", "hu_max", "input_rows", "input_cols",
              "input_deps", "crop_rows", "crop_cols", "nb_instances", "nb_instances_val",
              "multi_res", "minPatchSize", "maxPatchSize", "classes_per_file")


def same_cube_config(a: argparse.Namespace, save: Path) -> bool:
    """True when --prev_coordinates lies in --output_dir and that run (its config.json) used the same
    ``CUBE_FLAGS``: its complete blocks can be kept."""
    prev = Path(a.prev_coordinates)
    cfg_path = save / "config.json"
    if prev.resolve().parent != save.resolve() or not cfg_path.is_file():
        return False
    try:
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(old.get(k) == getattr(a, k) for k in CUBE_FLAGS)


#: ``--prev_coordinates``: flags applied when they differ from the run continued (more classes,
#: another montage, another saved cube size: every class is re-cropped then), paths whose
#: content is checked instead (the features index's identity), and every other flag refused.
RESUME_POLICY = ResumePolicy(
    applied=("nb_classes", "montage_instances", "input_rows", "input_cols"),
    ignored=("output_dir", "data_dir", "train_features", "val_features"))


def read_run_config(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` a run wrote (None when missing or unreadable: older versions)."""
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def check_continuation(a: argparse.Namespace, index: Path, features: dict[str, Any]
                       ) -> dict[str, tuple[Any, Any]]:
    """Compare this run with the one ``--prev_coordinates`` continues (its ``config.json``
    beside the coordinates file): a flag of ``RESUME_POLICY`` applied is said and returned
    ({flag: (old, new)}), any other change refused with the list; features other than the
    recorded ones (``features``: the identity of this run's features index ``index``) are
    refused."""
    record = Path(a.prev_coordinates).parent / "config.json"
    recorded = read_run_config(record)
    restart = "start a new run without --prev_coordinates (into another --output_dir)"
    applied = check_resume_settings(recorded, vars(a), RESUME_POLICY, str(record),
                                    "--prev_coordinates", restart)
    old = (recorded or {}).get("features_index")
    if isinstance(old, dict) and old.get("sha256") != features.get("sha256"):
        raise InputError(f"{record}: --prev_coordinates continues a run made from other "
                         f"features or volumes ({index} is not the features index it "
                         "recorded); give that run's "
                         f"--data_dir and features, or {restart}")
    return applied
