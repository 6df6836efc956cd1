"""Transfer study: does pretraining with this code make target tasks better? One command.

    python experiments/transfer_study.py --preset cpu --output_dir outputs/transfer_study_cpu

Steps, each a cell keyed by its settings (``finetune.cells``): re-running with the same
settings reuses finished steps (an interrupted study resumes); a step whose recorded settings
differ from this run's (other ``--set`` values, a changed stage default) is refused before
anything runs, listing the differences, or redone with ``--overwrite``.

1. Pretraining data: phantom patients -> prepared dataset -> autoencoder -> features ->
   self-discovered anatomical patterns (the pipeline's stages 0-3, in-process).
2. Target tasks on patients disjoint from pretraining (other phantom seeds; checked):
   nodule / no-nodule classification of lung cubes (test ROC AUC) and nodule segmentation in
   whole phantom chests (test Dice, sliding window). Each task has a fixed training pool, a
   fixed validation set (early stopping and model choice) and a fixed test set.
3. Pretraining, same patterns, same budget (epochs, batch, learning rate, seed) per method:
   ``semantic_genesis`` (``--exp en_de``), ``restoration_only`` (``--lambda_cls 0``, Models
   Genesis-style) and ``classification_only`` (``--exp en``), with the pretext diagnostics
   (top-1 vs. chance, restoration gain per transform, a linear probe on the classification
   task's *validation* cubes).
4. Fine-tuning cells (task, label fraction, seed, method), ``scratch`` included: the labelled
   subset depends only on (fraction, seed) and is nested across fractions, the fine-tuning seed
   is the same for every method, so differences to scratch are paired. A classification subset
   is repeated to the pool size (with random flips), so every run gets the same number of
   updates; a segmentation run draws the same number of crops from fewer patients.
5. Outputs in ``--output_dir``: ``transfer_study.json`` (per-seed values, summary, pretext
   diagnostics), ``transfer_study.md`` (table) and ``transfer_study.png`` (plot).

Presets: ``cpu``, ``gpu``, ``full``, ``tiny`` (see ``experiments.transfer.config``); every value
can be overridden with ``--set key=value``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from finetune import classification as finetune_classification
from finetune import segmentation as finetune_segmentation
from finetune.cells import Cell, plan_cells, run_config, run_finetune_cell, start_cell, finish_cell
from finetune.stats import fraction_key
from pytorch import train
from pytorch.diagnostics import format_diagnostics
from runtime.cli import (ArgumentParser, HelpFormatter, add_verbosity_flag, nonneg_int,
                         positive_int, run_cli)
from runtime.devices import resolve_device
from runtime.errors import InputError, ReportedError
from runtime.files import atomic_path, make_output_dir, save_json_atomic, write_run_config

from experiments.transfer import data as D
from experiments.transfer.config import (METHODS, METRIC, PRESETS, PRETRAIN_FLAGS, TASKS,
                                         keys_help, resolve_config)
from experiments.transfer.report import format_table, machine, plot_results, summarize

__all__ = ["build_parser", "run", "main", "plan_study"]


def _flags(d: dict[str, Any]) -> list[str]:
    """``{"--flag": value | [values] | True | None}`` as a command line (None/False dropped)."""
    out: list[str] = []
    for k, v in d.items():
        if v is None or v is False:
            continue
        out += [k] if v is True else [k] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return out


# ------------------------------------------------------------------------------------------
# pretraining and fine-tuning steps
# ------------------------------------------------------------------------------------------
def _pretrain_argv(method: str, cfg: dict[str, Any], patterns: Path, folder: Path, log_dir: Path,
                   probe: tuple[str, str] | None, device: str, quiet: bool) -> list[str]:
    c = [str(v) for v in cfg["cube"]]
    argv = ["--data_dir", str(patterns), "--input_rows", c[0], "--input_cols", c[1],
            "--input_deps", c[2], "--cls_classes", str(cfg["classes"]),
            "--nb_instances", str(cfg["instances"]), "--nb_instances_val", str(cfg["val_instances"]),
            "--nb_multires_patch", "3", "--width", str(cfg["width"]),
            "--batch_size", str(cfg["pre_batch"]), "--lr", str(cfg["pre_lr"]),
            "--nb_epoch", str(cfg["pre_epochs"]), "--patience", str(cfg["pre_epochs"]),
            "--seed", "1", "--device", device, "--output_dir", str(folder / "checkpoints"),
            "--log_dir", str(log_dir), "--notes", method,
            "--verbose", "0" if quiet else "1", "--overwrite", *PRETRAIN_FLAGS[method]]
    if probe is not None:
        argv += ["--probe_data", probe[0], "--probe_labels", probe[1]]
    return argv


def _probe_paths(out: Path) -> tuple[str, str]:
    root = out / "data" / "classification"
    return str(root / "val_cubes.npy"), str(root / "val_labels.npy")


def pretrain_step(out: Path, method: str, cfg: dict[str, Any], data_cell: Cell,
                  probe: dict[str, Any] | None) -> Cell:
    """The pretraining of one method: keyed by its command line (without the study's own
    paths), the settings of the patterns it reads and of the probe's cubes."""
    folder = out / "pretrain" / method
    argv = _pretrain_argv(method, cfg, out / "pretraining_data" / "patterns", folder,
                          out / "runs" / "pretrain" / method,
                          _probe_paths(out) if probe else None, "cpu", True)
    return Cell(f"pretrain {method}", folder,
                {"run": run_config(train.build_parser(), argv, under=out),
                 "patterns": data_cell.settings, "probe": probe})


