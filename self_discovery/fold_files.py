"""Writing the fold files of stage 3, one block of classes at a time, and resuming in place.

A block's ``.npy`` data files are created with ``np.lib.format.open_memmap`` (header, full size)
under temporary names and filled cube by cube with ``os.pwrite`` at the cube's row offset (no
mapping stays alive, ~6x faster than page-faulting a fresh mapping). When the block is complete
the label files are written and the data files renamed onto their final names; on any error
the temporaries are removed, so a crash never leaves a partial fold file.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from pytorch.common import atomic_path, save_npy_atomic
from pytorch.data import fold_file_names

__all__ = ["file_keys", "block_labels", "block_complete", "BlockFiles", "open_block"]

#: (split as in a CubeSpec, file prefix, resolution) of one data file of a block.
FileKey = tuple[str, str, int]


def file_keys(multi_res: bool) -> list[FileKey]:
    """The data files of a block: train resolutions 1 (and 2, 3 with ``multi_res``), then val 1."""
    keys = [("train", "train", r) for r in ((1, 2, 3) if multi_res else (1,))]
    return keys + [("validation", "val", 1)]


def block_labels(first: int, n_cls: int, per_class: int) -> np.ndarray:
    """Class indices of a block's rows: ``first`` .. ``first + n_cls - 1``, each ``per_class``
    times (cubes of one class are contiguous), int64 (n_cls * per_class,)."""
    return np.repeat(np.arange(first, first + n_cls, dtype=np.int64), per_class)


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
        if data.shape != (n, *cube) or data.dtype != np.float32 or labels.shape != (n, 1) \
                or not np.array_equal(labels[:, 0], want):
            return False
    return True


class BlockFiles:
    """The open data files of one block: ``write(key, row, cube)`` puts a float32 cube
    (X, Y, Z) at row ``row`` of the file of ``key`` = (split, resolution)."""

    def __init__(self, files: dict[tuple[str, int], tuple[int, int]], cube: tuple[int, int, int]):
        self._files = files                       # (split, res) -> (fd, offset of row 0)
        self._nbytes = 4 * cube[0] * cube[1] * cube[2]

    def write(self, key: tuple[str, int], row: int, cube: np.ndarray) -> None:
        fd, offset = self._files[key]
        data, at = memoryview(np.ascontiguousarray(cube, np.float32)).cast("B"), \
            offset + row * self._nbytes
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
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
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
