"""Small utilities shared by every stage: atomic writes, devices, seeding, run configs."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import CheckpointError, InputError, atomic_path, to_plain

__all__ = ["REPO_ROOT", "ArgumentParser", "HelpFormatter", "positive_int", "nonneg_int",
           "seed_int", "positive_float", "nonneg_float", "finite_float", "fraction",
           "probability", "device_name", "atomic_path", "save_npy_atomic", "save_json_atomic",
           "resolve_device", "full_device", "seed_everything", "write_run_config",
           "early_stopping_update", "check_finite_training", "InputError",
           "call_reporting_errors", "one_line", "check_real_array",
           "make_output_dir", "check_output_outside", "LOCK_NAME", "add_overwrite_flag", "AMP_CHOICES", "add_amp_flag",
           "add_resume_flag", "resume_path", "output_session",
           "remove_stale_temporaries", "summary_writer", "middle_slice_grid", "save_png"]

#: The repository root; CLI defaults are relative to the working directory, as in the reference.
REPO_ROOT = Path(__file__).resolve().parents[1]


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every CLI: a bad flag is one ``error: ...`` line and exit code 2, like the
    errors ``call_reporting_errors`` reports (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {one_line(message)}; see {self.prog} --help\n")


def _number(text: str, kind: type, test: Callable[[Any], bool], what: str) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if (kind is float and not math.isfinite(value)) or not test(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sizes, counts, widths, epochs)."""
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0 (workers, borders)."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**63)."""
    return _number(text, int, lambda v: 0 <= v < 2**63, "a seed in [0, 2**63)")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates, spacings)."""
    return _number(text, float, lambda v: v > 0, "a finite number > 0")


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0 (loss weights, distances, weight decay)."""
    return _number(text, float, lambda v: v >= 0, "a finite number >= 0")


def finite_float(text: str) -> float:
    """argparse type: any finite number (HU window ends)."""
    return _number(text, float, lambda v: True, "a finite number")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1) (hold-out fractions, overlaps)."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number(text, float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def device_name(text: str) -> str:
    """argparse type (and the rule of ``resolve_device``): ``auto``, ``cpu``, or ``cuda`` /
    ``cuda:N`` of a visible GPU. Anything else (``mps``, ``meta``, typos) is refused."""
    name = str(text).strip().lower()
    if name in ("auto", "cpu"):
        return name
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device of this tool; use auto, cpu, "
                                         "cuda or cuda:N")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is visible; use cpu or auto")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA "
                                         "device(s) are visible")
    return name


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` formatter of every CLI: shows "(default: ...)" only where a default value
    exists (not for None, "", required options or on/off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.required or action.default == "" \
                or action.default is argparse.SUPPRESS \
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help or ""
        return super()._get_help_string(action)


def make_output_dir(path: str | os.PathLike, flag: str = "output folder") -> Path:
    """``mkdir -p path``; a path that is a file (or under one) is an ``InputError`` naming ``flag``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise InputError(f"{path}: cannot create this folder ({e.strerror}); set {flag} to a "
                         "writable folder") from e
    return path


def summary_writer(log_dir: str | os.PathLike, flag: str = "--log_dir") -> Any:
    """A TensorBoard ``SummaryWriter`` on ``log_dir`` (created; see ``make_output_dir``)."""
    from torch.utils.tensorboard import SummaryWriter  # imported only where curves are written
    return SummaryWriter(str(make_output_dir(log_dir, flag)))


#: Longest error line printed; the middle of a longer message (a list of thousands of names,
#: say) is replaced by "... (N more characters) ...", keeping its start and the fix at its end.
MAX_MESSAGE = 600


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` as one readable line: an error re-raised from a DataLoader worker ("Caught
    InputError in DataLoader worker process 0. Original Traceback ...") becomes its original
    message, newlines become spaces, and a message over ``limit`` characters keeps its first
    two thirds and last third around "... (N more characters) ..."."""
    text = str(message).strip()
    if "Original Traceback" in text:  # torch.utils.data's ExceptionWrapper
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        text = re.sub(r"^[\w.]*(InputError|CheckpointError|Error): ", "", last)
    text = " ".join(text.split())
    if len(text) > limit:
        head, tail = (2 * limit) // 3, limit // 3
        text = f"{text[:head]} ... ({len(text) - head - tail} more characters) ... {text[-tail:]}"
    return text


def call_reporting_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """Call ``fn``; bad user input (``InputError``, ``CheckpointError``) and operating-system
    errors (read-only or full disk, missing permission: ``OSError`` naming the path) become one
    ``error: ...`` line on stderr (see ``one_line``) and ``(False, None)``, so every CLI's
    ``main`` ends the same way (exit code 2, no traceback). Returns ``(True, result)`` otherwise."""
    try:
        return True, fn(*args, **kwargs)
    except (InputError, CheckpointError) as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return False, None
    except OSError as e:
        where = e.filename if e.filename is not None else "output"
        why = e.strerror or one_line(str(e))
        fix = "check that the path exists, is writable and the disk has free space"
        print(f"error: {one_line(f'{where}: {why}; {fix}')}", file=sys.stderr)
        return False, None


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


def add_overwrite_flag(group: Any, what: str) -> None:
    """``--overwrite``: the one flag that lets a run replace a finished result."""
    group.add_argument("--overwrite", action="store_true",
                       help=f"replace {what} of an earlier run in the output folder (without it "
                            "a finished result is kept and the run stops with an error)")


#: ``--amp`` values of every CLI: auto = bf16 autocast on CUDA and fp32 on CPU.
AMP_CHOICES = ("auto", "bf16", "fp32")


def add_amp_flag(group: Any, default: str = "auto", note: str = "") -> None:
    """``--amp {auto,bf16,fp32}``, the same in every CLI. The earlier switch form stays valid:
    ``--amp`` alone means auto (bf16 on CUDA, no effect on CPU, as the switch did) and
    ``--no-amp`` means fp32."""
    group.add_argument("--amp", nargs="?", const="auto", choices=AMP_CHOICES, default=default,
                       help="mixed precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16; "
                            f"fp32 (--amp alone: auto){note}")
    group.add_argument("--no-amp", dest="amp", action="store_const", const="fp32",
                       default=argparse.SUPPRESS, help="alias of --amp fp32")


def add_resume_flag(group: Any, last: str, what: str) -> None:
    """``--resume [PATH]``, the same in every CLI: continue an interrupted run from PATH, or
    without a value (or ``auto``) from the run's own last checkpoint ``last``."""
    group.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                       help=f"continue an interrupted run ({what}) from the checkpoint PATH; "
                            f"without a value (or 'auto') from {last}")


