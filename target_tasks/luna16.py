"""NCC, lung nodule false-positive reduction: 64 x 64 x 32 cubes around the LUNA16 candidates.

Input, as downloaded: ``candidates_V2.csv`` (seriesuid, coordX, coordY, coordZ in world mm,
class 1 = nodule) anywhere under ``--data_dir`` (or ``--candidates``) and the ten folders
``subset0`` ... ``subset9`` of ``<seriesuid>.mhd`` / ``.raw`` scans (nested folders are fine;
``.mhd`` files outside a ``subsetN`` folder, such as the lung masks of ``seg-lungs-LUNA16``,
are not scans). Subsets 0-4 are the training split, 5-6 validation, 7-9 test (the published
protocol).

Each scan is read with SimpleITK and turned to the identity direction (LPS) when its axes are
axis-aligned; a candidate's world point goes to a voxel through the scan's origin, spacing and
direction (``TransformPhysicalPointToContinuousIndex``, rounded), and the cube spans
[c - 32, c + 32) x [c - 32, c + 32) x [c - 16, c + 16) around it, so the candidate's voxel is
cube index (32, 32, 16); voxels outside the scan are air. HU are clipped to
[--hu_min, --hu_max] and scaled to [0, 1].

Outputs per split: ``{split}_cubes.npy`` (N, 64, 64, 32), float16 by default (``--dtype``),
``{split}_labels.npy`` (N,) int64 and ``{split}_candidates.csv`` (one row per cube, same order:
seriesuid, coordX, coordY, coordZ, class, voxel_x, voxel_y, voxel_z = the cube centre's voxel,
subset, candidate_row = the row's index in the candidates file). Cubes are ordered by scan
(subset, then seriesuid) and, within a scan, by their order in the candidates file. Workers
write their scan's cubes straight into the split's file (memory: one scan and its cubes).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import add_hu_flags, check_hu_window, positive_float, seed_int
from runtime.errors import InputError
from runtime.files import atomic_path, save_npy_atomic
from runtime.intensity import normalize_hu
from runtime.provenance import file_identity
from target_tasks.common import (SPLITS, Plan, TaskHooks, find_one, missing_or_refuse,
                                 plan_settings, relative_to)

__all__ = ["CUBE", "SPLIT_SUBSETS", "CANDIDATES_NAME", "CSV_FIELDS", "add_flags", "plan",
           "read_candidates", "find_scans", "check_mhd", "extract_cube", "work", "HOOKS"]

#: Cube size (x, y, z) in voxels; the candidate's voxel is at index CUBE // 2.
CUBE = (64, 64, 32)
#: The published split of the LUNA16 subsets.
SPLIT_SUBSETS = {"train": (0, 1, 2, 3, 4), "val": (5, 6), "test": (7, 8, 9)}
CANDIDATES_NAME = "candidates_V2.csv"
CSV_FIELDS = ("seriesuid", "coordX", "coordY", "coordZ", "class", "voxel_x", "voxel_y",
              "voxel_z", "subset", "candidate_row")
SETTINGS = ("candidates", "neg_ratio", "test_neg_ratio", "seed", "dtype", "hu_min", "hu_max")
_CHUNK = 32          # cubes normalised at once in a worker
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
              "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
              "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
_SUBSET = re.compile(r"^subset(\d)$")


def _ratio(text: str) -> float | str:
    """argparse type: ``all`` or a number > 0 of negatives per positive."""
    return "all" if text.strip().lower() == "all" else positive_float(text)


def add_flags(p: argparse.ArgumentParser) -> None:
    """The NCC flags."""
    g = p.add_argument_group("NCC")
    g.add_argument("--candidates", type=Path, default=None,
                   help=f"the candidates file (default: {CANDIDATES_NAME} found under --data_dir)")
    g.add_argument("--neg_ratio", type=_ratio, default=10.0,
                   help="negatives kept per positive in train and val, drawn uniformly at "
                        "random (seeded) from the split's negatives; every positive is kept; "
                        "'all' keeps every candidate. 10 keeps every nodule, about two per batch "
                        "of 24, and ~2 GB of training cubes instead of ~90 GB")
    g.add_argument("--test_neg_ratio", type=_ratio, default="all",
                   help="the same for test; 'all' keeps every candidate of subsets 7-9, the "
                        "real distribution the published AUC is computed over (~225k cubes)")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of the negative sampling")
    g.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="cube values in [0, 1]; float16 (steps of at most 1/2048, about 1 HU) "
                        "halves the disk")
    add_hu_flags(g)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def _find_candidates(data_dir: Path, given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise InputError(f"{given}: --candidates not found; give the path of {CANDIDATES_NAME}")
        return given
    return find_one(data_dir, CANDIDATES_NAME,
                    f"no {CANDIDATES_NAME} found; unzip candidates_V2.zip of LUNA16 into it, or "
                    "give --candidates",
                    "give the one to use with --candidates")


def read_candidates(path: Path) -> dict[str, Any]:
    """The candidates file: ``uids`` (list of series UIDs, one per code), ``codes`` (n,) int32
    into it, ``coords`` (n, 3) float64 world mm, ``cls`` (n,) int8 in {0, 1}."""
    fix = f"fix the file or download {CANDIDATES_NAME} again"
    need = ("seriesuid", "coordX", "coordY", "coordZ", "class")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if any(c not in header for c in need):
            raise InputError(f"{path}: header {header[:6]} lacks "
                             f"{[c for c in need if c not in header]}; expected columns "
                             f"{', '.join(need)}; {fix}")
        cols = [header.index(c) for c in need]
        uid_code: dict[str, int] = {}
        codes, coords, cls = [], [], []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                uid = row[cols[0]].strip()
                xyz = [float(row[c]) for c in cols[1:4]]
                label = int(float(row[cols[4]]))
            except (IndexError, ValueError):
                raise InputError(f"{path}:{line}: not a candidate row ({','.join(row)[:80]}); "
                                 f"{fix}") from None
            if not uid or label not in (0, 1) or not all(map(math.isfinite, xyz)):
                raise InputError(f"{path}:{line}: expected a series UID, three finite world "
                                 f"coordinates and class 0 or 1; {fix}")
            codes.append(uid_code.setdefault(uid, len(uid_code)))
            coords.append(xyz)
            cls.append(label)
    if not codes:
        raise InputError(f"{path}: holds no candidates; {fix}")
    return {"uids": list(uid_code), "codes": np.asarray(codes, np.int32),
            "coords": np.asarray(coords, np.float64), "cls": np.asarray(cls, np.int8)}


def find_scans(data_dir: Path) -> dict[str, tuple[int, Path]]:
    """``{seriesuid: (subset, .mhd path)}`` for every ``.mhd`` under a ``subsetN`` folder."""
    scans: dict[str, tuple[int, Path]] = {}
    for path in sorted(data_dir.rglob("*.mhd")):
        subsets = [int(m.group(1)) for part in path.relative_to(data_dir).parts[:-1]
                   if (m := _SUBSET.match(part))]
        if not subsets or path.name.startswith("."):
            continue
        uid = path.name[:-len(".mhd")]
        if uid in scans:
            raise InputError(f"{path}: scan {uid} is also at {scans[uid][1]}; keep one copy")
        scans[uid] = (subsets[-1], path)
    return scans


def check_mhd(path: Path) -> dict[str, Any]:
    """Read a MetaImage header and check its data file is there and complete (not truncated):
    ``{"size": [x, y, z], "bytes": header + data bytes}``."""
    fix = "download this subset again"
    try:
        text = path.read_text(encoding="latin-1")[:20000]
        fields = {k.strip(): v.strip() for k, _, v in
                  (line.partition("=") for line in text.splitlines() if "=" in line)}
        dims = [int(d) for d in fields["DimSize"].split()]
    except (OSError, KeyError, ValueError):
        raise InputError(f"{path}: not a readable MetaImage header (DimSize missing); {fix}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise InputError(f"{path}: a {len(dims)}D image of size {dims}, not a 3D scan; {fix}")
    data = fields.get("ElementDataFile", "")
    facts = {"size": dims, "bytes": path.stat().st_size}
    if not data or data == "LOCAL" or data.startswith("LIST") or "%" in data:
        return facts
    raw = path.parent / data
    if not raw.is_file():
        raise InputError(f"{raw}: missing; it holds the voxels of {path}; {fix}")
    facts["bytes"] += raw.stat().st_size
    per = _MET_BYTES.get(fields.get("ElementType", ""))
    if per and fields.get("CompressedData", "False").lower() != "true":
        channels = int(fields.get("ElementNumberOfChannels", "1") or 1)
        need = int(np.prod(dims)) * per * channels + max(0, int(fields.get("HeaderSize", "0") or 0))
        if raw.stat().st_size < need:
            raise InputError(f"{raw}: {raw.stat().st_size} bytes, but {path.name} describes "
                             f"{need}: a truncated download; {fix}")
    return facts


# ------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------
def _sample_rows(rows: np.ndarray, cls: np.ndarray, ratio: float | str, seed: int,
                 split: str) -> np.ndarray:
    """Every positive of ``rows`` and ``ratio`` negatives per positive (all when ``all`` or
    when there are fewer), drawn without replacement by a generator seeded with (seed,
    split); returned in the order of ``rows``."""
    pos = rows[cls[rows] == 1]
    neg = rows[cls[rows] == 0]
    if ratio != "all":
        k = min(len(neg), int(round(float(ratio) * len(pos))))
        rng = np.random.default_rng([int(seed), SPLITS.index(split)])
        neg = rng.choice(neg, size=k, replace=False) if k < len(neg) else neg
    keep = np.zeros(len(cls), bool)
    keep[pos] = True
    keep[neg] = True
    return rows[keep[rows]]


def plan(args: argparse.Namespace) -> Plan:
    """Read and check the candidates and every scan header; decide the cubes of each split."""
    check_hu_window(args)
    data_dir = Path(args.data_dir)
    cand_path = _find_candidates(data_dir, args.candidates)
    args.candidates = cand_path
    table = read_candidates(cand_path)
    scans = find_scans(data_dir)
    if not scans:
        raise InputError(f"{data_dir}: no subset0 ... subset9 folders of .mhd scans found; "
                         "unzip the LUNA16 subsets into it")
    headers = {uid: check_mhd(path) for uid, (_, path) in scans.items()}
    missing = sorted(set(table["uids"]) - set(scans))
    missing = missing_or_refuse(missing, "scans named in the candidates file", data_dir,
                                "download all ten subset folders into it", args.allow_missing)
    order = sorted(scans, key=lambda u: (scans[u][0], u))
    rank = {u: i for i, u in enumerate(order)}
    code_rank = np.array([rank.get(u, -1) for u in table["uids"]], np.int64)[table["codes"]]
    code_subset = np.array([scans[u][0] if u in scans else -1 for u in table["uids"]])
    row_subset = code_subset[table["codes"]]
    items, splits, rows_of = [], {}, {}
    for split, subsets in SPLIT_SUBSETS.items():
        splits[split] = [u for u in order if scans[u][0] in subsets]
        rows = np.flatnonzero(np.isin(row_subset, subsets))
        ratio = args.test_neg_ratio if split == "test" else args.neg_ratio
        rows = _sample_rows(rows, table["cls"], ratio, args.seed, split)
        rows = rows[np.lexsort((rows, code_rank[rows]))]       # by scan, then file order
        rows_of[split] = rows
        bounds = np.flatnonzero(np.diff(code_rank[rows])) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
            if stop <= start:
                continue
            uid = table["uids"][table["codes"][rows[start]]]
            items.append({"key": uid, "split": split, "path": str(scans[uid][1]),
                          "start": int(start), "worlds": table["coords"][rows[start:stop]].tolist(),
                          "hu": [args.hu_min, args.hu_max], "dtype": args.dtype,
                          "subset": scans[uid][0]})
    inputs = {"candidates": {"path": relative_to(cand_path, data_dir), **file_identity(cand_path)},
              "scans": {u: {"subset": scans[u][0], "path": relative_to(scans[u][1], data_dir),
                            **headers[u]} for u in order}}
    notes = [f"{len(set(scans) - set(table['uids']))} scan(s) without candidates"] \
        if set(scans) - set(table["uids"]) else []
    settings = plan_settings(args, SETTINGS)
    return Plan("ncc", str(data_dir.resolve()), settings, splits, items, inputs, missing, notes,
                extra={"table": table, "rows": rows_of, "row_subset": row_subset})


# ------------------------------------------------------------------------------------------
# the work: one scan
# ------------------------------------------------------------------------------------------
def _read_scan(path: Path):
    """The scan as a SimpleITK image, turned to the identity direction when axis-aligned."""
    import SimpleITK as sitk

    from preparation.ct_io import read_sitk

    img = read_sitk(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: not a 3D single-channel scan; download this subset again")
    direction = np.asarray(img.GetDirection(), float).reshape(3, 3)
    if np.allclose(np.abs(direction).max(axis=0), 1.0, atol=1e-3) and \
            not np.allclose(direction, np.eye(3), atol=1e-3):
        img = sitk.DICOMOrient(img, "LPS")
    return img


def extract_cube(vol: np.ndarray, centre: np.ndarray, size: tuple[int, int, int] = CUBE,
                 fill: float = -1000.0) -> np.ndarray:
    """The float32 box of ``size`` of ``vol`` (x, y, z) spanning [centre - size // 2,
    centre - size // 2 + size) on each axis; voxels outside ``vol`` get ``fill``."""
    lo = np.asarray(centre, np.int64) - np.asarray(size) // 2
    hi = lo + np.asarray(size)
    cube = np.full(size, fill, np.float32)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, vol.shape)
    if np.all(src_hi > src_lo):
        d_lo = src_lo - lo
        d_hi = d_lo + (src_hi - src_lo)
        cube[d_lo[0]:d_hi[0], d_lo[1]:d_hi[1], d_lo[2]:d_hi[2]] = \
            vol[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    return cube


def work(item: dict[str, Any]) -> dict[str, Any]:
    """Cut one scan's cubes and write them (and their voxel centres) into the split's partial
    files at rows ``start ...``; returns the scan's facts."""
    import SimpleITK as sitk

    from preparation.ct_io import CTReadError

    path, out, split = Path(item["path"]), Path(item["out"]), item["split"]
    try:
        img = _read_scan(path)
        vol = np.transpose(sitk.GetArrayViewFromImage(img), (2, 1, 0))   # (x, y, z), no copy
    except CTReadError as e:
        raise InputError(f"{e}; download this subset again") from None
    centres = np.array([np.floor(np.asarray(img.TransformPhysicalPointToContinuousIndex(
        tuple(float(v) for v in w))) + 0.5) for w in item["worlds"]], np.int64).reshape(-1, 3)
    cubes = np.load(out / f"{split}_cubes.partial.npy", mmap_mode="r+")
    cent = np.load(out / f"{split}_centres.partial.npy", mmap_mode="r+")
    lo, hi = item["hu"]
    start = item["start"]
    for a in range(0, len(centres), _CHUNK):
        block = np.stack([extract_cube(vol, c, CUBE, -1000.0) for c in centres[a:a + _CHUNK]])
        cubes[start + a:start + a + len(block)] = normalize_hu(block, lo, hi).astype(item["dtype"])
    cent[start:start + len(centres)] = centres
    cubes.flush()
    cent.flush()
    del cubes, cent
    inside = np.all((centres >= 0) & (centres < np.asarray(vol.shape)), axis=1)
    return {"key": item["key"], "split": split, "files": {},
            "facts": {"subset": item["subset"], "cubes": len(centres),
                      "centres_outside": int((~inside).sum()), "size_xyz": list(vol.shape),
                      "spacing": [float(s) for s in img.GetSpacing()]}}


# ------------------------------------------------------------------------------------------
# partial files, the end of a split, counts
# ------------------------------------------------------------------------------------------
def _partials(split: str) -> tuple[str, str]:
    return f"{split}_cubes.partial.npy", f"{split}_centres.partial.npy"


def begin(plan: Plan, out: Path, done: set[str], finished: list[str]) -> set[str]:
    """Create the partial cube and centre files of every unfinished split (kept when a run
    continues); the done scans of a split whose partial files are lost are redone."""
    from numpy.lib.format import open_memmap

    redo: set[str] = set()
    for split in SPLITS:
        n = len(plan.extra["rows"][split])
        if split in finished or n == 0:
            continue
        for name, shape, dtype in zip(_partials(split), [(n, *CUBE), (n, 3)],
                                      [plan.settings["dtype"], "int64"]):
            try:
                arr = np.load(out / name, mmap_mode="r")
                ok = arr.shape == shape and arr.dtype == np.dtype(dtype)
                del arr
            except (OSError, ValueError):
                ok = False
            if not ok:
                open_memmap(out / name, mode="w+", dtype=dtype, shape=shape).flush()
                redo |= {it["key"] for it in plan.items if it["split"] == split} & done
    return redo


def finish_split(plan: Plan, out: Path, split: str,
                 facts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Write the split's candidates CSV and labels, and move its cubes into place."""
    table, rows = plan.extra["table"], plan.extra["rows"][split]
    cubes_name, centres_name = _partials(split)
    final = out / f"{split}_cubes.npy"
    if len(rows) == 0:
        centres = np.zeros((0, 3), np.int64)
        save_npy_atomic(final, np.zeros((0, *CUBE), plan.settings["dtype"]))
    else:
        centres = np.load(out / centres_name)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r, c in zip(rows, centres):
        w.writerow([table["uids"][table["codes"][r]], *map(repr, table["coords"][r].tolist()),
                    int(table["cls"][r]), *c.tolist(), int(plan.extra["row_subset"][r]), int(r)])
    with atomic_path(out / f"{split}_candidates.csv") as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    save_npy_atomic(out / f"{split}_labels.npy", table["cls"][rows].astype(np.int64))
    if (out / cubes_name).exists():
        os.replace(out / cubes_name, final)
    shape = np.load(final, mmap_mode="r").shape
    if shape != (len(rows), *CUBE):
        raise InputError(f"{final}: shape {shape}, expected {(len(rows), *CUBE)}; pass "
                         "--overwrite to prepare again")
    names = [f"{split}_cubes.npy", f"{split}_labels.npy", f"{split}_candidates.csv"]
    return {n: file_identity(out / n) for n in names}


def counts(plan: Plan, split: str, facts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Patients (scans), cubes, positives and negatives of a split."""
    cls = plan.extra["table"]["cls"][plan.extra["rows"][split]]
    return {"patients": len(plan.splits[split]), "cubes": int(len(cls)),
            "positives": int((cls == 1).sum()), "negatives": int((cls == 0).sum()),
            "centres_outside_scan": int(sum(f.get("centres_outside", 0) for f in facts.values()))}


def leftovers(out: Path) -> list[Path]:
    """Partial files no longer needed once the preparation is complete."""
    return [out / name for s in SPLITS for name in _partials(s)]


HOOKS = TaskHooks(work=work, unit="scan", counts=counts, case_folders=False,
                  begin=begin, finish_split=finish_split, leftovers=leftovers)
