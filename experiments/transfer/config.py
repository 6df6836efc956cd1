"""The transfer study's settings: presets, the rule of every ``--set`` key, and their check.

Every value of a preset can be overridden with ``--set key=value`` (a Python literal). A value
is checked here, before anything runs, against its key's rule (:data:`RULES`): an unknown key,
a value of another type or out of range is one ``InputError`` line naming the key, what it
takes and where the study's keys are listed, never an error of a pipeline stage.
"""
from __future__ import annotations

import ast
import math
from collections.abc import Callable
from typing import Any

from runtime.errors import InputError

__all__ = ["METHODS", "TASKS", "METRIC", "PRETRAIN_FLAGS", "PRESETS", "RULES", "resolve_config",
           "keys_help"]

METHODS = ("scratch", "semantic_genesis", "restoration_only", "classification_only")
TASKS = ("classification", "segmentation")
#: (key in the fine-tuning test metrics, name in tables)
METRIC = {"classification": ("auc", "AUC"), "segmentation": ("dice", "Dice")}
#: pretraining flags of each pretrained method (on top of the shared ones)
PRETRAIN_FLAGS = {"semantic_genesis": ["--exp", "en_de"],
                  "restoration_only": ["--exp", "en_de", "--lambda_cls", "0"],
                  "classification_only": ["--exp", "en"]}

_BASE: dict[str, Any] = dict(
    seeds=[0, 1, 2, 3, 4], fractions=[0.05, 0.1, 0.25, 1.0], data_seed=1234,
    # pretraining data (stages 0-3)
    phantoms=16, phantom_shape=[128, 128, 48], spacing=[2.25, 2.25, 5.0], phantom_seed=100,
    ae_size=[64, 64, 32], ae_epochs=2, ae_batch=4, patch_min=25, patch_max=40,
    classes=8, instances=12, val_instances=4, border=24, border_z=4,
    # small phantoms have little lung per reference patient: 200 tries (the published default)
    # can miss a coordinate for the last classes, whose references are the leftover patients
    pattern_tries=1000,
    # pretraining (stage 4)
    width=4, cube=[32, 32, 16], pre_epochs=15, pre_batch=16, pre_lr=1e-3,
    # classification task: nodule / no-nodule cubes; nodule radius range in voxels ([0, 0]:
    # scaled with the cube, 2 to min(cube) / 6, as preparation/phantoms.py makes them)
    cls_n=[80, 40, 200], cls_nodule_radius=[0.0, 0.0], cls_monitor="auc", cls_epochs=8,
    cls_patience=4, cls_batch=16, cls_lr=1e-3,
    # segmentation task: nodules in whole phantom chests
    seg_n=[20, 3, 8], seg_shape=[64, 64, 32], seg_nodules=3, seg_epochs=8, seg_steps=6,
    seg_patience=4, seg_batch=8, seg_lr=1e-3, seg_overlap=0.0,
)
PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores shared with other work (see docs/transfer_study.md for the design and its
    # timing): width 4, 32 x 32 x 16 cubes, three label fractions; 720 pretraining updates per
    # method and 50 updates per fine-tuning run; nodules of 3-6 voxels; classification runs
    # keep the epoch of best validation AUC
    "cpu": dict(_BASE, fractions=[0.05, 0.25, 1.0], pre_epochs=40, cls_n=[80, 64, 200],
                cls_nodule_radius=[3.0, 6.0], cls_epochs=10, cls_patience=4, seg_epochs=10,
                seg_steps=5, seg_patience=4),
    # the published width and cube size; sized (not yet timed: no GPU here) for one H200 call of
    # under 10 minutes with --workers 8: 20 classes (24 training phantoms allow no more)
    "gpu": dict(_BASE, fractions=[0.05, 0.25, 1.0], phantoms=32, phantom_shape=[192, 192, 80],
                spacing=[1.5, 1.5, 3.0], ae_size=[128, 128, 64], ae_epochs=5, ae_batch=8,
                patch_min=50, patch_max=80, classes=20, instances=24, val_instances=8, border=40,
                border_z=4, width=32, cube=[64, 64, 32], pre_epochs=20, pre_batch=32,
                cls_n=[200, 80, 400], cls_epochs=12, cls_patience=4, seg_n=[40, 4, 12],
                seg_shape=[96, 96, 48], seg_nodules=4, seg_epochs=12, seg_steps=10,
                seg_patience=4, seg_overlap=0.25),
    # published sizes and number of classes, longer schedules: an unattended run
    "full": dict(_BASE, seeds=list(range(10)), phantoms=120, phantom_shape=[320, 320, 112],
                 spacing=[1.0, 1.0, 2.5], ae_size=[128, 128, 64], ae_epochs=50, ae_batch=8,
                 patch_min=50, patch_max=80, classes=44, instances=80, val_instances=20,
                 border=60, border_z=10, width=32, cube=[64, 64, 32], pre_epochs=200,
                 pre_batch=64, cls_n=[400, 100, 1000], cls_epochs=60, cls_patience=10,
                 seg_n=[80, 10, 30], seg_shape=[128, 128, 64], seg_nodules=4, seg_epochs=60,
                 seg_steps=25, seg_patience=10, seg_overlap=0.5),
    # seconds: the tests
    "tiny": dict(_BASE, seeds=[0, 1], fractions=[0.5, 1.0], phantoms=8, phantom_shape=[64, 64, 20],
                 spacing=[1.5, 1.5, 3.0], ae_size=[32, 32, 16], ae_epochs=1, ae_batch=2,
                 patch_min=12, patch_max=20, classes=2, instances=4, val_instances=2, border=4,
                 border_z=2, width=2, cube=[16, 16, 8], pre_epochs=1, pre_batch=4,
                 cls_n=[8, 8, 8], cls_epochs=1, cls_batch=4, seg_n=[2, 1, 1],
                 seg_shape=[24, 24, 8], seg_nodules=2, seg_epochs=1, seg_steps=1, seg_batch=2),
}


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_num(v: Any, lo: float, strict: bool = False) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (v > lo if strict else v >= lo))


