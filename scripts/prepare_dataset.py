"""Stage 0: turn a folder of CT scans into the prepared dataset the pipeline reads.

Reads every volume SimpleITK can (LUNA16 ``.mhd``/``.raw``, NIfTI, NRRD, MetaImage, DICOM
series folders, searched recursively) plus ``.npy`` volumes already in [0, 1]; transposes
SimpleITK's (z, y, x) to (x, y, z); optionally resamples linearly to ``--spacing`` (padding
with air, -1024 HU); clips to [--hu_min, --hu_max] and scales to [0, 1]; writes one float32
``.npy`` per patient into ``OUTPUT_DIR/train/`` or ``OUTPUT_DIR/validation/`` and a manifest
(``manifest.json`` and ``manifest.csv``: source, original shape and spacing, output shape and
spacing, HU range, split).

Unreadable or odd inputs (2D images, single slices, empty/constant volumes, values that are
not CT in HU such as label masks or MR) are reported and skipped; the run goes on and ends
with a summary. Re-running skips patients whose ``.npy`` already exists (``--overwrite``
redoes them). Exit status 0 when the dataset holds at least one volume, 2 otherwise.

    python scripts/prepare_dataset.py --input_dir /data/LUNA16 --output_dir dataset/
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import csv
import io
import json
import re
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from pytorch.common import (HelpFormatter, InputError, atomic_path, call_reporting_errors,
                            save_json_atomic, save_npy_atomic)
from scripts.ct_io import (CTReadError, find_ct_inputs, normalize_hu, read_ct, resample,
                           volume_stem, volume_suffix)

__all__ = ["build_parser", "prepare_dataset", "check_ct_range", "patient_name", "main"]

SPLITS = ("train", "validation")
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
CSV_FIELDS = ("patient", "split", "status", "source", "format", "original_shape",
              "original_spacing", "output_shape", "output_spacing", "source_hu_min",
              "source_hu_max", "hu_min", "hu_max", "orientation")


def build_parser() -> argparse.ArgumentParser:
    """The command line of stage 0 (every flag documented)."""
    ap = argparse.ArgumentParser(
        prog="prepare_dataset.py", description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter)
    g = ap.add_argument_group("input / output")
    g.add_argument("--input_dir", required=True, nargs="+",
                   help="folder(s) (searched recursively) or file(s) holding one CT per patient: "
                        "any SimpleITK format, DICOM series folders, or .npy already in [0, 1]")
    g.add_argument("--output_dir", default="dataset/",
                   help="where train/, validation/ and manifest.{json,csv} are written")
    g.add_argument("--overwrite", action="store_true",
                   help="re-create volumes that already exist (default: skip them)")
    g = ap.add_argument_group("split")
    g.add_argument("--val_fraction", type=float, default=0.2,
                   help="fraction of new patients put in validation/ (at least one when there "
                        "are two or more new patients and the fraction is > 0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the train/validation shuffle")
    g = ap.add_argument_group("intensities and geometry")
    g.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="resample linearly to this voxel spacing in mm, keeping the physical "
                        "extent (default: keep each scan's spacing)")
    g.add_argument("--hu_min", type=float, default=-1000.0, help="HU mapped to 0 (clipped below)")
    g.add_argument("--hu_max", type=float, default=1000.0, help="HU mapped to 1 (clipped above)")
    g.add_argument("--no_reorient", action="store_true",
                   help="keep each file's voxel order instead of turning axis-aligned scans to "
                        "the identity direction (LPS: x right->left, y front->back, z up)")
    g.add_argument("--no_hu_check", action="store_true",
                   help="accept volumes whose values do not look like CT in HU")
    g.add_argument("--min_size", type=int, default=8,
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
    else:
        base = volume_stem(path)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "patient"


def _existing_split(out: Path, name: str) -> str | None:
    for split in SPLITS:
        if (out / split / f"{name}.npy").is_file():
            return split
    return None


def _read_item(item: dict[str, Any], args: argparse.Namespace
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one input and return (normalised float32 (X, Y, Z), manifest facts)."""
    path = Path(item["path"])
    if item["kind"] == "file" and path.suffix.lower() == ".npy":
        try:
            vol = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CTReadError(f"{path}: not a readable .npy ({e})") from e
        if vol.ndim != 3 or not np.issubdtype(vol.dtype, np.number):
            raise CTReadError(f"{path}: expected a 3D numeric array (x, y, z), got shape "
                              f"{vol.shape} dtype {vol.dtype}")
        vol = vol.astype(np.float32)
        facts = {"format": "npy", "original_shape": list(vol.shape), "original_spacing": None,
                 "orientation": "as stored", "source_hu_min": float(vol.min()) if vol.size else None,
                 "source_hu_max": float(vol.max()) if vol.size else None}
        if vol.size and vol.min() >= 0.0 and vol.max() <= 1.0:
            if vol.max() - vol.min() < 1e-6:
                raise CTReadError(f"{path}: constant volume")
            facts["note"] = "already in [0, 1]: copied (no resampling, spacing unknown)"
            return vol, facts
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
    if min(hu.shape) < args.min_size:
        raise CTReadError(f"{path}: shape {hu.shape} has an axis shorter than --min_size "
                          f"{args.min_size} (a 2D image or a few slices?)")
    if not args.no_hu_check and (why := check_ct_range(hu)):
        raise CTReadError(f"{path}: {why}")
    if args.spacing is not None:
        hu = resample(hu, spacing, args.spacing, pad_value=-1024.0)
        facts["output_spacing"] = [float(s) for s in args.spacing]
    else:
        facts["output_spacing"] = list(spacing)
    return normalize_hu(hu, args.hu_min, args.hu_max), facts


