"""Statistics of repeated fine-tuning runs: the mean and its Student-t interval over seeds, and
the paired difference of two initialisations run with the same seeds (same data order, same
head initialisation), the comparison the target-task tables and the transfer study report."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["finite_values", "mean_ci", "mean_std", "paired_difference", "fraction_key",
           "summary_rows"]


def finite_values(values: Sequence[float | None]) -> np.ndarray:
    """The finite entries of ``values`` as float64 (None and NaN dropped)."""
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)


def mean_ci(values: Sequence[float | None], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper): Student-t interval of the mean of ``values`` (NaNs dropped); the
    interval is NaN for fewer than two values, everything NaN for none."""
    from scipy import stats  # slow to import; needed only where a summary is written

    arr = finite_values(values)
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(arr.mean())
    if arr.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return m, m - half, m + half


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """(mean, sample standard deviation) of the finite ``values`` (std NaN below two)."""
    arr = finite_values(values)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan")


def paired_difference(values: Sequence[float | None], baseline: Sequence[float | None],
                      level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper) of ``values[i] - baseline[i]`` over the seeds both have (pairs with
    a missing or non-finite side dropped): the paired comparison of two initialisations."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values need one per seed on both sides, got {len(values)} and "
                         f"{len(baseline)}")
    diffs = [a - b for a, b in zip(values, baseline)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    return mean_ci(diffs, level)


def fraction_key(fraction: float | str) -> str:
    """A label fraction as the key results are stored under: ``0.05 -> "0.05"``, ``1.0 -> "1"``."""
    return f"{float(fraction):g}"


def summary_rows(results: Mapping[str, Mapping[str, Sequence[float | None]]],
                 baseline: str | None = "scratch", level: float = 0.95) -> list[dict[str, Any]]:
    """Summary of ``results[init][fraction] = [value per seed]`` (the same seed order for every
    init): one row per (fraction, init), fractions in increasing order, inits in the order
    given, each ``{"init", "fraction", "n", "values", "mean", "std", "ci": [lo, hi]}`` plus, for
    an init other than ``baseline`` where the baseline has the same fraction and number of
    seeds, ``"diff"`` and ``"diff_ci"``: the paired difference to the baseline (seed by seed)
    and its interval."""
    fractions = sorted({f for by_f in results.values() for f in by_f}, key=float)
    rows = []
    for f in fractions:
        base = results.get(baseline, {}).get(f) if baseline is not None else None
        for init, by_f in results.items():
            vals = by_f.get(f)
            if vals is None:
                continue
            m, lo, hi = mean_ci(vals, level)
            row: dict[str, Any] = {"init": init, "fraction": f, "n": int(finite_values(vals).size),
                                   "values": list(vals), "mean": m, "std": mean_std(vals)[1],
                                   "ci": [lo, hi]}
            if base is not None and init != baseline and len(base) == len(vals):
                dm, dlo, dhi = paired_difference(vals, base, level)
                row.update(diff=dm, diff_ci=[dlo, dhi])
            rows.append(row)
    return rows