def _ints(n: int, lo: int, mult: int = 1) -> Callable[[Any], bool]:
    return lambda v: len(v) == n and all(_is_int(x, lo) and x % mult == 0 for x in v)


def _seeds(v: list) -> bool:
    return len(v) >= 2 and all(_is_int(x, 0) for x in v) and len(set(v)) == len(v)


def _fractions(v: list) -> bool:
    return (len(v) >= 1 and all(_is_num(x, 0, strict=True) and x <= 1 for x in v)
            and list(v) == sorted(set(v)))


#: key -> (check of a value of the preset's type, what the key takes)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seeds": (_seeds, "at least 2 distinct seeds >= 0, e.g. [0,1,2]"),
    "fractions": (_fractions, "increasing label fractions in (0, 1], e.g. [0.1,1.0]"),
    "data_seed": (lambda v: _is_int(v, 0), "a seed >= 0"),
    "phantoms": (lambda v: _is_int(v, 4), "a number of pretraining phantoms >= 4"),
    "phantom_shape": (_ints(3, 16), "3 phantom sizes >= 16 voxels, e.g. [128,128,48]"),
    "spacing": (lambda v: len(v) == 3 and all(_is_num(x, 0, True) for x in v),
                "3 voxel spacings > 0 in mm, e.g. [2.25,2.25,5.0]"),
    "phantom_seed": (lambda v: _is_int(v, 0), "a seed >= 0"),
    "ae_size": (_ints(3, 8, 8), "3 autoencoder input sizes, multiples of 8, e.g. [64,64,32]"),
    "ae_epochs": (lambda v: _is_int(v, 1), "a number of epochs >= 1"),
    "ae_batch": (lambda v: _is_int(v, 1), "a batch size >= 1"),
    "patch_min": (lambda v: _is_int(v, 1), "a patch size >= 1 voxel"),
    "patch_max": (lambda v: _is_int(v, 1), "a patch size >= 1 voxel"),
    "classes": (lambda v: _is_int(v, 2), "a number of pattern classes >= 2"),
    "instances": (lambda v: _is_int(v, 1), "a number of training instances per class >= 1"),
    "val_instances": (lambda v: _is_int(v, 1), "a number of validation instances >= 1"),
    "border": (lambda v: _is_int(v, 0), "an in-plane border >= 0 voxels"),
    "border_z": (lambda v: _is_int(v, 0), "a border along z >= 0 voxels"),
    "pattern_tries": (lambda v: _is_int(v, 1), "a number of tries >= 1"),
    "width": (lambda v: _is_int(v, 1), "a U-Net base width >= 1"),
    "cube": (_ints(3, 8, 8), "3 cube sizes, multiples of 8, e.g. [32,32,16]"),
    "pre_epochs": (lambda v: _is_int(v, 1), "a number of epochs >= 1"),
    "pre_batch": (lambda v: _is_int(v, 1), "a batch size >= 1"),
    "pre_lr": (lambda v: _is_num(v, 0, True), "a learning rate > 0"),
    "cls_n": (_ints(3, 2), "3 cube counts (train pool, validation, test) >= 2, e.g. [80,64,200]"),
    "cls_nodule_radius": (lambda v: len(v) == 2 and all(_is_num(x, 0) for x in v)
                          and v[0] <= v[1], "a radius range [low, high] >= 0 voxels ([0,0]: "
                                            "scaled with the cube)"),
    "cls_monitor": (lambda v: v in ("auc", "loss"), "auc or loss"),
    "cls_epochs": (lambda v: _is_int(v, 1), "a number of epochs >= 1"),
    "cls_patience": (lambda v: _is_int(v, 1), "a patience >= 1"),
    "cls_batch": (lambda v: _is_int(v, 1), "a batch size >= 1"),
    "cls_lr": (lambda v: _is_num(v, 0, True), "a learning rate > 0"),
    "seg_n": (_ints(3, 1), "3 chest counts (train pool, validation, test) >= 1, e.g. [20,3,8]"),
    "seg_shape": (_ints(3, 8), "3 chest sizes >= 8 voxels, e.g. [64,64,32]"),
    "seg_nodules": (lambda v: _is_int(v, 1), "a number of nodules per chest >= 1"),
    "seg_epochs": (lambda v: _is_int(v, 1), "a number of epochs >= 1"),
    "seg_steps": (lambda v: _is_int(v, 1), "a number of training batches per epoch >= 1"),
    "seg_patience": (lambda v: _is_int(v, 1), "a patience >= 1"),
    "seg_batch": (lambda v: _is_int(v, 1), "a batch size >= 1"),
    "seg_lr": (lambda v: _is_num(v, 0, True), "a learning rate > 0"),
    "seg_overlap": (lambda v: _is_num(v, 0) and v < 1, "a sliding-window overlap in [0, 1)"),
}
_HELP = "--help lists every key"


