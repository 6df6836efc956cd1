"""Stage 0: turn a folder of CT scans into the prepared dataset the pipeline reads.

Reads every volume SimpleITK can (LUNA16 ``.mhd``/``.raw``, NIfTI, NRRD, MetaImage, DICOM
series folders, searched recursively) plus ``.npy`` volumes already in [0, 1]; transposes
SimpleITK's (z, y, x) to (x, y, z); optionally resamples linearly to ``--spacing`` (padding
with air, -1024 HU); clips to [--hu_min, --hu_max] and scales to [0, 1]; writes one float32
``.npy`` per patient into ``OUTPUT_DIR/train/`` or ``OUTPUT_DIR/validation/`` and a manifest
(``manifest.json`` and ``manifest.csv``: source, original shape and spacing, output shape and
spacing, HU range, split).

Unreadable or odd inputs (2D images, single slices, tiny, empty/constant, complex or non-finite
volumes, values that are not CT in HU such as label masks or MR, pipes and other non-regular
files) are reported and skipped; the run goes on and ends with a summary.

A patient is identified by its source (absolute path, plus the series UID for DICOM; size and
modification time are recorded to notice changed files). The manifest is rewritten atomically
after every patient, so a killed run loses at most the patient in progress. Re-running prepares
exactly the sources not yet in the manifest (``--overwrite`` redoes them all). Each patient's
split comes from a hash of its source and ``--seed``, never from the order of discovery: an
interrupted run continued later gives the same split as an uninterrupted one. Exit status 0
when the dataset holds at least one volume, 2 otherwise.

    python scripts/prepare_dataset.py --input_dir /data/LUNA16 --output_dir dataset/
"""
from __future__ import annotations

import sys
from pathlib import Path


import argparse
import csv
import hashlib
import io
import json
import re
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from runtime.cli import (ArgumentParser, HelpFormatter, add_hu_flags, check_hu_window, run_cli,
                         fraction, positive_float, positive_int, seed_int)
from runtime.errors import InputError
from runtime.files import (atomic_path, check_output_outside, output_session, save_json_atomic,
                           save_npy_atomic)
from runtime.intensity import finite_range, normalize_hu, within_unit_range
from preparation.ct_io import CTReadError, find_ct_inputs, read_ct, resample, volume_stem, volume_suffix

__all__ = ["build_parser", "prepare_dataset", "check_ct_range", "patient_name", "source_identity",
           "main"]

SPLITS = ("train", "validation")
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
CSV_FIELDS = ("patient", "split", "status", "source", "format", "original_shape",
              "original_spacing", "output_shape", "output_spacing", "source_hu_min",
              "source_hu_max", "hu_min", "hu_max", "orientation")


def build_parser() -> argparse.ArgumentParser:
    """The command line of stage 0 (every flag documented)."""
    ap = ArgumentParser(
        prog="prepare_dataset.py", description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter)
    g = ap.add_argument_group("input / output")
    g.add_argument("--input_dir", required=True, nargs="+",
                   help="folder(s) (searched recursively) or file(s) holding one CT per patient: "
                        "any SimpleITK format, DICOM series folders, or .npy already in [0, 1]")
    g.add_argument("--output_dir", default="dataset/",
                   help="where train/, validation/ and manifest.{json,csv} are written")
    g.add_argument("--overwrite", action="store_true",
                   help="prepare again the patients already in the manifest (default: keep "
                        "them and prepare only new sources)")
    g = ap.add_argument_group("split")
    g.add_argument("--val_fraction", type=fraction, default=0.2,
                   help="fraction of the patients put in validation/ (at least one when there "
                        "are two or more patients and the fraction is > 0); patients already in "
                        "the manifest keep their split")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the train/validation split (a hash of each patient's source "
                        "and the seed orders the patients, whatever order they are found in)")
    g = ap.add_argument_group("intensities and geometry")
    g.add_argument("--spacing", type=positive_float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="resample linearly to this voxel spacing in mm, keeping the physical "
                        "extent (default: keep each scan's spacing)")
    add_hu_flags(g)
    g.add_argument("--no_reorient", action="store_true",
                   help="keep each file's voxel order instead of turning axis-aligned scans to "
                        "the identity direction (LPS: x right->left, y front->back, z up)")
    g.add_argument("--no_hu_check", action="store_true",
                   help="accept volumes whose values do not look like CT in HU")
    g.add_argument("--min_size", type=positive_int, default=8,
                   help="skip volumes with fewer voxels than this along any axis")
    return ap


