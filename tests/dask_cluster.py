"""A real Dask cluster for the tests: a scheduler and its workers started as processes on 127.0.0.1
(``dask scheduler``, ``dask worker``; a free port each, no dashboard, one thread per worker), the
workers importing the paramsurgeon under test. A test watches and kills them through a client of
its own (``pids``, ``busy``); ``stop`` ends them all.

Without Dask distributed the cluster tests skip, unless PARAMSURGEON_REQUIRE_DASK=1 (CI), where
they fail.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

import paramsurgeon

REQUIRED = os.environ.get("PARAMSURGEON_REQUIRE_DASK") == "1"
UNDER_TEST = os.path.dirname(os.path.dirname(paramsurgeon.__file__))  # the directory paramsurgeon is imported from
START_TIMEOUT = 60  # seconds for a process to start and a worker to join, on a busy machine


def require_distributed() -> None:
    """Skip (fail in CI) when Dask distributed is not importable."""
    if importlib.util.find_spec("distributed") is None:
        message = "Dask distributed is not installed (pip install 'paramsurgeon[cluster]')"
        pytest.fail(message + " and PARAMSURGEON_REQUIRE_DASK=1") if REQUIRED else pytest.skip(message)


def environment(**extra: str) -> dict:
    """This process's environment with the paramsurgeon under test first on the path."""
    path = os.pathsep.join(p for p in (UNDER_TEST, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


class Cluster:
    """A scheduler started in ``folder`` (its log and address file there); ``env``: settings of
    its processes, such as DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES."""

    def __init__(self, folder, **env: str):
        require_distributed()
        self.folder, self.env, self.workers = str(folder), environment(**env), []
        os.makedirs(self.folder, exist_ok=True)
        address_file = os.path.join(self.folder, "scheduler.json")
        self.scheduler = self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                                   "--no-dashboard", "--scheduler-file", address_file])
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(address_file):
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Dask scheduler did not start: {self.log('scheduler')}")
            time.sleep(0.05)
        self.address = json.load(open(address_file))["address"]
        from distributed import Client

        self.client = Client(self.address, timeout=START_TIMEOUT, set_as_default=False)

    def add_workers(self, count: int = 1, *, nanny: bool = False, wrap: tuple[str, ...] = (),
                    warm: bool = True) -> list[subprocess.Popen]:
        """Start ``count`` workers (``wrap``: the command they run under, such as ``unshare``) and
        return once they joined; ``warm``: once they imported paramsurgeon too (from where this
        process does), which their first task would otherwise pay for."""
        joined = len(self.client.nthreads())
        started = []
        for _ in range(count):
            name = f"worker{len(self.workers) + 1}"
            options = ["--nthreads", "1", "--no-dashboard", "--nanny" if nanny else "--no-nanny",
                       "--local-directory", os.path.join(self.folder, name)]
            started.append(self._start(name, ["worker", self.address, *options], wrap))
            self.workers.append(started[-1])
        self.client.wait_for_workers(joined + count, timeout=START_TIMEOUT)
        if warm:
            imported = self.client.run(_import_paramsurgeon)
            assert all(os.path.dirname(os.path.dirname(f)) == UNDER_TEST for f in imported.values()), imported
        return started

    def stop_workers(self, workers: list[subprocess.Popen]) -> None:
        """End ``workers`` and wait until the scheduler has none of them."""
        left = len([p for p in self.workers if p not in workers and p.poll() is None])  # a worker each
        for process in workers:
            process.terminate()
        for process in workers:
            process.wait(START_TIMEOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.client.nthreads()) > left and time.monotonic() < deadline:
            time.sleep(0.05)

    def allow_failures(self, count: int) -> None:
        """Set the scheduler's ``allowed-failures``: how many workers may die running a task before it fails."""
        self.client.run_on_scheduler(_allow_failures, count)

    def pids(self) -> dict[str, int]:
        """Each live worker's address and process id."""
        return self.client.run(os.getpid)

    def busy(self) -> dict[str, int]:
        """Each worker's address and the number of tasks the scheduler has given it."""
        return {worker: len(keys) for worker, keys in self.client.processing().items()}

    def executed(self) -> int:
        """How many tasks the live workers ran."""
        return sum(self.client.run(_executed).values())

    def log(self, name: str) -> str:
        with open(os.path.join(self.folder, f"{name}.log")) as f:
            return f.read()[-2000:]

    def stop(self) -> None:
        """End the workers, then the scheduler."""
        if getattr(self, "client", None) is not None:
            self.client.close()
        for group in (self.workers, [self.scheduler]):  # a worker without its scheduler would try to reconnect
            for process in group:
                if process.poll() is None:
                    process.terminate()
            for process in group:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def _start(self, name: str, args: list[str], wrap: tuple[str, ...] = ()) -> subprocess.Popen:
        with open(os.path.join(self.folder, f"{name}.log"), "wb") as log:
            return subprocess.Popen([*wrap, sys.executable, "-m", "dask", *args], stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, env=self.env, cwd=self.folder)


# run in the workers, so sent by value (lambdas): the workers do not import the tests
_import_paramsurgeon = lambda: __import__("paramsurgeon.cli").__file__  # noqa: E731 - what a task runs first
_executed = lambda dask_worker: dask_worker.state.executed_count  # noqa: E731
_allow_failures = lambda count, dask_scheduler: setattr(dask_scheduler, "allowed_failures", count)  # noqa: E731