def pretrain(out: Path, method: str, cfg: dict[str, Any], probe: bool, device: str,
             quiet: bool, cell: Cell, action: str) -> dict[str, Any]:
    """Pretrain one method on the patterns (or reuse it); returns {"checkpoint" (relative to
    ``out``), "diagnostics", "best_loss", "epochs", "seconds"}."""
    if action == "reuse":
        return cell.result()
    start_cell(cell, action)
    argv = _pretrain_argv(method, cfg, out / "pretraining_data" / "patterns", cell.folder,
                          out / "runs" / "pretrain" / method, _probe_paths(out) if probe else None,
                          device, quiet)
    t0 = time.time()
    try:
        summary = train.train(train.build_parser().parse_args(argv))
    except ReportedError as e:
        raise InputError(f"pretraining {method}: {D.in_study_terms('pretrain', str(e))}") from e
    return finish_cell(cell, {
        "checkpoint": Path(summary["best_checkpoint"]).relative_to(out).as_posix(),
        "diagnostics": summary["diagnostics"], "best_loss": summary["best_loss"],
        "epochs": summary["epoch"], "seconds": time.time() - t0})


def _finetune_argv(task: str, method: str, cfg: dict[str, Any], data: dict[str, list[str]],
                   weights: str | None, seed: int, run_dir: Path, device: str) -> list[str]:
    common = {"--width": str(cfg["width"]), "--device": device, "--num_workers": "0",
              "--quiet": True, "--seed": str(seed), "--output_dir": str(run_dir),
              "--weights": weights, "--optimizer": "adam", "--augment": True,
              "--overwrite": True}   # a cell without its result is redone from the start
    if task == "classification":
        specific = {"--nb_epoch": str(cfg["cls_epochs"]), "--patience": str(cfg["cls_patience"]),
                    "--monitor": cfg["cls_monitor"],
                    "--batch_size": str(cfg["cls_batch"]), "--lr": str(cfg["cls_lr"])}
    else:
        specific = {"--nb_epoch": str(cfg["seg_epochs"]), "--patience": str(cfg["seg_patience"]),
                    "--batch_size": str(cfg["seg_batch"]), "--lr": str(cfg["seg_lr"]),
                    "--steps_per_epoch": str(cfg["seg_steps"]), "--overlap": str(cfg["seg_overlap"]),
                    "--crop": [str(c) for c in cfg["cube"]],
                    "--new_decoder": method == "classification_only"}
    return _flags({**data, **common, **specific})


