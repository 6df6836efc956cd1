"""What a fine-tuning run reads, checked before anything is written.

* ``resolve_model_flags``: the kind of the ``--weights`` file (a pretraining checkpoint, an
  encoder-only one, a stage-1 autoencoder, a fine-tuned classifier, ...; refused with one line
  where it cannot initialise the task) and the architecture flags it decides: ``--width`` and
  ``--norm`` default to what the checkpoint records or its weights show (then to what the run
  being resumed records, then to the published values); a flag given wins, a ``--width`` that
  contradicts the weights is refused. Each value's source is returned for the console and the
  run's configuration.
* ``data_identity``: the content identity of every input the run reads (per flag: number of
  files, bytes and a SHA-256 over each file's name, size and content digest; see
  ``content_digest``), recorded in ``config.json`` and every checkpoint.
* ``check_resume``: a ``--resume`` with other settings (beyond those its policy applies) or
  other inputs (by content, whatever the paths) is refused with one line listing them all.
* ``resume_checkpoint``: the checkpoint ``--resume`` names, read and checked to be the
  ``last.pt`` of a run of the same task.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.checkpoint import (CheckpointInfo, checked_model_config, describe_checkpoint,
                               load_checkpoint)
from models.targets import DEFAULT_NORM, DEFAULT_WIDTH
from runtime.errors import CheckpointError, InputError
from runtime.provenance import ResumePolicy, file_sha256, format_changes, settings_changes

__all__ = ["PRETRAINED_HINT", "resolve_model_flags", "check_weights_kind", "resume_checkpoint",
           "WHOLE_HASH_BYTES", "content_digest", "input_files", "data_identity",
           "identity_changes", "check_resume"]

#: Where the pretrained network of this project is found (the one fix for a wrong --weights).
PRETRAINED_HINT = ("the pretraining checkpoint (Checkpoints/en_de/semantic_genesis_chest_ct.pt "
                   "or the published file)")


def check_weights_kind(info: CheckpointInfo, path: str, task: str, new_decoder: bool) -> None:
    """Refuse, with one line naming what the file is, a ``--weights`` file that cannot start
    ``task`` ("classification" | "segmentation"): a stage-1 autoencoder, a fine-tuned
    classifier, an unknown network, an encoder without decoder for segmentation (unless
    ``new_decoder``), or weights for other than single-channel input."""
    if info.kind == "autoencoder":
        raise InputError(f"{path}: this is {info.description}, made for the feature extractor, "
                         f"not a pretrained network to fine-tune; use {PRETRAINED_HINT}")
    if info.kind == "classifier":
        raise InputError(f"{path}: {info.description}, the result of a fine-tuning run; use "
                         f"{PRETRAINED_HINT}, or --resume to continue that run")
    if info.kind == "unknown":
        raise InputError(f"{path}: {info.description}; use {PRETRAINED_HINT}")
    if task == "segmentation" and info.kind in ("pretraining_en", "encoder") and not new_decoder:
        raise InputError(f"{path}: {info.description} has no decoder; pass --new_decoder to "
                         "train the decoder from scratch")
    channels = info.config.get("in_channels", 1)
    if channels != 1:
        raise InputError(f"{path}: {info.description} takes {channels} input channels; "
                         "fine-tuning reads single-channel CT")


#: The kind (``describe_checkpoint``) of the checkpoints a fine-tuning task writes.
_RUN_KINDS = {"classification": "classifier", "segmentation": "segmentation"}


def resume_checkpoint(path: Path, arch: str, task: str) -> dict[str, Any]:
    """The checkpoint ``--resume`` names, read; it must be a ``last.pt``/``best.pt`` of a
    ``task`` fine-tuning run (``arch`` and the run's configuration recorded), else one line
    naming what it is."""
    ckpt = load_checkpoint(path)
    info = describe_checkpoint(ckpt, str(path))
    if ckpt.get("arch") != arch or info.kind != _RUN_KINDS[task] \
            or not isinstance(ckpt.get("config"), Mapping):
        raise CheckpointError(f"{path}: {info.description}, not a checkpoint of a {task} "
                              "fine-tuning run; --resume takes <output_dir>/last.pt of the run "
                              "to continue")
    return ckpt


def resolve_model_flags(args: argparse.Namespace, task: str,
                        resumed: tuple[Path, Mapping[str, Any]] | None = None
                        ) -> tuple[CheckpointInfo | None, dict[str, str]]:
    """Fill ``args.width``/``args.norm`` left at None: from the ``--weights`` checkpoint
    (recorded ``model_config``, else what its weights show), else from the run ``resumed``
    ((path, checkpoint)) records, else the published values. Returns (what ``--weights`` is or
    None, {flag: source}) with sources such as "from checkpoint X", "--width", "default"."""
    info = None
    if args.weights:
        info = describe_checkpoint(load_checkpoint(args.weights), str(args.weights))
        check_weights_kind(info, str(args.weights), task, bool(getattr(args, "new_decoder", False)))
    recorded = checked_model_config(resumed[1], str(resumed[0])) if resumed else {}
    sources: dict[str, str] = {}
    for flag, default in (("width", DEFAULT_WIDTH), ("norm", DEFAULT_NORM)):
        given = getattr(args, flag)
        from_weights = info.config.get(flag) if info is not None else None
        if given is not None:
            if flag == "width" and from_weights is not None and given != from_weights:
                raise InputError(f"{args.weights}: {info.description}, but --width {given} was "
                                 f"given; omit --width (it is read from the checkpoint) or pass "
                                 f"--width {from_weights}")
            sources[flag] = f"--{flag}"
        elif from_weights is not None:
            setattr(args, flag, from_weights)
            sources[flag] = f"from checkpoint {args.weights}"
        elif flag in recorded:
            setattr(args, flag, recorded[flag])
            sources[flag] = f"from checkpoint {resumed[0]}"
        else:
            setattr(args, flag, default)
            sources[flag] = "default"
    return info, sources


#: Files up to this size are hashed whole; a larger file is identified by its size and the
#: SHA-256 of SAMPLE_BLOCKS blocks of SAMPLE_BYTES spread evenly over it (a volume or a stack
#: of cubes re-made with other content changes them; reading 1 MiB keeps a resume cheap).
WHOLE_HASH_BYTES = 4 << 20
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 64 << 10


def content_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the file (hex), or for files over ``WHOLE_HASH_BYTES`` "sampled:" + the
    SHA-256 of its sampled blocks."""
    size = os.path.getsize(path)
    if size <= WHOLE_HASH_BYTES:
        return file_sha256(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for k in range(SAMPLE_BLOCKS):
            f.seek(k * (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BYTES))
    return "sampled:" + h.hexdigest()


def input_files(paths: Sequence[str | os.PathLike], roots: Sequence[str | os.PathLike]
                ) -> list[tuple[str, Path]]:
    """(name, path) of the files a flag made the run read: a file inside one of the folders
    ``roots`` is named by its path relative to that folder (class sub-folders and pairing
    names are part of the identity); a file given itself by its position ("#0", "#1", ...),
    so that moving or renaming it changes nothing. A folder (a DICOM series) stands for its
    files; a MetaImage header brings its data file."""
    root_dirs = [Path(r).resolve() for r in roots if Path(r).is_dir()]
    out: list[tuple[str, Path]] = []
    for i, p in enumerate(paths):
        p = Path(p)
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) \
            if p.is_dir() else [p]
        if p.suffix.lower() == ".mhd":
            files += [f for f in (p.with_suffix(".raw"), p.with_suffix(".zraw")) if f.is_file()]
        for f in files:
            full = f.resolve()
            base = next((r for r in root_dirs if r in full.parents), None)
            out.append((full.relative_to(base).as_posix() if base else f"#{i}", f))
    return out


def data_identity(inputs: Mapping[str, Sequence[tuple[str, Path]]]) -> dict[str, dict[str, Any]]:
    """{flag: {"files", "bytes", "sha256"}} of ``inputs`` ({flag: ``input_files``}): the
    SHA-256 runs over one line "name, size, content digest" per file, in order."""
    identity = {}
    for flag, files in inputs.items():
        h, total = hashlib.sha256(), 0
        for name, path in files:
            size = os.path.getsize(path)
            total += size
            h.update(f"{name}\t{size}\t{content_digest(path)}\n".encode())
        identity[flag] = {"files": len(files), "bytes": total, "sha256": h.hexdigest()}
    return identity


def _describe(ident: Mapping[str, Any] | None) -> str:
    if not ident:
        return "not given"
    return f"{ident.get('files')} file(s), {ident.get('bytes')} bytes"


def identity_changes(recorded: Mapping[str, Any] | None,
                     current: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """"--flag (recorded -> now)" for every input whose content identity (``data_identity``)
    differs from the recorded one; [] for records without an identity (older versions)."""
    if not isinstance(recorded, Mapping):
        return []
    differ = []
    for flag in sorted(set(recorded) | set(current)):
        old, new = recorded.get(flag), current.get(flag)
        if (old or {}).get("sha256") != (new or {}).get("sha256"):
            what = (f"{_describe(old)} -> {_describe(new)}" if _describe(old) != _describe(new)
                    else "same size, other content")
            differ.append(f"--{flag} ({what})")
    return differ


def check_resume(recorded: Mapping[str, Any], config: Mapping[str, Any], policy: ResumePolicy,
                 source: str) -> None:
    """Refuse a ``--resume`` whose settings differ from the ``recorded`` configuration in a
    flag ``policy`` neither applies nor ignores, or whose inputs differ in content
    (``identity_changes``): one line listing every difference. Applied changes are left to
    ``runtime.training.restart_from_checkpoint``, which says and records them."""
    keys = [k for k in config if k not in policy.ignored and k not in policy.applied]
    refused = settings_changes(recorded, config, keys)
    differ = ([format_changes(refused)] if refused else []) + identity_changes(
        recorded.get("data_identity"), config.get("data_identity") or {})
    if differ:
        raise InputError(f"{source}: --resume continues a run made with other settings or "
                         f"inputs ({', '.join(differ)}); give the recorded values and the run's "
                         "own files to continue it, or start again without --resume (with "
                         "--overwrite)")
