"""Stage 0's sources: what one patient's scan is, whatever folder it lies in.

A *source* is one input that :func:`preparation.ct_io.find_ct_inputs` finds under one
``--input_dir`` root: a file (with its data file, ``.mhd`` + ``.raw``) or the slices of one
DICOM series of one patient and study. Its identity never depends on where the folder is:

* ``key``: its path relative to its root (POSIX separators; the file name when the root is the
  file), plus ``#<SeriesInstanceUID>`` and ``#<patient_study>`` for DICOM. The split is a hash
  of ``--seed`` and this key, so moving, renaming or copying the input folder, or preparing
  into another output folder, gives the same split.
* ``sha256``: the SHA-256 of the bytes it is read from (the file's own digest, as
  ``sha256sum`` prints it, for a one-file volume; the digest of its files' digests otherwise).
  Recorded in the manifest with size and modification time, so a re-run hashes only sources
  it has not seen at that key, size and time.

Sources with the same content are one patient: prepared once, under the first key in sorted
order, the others recorded as its duplicates, so one scan under two names can never be in both
splits. Hashing large inputs runs in ``--workers`` processes (``runtime.parallel.ordered_map``).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preparation.ct_io import CTReadError, find_ct_inputs, source_files, volume_stem
from runtime.errors import InputError
from runtime.parallel import ordered_map
from runtime.provenance import file_sha256

__all__ = ["Source", "discover", "source_key", "patient_name", "content_sha256", "identify",
           "group_by_content", "split_rank", "assign_splits", "unique_name"]


@dataclass
class Source:
    """One input: ``item`` (from ``find_ct_inputs``), its ``key`` under its root, the
    patient ``base`` name it suggests, its ``files`` with their summed ``size`` and latest
    ``mtime_ns``, its content ``sha256`` (empty until :func:`identify`) and the ``error`` that
    made it unreadable (empty when none)."""
    item: dict[str, Any]
    key: str
    base: str
    files: list[Path] = field(default_factory=list)
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""
    error: str = ""

    @property
    def path(self) -> Path:
        """The file or series folder, as found under its root."""
        return Path(self.item["path"])


def source_key(item: Mapping[str, Any], root: Path) -> str:
    """``item``'s path relative to ``root`` (POSIX), ``#series#subject`` for DICOM."""
    path = Path(item["path"])
    if root.is_file():
        rel = path.name
    else:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:   # not under root textually (should not happen): its name
            rel = path.name
    if item["kind"] == "dicom":
        rel += f"#{item['series']}" + (f"#{item['subject']}" if item.get("subject") else "")
    return rel


def patient_name(item: Mapping[str, Any], root: Path) -> str:
    """A file-system-safe patient name: the file stem, or the series folder's path under root
    (with the series UID's end when the folder holds several series, and the subject)."""
    path = Path(item["path"])
    if item["kind"] == "dicom":
        try:
            rel = path.relative_to(root) if root.is_dir() else Path(path.name)
            base = "_".join(rel.parts) or Path(os.path.abspath(path)).name
        except ValueError:
            base = path.name
        if item.get("n_series", 1) > 1:
            base = f"{base}_{item['series'][-8:]}"
        if item.get("subject"):
            base = f"{base}_{item['subject']}"
    else:
        base = volume_stem(path)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "patient"


def discover(roots: Iterable[Path]) -> list[Source]:
    """Every source under ``roots`` (their order, then sorted), with key, name and file
    sizes/times. A root that holds nothing readable as input is an ``InputError``."""
    out: list[Source] = []
    for root in roots:
        try:
            items = find_ct_inputs(root)
        except CTReadError as e:
            raise InputError(f"{e}; give folders or files of CT scans to --input_dir") from e
        for item in items:
            src = Source(item, source_key(item, root), patient_name(item, root))
            try:
                src.files = source_files(item)
                stats = [f.stat() for f in src.files]
                src.size = sum(st.st_size for st in stats)
                src.mtime_ns = max(st.st_mtime_ns for st in stats)
            except OSError as e:
                src.error = f"{src.path}: cannot be read ({e.strerror or e})"
            out.append(src)
    return out


def content_sha256(files: list[Path]) -> str:
    """The content identity of a source's files: the file's SHA-256 for one file, else the
    SHA-256 of the files' digests in order (names play no part)."""
    digests = [file_sha256(f) for f in files]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _hash_task(files: list[Path]) -> tuple[str, str]:
    """(sha256, "") or ("", why): module level, so worker processes can run it."""
    try:
        return content_sha256(files), ""
    except OSError as e:
        return "", f"{files[0]}: cannot be read ({e.strerror or e})"


#: Hash in worker processes only when there is more than this to read: starting them costs
#: seconds, hashing runs at about 1 GB/s per process.
POOL_BYTES = 1 << 30


def identify(sources: list[Source], known: Mapping[tuple[str, int, int], str],
             workers: int = 1, show: bool = True) -> None:
    """Fill every readable source's ``sha256``: from ``known`` ((key, size, mtime_ns) ->
    sha256, what the manifest recorded) when it matches, else by hashing its files (in
    ``workers`` processes when there are more than ``POOL_BYTES`` to read). A file that
    cannot be read sets ``error``."""
    todo = [s for s in sources if not s.error]
    for s in todo:
        s.sha256 = known.get((s.key, s.size, s.mtime_ns), "")
    todo = [s for s in todo if not s.sha256]
    pool = workers if sum(s.size for s in todo) > POOL_BYTES else 1
    results = ordered_map(_hash_task, [s.files for s in todo], pool, desc="identify",
                          unit="scan", show=show)
    for s, (sha, why) in zip(todo, results):
        s.sha256, s.error = sha, why


def group_by_content(sources: list[Source]) -> list[list[Source]]:
    """Readable sources grouped by content, each group sorted by key (its first source is the
    one read), the groups sorted by their first key."""
    groups: dict[str, list[Source]] = {}
    for s in sources:
        if not s.error:
            groups.setdefault(s.sha256, []).append(s)
    out = [sorted(g, key=lambda s: (s.key, str(s.path))) for g in groups.values()]
    return sorted(out, key=lambda g: (g[0].key, g[0].sha256))


def split_rank(key: str, sha256: str, seed: int) -> tuple[int, str]:
    """The place of a patient in the split order: a hash of ``seed`` and its relative key
    (its content breaks the tie of equal keys under two roots), never the discovery order."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big"), sha256


def assign_splits(groups: list[list[Source]], val_fraction: float, seed: int) -> dict[str, str]:
    """``{sha256: "train" | "validation"}`` for every group: the first ``round(n x
    val_fraction)`` groups in :func:`split_rank` order are validation (at least one when
    there are two or more groups and the fraction is > 0; never all)."""
    order = sorted(groups, key=lambda g: split_rank(g[0].key, g[0].sha256, seed))
    n_val = int(round(len(order) * val_fraction))
    if val_fraction > 0 and len(order) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, max(0, len(order) - 1))
    return {g[0].sha256: ("validation" if i < n_val else "train") for i, g in enumerate(order)}


def unique_name(base: str, key: str, sha256: str, taken: set[str], shared: bool) -> str:
    """``base`` when no other source of the run suggests it (``shared`` false) and no patient
    has it, else ``base_<hash of the key>`` (``base_<hash of the content>`` if that is taken)."""
    if not shared and base not in taken:
        return base
    for suffix in (hashlib.sha256(key.encode()).hexdigest()[:8], sha256[:8], sha256[8:16]):
        if f"{base}_{suffix}" not in taken:
            return f"{base}_{suffix}"
    return f"{base}_{sha256}"
