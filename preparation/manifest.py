"""Stage 0's manifest: what a prepared dataset holds, what each volume was made from, and the
checks a re-run makes before it adds to the dataset.

``manifest.json`` holds ``settings`` (the flags of the last run; the flags of
``RESULT_FLAGS`` are the same for every volume, a re-run with others is refused), ``volumes``
(one record per patient: name, split, source path and ``source_key`` relative to its input
folder, ``source_sha256``, sizes, shapes, spacings, HU facts, ``duplicates``), ``pending``
(the patients a running or interrupted run is writing: every ``.npy`` it may leave behind is
named there before it is written), ``skipped``, ``complete`` (false until a run ends: stages
1-3 refuse the dataset) and ``format``. ``manifest.csv`` is the table of the volumes.

Manifests of earlier versions (no ``format``) are read: their records keep their names and
splits; their absolute ``source_key`` is matched against the sources where they were, or under
the recorded ``--input_dir``; content hashes are added as the sources are met again.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import InputError
from runtime.files import atomic_path, save_json_atomic
from runtime.provenance import format_changes, settings_changes

__all__ = ["MANIFEST_JSON", "MANIFEST_CSV", "SPLITS", "CSV_FIELDS", "RESULT_FLAGS", "FORMAT",
           "Manifest", "volumes_on_disk", "load_manifest", "check_outputs", "write_manifest",
           "known_contents", "legacy_key"]

SPLITS = ("train", "validation")
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
FORMAT = 2
CSV_FIELDS = ("patient", "split", "status", "source", "source_key", "format", "original_shape",
              "original_spacing", "output_shape", "output_spacing", "source_hu_min",
              "source_hu_max", "hu_min", "hu_max", "hu_offset", "orientation", "source_sha256")
#: Flags that decide the values of every written volume or the split: the volumes of one
#: dataset share them, so a re-run into it with other values is refused.
RESULT_FLAGS = ("hu_min", "hu_max", "spacing", "no_reorient", "seed", "val_fraction")


@dataclass
class Manifest:
    """A dataset's manifest as read (empty when there is none): ``records`` and ``pending``
    by patient name."""
    settings: dict[str, Any] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True
    found: bool = False
    format: int = FORMAT


def volumes_on_disk(out: Path) -> list[Path]:
    """The ``.npy`` volumes in ``out/train`` and ``out/validation`` (not temporaries)."""
    return sorted(p for sp in SPLITS if (out / sp).is_dir() for p in (out / sp).iterdir()
                  if p.suffix == ".npy" and not p.name.startswith(".") and p.is_file())


def load_manifest(out: Path, overwrite: bool) -> Manifest:
    """The manifest of ``out`` (an empty one when there is none). An unreadable manifest
    beside volumes is an ``InputError`` (they could no longer be matched to their sources)
    unless ``overwrite``."""
    path = out / MANIFEST_JSON
    if not path.is_file():
        return Manifest()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = {str(r["patient"]): dict(r) for r in data["volumes"]}
        pending = {str(r["patient"]): dict(r) for r in data.get("pending", [])}
        for r in list(records.values()) + list(pending.values()):
            if r.get("split") not in SPLITS:
                raise ValueError(f"patient {r.get('patient')!r} has split {r.get('split')!r}")
        return Manifest(dict(data.get("settings") or {}), records, pending,
                        list(data.get("skipped") or []), data.get("complete", True) is not False,
                        True, int(data.get("format", 1)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = " ".join(str(e).split())[:120]
        vols = volumes_on_disk(out)
        if vols and not overwrite:
            raise InputError(f"{path}: unreadable ({why}), so the {len(vols)} volume(s) in {out} "
                             "can no longer be matched to their sources; pass --overwrite to "
                             "prepare the dataset again, or choose another --output_dir") from e
        print(f"warning: {path}: unreadable ({why}); "
              + ("--overwrite: preparing the dataset again" if vols else "starting afresh"),
              file=sys.stderr)
        return Manifest()


def _state(m: Manifest) -> str:
    return "the dataset there" if m.complete else \
        "the dataset there (incomplete: an interrupted or running preparation)"


def check_outputs(m: Manifest, out: Path, args: argparse.Namespace) -> None:
    """What a run without ``--overwrite`` may add to: refuse (``InputError``) a dataset made
    with other ``RESULT_FLAGS`` (listing them) and volumes the manifest does not name
    (written by another tool, or an output folder without a manifest)."""
    if m.records or m.pending:
        changes = settings_changes(m.settings, vars(args), RESULT_FLAGS)
        if changes:
            raise InputError(f"{out / MANIFEST_JSON}: {_state(m)} was prepared with other settings "
                             f"({format_changes(changes)}); give the recorded values to add to "
                             "it, choose another --output_dir, or pass --overwrite to prepare it "
                             "again with these")
    known = {(r["split"], name) for name, r in list(m.records.items()) + list(m.pending.items())}
    foreign = [p for p in volumes_on_disk(out) if (p.parent.name, p.stem) not in known]
    if foreign:
        why = "not named in its manifest.json" if m.found else "and no manifest.json"
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise InputError(f"{foreign[0]}{more}: volume(s) in --output_dir {out} that "
                         f"prepare_dataset did not write ({why}); they are kept: choose another "
                         "--output_dir, or pass --overwrite to replace the folder's volumes "
                         "with this run's")


def known_contents(m: Manifest) -> dict[tuple[str, int, int], str]:
    """``{(source_key, size, mtime_ns): sha256}`` of every source the manifest has hashed
    (records, their duplicates, pending patients), so a re-run hashes only what is new."""
    out: dict[tuple[str, int, int], str] = {}
    entries = [e for r in m.records.values() for e in [r] + list(r.get("duplicates") or [])]
    for e in entries + list(m.pending.values()):
        if e.get("source_sha256") and e.get("source_key") and "source_size" in e:
            out[(str(e["source_key"]), int(e["source_size"]),
                 int(e.get("source_mtime_ns") or 0))] = str(e["source_sha256"])
    return out


def legacy_key(rec: dict[str, Any], roots: list[str]) -> str | None:
    """The relative key of a record written by an earlier version (absolute ``source_key``),
    from its ``source`` under one of the ``roots`` recorded in its settings."""
    key, source = str(rec.get("source_key") or ""), rec.get("source")
    if not source or not key.startswith("/"):
        return None
    suffix = m.group(1) if (m := re.search(r"(#[0-9.]+(?:#[^#/]*)?)$", key)) else ""
    for root in roots:
        try:
            rel = Path(source).relative_to(Path(root))
        except ValueError:
            continue
        return (rel.as_posix() if str(rel) != "." else Path(source).name) + suffix
    return None


def write_manifest(out: Path, m: Manifest, settings: dict[str, Any]) -> None:
    """``manifest.json`` and ``manifest.csv``, atomically (records sorted by name)."""
    rows = [m.records[k] for k in sorted(m.records)]
    save_json_atomic(out / MANIFEST_JSON, {
        "format": FORMAT, "settings": settings, "volumes": rows,
        "pending": [m.pending[k] for k in sorted(m.pending)], "skipped": m.skipped,
        "complete": m.complete})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (" ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in r[k])
                        if isinstance(r.get(k), list) else r.get(k, "")) for k in CSV_FIELDS})
    with atomic_path(out / MANIFEST_CSV) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
