"""What the four target-task preparations share: the plan of a run, the manifest, the output
session and the work loop.

A task module (``luna16``, ``lidc``, ``lits``, ``brats``) reads and checks its inputs into a
:class:`Plan` (splits, one work item per scan, case or chunk, the settings) without touching
the output folder; :func:`run_plan` then owns the output folder (``runtime.files`` lock),
compares the plan with the folder's ``manifest.json`` (continue an interrupted run, refuse
other settings unless ``--overwrite``), runs the pending items through
``runtime.parallel.ordered_map`` (results in input order, so the outputs are identical for any
``--workers``), records every finished item in the manifest (``complete`` false until the
end) and finishes each split once its items are done.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.files import (check_output_outside, output_session, remove_stale_temporaries,
                           save_json_atomic, save_npy_atomic)
from runtime.parallel import ordered_map
from runtime.provenance import ResumePolicy, check_resume_settings, file_identity

__all__ = ["FORMAT_VERSION", "MANIFEST", "SPLITS", "SEG_FOLDERS", "Plan", "TaskHooks",
           "check_disjoint", "find_one", "missing_or_refuse", "outputs", "run_plan", "write_case",
           "check_labels", "read_header", "read_labelled_volume", "check_same_grid", "relative_to",
           "plan_settings"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
#: Sub-folders of every split of a segmentation task (images and masks share file names).
SEG_FOLDERS = ("images", "masks")


@dataclass
class Plan:
    """One preparation, decided from the inputs alone.

    ``splits``: patient ids per split; ``items``: picklable work items, each with ``key``
    (unique) and ``split``, in the order they are processed (split by split); ``inputs``: what
    was read (identities of small files, per-scan facts); ``missing``: expected inputs that
    are absent (only with ``--allow_missing``); ``extra``: task data kept in this process.
    """

    task: str
    source: str
    settings: dict[str, Any]
    splits: dict[str, list[str]]
    items: list[dict[str, Any]]
    inputs: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """SHA-256 of what decides the outputs besides the settings: the splits, the items
        and the input identities (a changed input folder gives another fingerprint)."""
        blob = json.dumps({"splits": self.splits, "items": self.items, "inputs": self.inputs},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class TaskHooks:
    """A task's part of :func:`run_plan`.

    ``work(item) -> {"key", "split", "files": {rel: identity}, "facts": {...}}`` runs in the
    worker processes (module level, picklable). ``begin(plan, out, done, finished)`` creates
    the partial outputs of the splits not yet ``finished`` and returns the keys among ``done``
    whose work is lost and must be redone.
    ``finish_split(plan, out, split, facts) -> {rel: identity}`` writes a split's last files.
    ``counts(plan, split, facts) -> dict`` gives a split's counts from the items' facts.
    ``leftovers(out) -> [paths]``: partial files removed once the run is complete.
    ``case_folders``: the task writes ``{split}/images`` and ``{split}/masks`` (checked to
    hold exactly the recorded cases).
    """

    work: Callable[[dict[str, Any]], dict[str, Any]]
    unit: str
    counts: Callable[[Plan, str, dict[str, dict[str, Any]]], dict[str, Any]]
    case_folders: bool = True
    begin: Callable[[Plan, Path, set[str], list[str]], set[str]] | None = None
    finish_split: Callable[[Plan, Path, str, dict[str, dict[str, Any]]],
                           dict[str, dict[str, Any]]] | None = None
    leftovers: Callable[[Path], list[Path]] | None = None


def plan_settings(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The flags that shape a task's data (``names``), plus ``task`` and the resolved
    ``data_dir``: what the manifest records and a re-run must repeat."""
    settings = {"task": args.task, "data_dir": str(Path(args.data_dir).resolve())}
    for name in names:
        value = getattr(args, name)
        settings[name] = str(Path(value).resolve()) if isinstance(value, Path) else value
    return settings