def _module(task: str):
    return finetune_classification if task == "classification" else finetune_segmentation


def finetune_step(out: Path, task: str, method: str, fraction: float, seed: int,
                  cfg: dict[str, Any], flags: dict[str, list[str]],
                  pre: Cell | None) -> Cell:
    """One fine-tuning cell: keyed by its command line (without the study's own paths), the
    settings of its task's data, of the method's pretraining, the fraction and the seed."""
    folder = out / "cells" / task / method / f"f{fraction_key(fraction)}" / f"seed{seed}"
    weights = str(out / "pretrain" / method / "w.pt") if pre is not None else None
    argv = _finetune_argv(task, method, cfg, flags, weights, seed, folder, "cpu")
    return Cell(f"{task} {method} fraction {fraction:g} seed {seed}", folder,
                {"run": run_config(_module(task).build_parser(), argv, under=out),
                 "data": D.task_spec(task, cfg), "fraction": fraction, "seed": seed,
                 "method": method, "pretraining": pre.settings if pre is not None else None},
                result_files=("metrics.json",))


def finetune_cell(out: Path, task: str, method: str, fraction: float, seed: int,
                  cfg: dict[str, Any], data: dict[str, list[str]], weights: str | None,
                  device: str, keep_checkpoints: bool, cell: Cell, action: str) -> dict[str, Any]:
    """Fine-tune one cell (or reuse it); returns its result (``value``: the test metric)."""
    if action == "reuse":
        return cell.result()
    argv = _finetune_argv(task, method, cfg, data, weights, seed, cell.folder, device)
    try:
        return run_finetune_cell(cell, _module(task), argv, action, METRIC[task][0],
                                 keep_checkpoints)
    except ReportedError as e:
        raise InputError(f"fine-tuning {task} {method} fraction {fraction:g} seed {seed}: "
                         f"{D.in_study_terms(task, str(e))}") from e