def resume_path(resume: str | None, last: str | os.PathLike) -> Path | None:
    """The checkpoint ``--resume`` names: None without it, ``last`` for ``auto``."""
    if not resume:
        return None
    return Path(last) if resume == "auto" else Path(resume)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(folder: Path, flag: str) -> Path:
    """Create ``folder/.lock`` exclusively with our pid; a lock of a dead process is reclaimed."""
    lock = folder / LOCK_NAME
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
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        return lock
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
                   continuing: bool = False, enabled: bool = True) -> Iterator[Path]:
    """Own ``folder`` while a run writes into it.

    A finished result of an earlier run (any path of ``finished`` that exists) is kept: the run
    stops with an error naming it unless ``overwrite`` (``--overwrite``) or ``continuing``
    (``continue_flag``, e.g. ``--resume``). A lock file (``.lock``, created exclusively, holding
    the process id; one of a dead process is taken over) stops a second run writing into the
    same folder, and temporaries of interrupted writes are removed. ``enabled=False`` (other
    ranks of a distributed run) only yields the folder.
    """
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    make_output_dir(folder, flag)
    lock = _take_lock(folder, flag)   # first: a run still writing there is the better message
    try:
        existing = [Path(p) for p in finished if Path(p).exists()]
        if existing and not (overwrite or continuing):
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            cont = f" or {continue_flag} to continue it" if continue_flag else ""
            raise InputError(f"{existing[0]}{more}: an earlier run's result is there and is "
                             f"kept; pass --overwrite to replace it{cont}, or choose another "
                             f"{flag}")
        if existing and overwrite and not continuing:
            print(f"note: --overwrite: replacing {existing[0]}"
                  + (f" and {len(existing) - 1} more" if len(existing) > 1 else ""),
                  file=sys.stderr)
        remove_stale_temporaries(folder)
        yield folder
    finally:
        lock.unlink(missing_ok=True)


