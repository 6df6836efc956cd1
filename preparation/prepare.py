"""Stage 0: turn a folder of CT scans into the prepared dataset the pipeline reads.

Reads every volume SimpleITK can (LUNA16 ``.mhd``/``.raw``, NIfTI, NRRD, MetaImage, DICOM
series folders, searched recursively) plus ``.npy`` volumes already in [0, 1]; transposes
SimpleITK's (z, y, x) to (x, y, z); optionally resamples linearly to ``--spacing`` (padding
with air, -1024 HU); clips to [--hu_min, --hu_max] and scales to [0, 1]; writes one float32
``.npy`` per patient into ``OUTPUT_DIR/train/`` or ``OUTPUT_DIR/validation/`` and a manifest
(``manifest.json`` and ``manifest.csv``: source, its content hash, original shape and
spacing, output shape and spacing, HU range, split).

Unreadable or odd inputs (damaged files, DICOM series with missing or duplicated slices, 2D
images, single slices, tiny, constant, complex or non-finite volumes, values that are not CT
in HU such as label masks or MR, pipes and other non-regular files) are reported and skipped;
the run goes on and ends with a summary. Every check holds for the volume as written (after
resampling and the HU window).

A patient is its content (SHA-256 of its files) found under a path relative to its
``--input_dir`` (``preparation.sources``): moving or renaming the input folder changes nothing,
and one scan under two names is prepared once. Each patient's split comes from a hash of
``--seed`` and that relative path, never from the order of discovery. The manifest names every
volume before it is written and is rewritten atomically after each one, so a killed run loses at
most the volumes in progress and a re-run continues it, ending with the same files as an
uninterrupted run. A re-run adds the new sources; it is refused when the dataset was made with
other ``--hu_min``/``--hu_max``/``--spacing``/``--no_reorient``/``--seed``/``--val_fraction``
or holds volumes the tool did not write (``--overwrite`` makes the dataset again from this run's
inputs). Reading, resampling and normalising run in ``--workers`` processes; the files are
identical for any number. Exit status 0 when the dataset holds at least one volume, 2 otherwise.

    python scripts/prepare_dataset.py --input_dir /data/LUNA16 --output_dir dataset/ --workers 4
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from preparation.ct_io import CTReadError, read_ct, resample, volume_suffix
from preparation.manifest import (MANIFEST_JSON, Manifest, check_outputs, known_contents,
                                  legacy_key, load_manifest, volumes_on_disk, write_manifest)
from preparation.sources import (Source, assign_splits, discover, group_by_content, identify,
                                 patient_name, unique_name)
from runtime.cli import (ArgumentParser, HelpFormatter, add_hu_flags, check_hu_window,
                         finite_float, fraction, positive_float, positive_int, run_cli, seed_int)
from runtime.errors import InputError
from runtime.files import check_output_outside, output_session, save_npy_atomic
from runtime.intensity import finite_range, normalize_hu, within_unit_range
from runtime.parallel import ordered_map

__all__ = ["build_parser", "prepare_dataset", "check_ct_range", "patient_name", "main"]


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
                   help="make the dataset again from this run's inputs: the volumes already in "
                        "--output_dir (also ones another tool wrote) are removed (default: keep "
                        "them and prepare only sources not yet in the manifest)")
    g.add_argument("--workers", type=positive_int, default=1,
                   help="processes that read, resample and normalise scans (1: in this process); "
                        "the files written are identical for any number")
    g = ap.add_argument_group("split")
    g.add_argument("--val_fraction", type=fraction, default=0.2,
                   help="fraction of the patients put in validation/ (at least one when there "
                        "are two or more patients and the fraction is > 0); patients already in "
                        "the manifest keep their split")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the train/validation split (a hash of the seed and each "
                        "patient's path relative to its --input_dir orders the patients)")
    g = ap.add_argument_group("intensities and geometry")
    g.add_argument("--spacing", type=positive_float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="resample linearly to this voxel spacing in mm, keeping the physical "
                        "extent (default: keep each scan's spacing)")
    add_hu_flags(g)
    g.add_argument("--hu_offset", type=finite_float, default=0.0,
                   help="add this to the stored values of scans saved without their rescale "
                        "intercept (air stored as 0 instead of -1000 HU: --hu_offset -1024); "
                        "scans holding negative values already are refused with it")
    g.add_argument("--no_reorient", action="store_true",
                   help="keep each file's voxel order instead of turning axis-aligned scans to "
                        "the identity direction (LPS: x right->left, y front->back, z up)")
    g.add_argument("--no_hu_check", action="store_true",
                   help="accept volumes whose values do not look like CT in HU (no air below "
                        "-500 HU)")
    g.add_argument("--min_size", type=positive_int, default=8,
                   help="skip volumes with fewer voxels than this along any axis (as written, "
                        "after --spacing)")
    return ap


def check_ct_range(vol: np.ndarray) -> str | None:
    """Why ``vol`` (HU) does not look like a CT, or None when it does.

    A CT holds air (below -500 HU) around or inside the body and spans hundreds of HU;
    label masks (0/1), MR or already-normalised volumes do not, and a CT stored without its
    rescale intercept has its air at 0.
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
        if lo >= 0 and p1 < 100 and p99 > 900:
            return (f"values {lo:g}..{hi:g} with air near 0 instead of -1000 HU: a CT stored "
                    "without its rescale intercept (prepare it with --hu_offset -1024, or set "
                    "RescaleIntercept in the file), or not a CT (MR)?")
        return (f"values {lo:g}..{hi:g} (1st percentile {p1:g}) do not look like CT in HU "
                "(no air below -500 HU): a label mask, MR or already-normalised image? "
                "(if it is CT in HU all the same, --no_hu_check accepts it)")
    return None


