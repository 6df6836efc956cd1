"""Per-item work (one scan, one patient) in worker processes, results in input order.

``ordered_map(fn, items, workers)`` is the one way the preparation commands spread their scans
over processes: ``workers`` 0 or 1 runs in this process (no pool, easy to debug); more starts
that many *spawned* processes (no fork of a process holding threads), each limited to one
compute thread, and keeps at most ``2 x workers`` items in flight, so memory stays bounded
however many scans there are. Results come back in the order of ``items`` whatever the number
of workers, so a run's outputs are identical for any ``--workers``; a progress bar counts the
finished items. An error in a worker is raised here (the first in input order) after the
pool is shut down; Ctrl-C cancels what has not started.

``fn`` must be a module-level function (it is pickled to the workers) taking one item.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

from tqdm import tqdm

__all__ = ["ordered_map", "single_threaded"]

T = TypeVar("T")
R = TypeVar("R")

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def single_threaded() -> None:
    """Worker initialiser: one compute thread for NumPy/BLAS, SimpleITK (ITK) and torch, so N
    workers use N cores instead of N x cores. Environment variables only: they are read when
    the worker's code first imports those libraries, so a worker pays for no import it does
    not need."""
    for var in _THREAD_VARS:
        os.environ[var] = "1"


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 1, desc: str = "",
                unit: str = "item", total: int | None = None,
                show: bool = True) -> Iterator[R]:
    """``fn(item)`` for every item, yielded in input order.

    ``workers`` <= 1: in this process. Otherwise that many spawned processes (initialised by
    :func:`single_threaded`), at most ``2 x workers`` items submitted ahead of the one being
    yielded. ``desc``/``unit``/``total``/``show``: the tqdm progress bar (off when ``show`` is
    False or the output is not a terminal).
    """
    items = list(items) if total is None else items
    total = len(items) if total is None else total   # type: ignore[arg-type]
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
               disable=None if show else True)
    try:
        if workers <= 1:
            for item in items:
                result = fn(item)
                bar.update(1)
                yield result
            return
        yield from _pooled(fn, items, workers, bar)
    finally:
        bar.close()


def _pooled(fn: Callable[[T], R], items: Iterable[T], workers: int, bar: tqdm) -> Iterator[R]:
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=single_threaded)
    pending: deque[Future[Any]] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()      # raises the worker's exception here
            for item in source:                      # keep the pool fed: one in, one out
                pending.append(pool.submit(fn, item))
                break
            bar.update(1)
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
