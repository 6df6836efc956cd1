"""Files a run writes: atomic writes (temporary file + rename), plain-type conversion for JSON
and checkpoints, run configs, and output folders owned by one run at a time
(``output_session``: a lock, finished results kept, temporaries of killed writes removed)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.errors import InputError

__all__ = ["to_plain", "atomic_path", "make_output_dir", "check_output_outside", "LOCK_NAME",
           "remove_stale_temporaries", "output_session", "save_npy_atomic", "save_json_atomic",
           "write_run_config"]


def to_plain(obj: Any) -> Any:
    """Convert ``obj`` to plain Python types accepted by ``torch.load(weights_only=True)``.

    Paths become str, numpy scalars/arrays become Python numbers/lists, Namespaces become dicts,
    tuples become lists, tensors are kept.
    """
    if obj is None or isinstance(obj, (bool, int, str, torch.Tensor)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":
        return to_plain(vars(obj))
    if isinstance(obj, (list, tuple, set)):
        return [to_plain(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0:
        return obj.item()  # numpy scalar
    if hasattr(obj, "tolist"):
        return obj.tolist()  # numpy array
    return str(obj)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed, so ``path`` is either the old file or the
    complete new one, never a partial write. ``suffix`` keeps an extension some writers
    need (``np.save`` appends ``.npy`` to names without it).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise InputError(f"{path.parent}: exists but is not a folder, so {path.name} cannot be "
                         "written there; choose another output folder") from e
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name for this output")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def make_output_dir(path: str | os.PathLike, flag: str = "output folder") -> Path:
    """``mkdir -p path``; a path that is a file (or under one) is an ``InputError`` naming ``flag``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise InputError(f"{path}: cannot create this folder ({e.strerror}); set {flag} to a "
                         "writable folder") from e
    return path


def check_output_outside(output: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                         out_flag: str, in_flag: str, both_ways: bool = False) -> None:
    """Refuse an output folder inside (or equal to) a folder the run reads: its files would be
    read as input by the next run. ``both_ways``: also an input inside the output folder."""
    o = Path(output).resolve()
    for item in inputs:
        r = Path(item).resolve()
        if o == r or r in o.parents or (both_ways and o in r.parents):
            raise InputError(f"{out_flag} {output} and {in_flag} {item} overlap: the outputs "
                             "would be read as input by the next run; choose an output folder "
                             "outside the input folders")


#: Lock file of a folder some run is writing into (holds the writer's process id).
LOCK_NAME = ".lock"


#: Temporary files of ``atomic_path``: ``.<name>.<random>.tmp[.suffix]``.
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp(\.\w+)?$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(folder: Path, flag: str) -> tuple[Path, bool]:
    """Create ``folder/.lock`` exclusively with our pid; a lock of a dead process is reclaimed.
    Returns (the lock, whether a dead run's lock was taken over: that run was interrupted)."""
    lock = folder / LOCK_NAME
    stale = False
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text(encoding="utf-8").split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            if pid is not None and _pid_alive(pid):
                raise InputError(f"{folder}: another run (process {pid}) is writing into this "
                                 f"folder; wait for it to end or choose another {flag} (if no "
                                 f"run is writing there, remove {lock})") from None
            print(f"note: {lock}: lock of a run that no longer exists, taken over",
                  file=sys.stderr)
            lock.unlink(missing_ok=True)
            stale = True
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        return lock, stale
    raise InputError(f"{lock}: cannot take this lock; remove it if no run is writing into {folder}")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed atomic write left in ``folder`` and its direct
    sub-folders (call it only while holding the folder's lock); returns them."""
    folder = Path(folder)
    found = []
    for d in [folder] + sorted(p for p in folder.iterdir() if p.is_dir()):
        for p in d.iterdir():
            if _TEMPORARY.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                found.append(p)
    if found:
        print(f"note: removed {len(found)} temporary file(s) left by an interrupted run in "
              f"{folder}", file=sys.stderr)
    return found


@contextmanager
def output_session(folder: str | os.PathLike, flag: str, finished: Iterable[str | os.PathLike] = (),
                   overwrite: bool = False, continue_flag: str | None = "--resume",
                   continuing: bool = False, enabled: bool = True,
                   unfinished: str | None = None) -> Iterator[Path]:
    """Own ``folder`` while a run writes into it.

    A finished result of an earlier run (any path of ``finished`` that exists) is kept: the run
    stops with an error naming it unless ``overwrite`` (``--overwrite``) or ``continuing``
    (``continue_flag``, e.g. ``--resume``). ``unfinished``: the caller's reason to think those
    files are an interrupted run's, not a finished result (e.g. "no fold_index.json"); the
    error then says so, as it does when the lock of a run that no longer exists is found. A
    lock file (``.lock``, created exclusively, holding the process id; one of a dead process is
    taken over) stops a second run writing into the same folder, and temporaries of interrupted
    writes are removed. ``enabled=False`` (other ranks of a distributed run) only yields the
    folder.
    """
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    make_output_dir(folder, flag)
    lock, stale = _take_lock(folder, flag)   # first: a run still writing there says more
    try:
        existing = [Path(p) for p in finished if Path(p).exists()]
        if existing and not (overwrite or continuing):
            raise InputError(_kept_message(existing, flag, continue_flag,
                                           unfinished or ("its run was interrupted: it left its "
                                                          "lock" if stale else None)))
        if existing and overwrite and not continuing:
            print(f"note: --overwrite: replacing {existing[0]}"
                  + (f" and {len(existing) - 1} more" if len(existing) > 1 else ""),
                  file=sys.stderr)
        remove_stale_temporaries(folder)
        yield folder
    finally:
        lock.unlink(missing_ok=True)


def _kept_message(existing: list[Path], flag: str, continue_flag: str | None,
                  unfinished: str | None) -> str:
    """The error of ``output_session`` when files of an earlier run are in the way: a finished
    result, or (``unfinished`` says why) the files of an interrupted run."""
    more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
    if unfinished:
        cont = f"continue it with {continue_flag}, " if continue_flag else ""
        return (f"{existing[0]}{more}: files of an interrupted run are there ({unfinished}); "
                f"{cont}pass --overwrite to start again, or choose another {flag}")
    cont = f" or {continue_flag} to continue it" if continue_flag else ""
    return (f"{existing[0]}{more}: an earlier run's result is there and is kept; pass "
            f"--overwrite to replace it{cont}, or choose another {flag}")


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``np.save`` atomically."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


def save_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` (converted to plain types) as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_plain(obj), indent=2, sort_keys=True) + "\n",
                       encoding="utf-8")
    return Path(path)


def write_run_config(args: argparse.Namespace | dict, out_dir: str | os.PathLike,
                     name: str = "config.json") -> Path:
    """Write the resolved configuration of a run next to its outputs."""
    cfg = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return save_json_atomic(Path(out_dir) / name, cfg)