def _voxel_sha256(vol: np.ndarray) -> str:
    """SHA-256 of a volume's float32 voxels and shape: one scan saved in two formats (or
    orientations, after reorienting) has one digest."""
    arr = np.ascontiguousarray(vol, dtype=np.float32)
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(arr.data)
    return h.hexdigest()


def _skip(path: Path, why: str) -> CTReadError:
    return CTReadError(f"{path}: {why}")


def _check_hu(path: Path, hu: np.ndarray, args: argparse.Namespace) -> None:
    """The checks of a volume about to be normalised and written (after resampling): size,
    finite values, CT-like HU (unless ``--no_hu_check``). Raises ``CTReadError`` (skip)."""
    if min(hu.shape) < args.min_size:
        raise _skip(path, f"shape {hu.shape}{' after --spacing' if args.spacing else ''} has an "
                          f"axis shorter than --min_size {args.min_size} (a 2D image or a few "
                          "slices?)")
    try:
        finite_range(hu, path, "skipped")
    except InputError as e:   # a bad input volume is skipped with its line, not fatal
        raise CTReadError(str(e)) from None
    if not args.no_hu_check and (why := check_ct_range(hu)):
        raise _skip(path, why)


def _check_written(path: Path, vol: np.ndarray, window: str = "") -> None:
    """The volume exactly as written: finite, in [0, 1], not constant (``window``: the HU
    window it was clipped to, for the message)."""
    lo, hi = float(vol.min()), float(vol.max())
    if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 <= lo and hi <= 1.0):
        raise _skip(path, f"values {lo:g}..{hi:g} as written, not in [0, 1]")
    if hi - lo < 1e-6:
        raise _skip(path, f"constant as written{window} (every voxel {lo:g}): nothing to learn "
                          "from")


