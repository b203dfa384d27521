"""Units of work on a Dask distributed cluster (``--scheduler tcp://HOST:PORT``).

The cluster's workers share this machine's paths (a shared file system), not its memory. A
task runs the command again from its command line (``Job``), in the worker, as far as the
point where the command spreads its work; there it runs only its own units and hands their
results back (``run_here``), and the command ends there. The client gathers the results as
the command running alone would have made them; a task whose worker dies is run again by Dask
on another worker, and a unit's result (a shard written under a name of its own, then renamed)
is the same whoever computes it.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import UsageError, WorkError

CONNECT_TIMEOUT = 5.0  # seconds to reach the scheduler
WORKERS_TIMEOUT = 10.0  # seconds to wait for its first worker
_REBUILDING: ContextVar[tuple[str, list[int], object] | None] = ContextVar("rebuilding", default=None)
_ONE_AT_A_TIME = threading.Lock()  # a rerun changes the worker's directory


@dataclass(frozen=True)
class Job:
    """How a worker runs the command again: its arguments and directory."""

    argv: tuple[str, ...]
    cwd: str


class _Done(BaseException):
    """A rerun reached its units and computed them: the command goes no further."""

    def __init__(self, results: list):
        super().__init__()
        self.results = results


def rebuilding(kind: str) -> object | None:
    """In a worker's rerun whose units are of ``kind``: the place the client gave them (a
    staging directory, or True); else None."""
    current = _REBUILDING.get()
    return current[2] if current is not None and current[0] == kind else None


def run_here(task: Callable, kind: str) -> Iterator:
    """In a worker's rerun: compute this task's units and end the command with their results."""
    _, units, _ = _REBUILDING.get()
    raise _Done([(unit, task(unit)) for unit in units])
    yield  # a generator, as spread's other ways are


def spread(sizes: dict[int, int], work, kind: str, place: object = None) -> Iterator[tuple[int, object]]:
    """Run the units on the cluster at ``work.scheduler``: one task per unit for shards, a few
    batches per worker for smaller units; yields ``(unit, result)`` as tasks finish."""
    from . import batches

    client = connect(work.scheduler)
    try:
        workers = len(client.scheduler_info()["workers"])
        if place is not None:
            _refuse_unseen(client, work.scheduler, str(place))
        runs = [[unit] for unit in sizes] if kind == "shards" else batches(sizes, 4 * workers)
        futures = [client.submit(_task, work.job, kind, run, place or True, pure=False) for run in runs]
        from distributed import as_completed

        for future in as_completed(futures, loop=client.loop):
            try:
                outcome = future.result()
            except Exception as e:  # KilledWorker, a worker's lost connection: Dask gave up on it
                raise WorkError(f"the cluster at {work.scheduler} could not finish ({type(e).__name__}: {e});"
                                " nothing was written") from e
            if isinstance(outcome, str):
                raise WorkError(f"a worker of the cluster at {work.scheduler} could not run the command: {outcome};"
                                " its workers need this machine's paths (a shared file system); nothing was written")
            yield from outcome
    finally:
        client.close()


def connect(address: str):
    """A Dask client of the scheduler at ``address`` with at least one worker."""
    try:
        from distributed import Client
    except ImportError as e:
        raise UsageError("--scheduler runs the work on a Dask cluster, which needs Dask distributed:"
                         " pip install 'paramsurgeon[cluster]'") from e
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise WorkError(f"cannot reach the Dask scheduler at {address} within {CONNECT_TIMEOUT:g} s ({e});"
                        " nothing was written; start one with 'dask scheduler' or check the address") from e
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT)
    except (OSError, TimeoutError) as e:
        client.close()
        raise WorkError(f"the Dask scheduler at {address} has no workers (none joined within"
                        f" {WORKERS_TIMEOUT:g} s); nothing was written; start one with 'dask worker {address}'") from e
    return client


def _refuse_unseen(client, address: str, place: str) -> None:
    """Refuse a cluster whose workers cannot see ``place`` (a directory this process made)."""
    seen = client.run(os.path.isdir, place)
    blind = sorted(worker for worker, visible in seen.items() if not visible)
    if blind:
        raise WorkError(f"the workers of the cluster at {address} ({', '.join(blind)}) cannot see"
                        f" '{os.path.dirname(place)}'; a cluster's workers need this machine's paths (a shared file"
                        " system); nothing was written")


def _task(job: Job, kind: str, units: list[int], place: object) -> list | str:
    """In a worker: run the command again and compute ``units``; their results, or the error
    that stopped the command (a line of text)."""
    from ..cli import build_app

    named = next((arg for arg in job.argv if not arg.startswith("-")), None)
    errors = io.StringIO()
    with _ONE_AT_A_TIME, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
        token = _REBUILDING.set((kind, units, place))
        previous = os.getcwd()
        try:
            os.chdir(job.cwd)
            build_app(named)(args=list(job.argv), standalone_mode=False)
        except _Done as done:
            return done.results
        except OSError as e:
            return f"cannot enter {job.cwd}: {e.strerror}"
        finally:
            os.chdir(previous)
            _REBUILDING.reset(token)
    said = [line for line in errors.getvalue().splitlines() if line.startswith("paramsurgeon: error: ")]
    return said[-1].removeprefix("paramsurgeon: error: ") if said else "the command ended before its work"