def relative_to(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or absolute when outside it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def check_disjoint(splits: dict[str, list[str]]) -> None:
    """Patients never cross splits, and no split lists one twice (a bug if it fails)."""
    seen: dict[str, str] = {}
    for split, ids in splits.items():
        for pid in ids:
            if pid in seen:
                raise RuntimeError(f"patient {pid} is in both {seen[pid]} and {split}: the "
                                   "splits must be disjoint")
            seen[pid] = split


def missing_or_refuse(missing: list[str], what: str, where: Path, fix: str,
                      allow: bool) -> list[str]:
    """Expected inputs absent from the data folder: an ``InputError`` (naming how many, the
    first few and ``fix``) unless ``allow`` (``--allow_missing``), then a note on stderr."""
    if not missing:
        return []
    shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
    if not allow:
        raise InputError(f"{where}: {len(missing)} {what} of the published protocol not found "
                         f"({shown}); {fix}, or pass --allow_missing to prepare those present "
                         "(the splits are then smaller than published)")
    print(f"note: --allow_missing: {len(missing)} {what} not found, prepared without them "
          f"({shown})", file=sys.stderr)
    return list(missing)


def check_labels(labels: np.ndarray, allowed: Iterable[int], path: Path, fix: str) -> None:
    """Every value of a label volume is one of ``allowed``; else an ``InputError`` naming
    ``path``, the unexpected values and ``fix``."""
    allowed = list(allowed)
    ok = np.zeros(labels.shape, bool)
    for v in allowed:
        ok |= labels == v
    if not ok.all():
        bad = np.unique(labels[~ok])[:6]
        raise InputError(f"{path}: label values {[float(b) for b in bad]} besides the expected "
                         f"{allowed}; {fix}")


def read_labelled_volume(image_path: Path, mask_path: Path, labels: Iterable[int], fix: str,
                         what: str = "volume") -> tuple[np.ndarray, np.ndarray, tuple, dict]:
    """One image and its label volume through ``preparation.ct_io.read_ct`` (both in (x, y, z),
    reoriented alike): ``(image, labels, spacing, meta of the image)``. A file that cannot be
    read, label volumes of another shape and label values outside ``labels`` are one
    ``InputError`` naming the file and ``fix``."""
    from preparation.ct_io import CTReadError, read_ct  # local: SimpleITK only in the workers

    try:
        image, spacing, meta = read_ct(image_path)
        seg, _, _ = read_ct(mask_path)
    except CTReadError as e:
        raise InputError(f"{e}; {fix}") from None
    if image.shape != seg.shape:
        raise InputError(f"{mask_path}: shape {seg.shape} differs from its {what}'s "
                         f"{image.shape}; {fix}")
    check_labels(seg, labels, mask_path, fix)
    return image, seg, spacing, meta


def find_one(data_dir: Path, name: str, missing: str, several_fix: str) -> Path:
    """The one file called ``name`` in ``data_dir`` (directly, else anywhere below it: the
    downloads unzip into sub-folders). None (``missing``: what to say, with the fix) or
    several are an ``InputError`` naming ``data_dir``."""
    direct = data_dir / name
    if direct.is_file():
        return direct
    found = sorted(p for p in data_dir.rglob(name) if p.is_file())
    if not found:
        raise InputError(f"{data_dir}: {missing}")
    if len(found) > 1:
        raise InputError(f"{data_dir}: several {name} ({found[0]}, {found[1]}); {several_fix}")
    return found[0]


def read_header(path: Path, fix: str) -> dict[str, Any]:
    """A volume's grid from its header alone (SimpleITK): ``size``, ``spacing``, ``origin``,
    ``direction``; an unreadable file is an ``InputError`` naming it and ``fix``."""
    import SimpleITK as sitk  # local: NCS never reads images

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path}: not a readable image; {fix}") from None
    if reader.GetDimension() != 3:
        raise InputError(f"{path}: a {reader.GetDimension()}D image, expected a 3D volume; {fix}")
    return {"size": list(reader.GetSize()), "spacing": list(reader.GetSpacing()),
            "origin": list(reader.GetOrigin()), "direction": list(reader.GetDirection())}


def check_same_grid(image_info: dict[str, Any], mask_info: dict[str, Any], image: Path,
                    mask: Path) -> None:
    """A mask must lie on its image's voxel grid: the same size, spacing, origin and direction
    (``info`` dicts of :func:`read_header`); else one ``InputError`` naming both."""
    problems = []
    if list(image_info["size"]) != list(mask_info["size"]):
        problems.append(f"size {tuple(image_info['size'])} vs {tuple(mask_info['size'])}")
    if not np.allclose(image_info["spacing"], mask_info["spacing"], rtol=1e-3, atol=1e-4):
        problems.append(f"spacing {tuple(image_info['spacing'])} vs {tuple(mask_info['spacing'])}")
    if not np.allclose(image_info["origin"], mask_info["origin"],
                       atol=0.5 * min(image_info["spacing"])):
        problems.append(f"origin {tuple(image_info['origin'])} vs {tuple(mask_info['origin'])}")
    if not np.allclose(image_info["direction"], mask_info["direction"], atol=1e-3):
        problems.append("direction differs")
    if problems:
        raise InputError(f"{mask}: not on the voxel grid of its image {image} ("
                         + "; ".join(problems) + "); download the pair again")