# ------------------------------------------------------------------------------------------
# running steps: in this process, or in parallel worker processes
# ------------------------------------------------------------------------------------------
class _InlineExecutor:
    """``submit`` runs the call at once in this process and returns a finished future."""

    def submit(self, fn, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to the caller by fut.result()
            fut.set_exception(e)
        return fut

    def __enter__(self) -> "_InlineExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _init_worker(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


class _Pool(ProcessPoolExecutor):
    """Worker processes (spawned: safe with CUDA); pending steps are cancelled on an error."""

    def __exit__(self, exc_type, exc, tb):
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def _executor(workers: int, threads: int):
    if workers <= 1:
        return _InlineExecutor()
    return _Pool(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                 initializer=_init_worker, initargs=(threads,))


# ------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------
def plan_study(out: Path, cfg: dict[str, Any], methods: list[str], tasks: list[str],
               overwrite: bool) -> dict[str, Any]:
    """Every step of the study with its action, decided before anything runs (an
    ``InputError`` when a finished or interrupted step was made with other settings and
    ``overwrite`` is not given)."""
    seeds = D.phantom_seeds(cfg)
    for task in tasks:
        shared = seeds[task] & seeds["pretraining"]
        if shared:
            raise InputError(f"{task} patients {sorted(shared)[:5]} are also pretraining patients; "
                             "change data_seed or phantom_seed (--set)")
    data = {t: D.target_cell(out, D.task_spec(t, cfg)) for t in tasks}
    pretrained = [m for m in methods if m != "scratch"]
    pre_data = D.pretraining_cell(out, cfg) if pretrained else None
    probe = D.task_spec("classification", cfg) if "classification" in tasks else None
    pre = {m: pretrain_step(out, m, cfg, pre_data, probe) for m in pretrained}
    base_flags = {t: D.flags_at(out, {"--data": ["x"]} if t == "classification" else
                                {"--images": ["x"], "--masks": ["x"]}) for t in tasks}
    cells = {(t, f, s, m): finetune_step(out, t, m, f, s, cfg, base_flags[t], pre.get(m))
             for m in methods for t in tasks for f in cfg["fractions"] for s in cfg["seeds"]}
    plan = plan_cells(data.values(), overwrite, "redo", what="step")
    if pre_data is not None:
        plan.update(plan_cells([pre_data], overwrite, "resume", what="step"))
    plan.update(plan_cells(pre.values(), overwrite, "redo", what="step"))
    plan.update(plan_cells(cells.values(), overwrite, "redo", what="cell"))
    return {"data": data, "pre_data": pre_data, "pre": pre, "cells": cells, "plan": plan,
            "probe": probe is not None}


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        description="Transfer study: pretrain Semantic Genesis and its ablations on the same "
                    "self-discovered patterns, fine-tune every method on phantom target tasks at "
                    "several label fractions and seeds (paired), and report a JSON, a table and "
                    "a plot. Resumable: re-running reuses the steps finished with the same "
                    "settings.",
        formatter_class=HelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS),
                    help="sizes and schedules: cpu (under an hour on 2 busy cores), gpu (published "
                         "sizes, < 10 min on one H200), full (unattended), tiny (tests)")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override preset values, e.g. --set width=8 seeds=[0,1,2]; keys: "
                         + keys_help())
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="methods to run (scratch is needed for the paired differences)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="target tasks")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--output_dir", default="outputs/transfer_study",
                    help="data, runs, per-cell results and the study's JSON / table / plot go here")
    ap.add_argument("--results_json", default=None,
                    help="also write the study's JSON to this path (e.g. experiments/results/...)")
    ap.add_argument("--plot", default=None,
                    help="also write the plot to this path (default: beside --results_json)")
    ap.add_argument("--overwrite", action="store_true",
                    help="redo the steps whose recorded settings differ from this run's (steps "
                         "with the same settings are kept); without it such a run is refused")
    ap.add_argument("--keep_checkpoints", action="store_true",
                    help="keep every fine-tuning run's best.pt / last.pt (default: only metrics)")
    ap.add_argument("--workers", type=positive_int, default=1,
                    help="run pretraining and fine-tuning steps in this many worker processes "
                         "at once (results do not depend on it); on a GPU several small runs "
                         "share the device, on a CPU use one per core with --threads 1")
    ap.add_argument("--threads", type=nonneg_int, default=0,
                    help="torch CPU threads per process (0: torch's default); 1 is faster on a "
                         "busy machine")
    add_verbosity_flag(ap, "1: per-epoch pretraining lines (with --workers 1) and progress bars; "
                           "2: the same")
    return ap


def _run_steps(out: Path, cfg: dict[str, Any], study: dict[str, Any], flags: dict, device: str,
               args: argparse.Namespace) -> tuple[dict, dict]:
    """Pretrain every method and fine-tune every cell (scratch cells start at once, a
    method's cells when its pretraining is done); returns (pretraining results, values)."""
    plan, cells = study["plan"], study["cells"]
    pre: dict[str, dict[str, Any]] = {}
    values: dict[tuple, float] = {}
    bar = tqdm(total=len(cells), desc="fine-tuning cells", dynamic_ncols=True)
    quiet = args.verbose == 0 or args.workers > 1   # parallel epoch lines would interleave
    with _executor(args.workers, args.threads) as ex:
        pending: dict[Any, tuple[str, Any]] = {}

        def submit_cells(method: str) -> None:
            for key in (k for k in cells if k[3] == method):
                task, f, seed, _ = key
                data, _items = D.cell_data(out, task, flags[task], f, seed)   # written here, once
                weights = str(out / pre[method]["checkpoint"]) if method != "scratch" else None
                fut = ex.submit(finetune_cell, out, task, method, f, seed, cfg, data, weights,
                                device, args.keep_checkpoints, cells[key], plan[cells[key].name])
                pending[fut] = ("cell", key)

        for method, cell in study["pre"].items():
            print(f"[pretrain] {method}" + (" (reused)" if plan[cell.name] == "reuse" else ""),
                  flush=True)
            pending[ex.submit(pretrain, out, method, cfg, study["probe"], device, quiet, cell,
                              plan[cell.name])] = ("pretrain", method)
        if "scratch" in args.methods:
            submit_cells("scratch")   # scratch needs no pretraining: it runs alongside
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                kind, what = pending.pop(fut)
                result = fut.result()
                if kind == "pretrain":
                    pre[what] = result
                    last = result["diagnostics"][-1] if result["diagnostics"] else {}
                    line = format_diagnostics(last).replace("    diag:", "") if "cls_top1" in last else ""
                    print(f"[pretrain] {what} done ({result['epochs']} epochs, "
                          f"{result['seconds']:.0f} s); last epoch{line}", flush=True)
                    submit_cells(what)
                else:
                    values[what] = result["value"]
                    bar.update(1)
                    bar.set_postfix_str(f"{what[0]} {100 * what[1]:g}% seed {what[2]} {what[3]}")
    bar.close()
    return pre, values


