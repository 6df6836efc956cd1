"""A prepared target-task folder (written by ``scripts/prepare_target.py``), checked before
anything runs, and the fine-tuning data flags it gives.

Layout (``manifest.json`` records every file with its size and SHA-256):

* NCC: ``{train,val,test}_cubes.npy`` (N, X, Y, Z) in [0, 1], ``{split}_labels.npy`` (N,) int64
  {0, 1}, ``{split}_candidates.csv``;
* NCS, LCS, BMS: ``{train,val,test}/images/<case>.npy`` float32 [0, 1] (x, y, z) and
  ``{split}/masks/<case>.npy`` uint8 {0, 1}, the same names.

The check reads the manifest (complete, format version 1, the task asked for) and every file
it records (present, with its recorded size); the content is identified by the manifest's own
identity (size and SHA-256 of ``manifest.json``, which holds every file's hash), so a run never
hashes the whole dataset.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.files import atomic_path
from runtime.provenance import file_identity
from target_tasks.common import FORMAT_VERSION, MANIFEST, SPLITS

__all__ = ["SPLITS", "FORMAT_VERSION", "Prepared", "check_prepared"]

_PREPARE = "python scripts/prepare_target.py {task} --data_dir ... --output_dir {folder}"


@dataclass
class Prepared:
    """A checked prepared folder: ``kind`` is the task's (classification / segmentation),
    ``identity`` the manifest's content identity."""

    folder: Path
    task: str
    kind: str
    manifest: dict[str, Any]
    identity: dict[str, Any]

    def path(self, rel: str) -> Path:
        return self.folder / rel

    def summary(self) -> dict[str, Any]:
        """What results files record about the data: folder, identity, counts, settings."""
        m = self.manifest
        return {"folder": str(self.folder), "manifest": self.identity, "counts": m.get("counts"),
                "settings": m.get("settings"), "source": m.get("source"),
                "patients": {s: len(m["splits"].get(s, [])) for s in SPLITS}
                if isinstance(m.get("splits"), dict) else None}

    def classification_flags(self, subset_folder: Path | None = None) -> dict[str, list[str]]:
        """NCC data flags; the training files come from ``subset_folder`` when given."""
        train = subset_folder if subset_folder is not None else self.folder
        return {"--data": [str(train / "train_cubes.npy")],
                "--labels": [str(train / "train_labels.npy")],
                "--val_data": [str(self.path("val_cubes.npy"))],
                "--val_labels": [str(self.path("val_labels.npy"))],
                "--test_data": [str(self.path("test_cubes.npy"))],
                "--test_labels": [str(self.path("test_labels.npy"))]}

    def cases(self, split: str) -> list[str]:
        """The case names of ``split`` (sorted), as the manifest records them."""
        prefix = f"{split}/images/"
        return sorted(rel[len(prefix):-4] for rel in self.manifest["files"]
                      if rel.startswith(prefix) and rel.endswith(".npy"))

    def segmentation_flags(self, train_cases: list[str]) -> dict[str, list[str]]:
        """Segmentation data flags: the training cases given, every validation and test case."""
        def files(split: str, what: str, cases: list[str]) -> list[str]:
            return [str(self.folder / split / what / f"{c}.npy") for c in cases]
        flags = {"--images": files("train", "images", train_cases),
                 "--masks": files("train", "masks", train_cases)}
        for split in ("val", "test"):
            cases = self.cases(split)
            flags[f"--{split}_images"] = files(split, "images", cases)
            flags[f"--{split}_masks"] = files(split, "masks", cases)
        return flags

    def write_cube_subset(self, idx: np.ndarray, folder: Path, chunk: int = 256) -> None:
        """Write the training cubes ``idx`` (sorted indices) and their labels into ``folder``
        (``train_cubes.npy``, ``train_labels.npy``), a chunk at a time, atomically."""
        cubes = np.load(self.path("train_cubes.npy"), mmap_mode="r")
        labels = np.load(self.path("train_labels.npy"))
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "train_cubes.npy", suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=cubes.dtype,
                                            shape=(len(idx),) + cubes.shape[1:])
            for a in range(0, len(idx), chunk):
                out[a:a + chunk] = cubes[idx[a:a + chunk]]
            out.flush()
            del out
        with atomic_path(folder / "train_labels.npy", suffix=".npy") as tmp:
            np.save(tmp, labels[idx])


