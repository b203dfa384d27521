"""--scheduler: the work on a real Dask cluster (a scheduler and two workers started as processes on
127.0.0.1 by the dask_cluster fixture), run as a user runs it: a process whose command line the
workers run again. Every output is compared byte for byte with a local ``--workers 1`` run and its
values with torch (safetensors read back, DeepSeek's weight_dequant, numpy's histogram); workers
are killed mid-run (SIGKILL), and bad clusters (none at the address, something else there, no
workers, workers that see other files) end in one line and exit 2 with nothing written.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dask_cluster import Cluster, environment, require_distributed
from fp8_reference import dequantize, quantize
from helpers import bits, digest, register_input, run, run_on_terminal
from test_quant_commands import FP8_CONFIG, stored

CONNECT_TIMEOUT = 5  # parallel.cluster's
STARTING = 20  # seconds a paramsurgeon process may take to start on a busy machine (torch's import)


def paramsurgeon(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, as the cluster path needs (its workers rerun the command line)."""
    return subprocess.run([sys.executable, "-m", "paramsurgeon", *map(str, args)], capture_output=True, text=True,
                          env=environment(**(env or {})), timeout=timeout)


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "paramsurgeon", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment(**(env or {})))


def contents(folder) -> dict[str, bytes]:
    """Every file of ``folder`` (hidden ones too: a staging directory, a .partial shard) and its bytes."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def sharded(folder, shards: int, rows: int = 256, columns: int = 256) -> dict[str, torch.Tensor]:
    """A Hugging Face directory of ``shards`` float32 shards (two tensors each), its index and a config."""
    torch.manual_seed(shards)
    folder.mkdir()
    state, weight_map = {}, {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {f"model.layers.{shard}.{p}.weight": torch.randn(rows, columns) for p in ("q_proj", "o_proj")}
        save_file(part, folder / name, metadata={"format": "pt"})
        state.update(part)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    return state


def cast(folder, out, *where):
    return "cast", folder, "--all", "--dtype", "bfloat16", "-o", out, *where


def local(*args) -> dict[str, bytes]:
    """The files a local ``--workers 1`` run writes (args end with its output)."""
    result = run(*args, "--workers", "1")
    assert result.exit_code == 0, result.stderr
    return contents(args[-1])


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """8 shards, 4 MiB (tensors of 65,536 values: exact histograms), and what a local cast to bfloat16
    writes of them: (folder, tensors, local output folder, its files)."""
    root = tmp_path_factory.mktemp("eight")
    state = sharded(root / "eight", 8)
    return root / "eight", state, root / "local", local(*cast(root / "eight", root / "local"))


@pytest.fixture
def eight_shards(request, eight):
    register_input(request, eight[0])
    return eight


@pytest.fixture
def old(tmp_path, eight):
    """An output a run replaces: a local cast's, and its digest."""
    shutil.copytree(eight[2], tmp_path / "out")
    return tmp_path / "out", digest(tmp_path / "out")


@pytest.fixture(scope="module")
def spare(tmp_path_factory):
    """A scheduler of its own, without workers: a test adds the ones it needs and leaves none."""
    cluster = Cluster(tmp_path_factory.mktemp("spare"))
    yield cluster
    cluster.stop()


def left_behind(folder) -> list[str]:
    """What a write left in ``folder`` besides its output: staging directories, partial shards."""
    return [name for name in os.listdir(folder) if name.startswith(".")]


def kill_when_busy(cluster: Cluster, command: subprocess.Popen, address: str | None = None) -> None:
    """SIGKILL the worker at ``address`` (else the first) as soon as the scheduler gives it a task of
    ``command``'s, which must still be running."""
    deadline = time.monotonic() + 60
    while not (busy := [a for a, n in cluster.busy().items() if n and address in (None, a)]):
        assert command.poll() is None and time.monotonic() < deadline, command.communicate()
        time.sleep(0.005)
    os.kill(cluster.pids()[busy[0]], signal.SIGKILL)
    assert command.poll() is None  # mid-run


# byte-identical to a local run, and right


