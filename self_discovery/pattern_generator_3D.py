"""Stage 3: self-discovery of anatomical patterns.

For every class ``i`` (``--nb_classes`` C) a reference train patient is drawn among those not yet
used as a reference; a random coordinate (x, y, z) inside its borders that is at least
``--distance_threshold`` away from every earlier class's coordinate and passes the lung test is
searched (``--max_tries`` tries, then another reference); the ``--nb_instances`` train patients
and ``--nb_instances_val`` validation patients nearest to the reference (L2 on the stage-2
features, scikit-learn) each give a cube cropped at that coordinate. With ``--multi_res`` every
train patient also gives two cubes of random side [minPatchSize, maxPatchSize) around it, resized
to the cube size (resolutions 2 and 3).

Output in ``--output_dir``::

    *_vwGen_ex_ref_fold{k}.0.npy   the fold files: cubes (N, X, Y, Z) float32 and labels (N, 1)
                                   int64 per block of 50 classes (``fold_files.py``)
    coordinates.csv     provenance of every cube (``--prev_coordinates`` resumes from it)
    config.json         the resolved flags, the identity of the features index read, and
                        what a ``--prev_coordinates`` run changed
    fold_index.json     written last: the fold files of the finished run (sizes, SHA-256)
    montage/class_NNN.png   middle slices of a few cubes per class (rows: res 1, 2, 3, val)

The files of a block are filled class by class and renamed when the block is complete, so
memory stays at one class whatever C and a crash never leaves a partial file. Every input
(volumes, features checked against them by content, the run ``--prev_coordinates`` continues)
is read before the output folder is looked at. A folder holding a finished result keeps it
until the new one is complete: the new files are written to ``.staging/`` and moved into
place at the end, so a run that fails (an extension whose next class finds no coordinate)
leaves the finished folder as it was.

This module is the command line and the orchestration; the parts live beside it:
``lung_test.py`` (the lung test), ``discovery.py`` (references, coordinates, nearest patients),
``coordinates.py`` (coordinates.csv and resuming), ``fold_files.py`` (writing the blocks) and
``volumes.py`` (normalised crops of the volumes).

Differences from the published code (its bugs; the README lists every difference): no cube
dropped at the end of a block and a partial last block is saved (C=44 saves 44 classes); the
"too close" flag is decided per try; volumes too small for the borders are an up-front error
naming the volume; the reference search stops with an error once every patient was tried; HU
windowing is applied to the saved cubes as well as to the lung test; the coordinates file is a
real CSV; all randomness comes from ``--seed`` (one ``np.random.Generator`` per class, derived
from one ``SeedSequence(seed)``, so a resumed run draws exactly what an uninterrupted run
draws); no float64 giant arrays. A reference given up on in one class may be drawn again by a
later class (a reference is "used" once a class was built from it; the published code uses up
every reference it draws): ``coordinates.csv`` then records every used reference, so
``--prev_coordinates`` resumes exactly.

Choices the published code leaves open: a non-reference patient whose volume is smaller than
the reference's is cropped at the reference coordinate clamped into its volume (the recorded
coordinate is the one used).

Run from the repository root::

    python self_discovery/pattern_generator_3D.py --data_dir dataset/ --multi_res
    python self_discovery/pattern_generator_3D.py --data_dir dataset/ --multi_res \
        --nb_classes 100 --prev_coordinates self_discovery/Semantic_Genesis_data/coordinates.csv
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import shutil

import numpy as np
from tqdm import tqdm

from runtime.cli import (ArgumentParser, HelpFormatter, add_hu_flags, add_overwrite_flag,
                         check_hu_window, nonneg_float, nonneg_int, positive_int, probability,
                         run_cli, seed_int)
from runtime.errors import InputError
from runtime.files import check_output_outside, output_session, write_run_config
from runtime.images import save_png
from runtime.provenance import file_identity
from self_discovery.coordinates import (SPLITS, check_continuation, plans_from_csv,
                                        read_coordinates, same_cube_config, write_coordinates)
from self_discovery.discovery import ClassPlan, CoordinateBounds, DiscoveryContext, new_plan
from self_discovery.features_index import INDEX_NAME, load_features
from self_discovery.fold_files import (CLASSES_PER_BLOCK, FOLD_GLOB, FOLD_INDEX, STAGING,
                                       BlockFiles, block_complete, commit_staging, file_keys,
                                       files_match_index, fold_blocks, fold_file_names,
                                       open_block, write_fold_index)
from self_discovery.lung_test import lung_threshold_unit
from self_discovery.montage import MONTAGE_TILE, class_montage
from self_discovery.volumes import VolumeCrops, list_volumes, open_volume, resize_volume

__all__ = ["MONTAGE_TILE", "build_parser", "generate_patterns", "main"]


def _write_class(ctx: DiscoveryContext, plan: ClassPlan, files: BlockFiles, row0: dict,
                 montage_n: int) -> dict[tuple[str, int], list[np.ndarray]]:
    """Crop every cube of ``plan``, resize it to the cube size (X, Y, Z) and write it to the
    block at row ``row0[(split, res)] + j``; return the first ``montage_n`` cubes per
    (split, resolution)."""
    a = ctx.args
    size = (a.input_rows, a.input_cols, a.input_deps)
    montage: dict[tuple[str, int], list[np.ndarray]] = {}
    count: dict[tuple[str, int], int] = {}
    for s in tqdm(plan.cubes, desc=f"class {plan.cls}", leave=False, disable=None):
        key = (s.split, s.resolution)
        j = count.get(key, 0)
        count[key] = j + 1
        # multi-resolution crops are resized as the published code does with scikit-image
        cube = resize_volume(ctx.volumes.crop(s.file, s.x, s.y, s.z, s.size), size)
        files.write(key, row0[key] + j, cube)
        if j < montage_n:
            montage.setdefault(key, []).append(cube)
    return montage


def _write_blocks(ctx: DiscoveryContext, plans: list[ClassPlan], same_run: bool,
                  target: Path) -> list[str]:
    """Write every block of --nb_classes classes into ``target`` (--output_dir, or its staging
    folder when a finished result is replaced), discovering the classes beyond ``plans``
    (appended); blocks of an earlier run with the same cube flags (``same_run``) that are
    complete in --output_dir (and, where it has one, as its fold_index.json records them) are
    kept. ``coordinates.csv`` is rewritten after each block. Returns every fold file name."""
    a, save, per_file = ctx.args, Path(ctx.args.output_dir), ctx.args.classes_per_file
    counts = {"train": a.nb_instances, "validation": a.nb_instances_val}
    keys = file_keys(3 if a.multi_res else 1)
    ref_index = {r: i for i, r in enumerate(ctx.train_rel)}
    used = {ref_index[p.reference] for p in plans}
    coords = [p.coord for p in plans]
    blocks = fold_blocks(a.nb_classes, per_file)
    cube_size = (a.input_rows, a.input_cols, a.input_deps)
    staged = target != save
    bar = tqdm(total=a.nb_classes, desc="classes", disable=None)
    for k, n_cls in blocks:
        first, last = (k - 1) * per_file, (k - 1) * per_file + n_cls
        names = [n for _, prefix, res in keys for n in fold_file_names(prefix, res, k)]
        if same_run and last <= len(plans) and block_complete(
                save, k, keys, counts, first, n_cls, cube_size) \
                and (not staged or files_match_index(save, names)):
            bar.update(n_cls)   # resumed in place: these files already hold these classes
            continue
        with open_block(target, k, keys, counts, first, n_cls, cube_size) as files:
            for c in range(first, last):
                if c == len(plans):
                    earlier = np.array(coords, dtype=np.float64).reshape(-1, 3)   # (c, 3)
                    plans.append(new_plan(ctx, c, used, earlier))
                    used.add(ref_index[plans[c].reference])
                    coords.append(plans[c].coord)
                row0 = {(s, r): (c - first) * counts[s] for s, _, r in keys}
                rows = _write_class(ctx, plans[c], files, row0, a.montage_instances)
                if a.montage_instances > 0:
                    save_png(target / "montage" / f"class_{c:03d}.png",
                             class_montage(plans[c], rows, cube_size))
                bar.update(1)
        write_coordinates(target / "coordinates.csv", plans[:last], per_file, counts)
    bar.close()
    return [name for k, _ in blocks for _, prefix, res in keys
            for name in fold_file_names(prefix, res, k)]


def generate_patterns(args: argparse.Namespace) -> list[ClassPlan]:
    """Run stage 3 with parsed ``args``; return the plans of all classes written.

    Every input is read and checked (volumes, features and their index, the run a
    ``--prev_coordinates`` continues) before the output folder is looked at."""
    a = args
    _check_args(a)
    save = Path(a.output_dir)
    for split in SPLITS:   # a mistyped --data_dir is named first
        list_volumes(Path(a.data_dir) / split)
    check_output_outside(save, [Path(a.data_dir) / sp for sp in SPLITS], "--output_dir",
                         "--data_dir")
    ctx = _context(a)
    features = file_identity(Path(a.train_features).parent / INDEX_NAME)
    plans, applied = [], {}
    if a.prev_coordinates:
        applied = check_continuation(a, Path(a.train_features).parent / INDEX_NAME, features)
        plans = plans_from_csv(Path(a.prev_coordinates), read_coordinates(a.prev_coordinates),
                               a.nb_classes, a.nb_instances, a.nb_instances_val, a.multi_res,
                               ctx.train_rel)
    earlier = [save / "coordinates.csv", save / FOLD_INDEX] + sorted(
        p for p in save.glob(FOLD_GLOB) if not p.name.startswith("."))
    unfinished = None if (save / FOLD_INDEX).is_file() else \
        f"no {FOLD_INDEX}: the run was interrupted or stopped with an error"
    resuming = bool(a.prev_coordinates) and Path(a.prev_coordinates).resolve().parent == save.resolve()
    with output_session(save, "--output_dir", earlier, a.overwrite, "--prev_coordinates",
                        resuming, unfinished=unfinished):
        return _generate(a, ctx, plans, {"features_index": features, "continued": {
            "from": a.prev_coordinates, "changed": {k: list(v) for k, v in applied.items()}}
            if a.prev_coordinates else None})


def _load_features(a: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(train features (N_train, D), val features (N_val, D), train and val volumes relative to
    --data_dir), checked to hold enough patients for the flags."""
    data_dir = Path(a.data_dir)
    train_feats, val_feats, train_files, val_files = load_features(
        a.train_features, a.val_features, data_dir)
    train_rel = [f"train/{Path(f).name}" for f in train_files]
    val_rel = [f"validation/{Path(f).name}" for f in val_files]
    n_train, n_val = len(train_rel), len(val_rel)
    tdir, vdir = data_dir / "train", data_dir / "validation"
    if n_train < a.nb_instances:
        raise InputError(f"{tdir}: {n_train} train patients but --nb_instances is "
                         f"{a.nb_instances}; lower --nb_instances to at most {n_train} "
                         "(or add patients)")
    if n_val < a.nb_instances_val:
        raise InputError(f"{vdir}: {n_val} validation patients but --nb_instances_val is "
                         f"{a.nb_instances_val}; lower --nb_instances_val to at most {n_val} "
                         "(or add patients)")
    if n_train < a.nb_classes:
        raise InputError(f"{tdir}: --nb_classes {a.nb_classes} needs one distinct reference "
                         f"patient per class but there are {n_train} train patients; lower "
                         f"--nb_classes to at most {n_train}")
    return (np.asarray(train_feats, dtype=np.float32), np.asarray(val_feats, dtype=np.float32),
            train_rel, val_rel)