def check_ct_range(vol: np.ndarray) -> str | None:
    """Why ``vol`` (HU) does not look like a CT, or None when it does.

    A CT holds air (below -500 HU) around or inside the body and spans hundreds of HU;
    label masks (0/1), MR or already-normalised volumes do not.
    """
    if vol.size == 0:
        return "empty volume"
    flat = vol.reshape(-1)
    sample = flat[:: max(1, flat.size // 2_000_000)]
    lo, hi = float(flat.min()), float(flat.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        return "holds NaN or infinite values"
    if hi - lo < 1e-6:
        return f"constant volume (every voxel {lo:g})"
    p1, p99 = (float(x) for x in np.percentile(sample, [1, 99]))
    if p1 > -500 or hi - lo < 200:
        return (f"values {lo:g}..{hi:g} (1st percentile {p1:g}) do not look like CT in HU "
                "(no air below -500 HU): a label mask, MR or already-normalised image? "
                "(--no_hu_check accepts it)")
    return None


def patient_name(item: dict[str, Any], root: Path) -> str:
    """A file-system-safe patient name: file stem, or the series folder's path under root."""
    path = Path(item["path"])
    if item["kind"] == "dicom":
        try:
            rel = path.resolve().relative_to(root.resolve())
            base = "_".join(rel.parts) or path.resolve().name
        except ValueError:
            base = path.name
        if item.get("n_series", 1) > 1:
            base = f"{base}_{item['series'][-8:]}"
        if item.get("subject"):
            base = f"{base}_{item['subject']}"
    else:
        base = volume_stem(path)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "patient"


def source_identity(item: dict[str, Any]) -> dict[str, Any]:
    """What identifies a patient's source: ``key`` (absolute path, ``#<series UID>`` and the
    patient/study of a DICOM series), and ``size``/``mtime_ns`` (summed / latest over the
    files) to notice a changed source."""
    path = Path(item["path"]).resolve()
    files = [Path(f) for f in item.get("files") or [path]]
    stats = [f.stat() for f in files]
    key = str(path)
    if item["kind"] == "dicom":
        key += f"#{item['series']}" + (f"#{item['subject']}" if item.get("subject") else "")
    return {"key": key, "size": sum(st.st_size for st in stats),
            "mtime_ns": max(st.st_mtime_ns for st in stats)}


def _split_rank(key: str, seed: int) -> int:
    """The order of a source in the split: a hash of (seed, key), never the discovery order."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big")


def _check_volume(path: Path, vol: np.ndarray, args: argparse.Namespace) -> None:
    """Skip (``CTReadError``) volumes that are too small or hold NaN/inf, whatever the flags."""
    if min(vol.shape) < args.min_size:
        raise CTReadError(f"{path}: shape {vol.shape} has an axis shorter than --min_size "
                          f"{args.min_size} (a 2D image or a few slices?)")
    try:
        finite_range(vol, path, "skipped")
    except InputError as e:   # a bad input volume is skipped with its line, not fatal
        raise CTReadError(str(e)) from None


def _read_item(item: dict[str, Any], args: argparse.Namespace
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one input and return (normalised float32 (X, Y, Z), manifest facts)."""
    path = Path(item["path"])
    if item["kind"] == "file" and path.suffix.lower() == ".npy":
        try:
            vol = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CTReadError(f"{path}: not a readable .npy ({e})") from e
        if vol.ndim != 3 or vol.dtype.kind not in "iuf":
            raise CTReadError(f"{path}: expected a 3D array of real numbers (x, y, z), got shape "
                              f"{vol.shape} dtype {vol.dtype}")
        _check_volume(path, vol, args)
        vol = vol.astype(np.float32)
        facts = {"format": "npy", "original_shape": list(vol.shape), "original_spacing": None,
                 "orientation": "as stored", "source_hu_min": float(vol.min()) if vol.size else None,
                 "source_hu_max": float(vol.max()) if vol.size else None}
        if vol.size and within_unit_range(float(vol.min()), float(vol.max())):
            if vol.max() - vol.min() < 1e-6:
                raise CTReadError(f"{path}: constant volume")
            facts["note"] = "already in [0, 1]: copied (no resampling, spacing unknown)"
            return np.clip(vol, 0.0, 1.0), facts   # the tolerance's rounding clipped off
        if not args.no_hu_check and (why := check_ct_range(vol)):
            raise CTReadError(f"{path}: {why}")
        facts["note"] = "HU .npy: spacing unknown, not resampled"
        return normalize_hu(vol, args.hu_min, args.hu_max), facts

    hu, spacing, meta = read_ct(path, item.get("files"), reorient=not args.no_reorient)
    facts = {"format": "dicom" if item["kind"] == "dicom" else volume_suffix(path).lstrip("."),
             "original_shape": list(hu.shape), "original_spacing": list(spacing),
             "orientation": meta.get("original_orientation", ""),
             "source_hu_min": float(hu.min()), "source_hu_max": float(hu.max())}
    if meta.get("reoriented_to"):
        facts["note"] = f"reoriented {meta.get('original_orientation', '')} -> {meta['reoriented_to']}"
    _check_volume(path, hu, args)
    if not args.no_hu_check and (why := check_ct_range(hu)):
        raise CTReadError(f"{path}: {why}")
    if args.spacing is not None:
        hu = resample(hu, spacing, args.spacing, pad_value=-1024.0)
        facts["output_spacing"] = [float(s) for s in args.spacing]
    else:
        facts["output_spacing"] = list(spacing)
    return normalize_hu(hu, args.hu_min, args.hu_max), facts


def _write_manifest(out: Path, records: dict[str, dict[str, Any]], settings: dict[str, Any],
                    skipped: list[dict[str, str]], complete: bool = True) -> None:
    """Both manifests, atomically; ``complete`` is false while a run is still writing volumes
    (the later stages refuse such a dataset)."""
    rows = [records[k] for k in sorted(records)]
    save_json_atomic(out / MANIFEST_JSON, {"settings": settings, "volumes": rows,
                                           "skipped": skipped, "complete": complete})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (" ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in r[k])
                        if isinstance(r.get(k), list) else r.get(k, "")) for k in CSV_FIELDS})
    with atomic_path(out / MANIFEST_CSV) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def _load_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """Records of the previous runs by patient name ({} when there is no readable manifest)."""
    if not (out / MANIFEST_JSON).is_file():
        return {}
    try:
        rows = json.loads((out / MANIFEST_JSON).read_text(encoding="utf-8"))["volumes"]
        return {r["patient"]: dict(r) for r in rows}
    except (ValueError, KeyError, TypeError) as e:
        print(f"warning: {out / MANIFEST_JSON} is unreadable ({e!r}); the patients of this run "
              "are prepared again (same names and splits)", file=sys.stderr)
        return {}


def _record_key(rec: dict[str, Any]) -> str | None:
    """The source key of a manifest record (records of older versions: the resolved source)."""
    if rec.get("source_key"):
        return str(rec["source_key"])
    return str(Path(rec["source"]).resolve()) if rec.get("source") else None


def prepare_dataset(args: argparse.Namespace) -> dict[str, Any]:
    """Run stage 0 with parsed ``args``; return a summary dict
    (``written``, ``existing``, ``skipped`` lists and ``output_dir``)."""
    out = Path(args.output_dir)
    if not 0.0 <= args.val_fraction < 1.0:
        raise InputError(f"--val_fraction {args.val_fraction}: must be in [0, 1)")
    if args.spacing is not None and min(args.spacing) <= 0:
        raise InputError(f"--spacing {args.spacing}: every spacing must be > 0 mm")
    check_hu_window(args)
    roots = [Path(p) for p in args.input_dir]
    for root in roots:
        if not root.exists():
            raise InputError(f"{root}: --input_dir not found; give a folder of CT scans "
                             "(or run scripts/fetch_sample_ct.py for sample data)")
    check_output_outside(out, roots, "--output_dir", "--input_dir", both_ways=True)
    with output_session(out, "--output_dir"):
        return _prepare(args, roots, out)


def _prepare(args: argparse.Namespace, roots: list[Path], out: Path) -> dict[str, Any]:
    # 1. find inputs and their identities
    found: list[tuple[str, dict[str, Any], dict[str, Any]]] = []   # (base name, item, identity)
    for root in roots:
        try:
            inputs = find_ct_inputs(root)
        except CTReadError as e:
            raise InputError(f"{e}; give folders or files of CT scans to --input_dir") from e
        for item in inputs:
            found.append((patient_name(item, root if root.is_dir() else root.parent), item,
                          source_identity(item)))
    if not found:
        raise InputError(f"{' '.join(args.input_dir)}: no files found; put one CT per patient "
                         "there (.mhd, .nii.gz, .nrrd, DICOM series folders, .npy)")
    by_key: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {}
    for entry in found:                     # the same source given twice counts once
        by_key.setdefault(entry[2]["key"], entry)

    # 2. previous manifest: which sources are done, under which name and split
    records = _load_manifest(out)
    known = {k: name for name, rec in records.items()
             if (k := _record_key(rec)) and rec.get("split") in SPLITS}
    done = {k for k, n in known.items() if (out / records[n]["split"] / f"{n}.npy").is_file()}

    # 3. names (a base name shared by several sources gets a hash of the source) and splits
    #    (sources ranked by a hash of source and seed; recorded patients keep theirs)
    base_count: dict[str, int] = {}
    for base, _, _ in by_key.values():
        base_count[base] = base_count.get(base, 0) + 1
    taken = set(records)
    order = sorted(by_key, key=lambda k: _split_rank(k, args.seed))
    n_val = int(round(len(order) * args.val_fraction))
    if args.val_fraction > 0 and len(order) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, max(0, len(order) - 1))
    ranked_split = {k: ("validation" if i < n_val else "train") for i, k in enumerate(order)}

    settings = {k: v for k, v in vars(args).items()}
    previous, records = records, {known[k]: records[known[k]] for k in done}  # still on disk
    written, kept, skipped = [], [], []
    for key, (base, item, ident) in tqdm(sorted(by_key.items(), key=lambda e: e[1][0]),
                                         desc="prepare", unit="vol", disable=None):
        if key in known:  # prepared before: same name and split
            name = known[key]
            split = previous[name]["split"]
            rec = records.get(name)
            if rec is not None and not args.overwrite:
                if rec.get("source_size") not in (None, ident["size"]) or \
                        rec.get("source_mtime_ns") not in (None, ident["mtime_ns"]):
                    tqdm.write(f"warning: {item['path']} changed since it was prepared; keeping "
                               f"{rec['split']}/{name}.npy (--overwrite prepares it again)",
                               file=sys.stderr)
                rec["status"] = "existing"
                kept.append(name)
                continue
        else:
            name = base if base_count[base] == 1 and base not in taken else \
                f"{base}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
            on_disk = [sp for sp in SPLITS if (out / sp / f"{name}.npy").is_file()]
            split = on_disk[0] if len(on_disk) == 1 else ranked_split[key]  # lost manifest
        t0 = time.time()
        try:
            vol, facts = _read_item(item, args)
        except (CTReadError, MemoryError, ValueError, OSError) as e:
            msg = str(e) if str(item["path"]) in str(e) else f"{item['path']}: {e}"
            tqdm.write(f"skipped: {msg}", file=sys.stderr)
            skipped.append({"source": str(item["path"]), "reason": msg})
            continue
        target = out / split / f"{name}.npy"
        for other in SPLITS:  # a leftover of an interrupted run in the other split
            if other != split:
                (out / other / f"{name}.npy").unlink(missing_ok=True)
        if not written:   # from the first write on, the dataset is incomplete until the end
            _write_manifest(out, records, settings, skipped, complete=False)
        save_npy_atomic(target, vol)
        records[name] = {"patient": name, "split": split, "status": "written",
                         "source": str(item["path"]), "source_key": key,
                         "source_size": ident["size"], "source_mtime_ns": ident["mtime_ns"],
                         "output": str(target), "output_shape": list(vol.shape),
                         "hu_min": args.hu_min, "hu_max": args.hu_max, **facts}
        taken.add(name)
        _write_manifest(out, records, settings, skipped, complete=False)  # every patient
        written.append(name)
        tqdm.write(f"{split}/{name}.npy  {tuple(facts['original_shape'])} -> {vol.shape}  "
                   f"({time.time() - t0:.1f}s)")
    _write_manifest(out, records, settings, skipped)
    n_train = len(list((out / "train").glob("*.npy"))) if (out / "train").is_dir() else 0
    n_val_all = len(list((out / "validation").glob("*.npy"))) if (out / "validation").is_dir() else 0
    return {"written": written, "existing": kept, "skipped": skipped, "output_dir": str(out),
            "n_train": n_train, "n_validation": n_val_all}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 when the dataset holds at least one volume, else 2."""
    return run_cli(build_parser, prepare_dataset, argv, _report,
                   "run the same command again: it continues with the patients not yet prepared")


def _report(args: argparse.Namespace, summary: dict[str, Any]) -> int:
    """Print the run's summary; 2 when the dataset holds no volume."""
    out = summary["output_dir"]
    print(f"prepare_dataset: {len(summary['written'])} written, {len(summary['existing'])} "
          f"already done, {len(summary['skipped'])} skipped -> {out} "
          f"(train {summary['n_train']}, validation {summary['n_validation']}; "
          f"manifest {Path(out) / MANIFEST_JSON})")
    for s in summary["skipped"]:
        print(f"  skipped: {s['reason']}")
    if summary["n_train"] + summary["n_validation"] == 0:
        skipped = summary["skipped"]
        first = (f"{skipped[0]['reason']}" + (f" (and {len(skipped) - 1} more skipped, listed above)"
                                             if len(skipped) > 1 else "")) if skipped else "nothing to do"
        print(f"error: no volume was written: {first}; fix or remove the skipped file(s), or check "
              "--min_size / --no_hu_check", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
