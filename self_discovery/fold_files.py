"""The fold files: the one contract between stage 3 (writer) and pretraining (reader).

For every block of ``CLASSES_PER_BLOCK`` classes k = 1, 2, ... (the last block may hold fewer)::

    train_data{r}_vwGen_ex_ref_fold{k}.0.npy   float32 (nb_instances * classes_in_block, X, Y, Z)
    train_label{r}_vwGen_ex_ref_fold{k}.0.npy  int64 (same N, 1): class index 0..C-1
    val_data1_vwGen_ex_ref_fold{k}.0.npy       float32 (nb_instances_val * classes_in_block, X, Y, Z)
    val_label1_vwGen_ex_ref_fold{k}.0.npy      int64 (same N, 1)

for train resolutions r = 1..n (validation: resolution 1 only). Cubes of one class are
contiguous, classes ascending, so "the first C classes" are the first rows. ``fold_index.json``
is written last, listing the files of the finished run with their sizes and SHA-256; the reader
refuses files it does not list and files whose content is not the recorded one (another run's
file of the same shape, a copy from elsewhere).

Writing (stage 3): a block's data files are created with ``np.lib.format.open_memmap``
(header, full size) under temporary names and filled cube by cube with ``os.pwrite`` at the
cube's row offset (no mapping stays alive, ~6x faster than page-faulting a fresh mapping).
When the block is complete the label files are written and the data files renamed onto their
final names; on any error the temporaries are removed, so a crash never leaves a partial file.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from runtime.errors import InputError
from runtime.files import atomic_path, save_json_atomic, save_npy_atomic
from runtime.provenance import file_identities

__all__ = ["CLASSES_PER_BLOCK", "FOLD_INDEX", "FOLD_GLOB", "CUBE_DTYPE", "LABEL_DTYPE",
           "fold_file_names", "fold_blocks", "file_keys", "block_labels", "write_fold_index",
           "check_fold_index", "read_fold_index", "recorded_fold_identities",
           "files_match_index", "block_complete", "BlockFiles", "open_block", "STAGING",
           "commit_staging"]

#: Classes per group of fold files (the published block of 50).
CLASSES_PER_BLOCK = 50
#: Written last by the pattern generator: the fold files of a finished run and their sizes.
FOLD_INDEX = "fold_index.json"
#: Matches every fold file (data and labels) of a folder.
FOLD_GLOB = "*_vwGen_ex_ref_fold*.npy"
#: What the pattern generator writes: cubes (N, X, Y, Z) and labels (N, 1).
CUBE_DTYPE, LABEL_DTYPE = np.float32, np.int64

#: (split as in a CubeSpec, file prefix, resolution) of one data file of a block.
FileKey = tuple[str, str, int]


def fold_file_names(prefix: str, resolution: int, k: int) -> tuple[str, str]:
    """(data file, label file) names of ``prefix`` "train" or "val", e.g.
    ``train_data2_vwGen_ex_ref_fold1.0.npy``."""
    return (f"{prefix}_data{resolution}_vwGen_ex_ref_fold{k}.0.npy",
            f"{prefix}_label{resolution}_vwGen_ex_ref_fold{k}.0.npy")


def fold_blocks(nb_classes: int, per_block: int = CLASSES_PER_BLOCK) -> list[tuple[int, int]]:
    """``[(k, classes of block k), ...]`` for ``nb_classes`` classes; k starts at 1 and block k
    holds classes ``(k - 1) * per_block`` onwards."""
    if nb_classes < 1:
        raise InputError(f"the number of classes must be >= 1, got {nb_classes}")
    nb = math.ceil(nb_classes / per_block)
    return [(k, min(per_block, nb_classes - (k - 1) * per_block)) for k in range(1, nb + 1)]


def write_fold_index(folder: Path, nb_classes: int, names: list[str]) -> None:
    """Record the fold files ``names`` of a finished run (name -> size in bytes and SHA-256),
    atomically; call it when every block is complete. Fold files of an earlier run left in
    ``folder`` (more blocks) are not listed, so the reader refuses them."""
    names = sorted(names)
    idents = file_identities([Path(folder) / n for n in names])
    save_json_atomic(Path(folder) / FOLD_INDEX, {"nb_classes": int(nb_classes),
                                                 "files": dict(zip(names, idents))})


def read_fold_index(folder: Path, fix: str = "re-create the folder with "
                    "self_discovery/pattern_generator_3D.py") -> dict[str, dict] | None:
    """The files ``fold_index.json`` of ``folder`` lists, as {name: {"size"[, "sha256"]}}
    (indexes of older versions recorded sizes only); None without an index."""
    index_path = Path(folder) / FOLD_INDEX
    if not index_path.is_file():
        return None
    try:
        files = json.loads(index_path.read_text(encoding="utf-8"))["files"]
        return {str(n): ({"size": int(v)} if isinstance(v, int) else
                         {"size": int(v["size"]), **({"sha256": str(v["sha256"])}
                                                     if "sha256" in v else {})})
                for n, v in dict(files).items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index_path}: unreadable ({e}); {fix}") from e


def _mismatched(folder: Path, files: Mapping[str, dict], names: list[str]) -> tuple[str, str]:
    """(first of ``names`` that is not as ``files`` records it, why) or ("", "")."""
    for name in names:
        path = folder / name
        if name not in files:
            return name, "not listed"
        if not path.is_file() or path.stat().st_size != files[name]["size"]:
            return name, "another size"
    hashed = [n for n in names if "sha256" in files[n]]
    for name, ident in zip(hashed, file_identities([folder / n for n in hashed])):
        if ident["sha256"] != files[name]["sha256"]:
            return name, "other content of the same size"
    return "", ""


def files_match_index(folder: Path, names: list[str]) -> bool:
    """True when ``fold_index.json`` of ``folder`` lists every file of ``names`` with its
    current size and content."""
    files = read_fold_index(folder)
    return files is not None and not _mismatched(Path(folder), files, names)[0]


def check_fold_index(folder: Path, names: list[str]) -> None:
    """Refuse fold files of an interrupted or mixed pattern-generator run.

    With ``fold_index.json``, every file of ``names`` must be listed there with its size and
    SHA-256 (every byte is read). Without it, a folder the pattern generator wrote into
    (``coordinates.csv`` or ``config.json`` there) is incomplete; folders without either (the
    published data, hand-made files) are read as is.
    """
    folder = Path(folder)
    index_path = folder / FOLD_INDEX
    fix = ("resume it with self_discovery/pattern_generator_3D.py --output_dir "
           f"{folder} --prev_coordinates {folder / 'coordinates.csv'}, or re-run it with --overwrite")
    files = read_fold_index(folder, fix)
    if files is None:
        if (folder / "coordinates.csv").is_file() or (folder / "config.json").is_file():
            raise InputError(f"{folder}: the pattern generator has not finished writing here (no "
                             f"{FOLD_INDEX}: the run was interrupted or is still running); {fix}")
        return
    name, why = _mismatched(folder, files, names)
    if name:
        raise InputError(f"{folder / name}: not the file the pattern generator finished with "
                         f"({why} than {index_path} records: a file of another run or a "
                         f"damaged copy); {fix}")


def recorded_fold_identities(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "sha256"}} of the fold files ``names``: as ``fold_index.json`` records
    them (``check_fold_index`` verifies the files against it), or hashed now for folders
    without an index (the published data)."""
    files = read_fold_index(folder) or {}
    if all("sha256" in files.get(n, {}) for n in names):
        return {n: files[n] for n in names}
    return dict(zip(names, file_identities([Path(folder) / n for n in names])))


