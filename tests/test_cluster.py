"""--scheduler: the work on a real Dask cluster (a scheduler and two workers started as processes on
127.0.0.1 by the dask_cluster fixture), run as a user runs it: a process whose command line the
workers run again. Every output is compared byte for byte with a local ``--workers 1`` run and its
values with torch (safetensors read back, DeepSeek's weight_dequant, numpy's histogram); workers
are killed mid-run (SIGKILL), and bad clusters (none at the address, something else there, no
workers, workers that see other files) end in one line and exit 2 with nothing written.
"""

import json
import os
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
from helpers import bits, digest, register_input, run
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


def sharded(request, folder, shards: int, rows: int = 256, columns: int = 256):
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
    register_input(request, folder)
    return folder, state


@pytest.fixture
def eight_shards(request, tmp_path):
    """8 shards, 4 MiB (tensors of 65,536 values: exact histograms)."""
    return sharded(request, tmp_path / "eight", 8)


def cast(folder, out, *where):
    return "cast", folder, "--all", "--dtype", "bfloat16", "-o", out, *where


def local(tmp_path, *args) -> dict[str, bytes]:
    """The files a local ``--workers 1`` run writes (args end with its output)."""
    result = run(*args, "--workers", "1")
    assert result.exit_code == 0, result.stderr
    return contents(args[-1])


def left_behind(folder) -> list[str]:
    """What a write left in ``folder`` besides its output: staging directories, partial shards."""
    return [name for name in os.listdir(folder) if name.startswith(".")]


# byte-identical to a local run, and right


def test_cast_on_the_cluster_writes_each_shard_in_a_worker_and_the_bytes_of_a_local_run(dask_cluster, eight_shards,
                                                                                          tmp_path):
    folder, state = eight_shards
    expected = local(tmp_path, *cast(folder, tmp_path / "local"))
    before = dask_cluster.executed()
    result = paramsurgeon(*cast(folder, tmp_path / "cluster", "--scheduler", dask_cluster.address))
    assert result.returncode == 0, result.stderr
    assert dask_cluster.executed() - before == 8  # a task per shard, run by the workers
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
    expected = local(tmp_path, "dequantize", folder, "-o", tmp_path / "local")
    result = paramsurgeon("dequantize", folder, "-o", tmp_path / "cluster", "--scheduler", dask_cluster.address)
    assert result.returncode == 0, result.stderr
    assert contents(tmp_path / "cluster") == expected
    written = stored(tmp_path / "cluster")
    assert written.keys() == reference.keys()
    for name, value in reference.items():
        assert bits(written[name]) == bits(value), name
    assert json.loads((tmp_path / "cluster" / "config.json").read_text()) == {"torch_dtype": "bfloat16"}


def test_inspect_statistics_and_histograms_on_the_cluster_are_a_local_runs_and_torchs(dask_cluster, eight_shards):
    folder, state = eight_shards
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


# a worker that dies


def test_a_worker_killed_mid_run_has_its_shard_written_again_by_another(dask_cluster, request, tmp_path):
    folder, _ = sharded(request, tmp_path / "many", 24, 256, 256)
    expected = local(tmp_path, *cast(folder, tmp_path / "local"))
    [victim] = dask_cluster.add_workers(1)
    address = next(a for a, pid in dask_cluster.pids().items() if pid == victim.pid)
    command = start(*cast(folder, tmp_path / "cluster", "--scheduler", dask_cluster.address))
    deadline = time.monotonic() + 60
    while not dask_cluster.busy().get(address):  # the victim is given a shard
        assert command.poll() is None and time.monotonic() < deadline, command.communicate()
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert command.poll() is None  # mid-run
    stdout, stderr = command.communicate(timeout=120)
    assert command.returncode == 0, stderr
    assert victim.wait() == -signal.SIGKILL
    assert contents(tmp_path / "cluster") == expected
    assert left_behind(tmp_path) == []


@pytest.fixture
def lonely(tmp_path):
    """A scheduler of its own and one worker."""
    cluster = Cluster(tmp_path / "lonely")
    try:
        cluster.add_workers(1)
        yield cluster
    finally:
        cluster.stop()


def test_a_cluster_that_lost_its_only_worker_or_has_none_exits_2_and_keeps_the_old_output(lonely, eight_shards,
                                                                                          tmp_path):
    folder, _ = eight_shards
    old = tmp_path / "out"
    local(tmp_path, "cast", folder, "--all", "--dtype", "float16", "-o", old)
    before = digest(old)
    patience = {"DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT": "1s"}
    command = start(*cast(folder, old, "--scheduler", lonely.address), env=patience)
    [worker] = lonely.workers
    deadline = time.monotonic() + 60
    while not any(lonely.busy().values()):
        assert command.poll() is None and time.monotonic() < deadline, command.communicate()
        time.sleep(0.005)
    worker.send_signal(signal.SIGKILL)
    _, stderr = command.communicate(timeout=60)  # Dask would hold the tasks for ever
    assert command.returncode == 2
    assert stderr == (f"paramsurgeon: error: the cluster at {lonely.address} lost its workers (none for 1 s) and"
                      f" could not finish; nothing was written; start one with 'dask worker {lonely.address}'\n")
    assert digest(old) == before and left_behind(tmp_path) == []
    started = time.monotonic()
    result = paramsurgeon(*cast(folder, old, "--scheduler", lonely.address), env=patience)
    assert result.returncode == 2
    assert result.stderr == (f"paramsurgeon: error: the Dask scheduler at {lonely.address} has no workers (none joined"
                             f" within 1 s); nothing was written; start one with 'dask worker {lonely.address}'\n")
    assert time.monotonic() - started < STARTING + 1
    assert digest(old) == before and left_behind(tmp_path) == []