def _volume_shapes(a: argparse.Namespace, volumes: VolumeCrops, train_rel: list[str],
                   val_rel: list[str]) -> dict[str, tuple[int, int, int]]:
    """Every volume's shape (X, Y, Z) from its header; every train volume may become a
    reference, so it must hold a coordinate (and a multi-resolution crop), a validation volume
    a cube."""
    bounds = CoordinateBounds.from_args(a)
    need_mr = (a.minPatchSize, a.minPatchSize, 0) if a.multi_res else (0, 0, 0)
    need_ref = tuple(max(p, q) for p, q in zip(bounds.min_shape(), need_mr))
    w = bounds.window
    shapes = {}
    for rels, need, what in ((train_rel, need_ref, "the borders --len_border "
                              f"{a.len_border} / --len_border_z {a.len_border_z} around a "
                              f"{w[0]}x{w[1]}x{w[2]} lung-test window"),
                             (val_rel, (a.crop_rows, a.crop_cols, a.input_deps), "a cube")):
        for rel in rels:
            shp = tuple(int(s) for s in open_volume(volumes.path(rel)).shape)
            if any(s < n for s, n in zip(shp, need)):
                raise InputError(
                    f"{volumes.path(rel)}: volume of size {shp} is too small for {what}: it needs "
                    f"at least {need[0]}x{need[1]}x{need[2]}; lower --len_border/--len_border_z "
                    "(or the crop sizes) or remove the volume")
            shapes[rel] = shp
    return shapes