def test_cast_on_the_cluster_writes_each_shard_in_a_worker_and_the_bytes_of_a_local_run(dask_cluster, eight_shards,
                                                                                          tmp_path):
    """On a terminal: the bar advances as the workers' shards arrive (2,097,152 bytes of bfloat16 in all)."""
    folder, state, _, expected = eight_shards
    before = dask_cluster.executed()
    code, shown, _ = run_on_terminal(*cast(folder, tmp_path / "cluster", "--scheduler", dask_cluster.address),
                                     terminal=("stderr",), env={**environment(), "PARAMSURGEON_PROGRESS_DELAY": "0"})
    assert code == 0, shown
    assert b"writing" in shown and b"2.1/2.1 MB" in shown, shown
    assert dask_cluster.executed() - before >= 8  # a task per shard (and the overflow checks'), run by the workers
    assert contents(tmp_path / "cluster") == expected  # the shards, the index and config.json
    assert "config.json" in expected and "model.safetensors.index.json" in expected
    written = stored(tmp_path / "cluster")
    assert written.keys() == state.keys()
    for name, value in state.items():
        assert bits(written[name]) == bits(value.to(torch.bfloat16)), name
    assert left_behind(tmp_path) == []


def test_dequantize_on_the_cluster_is_deepseeks_weight_dequant_and_a_local_runs_bytes(dask_cluster, request,
                                                                                      tmp_path):
    torch.manual_seed(7)
    folder, weight_map, reference = tmp_path / "fp8", {}, {}
    folder.mkdir()
    for shard in range(4):
        name, part = f"model-{shard + 1:05d}-of-00004.safetensors", {}
        for weight in (f"model.layers.{shard}.mlp.down_proj.weight", f"model.layers.{shard}.mlp.up_proj.weight"):
            part[weight], part[weight + "_scale_inv"] = quantize(torch.randn(200, 300) * 0.02)  # partial tiles
            reference[weight] = dequantize(part[weight], part[weight + "_scale_inv"])
        part[f"model.layers.{shard}.input_layernorm.weight"] = torch.rand(300, dtype=torch.bfloat16)
        reference.update((k, v) for k, v in part.items() if v.dtype == torch.bfloat16)
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": FP8_CONFIG}))
    register_input(request, folder)
    expected = local("dequantize", folder, "-o", tmp_path / "local")
    result = paramsurgeon("dequantize", folder, "-o", tmp_path / "cluster", "--scheduler", dask_cluster.address)
    assert result.returncode == 0, result.stderr
    assert contents(tmp_path / "cluster") == expected
    written = stored(tmp_path / "cluster")
    assert written.keys() == reference.keys()
    for name, value in reference.items():
        assert bits(written[name]) == bits(value), name
    assert json.loads((tmp_path / "cluster" / "config.json").read_text()) == {"torch_dtype": "bfloat16"}


def test_init_on_the_cluster_draws_in_the_workers_the_values_of_the_seed_it_reports(dask_cluster, eight_shards,
                                                                                     tmp_path):
    """No --seed: the client draws one and the workers, rerunning the command, use it, not one of their own."""
    folder, state = eight_shards[:2]
    init = ("init", folder, "-p", "*.q_proj.weight", "--scheme", "normal(std=0.02)")
    result = paramsurgeon(*init, "-o", tmp_path / "cluster", "--scheduler", dask_cluster.address)
    assert result.returncode == 0, result.stderr
    seed = re.search(r"pass --seed (\d+) to repeat", result.stderr).group(1)
    assert contents(tmp_path / "cluster") == local(*init, "--seed", seed, "-o", tmp_path / "local")
    written = stored(tmp_path / "cluster")
    for name, value in state.items():
        if "q_proj" in name:
            assert written[name].std().item() == pytest.approx(0.02, rel=0.05), name
        else:
            assert bits(written[name]) == bits(value), name