def run(args: argparse.Namespace, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) the whole study; return the study's JSON dict."""
    cfg = resolve_config(args.preset, args.overrides)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    out = Path(args.output_dir)
    if "scratch" not in args.methods:
        print("note: without scratch there are no paired differences", file=sys.stderr)
    study = plan_study(out, cfg, list(args.methods), list(args.tasks), args.overwrite)
    make_output_dir(out, "--output_dir")
    write_run_config(dict(vars(args), config=cfg), out)
    t0 = time.time()
    flags = {t: D.target_data(out, c, study["plan"][c.name]) for t, c in study["data"].items()}
    if study["pre_data"] is not None:
        D.pretraining_data(out, cfg, device, study["pre_data"], study["plan"][study["pre_data"].name])
    pre, values = _run_steps(out, cfg, study, flags, device, args)
    results = {t: {m: {fraction_key(f): [values[(t, f, s, m)] for s in cfg["seeds"]]
                       for f in cfg["fractions"]} for m in args.methods} for t in args.tasks}
    rows = summarize(results)
    table = format_table(rows)
    command = command or "python experiments/transfer_study.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    tasks = {t: {"metric": METRIC[t][0], "label_fractions": [float(f) for f in cfg["fractions"]],
                 "results": by_method} for t, by_method in results.items()}
    out_json = {"machine": machine(), "command": command, "tasks": tasks,
                "seeds": list(cfg["seeds"]), "preset": args.preset, "config": cfg,
                "summary": rows, "table": table,
                "pretraining": {m: {"diagnostics": p["diagnostics"], "seconds": p["seconds"],
                                    "epochs": p["epochs"]} for m, p in pre.items()},
                "seconds_this_call": time.time() - t0}
    _write_outputs(out, out_json, rows, table, args)
    return out_json


def _write_outputs(out: Path, study: dict[str, Any], rows: list, table: str,
                   args: argparse.Namespace) -> None:
    save_json_atomic(out / "transfer_study.json", study)
    with atomic_path(out / "transfer_study.md") as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    if args.results_json:
        save_json_atomic(make_output_dir(Path(args.results_json).parent, "--results_json")
                         / Path(args.results_json).name, study)
    plot_results(rows, out / "transfer_study.png")
    if args.results_json or args.plot:
        plot = Path(args.plot) if args.plot else Path(args.results_json).with_suffix(".png")
        plot_results(rows, make_output_dir(plot.parent, "--plot") / plot.name)
    print(table)
    print(f"wrote {out / 'transfer_study.json'}, {out / 'transfer_study.md'}, {out / 'transfer_study.png'}")


def main(argv: list[str] | None = None) -> int:
    command = None if argv is None else "python experiments/transfer_study.py " + " ".join(
        shlex.quote(a) for a in argv)
    return run_cli(build_parser, lambda args: run(args, command), argv,
                   interrupted="run the same command again: finished steps are kept")
