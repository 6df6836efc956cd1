"""What a stage's outputs were made from, and the checks that use it.

Every stage records, next to its outputs, the settings it ran with and the identity of what it
read; the next stage, a re-run and a ``--resume`` compare against that record instead of
trusting file names.

* ``file_identity`` / ``check_file_identity``: a file's content identity (size and SHA-256),
  recorded by the stage that wrote or read it and checked by the one that reads it next.
* ``settings_changes``: the flags whose values differ between a recorded configuration and
  this run's.
* ``ResumePolicy`` / ``check_resume_settings``: the rule of every ``--resume`` (and of every
  re-run that continues earlier work): a change of a flag that decides the result is refused
  with the list of differing flags; a change of a flag the policy names as ``applied`` (more
  epochs, patience) is applied and said; flags that change nothing in the result (output
  verbosity, device, workers, ...) are ``ignored``. The configuration written next to the
  outputs is then what ran.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import InputError

__all__ = ["file_sha256", "file_identity", "file_identities", "check_file_identity",
           "settings_changes", "format_changes", "ResumePolicy", "check_resume_settings",
           "RUNTIME_FLAGS"]

_CHUNK = 1 << 22   # 4 MiB read at a time


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file: what identifies its content, whatever its
    name or folder."""
    return {"size": os.path.getsize(path), "sha256": file_sha256(path)}


def file_identities(paths: Sequence[str | os.PathLike], threads: int = 4
                    ) -> list[dict[str, Any]]:
    """``file_identity`` of every path, in order, hashed by ``threads`` threads (hashlib
    releases the GIL: several files are read and hashed at once)."""
    if len(paths) <= 1 or threads <= 1:
        return [file_identity(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        return list(pool.map(file_identity, paths))


def check_file_identity(path: str | os.PathLike, recorded: Mapping[str, Any], what: str,
                        fix: str) -> None:
    """Refuse ``path`` when its content is not the one ``recorded`` (``file_identity``): an
    ``InputError`` naming the file, ``what`` it should be and the ``fix``. The size is compared
    first (cheap); the hash only when the sizes agree."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing; it should be {what}; {fix}")
    size = os.path.getsize(path)
    if "size" in recorded and int(recorded["size"]) != size:
        raise InputError(f"{path}: is not {what} ({size} bytes, {recorded['size']} recorded: "
                         f"another run's file or a truncated copy); {fix}")
    if "sha256" in recorded and file_sha256(path) != recorded["sha256"]:
        raise InputError(f"{path}: is not {what} (its content differs from the one recorded: "
                         f"another run's file with the same name?); {fix}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def settings_changes(recorded: Mapping[str, Any], current: Mapping[str, Any],
                     keys: Iterable[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded value, current value)}`` for every key (default: every key of
    ``current``) whose value differs; a key the record lacks counts as unchanged (records of
    older versions)."""
    keys = current.keys() if keys is None else keys
    return {k: (recorded[k], current[k]) for k in keys
            if k in recorded and k in current and not _same(recorded[k], current[k])}


def _flag_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v)) if v else "(none)"
    return "(none)" if v is None else str(v)


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``--a X -> Y, --b ...`` for a message."""
    return ", ".join(f"--{k} {_flag_value(a)} -> {_flag_value(b)}" for k, (a, b) in changes.items())


#: Flags that change how a run reports or where it computes, never its result: ignored when a
#: resume compares settings (every stage's policy includes them).
RUNTIME_FLAGS = frozenset({
    "resume", "overwrite", "verbose", "quiet", "log_every", "num_workers", "workers", "device",
    "data_device", "compile", "channels_last", "notes", "log_dir", "multi_gpu", "threads",
    "cache", "prev_coordinates", "save_predictions", "keep", "dry_run", "data_flags_from",
})


@dataclass(frozen=True)
class ResumePolicy:
    """Which flags a ``--resume`` may change. ``applied``: changed values take effect and are
    printed (e.g. ``nb_epoch``, ``patience``). ``ignored``: never compared (besides
    ``RUNTIME_FLAGS``). Every other flag must keep its recorded value."""
    applied: frozenset[str] = field(default_factory=frozenset)
    ignored: frozenset[str] = field(default_factory=frozenset)

    def __init__(self, applied: Iterable[str] = (), ignored: Iterable[str] = ()) -> None:
        object.__setattr__(self, "applied", frozenset(applied))
        object.__setattr__(self, "ignored", frozenset(ignored) | RUNTIME_FLAGS)


def check_resume_settings(recorded: Mapping[str, Any] | None, current: Mapping[str, Any],
                          policy: ResumePolicy, source: str, what: str = "--resume",
                          restart: str = "start again without --resume (with --overwrite)"
                          ) -> dict[str, tuple[Any, Any]]:
    """Compare this run's ``current`` flags with the ``recorded`` configuration of the run it
    continues (``source`` names the file holding it).

    A difference in a flag the policy neither applies nor ignores is an ``InputError`` listing
    every such flag (recorded -> given) and the two fixes. Differences in ``policy.applied``
    flags are printed as one note on stderr and returned ({flag: (old, new)}), so the caller
    can record them. Without a record (files of older versions) nothing is compared.
    """
    if not recorded:
        return {}
    keys = [k for k in current if k not in policy.ignored]
    changes = settings_changes(recorded, current, keys)
    refused = {k: v for k, v in changes.items() if k not in policy.applied}
    if refused:
        raise InputError(f"{source}: {what} continues a run made with other settings "
                         f"({format_changes(refused)}); give the recorded values to continue "
                         f"it, or {restart}")
    applied = {k: v for k, v in changes.items() if k in policy.applied}
    if applied:
        print(f"note: {what}: applying {format_changes(applied)} (recorded in the run's "
              "configuration)", file=sys.stderr)
    return applied