def test_inspect_statistics_and_histograms_on_the_cluster_are_a_local_runs_and_torchs(dask_cluster, eight_shards):
    folder, state = eight_shards[:2]
    expected = run("inspect", folder, "--json", "--hist", "--workers", "1")
    assert expected.exit_code == 0, expected.stderr
    before = dask_cluster.executed()
    result = paramsurgeon("inspect", folder, "--json", "--hist", "--scheduler", dask_cluster.address)
    assert result.returncode == 0, result.stderr
    assert dask_cluster.executed() > before
    assert result.stdout == expected.stdout
    entries = json.loads(result.stdout)["tensors"]
    assert [e["name"] for e in entries] == sorted(state)
    for entry in entries:
        values = state[entry["name"]].double()
        stats, histogram = entry["stats"], entry["histogram"]
        assert (stats["min"], stats["max"]) == (values.min().item(), values.max().item())
        assert stats["mean"] == pytest.approx(values.mean().item(), abs=1e-6)  # values of about 1
        assert stats["std"] == pytest.approx(values.std().item(), rel=1e-6)
        assert histogram["exact"] is True
        counts, _ = np.histogram(values.numpy().ravel(), bins=np.array(histogram["edges"]))
        assert histogram["counts"] == counts.tolist(), entry["name"]


def test_report_on_the_cluster_is_a_local_runs_page(dask_cluster, eight_shards, tmp_path):
    folder = eight_shards[0]
    local, remote = tmp_path / "local.html", tmp_path / "cluster.html"
    assert run("report", folder, "-o", local, "--workers", "1").exit_code == 0
    before = dask_cluster.executed()
    result = paramsurgeon("report", folder, "-o", remote, "--scheduler", dask_cluster.address)
    assert result.returncode == 0, result.stderr
    assert dask_cluster.executed() > before
    assert remote.read_bytes() == local.read_bytes()


# workers that die


def test_a_worker_killed_mid_run_has_its_shard_written_again_by_another(dask_cluster, eight_shards, tmp_path):
    folder, _, _, expected = eight_shards
    [victim] = dask_cluster.add_workers(1)  # a third worker, the session's two stay
    address = next(a for a, pid in dask_cluster.pids().items() if pid == victim.pid)
    command = start(*cast(folder, tmp_path / "cluster", "--scheduler", dask_cluster.address))
    kill_when_busy(dask_cluster, command, address)
    _, stderr = command.communicate(timeout=120)
    assert command.returncode == 0, stderr
    assert victim.wait() == -signal.SIGKILL
    assert contents(tmp_path / "cluster") == expected
    assert left_behind(tmp_path) == []


PATIENCE = {"DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT": "1s"}  # how long the client waits for a worker


def test_a_cluster_that_lost_its_only_worker_or_has_none_exits_2_and_keeps_the_old_output(spare, eight_shards, old,
                                                                                          tmp_path):
    folder = eight_shards[0]
    out, before = old
    spare.add_workers(1)
    command = start(*cast(folder, out, "--scheduler", spare.address), env=PATIENCE)
    kill_when_busy(spare, command)
    _, stderr = command.communicate(timeout=60)  # Dask would hold the tasks for ever
    assert command.returncode == 2
    assert stderr == (f"paramsurgeon: error: the cluster at {spare.address} lost its workers (none for 1 s) and"
                      f" could not finish; nothing was written; start one with 'dask worker {spare.address}'\n")
    assert digest(out) == before and left_behind(tmp_path) == []
    started = time.monotonic()
    result = paramsurgeon(*cast(folder, out, "--scheduler", spare.address), env=PATIENCE)
    assert result.returncode == 2
    assert result.stderr == (f"paramsurgeon: error: the Dask scheduler at {spare.address} has no workers (none joined"
                             f" within 1 s); nothing was written; start one with 'dask worker {spare.address}'\n")
    assert time.monotonic() - started < STARTING + 1
    assert digest(out) == before and left_behind(tmp_path) == []


def test_a_task_whose_workers_keep_dying_ends_the_run_with_exit_2_and_the_old_output(spare, eight_shards, old,
                                                                                     tmp_path):
    """Dask gives up on a task after ``allowed-failures`` deaths of the workers running it (0 here)."""
    folder = eight_shards[0]
    out, before = old
    spare.allow_failures(0)
    [nanny] = spare.add_workers(1, nanny=True)  # which starts its worker again
    try:
        command = start(*cast(folder, out, "--scheduler", spare.address))
        kill_when_busy(spare, command)
        _, stderr = command.communicate(timeout=60)
    finally:
        spare.stop_workers([nanny])
        spare.allow_failures(3)
    assert command.returncode == 2
    assert stderr.startswith(f"paramsurgeon: error: the cluster at {spare.address} could not finish (KilledWorker")
    assert stderr.endswith("; nothing was written\n") and stderr.count("\n") == 1
    assert digest(out) == before and left_behind(tmp_path) == []