def _read_npy(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """An ``.npy`` input: (values as float32 (X, Y, Z), facts); in [0, 1] or HU."""
    try:
        vol = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise _skip(path, f"not a readable .npy ({e})") from e
    if vol.ndim != 3 or vol.dtype.kind not in "iuf":
        raise _skip(path, f"expected a 3D array of real numbers (x, y, z), got shape {vol.shape} "
                          f"dtype {vol.dtype}")
    vol = vol.astype(np.float32)
    return vol, {"format": "npy", "original_shape": list(vol.shape), "original_spacing": None,
                 "orientation": "as stored"}


def _read_item(item: dict[str, Any], args: argparse.Namespace
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one input and return (normalised float32 (X, Y, Z) as written, manifest facts)."""
    path = Path(item["path"])
    spacing = None
    if item["kind"] == "file" and path.suffix.lower() == ".npy":
        hu, facts = _read_npy(path)
    else:
        hu, spacing, meta = read_ct(path, item.get("files"), reorient=not args.no_reorient)
        facts = {"format": "dicom" if item["kind"] == "dicom" else volume_suffix(path).lstrip("."),
                 "original_shape": list(hu.shape), "original_spacing": list(spacing),
                 "orientation": meta.get("original_orientation", "")}
        if meta.get("reoriented_to"):
            facts["note"] = (f"reoriented {meta.get('original_orientation', '')} -> "
                             f"{meta['reoriented_to']}")
    if min(hu.shape) == 0:
        raise _skip(path, f"empty volume of shape {hu.shape}")
    try:
        lo, hi = finite_range(hu, path, "skipped")
    except InputError as e:
        raise CTReadError(str(e)) from None
    facts.update(voxel_sha256=_voxel_sha256(hu), source_hu_min=lo, source_hu_max=hi,
                 hu_offset=0.0, hu_check=not args.no_hu_check)
    if spacing is None and within_unit_range(lo, hi):    # an .npy already in [0, 1]: copied
        if min(hu.shape) < args.min_size:
            raise _skip(path, f"shape {hu.shape} has an axis shorter than --min_size {args.min_size}")
        vol = np.clip(hu, 0.0, 1.0)                      # the tolerance's rounding clipped off
        facts.update(note="already in [0, 1]: copied (no resampling, spacing unknown)",
                     output_spacing=None)
        _check_written(path, vol)
        return vol, facts
    if args.hu_offset:
        if lo < 0:
            raise _skip(path, f"stored values down to {lo:g}: its rescale is applied already, "
                              f"--hu_offset {args.hu_offset:g} would shift it; prepare it in a run "
                              "without --hu_offset")
        hu += np.float32(args.hu_offset)
        facts["hu_offset"] = float(args.hu_offset)
    if spacing is None:
        facts.update(note="HU .npy: spacing unknown, not resampled", output_spacing=None)
    elif args.spacing is not None:
        hu = resample(hu, spacing, args.spacing, pad_value=-1024.0)
        facts["output_spacing"] = [float(s) for s in args.spacing]
    else:
        facts["output_spacing"] = list(spacing)
    _check_hu(path, hu, args)
    vol = normalize_hu(hu, args.hu_min, args.hu_max)
    _check_written(path, vol, f" after the HU window [{args.hu_min:g}, {args.hu_max:g}]")
    return vol, facts


def _prepare_one(task: tuple[dict[str, Any], argparse.Namespace]) -> dict[str, Any]:
    """Worker: read, resample and normalise one input. Returns ``{"volume", "facts",
    "seconds"}`` or ``{"error": one line}`` for an input to skip."""
    item, args = task
    t0 = time.perf_counter()
    try:
        vol, facts = _read_item(item, args)
    except (CTReadError, MemoryError, ValueError, OSError) as e:
        msg = str(e) if str(item["path"]) in str(e) else f"{item['path']}: {e}"
        return {"error": msg}
    return {"volume": vol, "facts": facts, "seconds": time.perf_counter() - t0}


@dataclass
class _Patient:
    """One patient of this run: its ``name``, ``split`` and ``sources`` (the first is read;
    the others have the same content)."""
    name: str
    split: str
    sources: list[Source]


def _legacy_absolute(src: Source) -> str:
    """The ``source_key`` an earlier version recorded for ``src``: its resolved path (and
    ``#series#subject`` for DICOM)."""
    item = src.item
    key = str(Path(item["path"]).resolve())
    if item["kind"] == "dicom":
        key += f"#{item['series']}" + (f"#{item['subject']}" if item.get("subject") else "")
    return key


def _entry(src: Source, same: str = "file") -> dict[str, Any]:
    return {"source": str(src.path), "source_key": src.key, "source_sha256": src.sha256,
            "source_size": src.size, "source_mtime_ns": src.mtime_ns, "same": same}


def _keep(rec: dict[str, Any], group: list[Source]) -> None:
    """A recorded patient met again: its duplicates found now are added to its record."""
    rec["status"] = "existing"
    dups = {d["source_key"]: d for d in rec.get("duplicates") or []}
    for src in group:
        if src.key != rec.get("source_key"):
            dups[src.key] = _entry(src, dups.get(src.key, {}).get("same", "file"))
    if dups:
        rec["duplicates"] = [dups[k] for k in sorted(dups)]


def _index(m: Manifest) -> tuple[dict[str, str], dict[str, str]]:
    """The recorded patients by content (theirs and their duplicates') and by source key
    (for records of earlier versions: their absolute key and the key under their recorded
    --input_dir)."""
    by_sha: dict[str, str] = {}
    by_key: dict[str, str] = {}
    roots = [str(r) for r in m.settings.get("input_dir") or []]
    for name, rec in m.records.items():
        for e in [rec] + list(rec.get("duplicates") or []):
            if e.get("source_sha256"):
                by_sha.setdefault(str(e["source_sha256"]), name)
        if rec.get("source_key"):
            by_key.setdefault(str(rec["source_key"]), name)
            if (rel := legacy_key(rec, roots)) is not None:
                by_key.setdefault(rel, name)
    return by_sha, by_key


def _match(m: Manifest, index: tuple[dict[str, str], dict[str, str]], group: list[Source],
           claimed: set[str]) -> tuple[str | None, bool]:
    """The recorded patient ``group`` is, and whether its content is the recorded one: by
    content first (wherever it lies now), else by key (a changed file at a known place; a
    record of an earlier version, without hash, is the same when size and time are)."""
    by_sha, by_key = index
    name = by_sha.get(group[0].sha256)
    if name is not None and name not in claimed:
        return name, True
    for src in group:
        name = by_key.get(src.key) or by_key.get(_legacy_absolute(src))
        if name is not None and name not in claimed:
            rec = m.records[name]
            same = not rec.get("source_sha256") and rec.get("source_size") == src.size \
                and rec.get("source_mtime_ns") in (None, src.mtime_ns)
            if same:   # a record of an earlier version, unchanged: add its identity
                rec.update({k: v for k, v in _entry(src).items() if k != "same"})
            return name, same
    return None, False


def _plan(groups: list[list[Source]], m: Manifest, args: argparse.Namespace
          ) -> tuple[list[str], list[_Patient]]:
    """(names of recorded patients kept, patients to prepare, sorted by name)."""
    splits = assign_splits(groups, args.val_fraction, args.seed)
    shared = Counter(g[0].base for g in groups)
    taken = set(m.records) | set(m.pending)
    pending = {str(p.get("source_sha256")): n for n, p in m.pending.items()}
    claimed: set[str] = set()
    index = _index(m)
    kept, todo = [], []
    for group in groups:
        name, same = _match(m, index, group, claimed)
        if name is not None and (vol := Path(args.output_dir) / m.records[name]["split"]
                                 / f"{name}.npy").is_file():
            claimed.add(name)
            if not same:
                tqdm.write(f"warning: {group[0].path} changed since it was prepared; keeping "
                           f"{vol.parent.name}/{name}.npy (--overwrite prepares the dataset "
                           "again)", file=sys.stderr)
            _keep(m.records[name], group)
            kept.append(name)
            continue
        if name is not None:                     # recorded, but its volume is gone: redo it
            claimed.add(name)
            split = m.records.pop(name)["split"]
        elif (name := pending.get(group[0].sha256)) is not None and name not in claimed:
            claimed.add(name)                    # named by an interrupted run: same name, split
            split = m.pending[name]["split"]
        else:
            name = unique_name(group[0].base, group[0].key, group[0].sha256, taken,
                               shared[group[0].base] > 1)
            split = splits[group[0].sha256]
        taken.add(name)
        todo.append(_Patient(name, split, group))
    return kept, sorted(todo, key=lambda p: p.name)


def _write_manifest(out: Path, m: Manifest, settings: dict[str, Any]) -> None:
    """Both manifests, atomically (one call per state: before the first volume, after each)."""
    write_manifest(out, m, settings)


def prepare_dataset(args: argparse.Namespace) -> dict[str, Any]:
    """Run stage 0 with parsed ``args``; return a summary dict (``written``, ``existing``,
    ``skipped``, ``duplicates`` lists, counts, ``seconds`` and ``output_dir``). Inputs are
    checked (and found) before the output folder is touched."""
    out = Path(args.output_dir)
    check_hu_window(args)
    roots = [Path(p) for p in args.input_dir]
    for root in roots:
        if not root.exists():
            raise InputError(f"{root}: --input_dir not found; give a folder of CT scans "
                             "(or run scripts/fetch_sample_ct.py for sample data)")
    check_output_outside(out, roots, "--output_dir", "--input_dir", both_ways=True)
    sources = discover(roots)
    if not sources:
        raise InputError(f"{' '.join(args.input_dir)}: no files found; put one CT per patient "
                         "there (.mhd, .nii.gz, .nrrd, DICOM series folders, .npy)")
    with output_session(out, "--output_dir"):
        return _prepare(args, sources, out)


def _start(args: argparse.Namespace, sources: list[Source], out: Path
           ) -> tuple[Manifest, list[str], list[_Patient], list[dict[str, Any]]]:
    """Check the output folder, identify the sources, plan the run and record the plan."""
    m = load_manifest(out, args.overwrite)
    known = known_contents(m)
    if args.overwrite:
        m = Manifest(found=m.found)
    else:
        check_outputs(m, out, args)
    identify(sources, known, args.workers)
    skipped = [{"source": str(s.path), "reason": s.error} for s in sources if s.error]
    groups = group_by_content(sources)
    for group in groups:
        for dup in group[1:]:
            tqdm.write(f"note: {dup.path} is the same file content as {group[0].path}: one "
                       "patient, prepared once", file=sys.stderr)
    kept, todo = _plan(groups, m, args)
    m.records = {n: r for n, r in m.records.items() if n in kept
                 or (out / r["split"] / f"{n}.npy").is_file()}     # volumes still on disk
    earlier = m.pending
    m.pending = {p.name: {"patient": p.name, "split": p.split,
                          **{k: v for k, v in _entry(p.sources[0]).items() if k != "same"}}
                 for p in todo}
    m.skipped, m.complete = skipped, False
    if todo or args.overwrite or earlier:
        _write_manifest(out, m, vars(args))     # every volume is named before it is written
    # what this run will not write: with --overwrite every earlier volume; else the volumes an
    # interrupted run may have written for sources that are gone now
    old = volumes_on_disk(out) if args.overwrite else \
        [out / p["split"] / f"{n}.npy" for n, p in earlier.items()
         if n not in m.pending and n not in m.records]
    old = [p for p in old if p.is_file()]
    for p in old:
        p.unlink()
    if old and args.overwrite:
        print(f"note: --overwrite: removed the {len(old)} volume(s) of the earlier dataset in "
              f"{out}", file=sys.stderr)
    return m, kept, todo, skipped


def _prepare(args: argparse.Namespace, sources: list[Source], out: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    m, kept, todo, skipped = _start(args, sources, out)
    voxels = {r["voxel_sha256"]: n for n, r in m.records.items() if r.get("voxel_sha256")}
    written: list[str] = []
    duplicates: list[str] = []
    tasks = ((p.sources[0].item, args) for p in todo)
    results = ordered_map(_prepare_one, tasks, args.workers, desc="prepare", unit="scan",
                          total=len(todo))
    for patient, res in zip(todo, results):
        src = patient.sources[0]
        m.pending.pop(patient.name, None)
        if "error" in res:
            tqdm.write(f"skipped: {res['error']}", file=sys.stderr)
            skipped.append({"source": str(src.path), "reason": res["error"]})
        elif (same := voxels.get(res["facts"]["voxel_sha256"])) is not None:
            tqdm.write(f"note: {src.path} holds the same voxels as patient {same}: not prepared "
                       "twice", file=sys.stderr)
            m.records[same].setdefault("duplicates", []).extend(
                _entry(s, "voxels") for s in patient.sources)
            duplicates.append(str(src.path))
        else:
            target = out / patient.split / f"{patient.name}.npy"
            save_npy_atomic(target, res["volume"])
            voxels[res["facts"]["voxel_sha256"]] = patient.name
            m.records[patient.name] = _record(patient, res, args)
            written.append(patient.name)
            tqdm.write(f"{patient.split}/{patient.name}.npy  {tuple(res['facts']['original_shape'])}"
                       f" -> {res['volume'].shape}  ({res['seconds']:.1f}s)")
        _write_manifest(out, m, vars(args))     # after every patient
    m.complete = True
    _write_manifest(out, m, vars(args))
    on_disk = volumes_on_disk(out)
    return {"written": written, "existing": kept, "skipped": skipped, "output_dir": str(out),
            "duplicates": duplicates + [str(s.path) for g in group_by_content(sources) for s in g[1:]],
            "n_train": sum(p.parent.name == "train" for p in on_disk),
            "n_validation": sum(p.parent.name == "validation" for p in on_disk),
            "n_read": len(todo), "seconds": time.perf_counter() - t_start}


def _record(patient: _Patient, res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The manifest record of a volume just written."""
    src = patient.sources[0]
    rec = {"patient": patient.name, "split": patient.split, "status": "written",
           **{k: v for k, v in _entry(src).items() if k != "same"},
           "output": f"{patient.split}/{patient.name}.npy",
           "output_shape": list(res["volume"].shape), "hu_min": args.hu_min,
           "hu_max": args.hu_max, **res["facts"]}
    if len(patient.sources) > 1:
        rec["duplicates"] = [_entry(s) for s in patient.sources[1:]]
    return rec


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 when the dataset holds at least one volume, else 2."""
    return run_cli(build_parser, prepare_dataset, argv, _report,
                   "run the same command again: it continues with the patients not yet prepared")


def _report(args: argparse.Namespace, summary: dict[str, Any]) -> int:
    """Print the run's summary; 2 when the dataset holds no volume."""
    out = summary["output_dir"]
    rate = (f"; {summary['n_read']} scans read in {summary['seconds']:.1f} s, "
            f"{summary['n_read'] / max(summary['seconds'], 1e-9):.2f} scans/s with "
            f"{args.workers} worker(s)") if summary["n_read"] else ""
    dups = f", {len(summary['duplicates'])} duplicate(s)" if summary["duplicates"] else ""
    print(f"prepare_dataset: {len(summary['written'])} written, {len(summary['existing'])} "
          f"already done, {len(summary['skipped'])} skipped{dups} -> {out} "
          f"(train {summary['n_train']}, validation {summary['n_validation']}; "
          f"manifest {Path(out) / MANIFEST_JSON}{rate})")
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
