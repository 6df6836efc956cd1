"""Device, precision and seeding: the ``--device`` rule, ``--amp`` autocast, the process-wide
CUDA speed flags and ``seed_everything``."""
from __future__ import annotations

import argparse
import contextlib
import random
import re

import numpy as np
import torch

from runtime.errors import InputError

__all__ = ["device_name", "resolve_device", "full_device", "seed_everything", "resolve_amp",
           "autocast", "enable_fast_math"]


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


def resolve_amp(amp: str, device: torch.device | str) -> torch.dtype | None:
    """Autocast dtype for ``--amp``: "auto" = bf16 on CUDA, fp32 (None) elsewhere."""
    device = torch.device(device)
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp32":
        return None
    raise ValueError(f"amp must be auto, bf16 or fp32, got {amp!r}")


def autocast(device: torch.device | str, amp_dtype: torch.dtype | None):
    """``torch.autocast`` context for ``amp_dtype``, or a no-op for fp32."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)


def enable_fast_math(device: torch.device | str, tf32: bool = True) -> None:
    """On CUDA, turn on cuDNN autotuning and (with ``tf32``) TF32 matmuls and convolutions;
    nothing elsewhere. These are process-wide flags, so a CLI sets them once, explicitly."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
