"""The one checkpoint schema of this project, and loading of published checkpoints.

A checkpoint is a ``dict`` saved with ``torch.save`` that holds only tensors and plain Python
types (str, int, float, bool, None, list, tuple, dict), so that ``torch.load(path)`` (which
in current PyTorch defaults to ``weights_only=True``) reads it, as the original README's
fine-tuning snippet does, and so that loading never runs code from the file.

Keys (the first five are the published ones; every writer here fills all of them):

================================ ==========================================================
``state_dict``                   the *unwrapped* model's weights (no ``module.`` or
                                 ``_orig_mod.`` prefix)
``optimizer_state_dict``         ``optimizer.state_dict()`` (or ``{}``)
``epoch``                        int, number of epochs completed
``best_loss``                    float, best validation loss so far
``num_epoch_no_improvement``     int, epochs since ``best_loss`` improved
``scheduler_state_dict``         lr scheduler state (or ``{}``)
``arch``                         str, e.g. ``"YNet3D"``, ``"ClassificationNet3D"``, ``"UNet3D"``
``model_config``                 dict of constructor arguments (``width``, ``cls_classes`` ...)
``config``                       the resolved run configuration (plain types)
``schema_version``               int, ``SCHEMA_VERSION``
``extra``                        dict, free-form plain data (e.g. losses, learning rate)
================================ ==========================================================

Files are written atomically (temporary file in the same folder, then ``os.replace``), so a
crash never leaves a truncated checkpoint under the final name.
"""
from __future__ import annotations

import math
import os
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime.errors import CheckpointError, InputError
from runtime.files import atomic_path, to_plain

__all__ = [
    "SCHEMA_VERSION",
    "DECODER_PREFIXES",
    "CheckpointError",
    "InputError",
    "to_plain",
    "atomic_path",
    "atomic_torch_save",
    "save_checkpoint",
    "resolve_checkpoint_path",
    "read_checkpoint_file",
    "load_checkpoint",
    "checkpoint_dict",
    "infer_model_config",
    "load_training_state",
    "training_counters",
    "checked_model_config",
    "clean_state_dict",
    "strip_prefixes",
    "unwrap_model",
    "load_state_dict_checked",
    "load_pretrained",
    "CHECKPOINT_KINDS",
    "CheckpointInfo",
    "describe_checkpoint",
]

SCHEMA_VERSION = 1

