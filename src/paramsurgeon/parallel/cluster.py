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
import importlib
import io
import os
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from time import monotonic
from typing import Callable, Iterator

from ..errors import UsageError, WorkError
from .batches import batches

CONNECT_TIMEOUT = 5.0  # seconds to reach the scheduler
WORKERS_TIMEOUT = 10.0  # seconds to wait for a worker, unless Dask's no-workers-timeout says otherwise
_REBUILDING: ContextVar[tuple[str, list[int], object] | None] = ContextVar("rebuilding", default=None)
_ONE_AT_A_TIME = threading.Lock()  # a rerun changes the worker's directory


@dataclass(frozen=True)
class Job:
    """How a worker runs the command again: ``run(argv)`` (the CLI's) in ``cwd``."""

    argv: tuple[str, ...]
    cwd: str
    run: Callable[[list[str]], object]


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


def rerunning() -> bool:
    """Whether this is a worker's rerun of a command."""
    return _REBUILDING.get() is not None


def run_here(task: Callable, kind: str) -> Iterator:
    """In a worker's rerun: compute this task's units and end the command with their results."""
    _, units, _ = _REBUILDING.get()
    raise _Done([(unit, task(unit)) for unit in units])
    yield  # a generator, as spread's other ways are


def spread(sizes: dict[int, int], work, kind: str, place: object = None) -> Iterator[tuple[int, object]]:
    """Run the units on the cluster at ``work.scheduler``: one task per unit for shards, a few
    batches per worker for smaller units; yields ``(unit, result)`` as tasks finish."""
    client = connect(work.scheduler)
    try:
        if place is not None:
            _refuse_unseen(client, work.scheduler, str(place))
        runs = [[unit] for unit in sizes] if kind == "shards" else batches(sizes, 4 * len(client.nthreads()))
        futures = [client.submit(_task, work.job, kind, run, place or True, pure=False) for run in runs]
        for future in _finishing(client, futures, work.scheduler):
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


def _finishing(client, futures: list, address: str) -> Iterator:
    """``futures`` as they finish; a WorkError once the cluster has had no worker for the patience
    (every worker died and none joined: Dask would hold the tasks for ever)."""
    from distributed import TimeoutError as NotYet, wait

    patience, pending, alone_since = _patience(), set(futures), None
    while pending:
        try:
            with client.as_current():
                done, pending = wait(pending, timeout=1, return_when="FIRST_COMPLETED")
        except NotYet:
            done = set()
            if client.nthreads():
                alone_since = None
            elif alone_since is None:
                alone_since = monotonic()
            elif monotonic() - alone_since > patience:
                raise WorkError(f"the cluster at {address} lost its workers (none for {patience:g} s) and could not"
                                f" finish; nothing was written; start one with 'dask worker {address}'") from None
        yield from done


def require() -> None:
    """A UsageError saying how to install Dask distributed, where it is missing."""
    try:
        importlib.import_module("distributed")
    except ImportError as e:
        raise UsageError("--scheduler runs the work on a Dask cluster, which needs Dask distributed:"
                         " pip install 'paramsurgeon[cluster]'") from e


def connect(address: str):
    """A Dask client of the scheduler at ``address`` with at least one worker."""
    require()
    from distributed import Client

    client = _within(lambda: Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False), CONNECT_TIMEOUT + 1)
    if isinstance(client, (OSError, TimeoutError, ValueError)):
        raise WorkError(f"cannot reach the Dask scheduler at {address} within {CONNECT_TIMEOUT:g} s ({client});"
                        " nothing was written; start one with 'dask scheduler' or check the address") from client
    if not hasattr(client, "submit"):  # no answer, or one that is not Dask's
        raise WorkError(f"{address} does not answer as a Dask scheduler does ({_said(client)}); nothing was written;"
                        " give the scheduler's address (tcp://HOST:PORT, 8786 by default), not its dashboard's")
    patience = _patience()
    try:
        client.wait_for_workers(1, timeout=patience)
    except (OSError, TimeoutError) as e:
        client.close()
        raise WorkError(f"the Dask scheduler at {address} has no workers (none joined within"
                        f" {patience:g} s); nothing was written; start one with 'dask worker {address}'") from e
    return client


def _within(make: Callable, seconds: float) -> object:
    """What ``make()`` returns or raises, or None when it takes longer than ``seconds``: Dask's own
    connect timeout does not cover its handshake, which a port that accepts and never answers (a
    web server's) holds for ever. Left behind, the thread dies with the process."""
    outcome: list = [None]

    def attempt() -> None:
        try:
            outcome[0] = make()
        except Exception as e:  # noqa: BLE001 - returned, judged by the caller
            outcome[0] = e

    thread = threading.Thread(target=attempt, name="dask-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0]


def _said(outcome: object) -> str:
    return f"no answer within {CONNECT_TIMEOUT:g} s" if outcome is None else f"{type(outcome).__name__} on its reply"


def _patience() -> float:
    """Seconds to wait for a worker: Dask's ``distributed.scheduler.no-workers-timeout`` (how long a task
    may stay unrunnable; DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT) when set above 0, else WORKERS_TIMEOUT."""
    import dask
    from dask.utils import parse_timedelta

    setting = dask.config.get("distributed.scheduler.no-workers-timeout", None)
    seconds = float(parse_timedelta(setting, "s")) if setting is not None else 0.0
    return seconds if seconds > 0 else WORKERS_TIMEOUT


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
    errors = io.StringIO()
    with _ONE_AT_A_TIME, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
        token = _REBUILDING.set((kind, units, place))
        previous = os.getcwd()
        try:
            os.chdir(job.cwd)
            job.run(list(job.argv))
        except _Done as done:
            return done.results
        except OSError as e:
            return f"cannot enter {job.cwd}: {e.strerror}"
        finally:
            os.chdir(previous)
            _REBUILDING.reset(token)
    said = [line for line in errors.getvalue().splitlines() if line.startswith("paramsurgeon: error: ")]
    return said[-1].removeprefix("paramsurgeon: error: ") if said else "the command ended before its work"
