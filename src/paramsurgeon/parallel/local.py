"""Units of work in processes forked from this one.

A forked worker starts with this process's memory: the lazy checkpoint, its open files and the
operations' closures are there already, so a unit is sent as its index and only its result
(statistics, a shard's digest) comes back. Each worker computes with one thread (the cores
are the workers'), and its memory is one unit's working set on top of what it shares.
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator, TypeVar

from ..errors import WorkError
from .batches import batches

R = TypeVar("R")
_TASK: Callable | None = None  # the forked worker's task, inherited from the process that forked it


def spread(task: Callable[[int], R], sizes: dict[int, int], processes: int) -> Iterator[tuple[int, R]]:
    """``(i, task(i))`` for each unit of ``sizes`` (unit -> bytes) as it finishes, in ``processes``
    forked workers (in this process when it is 1), a few runs of units per worker. A worker's
    error is raised here; so is its death."""
    if processes <= 1:
        for unit in sizes:
            yield unit, task(unit)
        return
    import torch  # here, once, not in every worker

    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"), initializer=_adopt,
                               initargs=(task, torch))
    try:
        pending = {pool.submit(_run, run) for run in batches(sizes, 4 * processes)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    results = future.result()
                except BrokenProcessPool as e:
                    raise WorkError("a worker process died (killed, or out of memory); nothing was written; retry,"
                                    " with fewer --workers if memory is short") from e
                yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _adopt(task: Callable, torch) -> None:
    """In a new worker: take the task over and compute with one thread."""
    global _TASK
    _TASK = task
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle
    torch.set_num_threads(1)


def _run(units: list[int]) -> list:
    return [(unit, _TASK(unit)) for unit in units]