def test_a_task_whose_workers_keep_dying_ends_the_run_with_exit_2_and_the_old_output(eight_shards, tmp_path):
    """Dask gives up on a task after ``allowed-failures`` deaths of the workers running it (here 0)."""
    folder, _ = eight_shards
    cluster = Cluster(tmp_path / "fragile", DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    try:
        cluster.add_workers(1, nanny=True)  # its nanny starts it again
        old = tmp_path / "out"
        local(tmp_path, "cast", folder, "--all", "--dtype", "float16", "-o", old)
        before = digest(old)
        command = start(*cast(folder, old, "--scheduler", cluster.address))
        deadline = time.monotonic() + 60
        while not (busy := [a for a, n in cluster.busy().items() if n]):
            assert command.poll() is None and time.monotonic() < deadline, command.communicate()
            time.sleep(0.005)
        os.kill(cluster.pids()[busy[0]], signal.SIGKILL)
        _, stderr = command.communicate(timeout=60)
    finally:
        cluster.stop()
    assert command.returncode == 2
    assert stderr.startswith(f"paramsurgeon: error: the cluster at {cluster.address} could not finish (KilledWorker")
    assert stderr.endswith("; nothing was written\n") and stderr.count("\n") == 1
    assert digest(old) == before and left_behind(tmp_path) == []


# bad clusters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_one_line_naming_it_within_the_connect_timeout(eight_shards, tmp_path):
    require_distributed()
    folder, _ = eight_shards
    address = f"tcp://127.0.0.1:{free_port()}"  # closed
    started = time.monotonic()
    result = paramsurgeon(*cast(folder, tmp_path / "out", "--scheduler", address))
    assert time.monotonic() - started < CONNECT_TIMEOUT + STARTING
    assert result.returncode == 2
    assert result.stderr.startswith(f"paramsurgeon: error: cannot reach the Dask scheduler at {address} within 5 s")
    assert result.stderr.endswith("start one with 'dask scheduler' or check the address\n")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and left_behind(tmp_path) == []


def test_an_address_that_accepts_but_is_no_dask_scheduler_is_refused_within_the_connect_timeout(eight_shards,
                                                                                                tmp_path):
    """A web server, or a port that says nothing: Dask's handshake alone would wait for ever."""
    require_distributed()
    folder, _ = eight_shards
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = paramsurgeon(*cast(folder, tmp_path / "out", "--scheduler", address), timeout=60)
    assert time.monotonic() - started < CONNECT_TIMEOUT + 1 + STARTING
    assert result.returncode == 2
    assert result.stderr == (f"paramsurgeon: error: {address} does not answer as a Dask scheduler does (no answer"
                             " within 5 s); nothing was written; give the scheduler's address (tcp://HOST:PORT, 8786"
                             " by default), not its dashboard's\n")
    assert not (tmp_path / "out").exists() and left_behind(tmp_path) == []


def can_unshare() -> bool:
    return subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True).returncode == 0 \
        if os.path.exists("/usr/bin/unshare") else False


def test_workers_that_cannot_see_the_paths_are_named_and_nothing_is_written(request, tmp_path):
    """A worker with a file system of its own at the checkpoint's path (a tmpfs mounted over it in
    its own mount namespace), as a worker on another machine without the shared disk has."""
    if not can_unshare():
        pytest.skip("this machine cannot start a process in a mount namespace of its own (unshare --mount)")
    shared = tmp_path / "shared"
    shared.mkdir()
    folder, _ = sharded(request, shared / "ckpt", 2)
    cluster = Cluster(tmp_path / "blind")
    try:
        hide = ("unshare", "--mount", "--map-root-user", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(shared))
        cluster.add_workers(1, wrap=hide)
        [blind] = cluster.pids()
        result = paramsurgeon(*cast(folder, shared / "out", "--scheduler", cluster.address))
    finally:
        cluster.stop()
    assert result.returncode == 2
    assert result.stderr == (f"paramsurgeon: error: the workers of the cluster at {cluster.address} ({blind}) cannot"
                             f" see '{shared}'; a cluster's workers need this machine's paths (a shared file system);"
                             " nothing was written\n")
    assert sorted(os.listdir(shared)) == ["ckpt"]


def test_scheduler_without_dask_distributed_says_how_to_install_it(monkeypatch, eight_shards, tmp_path):
    folder, _ = eight_shards
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails, as where it is not installed
    for args in (cast(folder, tmp_path / "out"), ("inspect", folder, "--hist")):
        result = run(*args, "--scheduler", "tcp://127.0.0.1:8786")
        assert result.exit_code == 2
        assert result.stderr == ("paramsurgeon: error: --scheduler runs the work on a Dask cluster, which needs Dask"
                                 " distributed: pip install 'paramsurgeon[cluster]'\n")
        assert result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["eight"]