def _context(a: argparse.Namespace) -> DiscoveryContext:
    """What discovery reads: the features (checked against the volumes by content), the
    volumes' shapes and the neighbour indexes."""
    train_feats, val_feats, train_rel, val_rel = _load_features(a)
    volumes = VolumeCrops(Path(a.data_dir), a.is_normalized, a.hu_min, a.hu_max)
    shapes = _volume_shapes(a, volumes, train_rel, val_rel)
    return DiscoveryContext.build(a, volumes, train_rel, val_rel, shapes, train_feats, val_feats,
                                  lung_threshold_unit(a.hu_min, a.hu_max))


def _generate(a: argparse.Namespace, ctx: DiscoveryContext, plans: list[ClassPlan],
              record: dict) -> list[ClassPlan]:
    """Write the classes into --output_dir. A folder holding a finished result (its
    fold_index.json) keeps it, usable, until the new one is complete: the new files go to a
    staging folder and are moved into place at the end; otherwise they are written in place
    (fold_index.json, written last, tells a finished run from an interrupted one)."""
    save = Path(a.output_dir)
    if plans:
        print(f"resuming: {len(plans)} class(es) from {a.prev_coordinates} (blocks complete in "
              "--output_dir are kept, other recorded classes re-cropped from their coordinates)")
    same_run = same_cube_config(a, save) if plans else False
    target = save / STAGING if (save / FOLD_INDEX).is_file() else save
    shutil.rmtree(save / STAGING, ignore_errors=True)    # left by a killed run: not a result
    try:
        target.mkdir(parents=True, exist_ok=True)
        write_run_config(dict(vars(a), **record), target)
        names = _write_blocks(ctx, plans, same_run, target)
        if target != save:
            commit_staging(target, save, ["coordinates.csv", "config.json"])
    except BaseException:
        if target != save:    # the finished result stays as it was
            shutil.rmtree(target, ignore_errors=True)
        raise
    write_fold_index(save, a.nb_classes, names)
    return plans


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _check_args(a: argparse.Namespace) -> None:
    """Cross-flag checks (single values are checked by the argparse types)."""
    if a.maxPatchSize <= a.minPatchSize:
        raise InputError(f"--maxPatchSize ({a.maxPatchSize}) must exceed --minPatchSize "
                         f"({a.minPatchSize}): sides are drawn from [min, max)")
    check_hu_window(a)