def write_case(out: Path, split: str, name: str, image: np.ndarray,
               mask: np.ndarray) -> dict[str, dict[str, Any]]:
    """Write one segmentation case atomically: ``{split}/images/{name}.npy`` (float32 (x, y, z)
    in [0, 1]) and ``{split}/masks/{name}.npy`` (uint8 {0, 1}, same shape); returns their
    identities keyed by path relative to ``out``."""
    if image.shape != mask.shape:
        raise RuntimeError(f"case {name}: image {image.shape} and mask {mask.shape} differ")
    files = {}
    for folder, arr in (("images", image.astype(np.float32, copy=False)),
                        ("masks", mask.astype(np.uint8, copy=False))):
        rel = f"{split}/{folder}/{name}.npy"
        save_npy_atomic(out / rel, arr)
        files[rel] = file_identity(out / rel)
    return files


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or "settings" not in record:
            raise ValueError("not a preparation manifest")
        return record
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e}); pass --overwrite to prepare this folder "
                         "again, or choose another --output_dir") from None


def outputs(out: Path) -> list[Path]:
    """Every file and folder a preparation of any task may write into ``out``: the NCC
    files (``{split}_cubes.npy`` ..., their partial files) and the split folders."""
    return [out / f"{s}_{k}" for s in SPLITS for k in
            ("cubes.npy", "labels.npy", "candidates.csv", "cubes.partial.npy",
             "centres.partial.npy")] + [out / s for s in SPLITS]


def _wipe(out: Path) -> None:
    """Remove what an earlier run wrote (``--overwrite``); other files stay."""
    removed = 0
    for p in [out / MANIFEST, *outputs(out)]:
        if p.is_dir():
            shutil.rmtree(p)
            removed += 1
        elif p.exists():
            p.unlink()
            removed += 1
    if removed:
        print(f"note: --overwrite: removed the earlier preparation in {out}", file=sys.stderr)


def _start(out: Path, plan: Plan, hooks: TaskHooks, overwrite: bool) -> dict[str, Any]:
    """The manifest this run continues (its finished items kept), or a fresh one."""
    record = None if overwrite else _read_manifest(out)
    if record is None and not overwrite:
        found = [p for p in outputs(out) if p.exists()]
        if found:
            raise InputError(f"{found[0]}: an earlier preparation's output without its "
                             f"{MANIFEST}; pass --overwrite to prepare again, or choose another "
                             "--output_dir")
    if record is not None:
        check_resume_settings(record.get("settings"), plan.settings, ResumePolicy(),
                              str(out / MANIFEST), what="this run",
                              restart="pass --overwrite to prepare again from scratch")
        if record.get("plan_sha256") != plan.fingerprint():
            raise InputError(f"{out / MANIFEST}: the inputs changed since this folder was "
                             f"prepared ({_split_sizes(record.get('splits'))} recorded, "
                             f"{_split_sizes(plan.splits)} now); pass --overwrite to prepare "
                             "again from scratch")
        return record
    _wipe(out)
    return {"task": plan.task, "format_version": FORMAT_VERSION, "complete": False,
            "source": plan.source, "settings": plan.settings, "plan_sha256": plan.fingerprint(),
            "splits": plan.splits, "inputs": plan.inputs, "missing": plan.missing,
            "notes": plan.notes, "counts": {}, "files": {}, "items": {}, "finished_splits": []}


def _split_sizes(splits: Any) -> str:
    if not isinstance(splits, dict):
        return "no splits"
    return "/".join(str(len(splits.get(s, []))) for s in SPLITS) + " patients"