def _write_manifest(out: Path, records: dict[str, dict[str, Any]], settings: dict[str, Any],
                    skipped: list[dict[str, str]]) -> None:
    rows = [records[k] for k in sorted(records)]
    save_json_atomic(out / MANIFEST_JSON, {"settings": settings, "volumes": rows,
                                           "skipped": skipped})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (" ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in r[k])
                        if isinstance(r.get(k), list) else r.get(k, "")) for k in CSV_FIELDS})
    with atomic_path(out / MANIFEST_CSV) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def prepare_dataset(args: argparse.Namespace) -> dict[str, Any]:
    """Run stage 0 with parsed ``args``; return a summary dict
    (``written``, ``existing``, ``skipped`` lists and ``output_dir``)."""
    out = Path(args.output_dir)
    if not 0.0 <= args.val_fraction < 1.0:
        raise InputError(f"--val_fraction {args.val_fraction}: must be in [0, 1)")
    if args.spacing is not None and min(args.spacing) <= 0:
        raise InputError(f"--spacing {args.spacing}: every spacing must be > 0 mm")
    if not args.hu_max > args.hu_min:
        raise InputError(f"--hu_min {args.hu_min} / --hu_max {args.hu_max}: need hu_max > hu_min")

    # 1. find inputs, name them uniquely
    items: list[tuple[str, dict[str, Any]]] = []
    seen: dict[str, int] = {}
    for root in (Path(p) for p in args.input_dir):
        if not root.exists():
            raise InputError(f"{root}: --input_dir not found; give a folder of CT scans "
                             "(or run scripts/fetch_sample_ct.py for sample data)")
        for item in find_ct_inputs(root):
            name = patient_name(item, root if root.is_dir() else root.parent)
            if name in seen:
                seen[name] += 1
                name = f"{name}_{seen[name]}"
            else:
                seen[name] = 0
            items.append((name, item))
    if not items:
        raise InputError(f"{' '.join(args.input_dir)}: no files found; put one CT per patient "
                         "there (.mhd, .nii.gz, .nrrd, DICOM series folders, .npy)")

    # 2. previous manifest: what is done, and where
    old: dict[str, dict[str, Any]] = {}
    if (out / MANIFEST_JSON).is_file():
        try:
            manifest = json.loads((out / MANIFEST_JSON).read_text(encoding="utf-8"))
            old = {r["patient"]: r for r in manifest["volumes"]}
        except (ValueError, KeyError, TypeError) as e:
            print(f"warning: {out / MANIFEST_JSON} is unreadable ({e!r}); it is rebuilt from the "
                  "volumes processed in this run", file=sys.stderr)
            old = {}

    # 3. split the new patients (existing ones keep their split)
    existing = {n: s for n, _ in items if not args.overwrite and (s := _existing_split(out, n))}
    new_names = [n for n, _ in items if n not in existing]
    rng = np.random.default_rng(args.seed)
    order = [new_names[i] for i in rng.permutation(len(new_names))]
    n_val = int(round(len(order) * args.val_fraction))
    if args.val_fraction > 0 and len(order) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, max(0, len(order) - 1))
    split_of = {n: ("validation" if i < n_val else "train") for i, n in enumerate(order)}
    split_of.update(existing)

    settings = {k: v for k, v in vars(args).items()}
    records: dict[str, dict[str, Any]] = {k: v for k, v in old.items()
                                          if _existing_split(out, k)}
    written, kept, skipped = [], [], []
    for name, item in tqdm(items, desc="prepare", unit="vol", disable=None):
        split = split_of[name]
        target = out / split / f"{name}.npy"
        if name in existing:
            kept.append(name)
            rec = records.setdefault(name, {"patient": name, "source": str(item["path"])})
            rec.update(split=split, status="existing")
            continue
        t0 = time.time()
        try:
            vol, facts = _read_item(item, args)
        except (CTReadError, MemoryError) as e:
            msg = str(e)
            tqdm.write(f"skipped: {msg}", file=sys.stderr)
            skipped.append({"source": str(item["path"]), "reason": msg})
            continue
        for other in SPLITS:  # --overwrite may move a patient between splits
            if other != split and (out / other / f"{name}.npy").is_file():
                (out / other / f"{name}.npy").unlink()
        save_npy_atomic(target, vol)
        records[name] = {"patient": name, "split": split, "status": "written",
                         "source": str(item["path"]), "output": str(target),
                         "output_shape": list(vol.shape), "hu_min": args.hu_min,
                         "hu_max": args.hu_max, **facts}
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
    args = build_parser().parse_args(argv)
    ok, summary = call_reporting_errors(prepare_dataset, args)
    if not ok:
        return 2
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