#: Hidden sub-folder of --output_dir where a run that replaces or extends a finished result
#: writes its files; they are moved into place only when every block is complete.
STAGING = ".staging"


def commit_staging(staging: Path, folder: Path, last: list[str]) -> None:
    """Move every file of ``staging`` (fold files, montage/, ...) into ``folder``, the names
    of ``last`` (coordinates.csv, config.json) after the others, then remove ``staging``.
    Each move is an atomic rename; the caller writes ``fold_index.json`` afterwards."""
    moved = sorted((p for p in staging.rglob("*") if p.is_file()),
                   key=lambda p: (p.name in last, last.index(p.name) if p.name in last else 0))
    for src in moved:
        dst = folder / src.relative_to(staging)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    shutil.rmtree(staging, ignore_errors=True)


def file_keys(resolutions: int) -> list[FileKey]:
    """The data files of a block: train resolutions 1..``resolutions``, then validation 1."""
    return [("train", "train", r) for r in range(1, resolutions + 1)] + [("validation", "val", 1)]


def block_labels(first: int, n_cls: int, per_class: int) -> np.ndarray:
    """Class indices of a block's rows: ``first`` .. ``first + n_cls - 1``, each ``per_class``
    times (cubes of one class are contiguous), int64 (n_cls * per_class,)."""
    return np.repeat(np.arange(first, first + n_cls, dtype=LABEL_DTYPE), per_class)