def keys_help() -> str:
    """The study's keys, for ``--help``."""
    return ", ".join(sorted(RULES))


def _parse(item: str, cfg: dict[str, Any]) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or key not in cfg:
        raise InputError(f"--set {item}: expected KEY=VALUE with KEY one of the study's keys: "
                         f"{keys_help()}")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = text.strip() if isinstance(cfg[key], str) else None
        if value is None:
            raise InputError(f"--set {item}: {text!r} is not a number or a list; {key} takes "
                             f"{RULES[key][1]} ({_HELP})") from None
    old = cfg[key]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, list) and isinstance(value, tuple):
        value = list(value)
    if isinstance(old, list) and isinstance(value, list) and old and isinstance(old[0], float):
        value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    if type(value) is not type(old) or not RULES[key][0](value):
        raise InputError(f"--set {item}: {key} takes {RULES[key][1]} ({_HELP})")
    return key, value


def resolve_config(preset: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The preset's values with ``key=value`` overrides; an unknown key, a value of another
    type or out of range, or keys that contradict each other are an ``InputError``."""
    if preset not in PRESETS:
        raise InputError(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
    cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS[preset].items()}
    for item in overrides or []:
        key, value = _parse(item, cfg)
        cfg[key] = value
    if cfg["patch_min"] > cfg["patch_max"]:
        raise InputError(f"--set: patch_min {cfg['patch_min']} is above patch_max "
                         f"{cfg['patch_max']}; give patch_min <= patch_max")
    return cfg