# bad clusters


def test_an_address_without_a_dask_scheduler_is_one_line_naming_it_within_the_connect_timeout(eight_shards,
                                                                                              tmp_path):
    """A closed port; and one that accepts and says nothing (a web server's), where Dask's handshake would
    wait for ever."""
    require_distributed()
    folder = eight_shards[0]
    with socket.socket() as closed, socket.socket() as silent:
        closed.bind(("127.0.0.1", 0))
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        addresses = [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in (closed, silent)]
        started = time.monotonic()
        commands = [start(*cast(folder, tmp_path / f"out{i}", "--scheduler", a)) for i, a in enumerate(addresses)]
        (_, unreachable), (_, unanswered) = [command.communicate(timeout=60) for command in commands]
    assert time.monotonic() - started < CONNECT_TIMEOUT + 1 + STARTING
    assert [command.returncode for command in commands] == [2, 2]
    assert unreachable.startswith(f"paramsurgeon: error: cannot reach the Dask scheduler at {addresses[0]} within 5 s")
    assert unreachable.endswith("start one with 'dask scheduler' or check the address\n")
    assert unreachable.count("\n") == 1
    assert unanswered == (f"paramsurgeon: error: {addresses[1]} does not answer as a Dask scheduler does (no answer"
                          " within 5 s); nothing was written; give the scheduler's address (tcp://HOST:PORT, 8786 by"
                          " default), not its dashboard's\n")
    assert os.listdir(tmp_path) == []


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def test_workers_that_cannot_see_the_paths_are_named_and_nothing_is_written(spare, request, tmp_path):
    """A worker with a file system of its own at a path of the client's (a tmpfs mounted over it in its own
    mount namespace), as a worker on another machine without the shared disk has: the output's directory,
    then the checkpoint's."""
    if not can_unshare():
        pytest.skip("this machine cannot start a process in a mount namespace of its own (unshare --mount)")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for folder in (tmp_path / "ckpt", hidden / "ckpt"):
        sharded(folder, 2)
        register_input(request, folder)
    hide = ("unshare", "--mount", "--map-root-user", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(hidden))
    workers = spare.add_workers(1, wrap=hide, warm=False)
    try:
        [blind] = spare.pids()
        output_unseen = paramsurgeon(*cast(tmp_path / "ckpt", hidden / "out", "--scheduler", spare.address))
        input_unseen = paramsurgeon("inspect", hidden / "ckpt", "--scheduler", spare.address)
    finally:
        spare.stop_workers(workers)
    assert output_unseen.returncode == 2
    assert output_unseen.stderr == (f"paramsurgeon: error: the workers of the cluster at {spare.address} ({blind})"
                                    f" cannot see '{hidden}'; a cluster's workers need this machine's paths (a shared"
                                    " file system); nothing was written\n")
    assert sorted(os.listdir(hidden)) == ["ckpt"]
    assert input_unseen.returncode == 2 and input_unseen.stdout == ""
    assert input_unseen.stderr == (f"paramsurgeon: error: a worker of the cluster at {spare.address} could not run the"
                                   f" command: cannot read '{hidden / 'ckpt'}': No such file or directory; its workers"
                                   " need this machine's paths (a shared file system); nothing was written\n")


def test_scheduler_without_dask_distributed_says_how_to_install_it(monkeypatch, eight_shards, tmp_path):
    folder = eight_shards[0]
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails, as where it is not installed
    for args in (cast(folder, tmp_path / "out"), ("inspect", folder, "--hist")):
        result = run(*args, "--scheduler", "tcp://127.0.0.1:8786")
        assert result.exit_code == 2
        assert result.stderr == ("paramsurgeon: error: --scheduler runs the work on a Dask cluster, which needs Dask"
                                 " distributed: pip install 'paramsurgeon[cluster]'\n")
        assert result.stdout == ""
    assert os.listdir(tmp_path) == []
