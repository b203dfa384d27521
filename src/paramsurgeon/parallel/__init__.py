"""Work spread over processes: per-tensor statistics and per-shard writes.

A command that reads or writes many tensors hands its units of work (a batch of tensors, an
output shard) to ``spread``, which runs them in ``--workers N`` processes forked from this one
(they inherit the lazy checkpoint, so nothing is sent to them but an index; local.py), or on a
Dask cluster (``--scheduler``; cluster.py), whose workers rebuild the command from its command
line and run just their units. Each unit's result comes back to the command, which puts
them in order: the output is the same whatever ran it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from ..errors import UsageError

R = TypeVar("R")
ENVIRONMENT = "PARAMSURGEON_WORKERS"
SMALL = 64 << 20  # bytes of work not worth a process when the user asked for no particular number


@dataclass(frozen=True)
class Work:
    """How a command spreads its work: ``workers`` local processes (``asked``: a number the user
    gave, used even for small work), or the Dask cluster at ``scheduler``, whose workers rebuild
    the command from ``job``."""

    workers: int = 1
    asked: bool = False
    scheduler: str | None = None
    job: object | None = None  # cluster.Job, made by the command line

    def processes(self, count: int, nbytes: int) -> int:
        """How many local processes ``count`` units of ``nbytes`` in all are worth."""
        if count < 2 or (not self.asked and nbytes < SMALL):
            return 1
        return min(self.workers, count)


def work(workers: str | None, scheduler: str | None = None, job: object | None = None) -> Work:
    """The Work of ``--workers`` (else PARAMSURGEON_WORKERS, else every core) and ``--scheduler``;
    a count that is not a positive integer is a UsageError, and so is a scheduler without Dask distributed."""
    if scheduler is not None:
        from .cluster import require

        require()
    given, where = (workers, "--workers") if workers is not None else (os.environ.get(ENVIRONMENT), ENVIRONMENT)
    if given is None:
        return Work(cores(), False, scheduler, job)
    try:
        count = int(given)
    except ValueError:
        count = 0
    if count < 1 or str(given).strip() != str(given):
        raise UsageError(f"{where} {given}: the number of worker processes is a positive integer (1 runs"
                         " everything in this process)")
    return Work(count, True, scheduler, job)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def spread(task: Callable[[int], R], sizes: dict[int, int], work: Work, kind: str,
           place: object = None) -> Iterator[tuple[int, R]]:
    """``(i, task(i))`` for every unit ``i`` of ``sizes`` (unit -> bytes of work), as each finishes:
    in this process, in forked workers, or on the cluster (``kind`` names the units there, 'shards'
    or 'tensors'; ``place`` is where a cluster's workers put what they write)."""
    from . import cluster, local

    if cluster.rerunning():  # on a cluster's worker: this task's units, none of another kind (the
        if cluster.rebuilding(kind) is not None:  # client ran those: overflow checks)
            yield from cluster.run_here(task, kind)
        return
    if work.scheduler is not None and work.job is not None:
        yield from cluster.spread(sizes, work, kind, place)
        return
    yield from local.spread(task, sizes, work.processes(len(sizes), sum(sizes.values())))
