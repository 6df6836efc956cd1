"""Prepare a target task of the paper from its public dataset, in the layout it is downloaded in.

    python scripts/prepare_target.py TASK --data_dir DIR --output_dir OUT [--workers N]

TASK: ``ncc`` (lung nodule false-positive reduction, LUNA16), ``ncs`` (lung nodule
segmentation, the processed LIDC-IDRI arrays), ``lcs`` (liver segmentation, LiTS 2017) or
``bms`` (brain tumour segmentation, BraTS 2018 FLAIR); ``TASK --help`` lists a task's flags.
The splits are the published ones and are named ``train``, ``val`` and ``test``.

Outputs: NCC writes ``OUT/{split}_cubes.npy`` (N, 64, 64, 32) in [0, 1],
``OUT/{split}_labels.npy`` (N,) int64 and ``OUT/{split}_candidates.csv``; the segmentation tasks
write ``OUT/{split}/images/<case>.npy`` (float32 (x, y, z) in [0, 1]) and
``OUT/{split}/masks/<case>.npy`` (uint8 {0, 1}, same name), the layout
``scripts/finetune_segmentation.py`` pairs. ``OUT/manifest.json`` records the task, the source
folder, the settings, every split's patients, counts and the size and SHA-256 of every output
file; ``complete`` is false until the run has finished.

Inputs are read and checked before anything is written. Work runs scan by scan (or case by
case) in ``--workers`` processes, the outputs identical for any number. A killed run continues
where it stopped when the same command is run again; a run with other settings (or other
inputs) into a prepared folder is refused, listing what differs, unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from runtime.cli import (ArgumentParser, HelpFormatter, add_overwrite_flag, add_verbosity_flag,
                         nonneg_int, run_cli)
from runtime.errors import InputError
from runtime.files import check_output_outside
from target_tasks import brats, lidc, lits, luna16
from target_tasks.common import MANIFEST, SPLITS, run_plan

__all__ = ["TASKS", "build_parser", "prepare", "main"]

#: Task name -> (module, one-line description).
TASKS: dict[str, tuple[ModuleType, str]] = {
    "ncc": (luna16, "lung nodule false-positive reduction: cubes around the LUNA16 candidates"),
    "ncs": (lidc, "lung nodule segmentation: the processed LIDC-IDRI cubes, one case each"),
    "lcs": (lits, "liver segmentation: the LiTS 2017 training volumes"),
    "bms": (brats, "brain tumour segmentation: BraTS 2018 FLAIR volumes"),
}


def _add_common(p: argparse.ArgumentParser, task: str) -> None:
    g = p.add_argument_group("input / output")
    g.add_argument("--data_dir", type=Path, required=True,
                   help="the dataset folder as downloaded and unzipped (searched recursively)")
    g.add_argument("--output_dir", type=Path, required=True,
                   help="where the prepared splits and manifest.json are written (outside "
                        "--data_dir)")
    g.add_argument("--workers", type=nonneg_int, default=1,
                   help="processes preparing scans or cases in parallel (0 or 1: this process); "
                        "the outputs are identical for any number")
    if task != "ncs":
        g.add_argument("--allow_missing", action="store_true",
                       help="prepare the scans or patients present when some of the published "
                            "protocol's are missing (listed in the manifest); without it a "
                            "missing one is an error")
    add_overwrite_flag(g, "the preparation")
    add_verbosity_flag(g, levels="1 or 2: a progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per task, each with its flags."""
    ap = ArgumentParser(prog="prepare_target.py", description=__doc__.split("\n\n")[0],
                        formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="task", metavar="TASK", required=True,
                            parser_class=ArgumentParser)
    for name, (module, about) in TASKS.items():
        p = sub.add_parser(name, help=about, description=module.__doc__.split("\n\n")[0],
                           formatter_class=HelpFormatter)
        _add_common(p, name)
        module.add_flags(p)
    return ap


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare ``args.task`` (parsed flags); returns the complete manifest."""
    module = TASKS[args.task][0]
    if not Path(args.data_dir).is_dir():
        raise InputError(f"{args.data_dir}: --data_dir not found; give the folder the dataset "
                         "was downloaded and unzipped into")
    check_output_outside(args.output_dir, [args.data_dir], "--output_dir", "--data_dir",
                         both_ways=True)
    plan = module.plan(args)
    return run_plan(plan, module.HOOKS, args)


def _report(args: argparse.Namespace, manifest: dict[str, Any]) -> None:
    parts = []
    for split in SPLITS:
        c = manifest["counts"].get(split, {})
        n = c.get("cubes", c.get("cases", 0))
        what = "cubes" if "cubes" in c else "cases"
        extra = f", {c['positives']} positive" if "positives" in c else ""
        parts.append(f"{split} {c.get('patients', 0)} patients / {n} {what}{extra}")
    missing = f"; {len(manifest['missing'])} missing (see manifest)" if manifest.get("missing") else ""
    print(f"prepare_target {args.task}: {'; '.join(parts)}{missing} -> "
          f"{Path(args.output_dir) / MANIFEST}", file=sys.stdout)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 when the preparation is complete, 2 on an error (one line)."""
    return run_cli(build_parser, prepare, argv, _report,
                   "run the same command again: it continues where it stopped")


if __name__ == "__main__":
    raise SystemExit(main())