def _files_intact(out: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first recorded file that is missing or has another size, or None."""
    for rel, ident in files.items():
        p = out / rel
        if not p.is_file() or p.stat().st_size != ident.get("size"):
            return rel
    return None


def _done_items(out: Path, record: dict[str, Any]) -> set[str]:
    """Items of the record whose files are all still there with their recorded sizes."""
    done = set()
    for key, facts in record["items"].items():
        if all(_files_intact(out, {rel: record["files"].get(rel, {})}) is None
               for rel in facts.get("files", [])):
            done.add(key)
    return done


def _reopen_damaged_splits(out: Path, record: dict[str, Any]) -> None:
    """A finished split whose files are gone (or changed size) is done again, items included."""
    for split in list(record["finished_splits"]):
        rels = record.get("split_files", {}).get(split, [])
        if _files_intact(out, {r: record["files"].get(r, {}) for r in rels}) is not None:
            record["finished_splits"].remove(split)
            record["items"] = {k: v for k, v in record["items"].items() if v.get("split") != split}


def run_plan(plan: Plan, hooks: TaskHooks, args: argparse.Namespace) -> dict[str, Any]:
    """Prepare ``plan`` into ``args.output_dir`` (``workers``, ``overwrite``, ``verbose``);
    returns the complete manifest."""
    out = Path(args.output_dir)
    check_output_outside(out, [args.data_dir], "--output_dir", "--data_dir", both_ways=True)
    check_disjoint(plan.splits)
    with output_session(out, "--output_dir", continue_flag=None):
        for split in SPLITS:
            for sub in SEG_FOLDERS:
                if (out / split / sub).is_dir():
                    remove_stale_temporaries(out / split / sub)
        record = _start(out, plan, hooks, args.overwrite)
        if record.get("complete"):
            bad = _files_intact(out, record["files"])
            if bad:
                raise InputError(f"{out / bad}: missing or changed since this folder was "
                                 "prepared; pass --overwrite to prepare it again")
            print(f"note: {out} already holds this preparation (complete); nothing to do",
                  file=sys.stderr)
            return record
        _reopen_damaged_splits(out, record)
        done = _done_items(out, record)
        if hooks.begin is not None:
            done -= hooks.begin(plan, out, done, record["finished_splits"])
        record["items"] = {k: v for k, v in record["items"].items() if k in done}
        save_json_atomic(out / MANIFEST, record)          # complete: false from here on
        _finish_ready(plan, hooks, out, record)
        pending = [dict(it, out=str(out)) for it in plan.items if it["key"] not in done]
        if done and pending:
            print(f"note: continuing an interrupted preparation: {len(done)} of "
                  f"{len(plan.items)} {hooks.unit}s already done", file=sys.stderr)
        for result in ordered_map(hooks.work, pending, args.workers, desc=f"prepare {plan.task}",
                                  unit=hooks.unit, show=args.verbose > 0):
            record["files"].update(result["files"])
            record["items"][result["key"]] = dict(result["facts"], split=result["split"],
                                                  files=sorted(result["files"]))
            _finish_ready(plan, hooks, out, record)
            save_json_atomic(out / MANIFEST, record)
        return _complete(plan, hooks, out, record)


def _finish_ready(plan: Plan, hooks: TaskHooks, out: Path, record: dict[str, Any]) -> None:
    """Finish every split whose items are all done (in split order)."""
    for split in SPLITS:
        if split in record["finished_splits"]:
            continue
        keys = [it["key"] for it in plan.items if it["split"] == split]
        if any(k not in record["items"] for k in keys):
            return
        if hooks.finish_split is not None:
            facts = {k: record["items"][k] for k in keys}
            files = hooks.finish_split(plan, out, split, facts)
            record["files"].update(files)
            record.setdefault("split_files", {})[split] = sorted(files)
        record["finished_splits"].append(split)
        save_json_atomic(out / MANIFEST, record)


def _complete(plan: Plan, hooks: TaskHooks, out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Final checks, counts, ``complete: true``, leftovers removed."""
    check_disjoint(record["splits"])
    bad = _files_intact(out, record["files"])
    if bad:
        raise InputError(f"{out / bad}: changed while this run was writing it; pass --overwrite "
                         "to prepare again")
    if hooks.case_folders:
        _check_no_strays(out, record)
    for split in SPLITS:
        facts = {k: v for k, v in record["items"].items() if v.get("split") == split}
        record["counts"][split] = hooks.counts(plan, split, facts)
    record["complete"] = True
    save_json_atomic(out / MANIFEST, record)
    for p in hooks.leftovers(out) if hooks.leftovers is not None else []:
        p.unlink(missing_ok=True)
    return record


def _check_no_strays(out: Path, record: dict[str, Any]) -> None:
    """The image and mask folders hold exactly the recorded cases: a stray ``.npy`` would be
    read by the fine-tuning script as one more case."""
    for split in SPLITS:
        for sub in SEG_FOLDERS:
            folder = out / split / sub
            folder.mkdir(parents=True, exist_ok=True)   # an empty split still has its folders
            for p in sorted(folder.iterdir()):
                if f"{split}/{sub}/{p.name}" not in record["files"] and not p.name.startswith("."):
                    raise InputError(f"{p}: not written by this preparation, but the fine-tuning "
                                     "script would read it as a case; remove it, or pass "
                                     "--overwrite to prepare again")