def _read_manifest(folder: Path, task: str) -> tuple[dict[str, Any], Path]:
    fix = "prepare it with " + _PREPARE.format(task=task, folder=folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: --prepared is not a folder; {fix}")
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: missing: {folder} is not a folder prepared by "
                         f"scripts/prepare_target.py; {fix}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable manifest ({e}); {fix}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise InputError(f"{path}: not a target-task manifest (no files); {fix}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: format_version {manifest.get('format_version')!r}, this "
                         f"version reads {FORMAT_VERSION}; prepare the data again with this version")
    if manifest.get("task") != task:
        raise InputError(f"{path}: prepared for task {manifest.get('task')!r}, not {task}; give "
                         f"the folder prepared for {task}, or run the task it was prepared for")
    if manifest.get("complete") is not True:
        raise InputError(f"{path}: the preparation did not finish (complete is not true); run "
                         "the same prepare_target.py command again to finish it")
    return manifest, path


def _check_files(folder: Path, manifest: dict[str, Any], task: str) -> None:
    """Every recorded file present with its recorded size."""
    for rel, rec in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            raise InputError(f"{p}: recorded in {folder / 'manifest.json'} but missing; prepare "
                             f"the data again ({_PREPARE.format(task=task, folder=folder)})")
        size = os.path.getsize(p)
        if isinstance(rec, dict) and "size" in rec and int(rec["size"]) != size:
            raise InputError(f"{p}: {size} bytes, {rec['size']} recorded in the manifest (a "
                             "truncated or replaced file); prepare the data again")


def _check_cubes(folder: Path, manifest: dict[str, Any], input_size: list[int]) -> None:
    for split in SPLITS:
        for name in (f"{split}_cubes.npy", f"{split}_labels.npy"):
            if name not in manifest["files"]:
                raise InputError(f"{folder / 'manifest.json'}: records no {name}; prepare the "
                                 "data again")
        cubes = np.load(folder / f"{split}_cubes.npy", mmap_mode="r")
        labels = np.load(folder / f"{split}_labels.npy", mmap_mode="r")
        if cubes.ndim != 4 or list(cubes.shape[1:]) != list(input_size):
            raise InputError(f"{folder / f'{split}_cubes.npy'}: cubes of shape "
                             f"{tuple(cubes.shape)}, the protocol's input is "
                             f"{tuple(input_size)}; pass --input {' '.join(map(str, cubes.shape[1:]))} "
                             "to fine-tune at their size")
        if labels.shape != (cubes.shape[0],):
            raise InputError(f"{folder / f'{split}_labels.npy'}: {labels.shape} labels for "
                             f"{cubes.shape[0]} cubes; prepare the data again")


def _check_cases(folder: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    for split in SPLITS:
        for what in ("images", "masks"):
            d = folder / split / what
            on_disk = {p.name for p in d.glob("*.npy")} if d.is_dir() else set()
            recorded = {rel.rsplit("/", 1)[1] for rel in files
                        if rel.startswith(f"{split}/{what}/") and rel.endswith(".npy")}
            extra = sorted(on_disk - recorded)
            if extra:
                raise InputError(f"{d / extra[0]}: not recorded in the manifest ({len(extra)} "
                                 "such files): not written by the preparation; remove it or "
                                 "prepare the data again")
            if not recorded:
                raise InputError(f"{d}: no {what} recorded for {split}; prepare the data again")
        images = {r.rsplit("/", 1)[1] for r in files if r.startswith(f"{split}/images/")}
        masks = {r.rsplit("/", 1)[1] for r in files if r.startswith(f"{split}/masks/")}
        if images != masks:
            odd = sorted(images ^ masks)[0]
            raise InputError(f"{folder / split}: images and masks differ in names (e.g. {odd}); "
                             "prepare the data again")


def check_prepared(folder: str | os.PathLike, task: str, kind: str, input_size: list[int]
                   ) -> Prepared:
    """Check a prepared folder for ``task`` (see the module docstring); an ``InputError`` naming
    the file and the fix at the first problem."""
    folder = Path(folder)
    manifest, path = _read_manifest(folder, task)
    _check_files(folder, manifest, task)
    if kind == "classification":
        _check_cubes(folder, manifest, input_size)
    else:
        _check_cases(folder, manifest)
    return Prepared(folder, task, kind, manifest, file_identity(path))