def block_complete(save: Path, k: int, keys: list[FileKey], counts: dict[str, int],
                   first: int, n_cls: int, cube: tuple[int, int, int]) -> bool:
    """True when every file of block ``k`` exists with the rows and labels of its classes
    (``counts[split]`` cubes per class, float32 cubes ``cube``, int64 labels (N, 1))."""
    for split, prefix, res in keys:
        data_name, label_name = fold_file_names(prefix, res, k)
        n = counts[split] * n_cls
        try:
            data = np.load(save / data_name, mmap_mode="r")
            labels = np.load(save / label_name)
        except (OSError, ValueError):
            return False
        want = block_labels(first, n_cls, counts[split])
        if data.shape != (n, *cube) or data.dtype != CUBE_DTYPE or labels.shape != (n, 1) \
                or labels.dtype != LABEL_DTYPE or not np.array_equal(labels[:, 0], want):
            return False
    return True


class BlockFiles:
    """The open data files of one block: ``write(key, row, cube)`` puts a float32 cube
    (X, Y, Z) at row ``row`` of the file of ``key`` = (split, resolution)."""

    def __init__(self, files: dict[tuple[str, int], tuple[int, int]], cube: tuple[int, int, int]):
        self._files = files                       # (split, res) -> (fd, offset of row 0)
        self._nbytes = np.dtype(CUBE_DTYPE).itemsize * cube[0] * cube[1] * cube[2]

    def write(self, key: tuple[str, int], row: int, cube: np.ndarray) -> None:
        fd, offset = self._files[key]
        data = memoryview(np.ascontiguousarray(cube, CUBE_DTYPE)).cast("B")
        at = offset + row * self._nbytes
        while len(data):
            n = os.pwrite(fd, data, at)
            data, at = data[n:], at + n


@contextmanager
def open_block(save: Path, k: int, keys: list[FileKey], counts: dict[str, int], first: int,
               n_cls: int, cube: tuple[int, int, int]) -> Iterator[BlockFiles]:
    """Yield the ``BlockFiles`` of block ``k`` (classes ``first`` .. ``first + n_cls - 1``,
    ``counts[split]`` cubes per class); on success the labels are written and the data files
    renamed onto their names, on error the temporaries are removed."""
    with ExitStack() as temporaries:           # atomic_path: renames on success, else removes
        files = {}
        with ExitStack() as descriptors:
            for split, prefix, res in keys:
                data_name, _ = fold_file_names(prefix, res, k)
                tmp = temporaries.enter_context(atomic_path(save / data_name, suffix=".npy"))
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=CUBE_DTYPE,
                                               shape=(counts[split] * n_cls, *cube))
                offset = int(mm.offset)
                del mm
                fd = os.open(tmp, os.O_WRONLY)
                descriptors.callback(os.close, fd)
                files[(split, res)] = (fd, offset)
            yield BlockFiles(files, cube)
        for split, prefix, res in keys:
            _, label_name = fold_file_names(prefix, res, k)
            labels = block_labels(first, n_cls, counts[split])
            save_npy_atomic(save / label_name, labels.reshape(-1, 1))