def check_real_array(arr: np.ndarray, path: str | os.PathLike, fix: str,
                     allow_bool: bool = False) -> np.ndarray:
    """The dtype rule of every array a stage reads: real numbers (integers or floats; booleans
    where ``allow_bool``), never complex, strings or objects; an ``InputError`` naming ``path``
    and ``fix`` otherwise. Returns ``arr``."""
    if arr.dtype.kind not in ("iufb" if allow_bool else "iuf"):
        raise InputError(f"{path}: values of dtype {arr.dtype}, expected real numbers; {fix}")
    return arr


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


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; other names as ``device_name`` accepts them
    (an ``InputError`` otherwise)."""
    try:
        name = device_name(name)
    except argparse.ArgumentTypeError as e:
        raise InputError(f"--device {e}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def full_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so devices compare equal to ``tensor.device``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (the reference seeded only ``random``); return a CPU
    ``torch.Generator`` seeded with ``seed`` for code that takes explicit randomness."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def check_finite_training(model: torch.nn.Module, epoch: int, train_loss: float,
                          val_loss: float, fix: str) -> None:
    """Stop a run whose loss or weights stopped being finite: an ``InputError`` (one line,
    ``fix`` says what to change) raised before the epoch's checkpoints are written, so the
    last good ones stay. One host read for all weights."""
    sums = [p.detach().float().sum() for p in model.parameters()]
    weights_ok = bool(torch.isfinite(torch.stack(sums)).all()) if sums else True
    if not (math.isfinite(train_loss) and math.isfinite(val_loss) and weights_ok):
        what = "weights" if weights_ok is False else "loss"
        raise InputError(f"epoch {epoch}: non-finite {what} (train loss {train_loss:.4g}, val "
                         f"loss {val_loss:.4g}); the checkpoints of the last good epoch are kept; "
                         f"{fix}")


def early_stopping_update(val_loss: float, best_loss: float, no_improve: int,
                          patience: int) -> tuple[bool, float, int, bool]:
    """One epoch's early-stopping bookkeeping (the reference's rule), shared by the training CLIs.

    Returns (improved, new best loss, epochs without improvement, stop now).
    """
    if val_loss < best_loss:
        return True, val_loss, 0, False
    return False, best_loss, no_improve + 1, no_improve + 1 >= patience


def middle_slice_grid(rows: list[list[np.ndarray | torch.Tensor]], pad: int = 2,
                      min_tile: int = 0) -> np.ndarray:
    """Tile middle z-slices of cubes into one grayscale image.

    ``rows[r][c]`` is a cube (X, Y, Z) or (1, X, Y, Z) with values in [0, 1]; each tile is its
    slice at Z // 2, so a row can show original | perturbed | restored. With ``min_tile``, the
    slices are enlarged by the smallest integer factor (nearest neighbour: every voxel a square)
    that makes each tile at least ``min_tile`` pixels on a side.
    Returns a float32 image (H, W) in [0, 1] (use ``dataformats="HW"`` for TensorBoard).
    """
    tiles = [[np.asarray(c.detach().float().cpu() if isinstance(c, torch.Tensor) else c,
                         dtype=np.float32).reshape(c.shape[-3:]) for c in row] for row in rows]
    h = max(t.shape[0] for row in tiles for t in row)
    w = max(t.shape[1] for row in tiles for t in row)
    ncols = max(len(row) for row in tiles)
    k = max(1, -(-min_tile // min(h, w)))  # ceil(min_tile / smallest side)
    h, w = h * k, w * k
    img = np.ones(((h + pad) * len(tiles) + pad, (w + pad) * ncols + pad), np.float32)
    for r, row in enumerate(tiles):
        for c, cube in enumerate(row):
            sl = cube[:, :, cube.shape[2] // 2].repeat(k, axis=0).repeat(k, axis=1)
            y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
            img[y0:y0 + sl.shape[0], x0:x0 + sl.shape[1]] = np.clip(sl, 0, 1)
    return img


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a grayscale (H, W) or RGB (H, W, 3) image with values in [0, 1] as an 8-bit PNG,
    atomically.

    A minimal encoder (zlib + CRC chunks) so no imaging library is needed.
    """
    import struct
    import zlib

    img = (np.clip(np.asarray(image, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"save_png expects (H, W) or (H, W, 3), got {img.shape}")
    color_type = 0 if img.ndim == 2 else 2
    rows = img.reshape(img.shape[0], -1)
    raw = np.concatenate([np.zeros((img.shape[0], 1), np.uint8), rows], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, color_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return Path(path)