#: Prefixes stripped from published or wrapped checkpoints before matching keys.
STRIP_PREFIXES = ("module.", "_orig_mod.", "classficationNet.", "classificationNet.")
#: Key prefixes of the U-Net decoder (absent from encoder-only networks).
DECODER_PREFIXES = ("up_tr256", "up_tr128", "up_tr64", "out_tr")
#: Key prefixes of published checkpoints that never belong to our networks.
IGNORED_PREFIXES = ("projection_head.", "prototypes.")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module under DataParallel / DistributedDataParallel / torch.compile."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, epoch: int = 0, best_loss: float = math.inf,
                    num_epoch_no_improvement: int = 0, arch: str | None = None,
                    model_config: Mapping[str, Any] | None = None,
                    config: Any = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint of the unwrapped ``model`` atomically; see the module docstring."""
    model = unwrap_model(model)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
        "best_loss": float(best_loss),
        "num_epoch_no_improvement": int(num_epoch_no_improvement),
        "scheduler_state_dict": scheduler.state_dict() if scheduler is not None else {},
        "arch": arch or type(model).__name__,
        "model_config": to_plain(dict(model_config or {})),
        "config": to_plain(config if config is not None else {}),
        "schema_version": SCHEMA_VERSION,
        "extra": to_plain(dict(extra or {})),
    }
    return atomic_torch_save(payload, path)


def _numpy_scalar_globals() -> list[Any]:
    """The only globals besides PyTorch's own that checkpoints may need: NumPy scalars.

    The published ``pytorch/train.py`` stored ``best_loss``/``best_acc`` from ``np.average``,
    i.e. NumPy scalars, which pickle as ``numpy.core.multiarray.scalar`` (``numpy._core...``
    under NumPy 2) applied to a ``numpy.dtype`` and raw bytes. Allowed here: that constructor
    under both names, ``numpy.dtype``, and the dtype classes of bool, integer and float scalars
    (needed to restore a dtype's state). Nothing else: no arrays, no object dtype, no code.
    """
    try:
        from numpy._core import multiarray  # local: NumPy 1/2 fallback, needed only here
    except ImportError:  # NumPy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    scalar = multiarray.scalar
    dtype_classes = {type(np.dtype(c)) for c in "?bhilqBHILQefdg"}
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, *sorted(dtype_classes, key=lambda t: t.__name__)]


def _refused_global(error: BaseException) -> str | None:
    """The global named by PyTorch's weights-only unpickler error, if that is what failed."""
    text = str(error)
    for pattern in (r"GLOBAL ([\w.]+)", r"unrecognized function (\S+)",
                    r"allowlisted via `add_safe_globals` but got (\S+)"):
        found = re.search(pattern, text)
        if found:
            name = found.group(1).strip("<>'\".,")
            return name if "." in name else f"builtins.{name}"  # torch drops "builtins."
    return None


def _is_truncated(path: Path, error: BaseException) -> bool:
    """Whether ``path`` starts like a ``torch.save`` file but its end is missing."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # zip format (torch >= 1.6): the directory at the end is gone
        return not zipfile.is_zipfile(path)
    # the legacy format (the published checkpoint's): a pickle stream that stops early
    return head[:1] == b"\x80" and (isinstance(error, EOFError) or any(
        s in str(error) for s in ("truncated", "Ran out of input", "unexpected EOF")))


def _plain_scalar(value: Any) -> Any:
    """A NumPy scalar (published ``best_loss``/``best_acc``) as the Python number it holds."""
    return value.item() if isinstance(value, np.generic) else value


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """The file a checkpoint path names, the same for every stage: ``path`` itself, or, when
    ``path`` is a missing ``.h5`` (the published README's Keras names, e.g.
    ``Unet_autoencoder.h5``), its ``.pt`` sibling where that exists (this project writes
    ``.pt``), with a note saying so."""
    path = Path(path)
    if path.suffix.lower() == ".h5" and not path.exists() and path.with_suffix(".pt").is_file():
        if str(path) not in _H5_NOTED:        # once per file, however often it is read
            _H5_NOTED.add(str(path))
            print(f"note: {path} not found; reading {path.with_suffix('.pt').name} beside it "
                  "(this implementation writes PyTorch .pt checkpoints)", file=sys.stderr)
        return path.with_suffix(".pt")
    return path


_H5_NOTED: set[str] = set()


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def read_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` that also accepts NumPy scalars, and nothing else.

    Never unpickles arbitrary objects. Errors (``CheckpointError``, one line naming the file):
    not found; truncated; needs a global that is refused (named, with why); not a ``torch.save``
    file at all.
    """
    given = Path(path)
    path = resolve_checkpoint_path(given)
    if not path.is_file():
        beside = (f" (nor {given.with_suffix('.pt').name} beside it)"
                  if given.suffix.lower() == ".h5" else "")
        raise CheckpointError(f"{path}: checkpoint not found{beside}; check the path "
                              "(--weights/--pre_path/--resume)")
    if _is_hdf5(path):
        raise CheckpointError(f"{path}: a Keras/HDF5 file (the published TensorFlow code's "
                              "format), which this PyTorch implementation does not read; give "
                              "a .pt checkpoint written by this project")
    try:
        present = torch.serialization.get_safe_globals()  # the caller's stay after the load
        allowed = [g for g in _numpy_scalar_globals() if g not in present]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- every failure to parse the file is reported below
        if _is_truncated(path, e):
            raise CheckpointError(
                f"{path}: truncated ({path.stat().st_size} bytes, the end of the file is missing); "
                "re-download or re-create it") from e
        name = _refused_global(e)
        if name is not None:
            raise CheckpointError(
                f"{path}: refused: the file needs the Python global {name}, which is not a tensor, "
                "plain Python value or NumPy scalar, so unpickling it could run code from the file "
                "(only weights-only loading is done here); use a checkpoint that holds only "
                "weights and numbers, from a source you trust") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split(". ")[0][:160]  # torch's zip errors run on for several sentences
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (not a torch.save file: "
            f"{type(e).__name__}: {first}); check the path, or re-create it") from e


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint (see :func:`read_checkpoint_file`); errors name the file and the fix.

    Accepts our schema, the published format (a dict with ``state_dict``; its NumPy scalars are
    returned as Python numbers) and a bare state dict (returned as ``{"state_dict": ...}``).
    """
    return checkpoint_dict(read_checkpoint_file(path, map_location), source=str(path))


def checkpoint_dict(obj: Any, source: str = "checkpoint") -> dict[str, Any]:
    """What :func:`read_checkpoint_file` returned, as a dict with ``state_dict``: NumPy scalars
    become Python numbers, a bare state dict becomes ``{"state_dict": ...}``."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return {k: _plain_scalar(v) for k, v in obj.items()}
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": dict(obj)}
    raise CheckpointError(f"{source}: no 'state_dict' in this file; expected a Semantic Genesis checkpoint")


def infer_model_config(state_dict: Mapping[str, torch.Tensor]) -> tuple[str | None, dict[str, Any]]:
    """Architecture and constructor arguments of a Semantic Genesis state dict, from key names
    and shapes (prefixes such as ``module.`` are ignored).

    Returns ``(arch, config)``: arch ``"YNet3D"`` (decoder and ``clc_out`` head),
    ``"ClassificationNet3D"`` (head, no decoder), ``"UNet3D"`` (decoder, no head; ``decoder``
    is ``"transpose"`` when ``up_conv`` has weights, else ``"upsampling"``) or None when the
    keys fit none of them; config holds what the weights tell: ``width``, ``in_channels``,
    ``cls_classes``, ``n_class``, ``decoder``.
    """
    sd = clean_state_dict(state_dict)
    first = sd.get("down_tr64.ops.0.conv1.weight")
    if first is None or first.dim() != 5:
        return None, {}
    cfg: dict[str, Any] = {"width": int(first.shape[0]), "in_channels": int(first.shape[1])}
    head = sd.get("clc_out.fc1.weight")
    out = sd.get("out_tr.final_conv.weight")
    transpose = "up_tr256.up_conv.weight" in sd
    if head is not None:
        cfg["cls_classes"] = int(head.shape[0])
    if out is not None:
        cfg["n_class"] = int(out.shape[0])
    if head is not None and out is not None and transpose:
        return "YNet3D", cfg
    if head is not None and out is None:
        return "ClassificationNet3D", cfg
    if head is None and out is not None:
        return "UNet3D", {**cfg, "decoder": "transpose" if transpose else "upsampling"}
    return None, cfg


def training_counters(ckpt: Mapping[str, Any], source: str = "checkpoint"
                      ) -> tuple[int, float, int]:
    """(``epoch``, ``best_loss``, ``num_epoch_no_improvement``) of a checkpoint, checked: whole
    numbers >= 0 and a number (inf allowed, NaN not); a ``CheckpointError`` naming ``source``
    and the field otherwise (a hand-edited or foreign file)."""
    def whole(key: str) -> int:
        v = ckpt.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0 \
                or v != int(v):
            raise CheckpointError(f"{source}: field {key!r} is {v!r}, not a whole number >= 0; "
                                  "the file is damaged or not written by this project")
        return int(v)

    best = ckpt.get("best_loss", math.inf)
    if isinstance(best, bool) or not isinstance(best, (int, float)) or best != best:
        raise CheckpointError(f"{source}: field 'best_loss' is {best!r}, not a number; the file "
                              "is damaged or not written by this project")
    return whole("epoch"), float(best), whole("num_epoch_no_improvement")


#: Values a checkpoint's ``model_config`` may hold, checked by ``checked_model_config``.
_CONFIG_CHOICES = {"decoder": ("upsampling", "transpose"), "norm": ("batch_stats", "standard")}


def checked_model_config(ckpt: Mapping[str, Any], source: str = "checkpoint",
                         defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's ``model_config`` over ``defaults``, checked: ``width``/``n_class``/
    ``cls_classes``/``in_channels`` whole numbers >= 1, ``decoder``/``norm`` known names,
    ``bn_momentum``/``bn_eps`` numbers in (0, 1]."""
    cfg = ckpt.get("model_config") or {}
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{source}: 'model_config' is a {type(cfg).__name__}, not a dict; "
                              "the file is damaged or not written by this project")
    out = dict(defaults or {})
    out.update(cfg)
    for key, value in out.items():
        if key in ("width", "n_class", "cls_classes", "in_channels"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{source}: model_config {key!r} is {value!r}, not a whole "
                                      "number >= 1; the file is damaged")
        elif key in ("bn_momentum", "bn_eps"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value <= 1:
                raise CheckpointError(f"{source}: model_config {key!r} is {value!r}, not a "
                                      "number in (0, 1]; the file is damaged")
        elif key in _CONFIG_CHOICES and value not in _CONFIG_CHOICES[key]:
            raise CheckpointError(f"{source}: model_config {key!r} is {value!r}, not one of "
                                  f"{', '.join(_CONFIG_CHOICES[key])}; the file is damaged")
    return out


def load_training_state(ckpt: Mapping[str, Any], optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None, source: str = "checkpoint") -> None:
    """Restore the optimiser and lr-scheduler states of a checkpoint read by ``load_checkpoint``
    (for ``--resume``); empty or absent states are skipped. No RNG state is restored: every
    random draw of the training loops derives from the run's seed and the epoch.

    Raises CheckpointError naming ``source`` when a state does not fit (other parameters or
    settings than the run that wrote it).
    """
    try:
        if optimizer is not None and ckpt.get("optimizer_state_dict"):
            optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        if scheduler is not None and ckpt.get("scheduler_state_dict"):
            scheduler.load_state_dict(ckpt["scheduler_state_dict"])
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{source}: optimiser/scheduler state does not fit this model "
                              f"({e}); resume with the run's own settings") from e


def clean_state_dict(state_dict: Mapping[str, torch.Tensor],
                     source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``, ``classficationNet.``) and drop
    keys of heads that are not part of our networks (``projection_head.*``, ``prototypes.*``).
    A key that is not a name or a value that is not a tensor is a ``CheckpointError`` (a damaged
    file): every reader of weights goes through here first."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: state_dict key {key!r} is not a parameter name; the "
                                  "file is damaged or not a Semantic Genesis checkpoint")
        key = strip_prefixes(key)
        if key.startswith(IGNORED_PREFIXES):
            continue
        out[key] = value
    odd = [f"{k} ({type(v).__name__})" for k, v in out.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{source}: {len(odd)} state_dict value(s) are not tensors: "
                              f"{', '.join(odd[:5])}; the file is damaged or not a checkpoint")
    return out


def strip_prefixes(key: str) -> str:
    """``key`` without the wrapper prefixes of ``STRIP_PREFIXES`` (repeatedly, in any order)."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p.rstrip(".") + ".") for p in patterns)


def _key_problems(target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                  new_keys: Iterable[str] = (), ignore_unexpected: Iterable[str] = (),
                  allow_unexpected: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape-mismatched) keys of a cleaned ``state`` against a model's
    ``target`` state dict; mismatches read "key: checkpoint (shape) vs model (shape)"."""
    new_keys, ignore_unexpected = tuple(new_keys), tuple(ignore_unexpected)
    missing = [k for k in target if k not in state and not _matches(k, new_keys)]
    unexpected = [k for k in state if k not in target and not allow_unexpected
                  and not _matches(k, ignore_unexpected)]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in target if k in state and state[k].shape != target[k].shape
                  and not _matches(k, new_keys)]
    return missing, unexpected, mismatched


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                            source: str = "checkpoint", new_keys: Iterable[str] = (),
                            ignore_unexpected: Iterable[str] = (),
                            allow_unexpected: bool = False) -> list[str]:
    """Copy ``state_dict`` into ``model`` after checking every key and shape.

    Args:
        new_keys: keys or key prefixes of ``model`` the caller declares new (e.g. a fresh head):
            they may be missing or of another shape, and then keep their initial values (when
            present with the model's shape they are loaded like any other key).
        ignore_unexpected: prefixes of checkpoint keys to skip silently (e.g. ``clc_out`` when
            loading a Y-Net checkpoint into a ``UNet3D``).
        allow_unexpected: skip every checkpoint key the model lacks.

    Returns:
        The list of model keys that were loaded.

    Raises:
        CheckpointError listing every missing, unexpected and shape-mismatched key.
    """
    model = unwrap_model(model)
    new_keys = tuple(new_keys)
    target = model.state_dict()
    state = clean_state_dict(state_dict, source)
    bad = [k for k, v in state.items() if k in target and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight tensor(s) hold NaN or inf (first "
                              f"{bad[0]}); a diverged run's file: use an earlier checkpoint")
    missing, unexpected, mismatched = _key_problems(target, state, new_keys, ignore_unexpected,
                                                    allow_unexpected)
    if missing or unexpected or mismatched:
        parts = []  # every offending key is listed: the message is the diagnosis
        first_conv = [k for k in target if k.endswith("down_tr64.ops.0.conv1.weight")
                      and k in state]  # (width, in_channels, 3, 3, 3), maybe under a prefix
        if first_conv and state[first_conv[0]].shape[0] != target[first_conv[0]].shape[0]:
            ws, wm = state[first_conv[0]].shape[0], target[first_conv[0]].shape[0]
            parts.append(f"the checkpoint has width {ws}, the model {wm}: pass --width {ws}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched))
        if missing:
            parts.append(f"{len(missing)} missing key(s): " + ", ".join(missing))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected))
        raise CheckpointError(
            f"{source}: does not fit {type(model).__name__} ({' | '.join(parts)}); "
            "check the architecture/--width/--cls_classes the checkpoint was made with")
    loaded = []
    with torch.no_grad():
        for key, value in target.items():
            if key in state and state[key].shape == value.shape:
                value.copy_(state[key].to(value.dtype))
                loaded.append(key)
    return loaded


#: Kinds of checkpoint ``describe_checkpoint`` tells apart.
CHECKPOINT_KINDS = ("pretraining", "pretraining_en", "autoencoder", "unet", "segmentation",
                    "classifier", "encoder", "unknown")
#: The first convolution (width w, in_channels, 3, 3, 3) of every Semantic Genesis network.
FIRST_CONV = "down_tr64.ops.0.conv1.weight"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is: ``kind`` (one of ``CHECKPOINT_KINDS``), ``arch`` (recorded, else
    inferred from the keys; None when unknown), ``config`` (the architecture: ``width``,
    ``in_channels``, ``norm``, ``decoder``, ... as the weights show them, over what
    ``model_config`` records) and ``description``, a phrase for messages ("a Semantic Genesis
    pretraining checkpoint (en_de: YNet3D, width 4)")."""
    kind: str
    arch: str | None
    config: dict[str, Any]
    description: str


def _first_conv_width(state: Mapping[str, Any]) -> int | None:
    """Width of the first convolution found under any prefix (``base_model.`` ...), or None."""
    for key, value in state.items():
        if isinstance(key, str) and key.endswith(FIRST_CONV) and isinstance(value, torch.Tensor) \
                and value.dim() == 5:
            return int(value.shape[0])
    return None


def describe_checkpoint(ckpt: Mapping[str, Any], source: str = "checkpoint") -> CheckpointInfo:
    """Name the kind of a checkpoint read by :func:`load_checkpoint` (ours, published or a bare
    state dict) from its recorded ``arch``/``model_config``/``config`` and its keys and shapes:
    a pretraining Y-Net (``en_de``), an encoder-only pretraining network (``en``), a stage-1
    autoencoder (a U-Net with the upsampling decoder or the autoencoder's BatchNorm constants),
    a fine-tuned segmentation U-Net, another 3D U-Net (e.g. Models Genesis), a fine-tuned
    classifier (``TargetClassifier``), a bare encoder, or unknown."""
    state = ckpt.get("state_dict") or {}
    recorded = checked_model_config(ckpt, source)
    run_config = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
    keys = [k for k in state if isinstance(k, str)]
    width = _first_conv_width(state)
    if any(k.startswith("base_model.") for k in keys) and any(k.startswith("dense_1.") for k in keys):
        cfg = {**recorded, "width": width} if width else dict(recorded)
        return CheckpointInfo("classifier", "TargetClassifier", cfg,
                              f"a fine-tuned classifier (TargetClassifier, width {width})")
    arch, inferred = infer_model_config(clean_state_dict(state, source))  # damaged keys: an error
    if not inferred:
        shown = ", ".join(keys[:3]) or "none"
        return CheckpointInfo("unknown", None, dict(recorded),
                              f"a checkpoint of another network (first keys: {shown})")
    cfg = {**recorded, **inferred}
    w = cfg["width"]
    if arch == "YNet3D":
        kind, text = "pretraining", f"a Semantic Genesis pretraining checkpoint (en_de: YNet3D, width {w})"
    elif arch == "ClassificationNet3D":
        kind, text = "pretraining_en", ("an encoder-only pretraining checkpoint (en: "
                                        f"ClassificationNet3D, width {w})")
    elif arch == "UNet3D" and ("bn_eps" in recorded or cfg.get("decoder") == "upsampling"):
        kind, text = "autoencoder", (f"an autoencoder checkpoint (stage 1: UNet3D, "
                                     f"{cfg.get('decoder', 'upsampling')} decoder, width {w})")
    elif arch == "UNet3D" and "masks" in run_config:
        kind, text = "segmentation", f"a fine-tuned segmentation U-Net (UNet3D, width {w})"
    elif arch == "UNet3D":
        kind, text = "unet", f"a 3D U-Net checkpoint (UNet3D, width {w})"
    else:
        kind, text = "encoder", f"an encoder-only checkpoint (Encoder3D, width {w})"
    return CheckpointInfo(kind, arch or ("Encoder3D" if kind == "encoder" else None), cfg, text)


def _misfit(target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
            missing: list[str], unexpected: list[str], mismatched: list[str],
            shown: int = 3) -> str:
    """What does not fit, in a few words: "of width W (...)" when the widths differ (the first
    shape mismatch shown), else the counts of mismatched / missing / unexpected keys with the
    first ``shown`` of each."""
    def listed(what: str, items: list[str], k: int = shown) -> str:
        more = f", ... (+{len(items) - k} more)" if len(items) > k else ""
        return f"{len(items)} {what}: {', '.join(items[:k])}{more}"
    ws, wm = _first_conv_width(state), _first_conv_width(target)
    if ws is not None and wm is not None and ws != wm and mismatched:
        return f"of width {wm} ({listed('shape mismatch(es)', mismatched, 1)})"
    parts = [listed("shape mismatch(es)", mismatched)] if mismatched else []
    parts += [listed("missing key(s)", missing)] if missing else []
    parts += [listed("unexpected key(s)", unexpected)] if unexpected else []
    return f"({'; '.join(parts)})"


def load_pretrained(model: nn.Module, path: str | os.PathLike, new_keys: Iterable[str] = (),
                    map_location: Any = "cpu") -> list[str]:
    """Load a Semantic Genesis checkpoint (ours or published) into ``model``.

    Works for ``UNet3D``, ``YNet3D``, ``ClassificationNet3D`` of any width. Prefixes such as
    ``module.``/``_orig_mod.``/``classficationNet.`` are stripped; ``projection_head.*`` and
    ``prototypes.*`` are dropped; the Y-Net's ``clc_out.*`` is skipped when the model has no
    head, and the decoder keys are skipped when the model is an encoder-only network.

    Returns the loaded keys. Raises ``CheckpointError``, one short line naming the file, what
    it is (``describe_checkpoint``) and what does not fit (the width, or the first missing /
    unexpected / mismatched keys; keys in ``new_keys``, keys or prefixes such as
    ``["clc_out"]``, may be missing or differ).
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    target = unwrap_model(model).state_dict()
    ignore = []
    if not any(k.startswith("clc_out.") for k in target):
        ignore.append("clc_out")
    if not any(k.startswith(("up_tr", "out_tr")) for k in target):
        ignore += DECODER_PREFIXES
    state = clean_state_dict(ckpt["state_dict"], str(path))
    if all(isinstance(v, torch.Tensor) for v in state.values()):  # else: the check below names them
        problems = _key_problems(target, state, new_keys, ignore)
        if any(problems):
            info = describe_checkpoint(ckpt, str(path))
            raise CheckpointError(f"{path}: {info.description} does not fit this "
                                  f"{type(unwrap_model(model)).__name__} "
                                  f"{_misfit(target, state, *problems)}")
    return load_state_dict_checked(model, state, source=str(path),
                                   new_keys=new_keys, ignore_unexpected=ignore)