def build_parser() -> argparse.ArgumentParser:
    """The command line of stage 3 (reference flag names and defaults, plus ours)."""
    ap = ArgumentParser(
        description="Self-discovery of anatomical patterns (Semantic Genesis stage 3): crop "
                    "C classes of similar cubes from the train/validation volumes.",
        formatter_class=HelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--data_dir", default="dataset/",
                   help="folder holding train/ and validation/ with one .npy volume (x, y, z) "
                        "per patient (scripts/prepare_dataset.py makes them)")
    g.add_argument("--output_dir", "--save", dest="output_dir",
                   default="self_discovery/Semantic_Genesis_data",
                   help="output folder for the fold files, coordinates.csv, config.json and "
                        "montage/ (pytorch/train.py --data_dir reads it)")
    g.add_argument("--train_features", default="self_discovery/features/train_features.npy",
                   help="stage-2 features of the train volumes (N_train, D), sorted file order")
    g.add_argument("--val_features", default="self_discovery/features/validation_features.npy",
                   help="stage-2 features of the validation volumes (N_val, D)")
    g.add_argument("--is_normalized", action="store_true",
                   help="volumes are already in [0, 1]; without it HU volumes are clipped to "
                        "[--hu_min, --hu_max] and scaled (volumes found in [0, 1] are detected "
                        "and used as they are)")
    add_hu_flags(g, " (HU volumes only)")
    g = ap.add_argument_group("cubes")
    g.add_argument("--input_rows", type=positive_int, default=64, help="saved cube size in x")
    g.add_argument("--input_cols", type=positive_int, default=64, help="saved cube size in y")
    g.add_argument("--input_deps", type=positive_int, default=32, help="saved cube size in z (and crop "
                                                             "depth)")
    g.add_argument("--crop_rows", type=positive_int, default=64, help="resolution-1 crop size in x "
                   "(resized to --input_rows when different)")
    g.add_argument("--crop_cols", type=positive_int, default=64, help="resolution-1 crop size in y "
                   "(resized to --input_cols when different)")
    g.add_argument("--multi_res", action="store_true",
                   help="also save two multi-resolution crops per train patient (resolutions 2 "
                        "and 3: side in [--minPatchSize, --maxPatchSize), resized)")
    g.add_argument("--minPatchSize", type=positive_int, default=50,
                   help="smallest in-plane side of a multi-resolution crop")
    g.add_argument("--maxPatchSize", type=positive_int, default=80,
                   help="multi-resolution sides are drawn below this (exclusive)")
    g = ap.add_argument_group("discovery")
    g.add_argument("--nb_classes", type=positive_int, default=200,
                   help="number of pattern classes C (the paper trained with 44)")
    g.add_argument("--nb_instances", type=positive_int, default=200,
                   help="train cubes per class (from the nearest train patients)")
    g.add_argument("--nb_instances_val", type=positive_int, default=30,
                   help="validation cubes per class (from the nearest validation patients)")
    g.add_argument("--distance_threshold", type=nonneg_float, default=5,
                   help="a class coordinate must be at least this far (voxels, L2) from every "
                        "earlier class's coordinate (closer is rejected)")
    g.add_argument("--len_border", type=nonneg_int, default=100,
                   help="coordinates keep this many voxels from the x/y borders of the reference")
    g.add_argument("--len_border_z", type=nonneg_int, default=30,
                   help="coordinates keep this many voxels from the z borders of the reference")
    g.add_argument("--max_tries", type=positive_int, default=200,
                   help="random coordinates tried per reference before another reference")
    g.add_argument("--lung_threshold", type=probability, default=0.15,
                   help="lung test: reject a window whose weighted count of voxels >= -150 HU "
                        "exceeds this fraction of the cube")
    g.add_argument("--prev_coordinates", default=None,
                   help="coordinates.csv of an earlier run: its classes are re-cropped from the "
                        "recorded coordinates and discovery continues up to --nb_classes")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of all random draws (same seed and inputs -> same bytes)")
    add_overwrite_flag(g, "the fold files and coordinates.csv")
    g = ap.add_argument_group("output")
    g.add_argument("--montage_instances", type=nonneg_int, default=8,
                   help="cubes per row in montage/class_NNN.png (0: no montage)")
    g.add_argument("--classes_per_file", type=positive_int, default=CLASSES_PER_BLOCK,
                   help="classes per group of fold files (keep 50: pytorch/train.py expects it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: returns 0, or 2 after a one-line error on bad input."""
    return run_cli(build_parser, generate_patterns, argv,
                   lambda args, plans: print(f"wrote {len(plans)} classes to {args.output_dir}"),
                   "continue with --prev_coordinates <output_dir>/coordinates.csv")


if __name__ == "__main__":
    raise SystemExit(main())
