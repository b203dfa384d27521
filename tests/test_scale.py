"""Bounded memory on files larger than the budget, DCP directories, and no torch where
only headers are read. Nothing here is timed: speed is the benchmark's job (bench/run.py)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import assert_same_state, load_torch, register_input, run, run_on_terminal, run_process
from models import ResNet
from safetensors.torch import save_file

MiB = 1 << 20


def peak_anon(args: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    """Run ``python -m paramsurgeon ARGS`` and sample its RssAnon until it exits."""
    process = subprocess.Popen([sys.executable, "-m", "paramsurgeon", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                with open(f"/proc/{process.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = process.communicate(timeout=600)
    done.set()
    sampler.join()
    return peak[0], subprocess.CompletedProcess(args, process.returncode, out, err)


@pytest.fixture(scope="module")
def big_files(tmp_path_factory):
    """A 384 MiB checkpoint (96 tensors of 4 MiB) in both formats: larger than every budget below."""
    folder = tmp_path_factory.mktemp("big")
    state = {f"blocks.{i}.weight": torch.full((1024, 1024), float(i)) for i in range(96)}
    torch.save(state, folder / "big.pt")
    save_file(state, folder / "big.safetensors")
    return folder


@pytest.fixture
def big(request, big_files):
    register_input(request, big_files / "big.pt")
    register_input(request, big_files / "big.safetensors")
    return big_files


@pytest.mark.parametrize("name", ["big.pt", "big.safetensors"])
def test_surgery_memory_is_bounded_by_what_changes(tmp_path, big, name):
    size = os.path.getsize(big / name)
    peak, result = peak_anon(["zero", big / name, "-p", "blocks.7.weight", "-o", tmp_path / name])
    assert result.returncode == 0, result.stderr
    assert peak < 96 * MiB < size, f"zero used {peak / MiB:.0f} MiB of anonymous memory on a {size / MiB:.0f} MiB file"
    peak, result = peak_anon(["convert", big / name, "-o", tmp_path / "copy.safetensors"])
    assert result.returncode == 0 and peak < 96 * MiB, f"convert used {peak / MiB:.0f} MiB"
    zeroed = load_torch(tmp_path / name) if name.endswith(".pt") else None
    if zeroed is not None:
        assert zeroed["blocks.7.weight"].abs().sum() == 0 and zeroed["blocks.8.weight"][0, 0] == 8


def test_statistics_memory_does_not_grow_with_the_file(big):
    peak, result = peak_anon(["inspect", big / "big.safetensors", "--json"])
    assert result.returncode == 0, result.stderr
    assert peak < 320 * MiB < os.path.getsize(big / "big.safetensors"), f"inspect used {peak / MiB:.0f} MiB"
    stats = {t["name"]: t["stats"] for t in json.loads(result.stdout)["tensors"]}
    assert stats["blocks.5.weight"]["mean"] == 5.0 and stats["blocks.5.weight"]["std"] == 0.0


def test_commands_that_compute_nothing_never_import_torch(tmp_path, resnet_pt, gpt_pt):
    dcp_dir = tmp_path / "dcp"
    assert run("convert", resnet_pt, "-o", dcp_dir, "--format", "dcp").exit_code == 0
    code = ("import sys\nfrom paramsurgeon.cli import main\nsys.argv = ['paramsurgeon'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, 1), e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    st = tmp_path / "m.safetensors"
    run("convert", resnet_pt, "-o", st)
    for args in (["inspect", "--no-stats", st], ["inspect", "--no-stats", dcp_dir], ["diff", "--no-values", resnet_pt, st],
                 ["zero", resnet_pt, "-p", "fc.bias", "-o", tmp_path / "z.pt"], ["--help"],
                 ["untie", gpt_pt, "-p", "lm_head.weight", "-o", tmp_path / "u.pt"],
                 ["copy", resnet_pt, "--from", "layer1.0.*", "--to", "layer1.1.*", "-o", tmp_path / "c.pt"],
                 ["tie", gpt_pt, "--source", "h.0.ln_1.weight", "--target", "h.1.ln_1.weight", "-o", tmp_path / "t.pt"],
                 ["rename", resnet_pt, "--from", "fc.*", "--to", "head.*", "-o", tmp_path / "r.safetensors"],
                 ["check", "--like", st, "--expect", "fc.bias=10", resnet_pt, "--dtype", "float32"]):
        result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert result.stderr.strip().endswith("NO-TORCH"), (args, result.stderr)


def test_dcp_round_trip_is_bit_identical(tmp_path, training_pt, resnet):
    dcp_dir, back = tmp_path / "dcp", tmp_path / "back.pt"
    assert run("convert", training_pt, "-o", dcp_dir, "--format", "dcp").exit_code == 0
    assert (dcp_dir / ".metadata").is_file()
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {k: torch.empty_like(v) for k, v in resnet.state_dict().items()}}
    with pytest.warns(UserWarning):
        dcp.load(state, checkpoint_id=str(dcp_dir), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    assert_same_state(state["state_dict"], load_torch(training_pt)["state_dict"])  # DCP itself reads our output
    assert run("convert", dcp_dir, "-o", back).exit_code == 0
    original, copy = load_torch(training_pt), load_torch(back)
    assert_same_state(copy["state_dict"], original["state_dict"])
    assert copy["epoch"] == 7 and copy["hyper_parameters"] == original["hyper_parameters"]
    ResNet().load_state_dict(copy["state_dict"], strict=True)
    document = json.loads(run("inspect", dcp_dir, "--json").stdout)
    assert document["format"] == "dcp" and document["key"] == "state_dict"


def test_dcp_written_by_two_ranks_reads_whole(tmp_path):
    """Two processes each save half of every tensor (DTensors sharded as FSDP shards them);
    the chunks are reassembled through DCP."""
    import socket

    from dcp_two_ranks import FULL

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path / "fsdp"
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "dcp_two_ranks.py"), str(folder), str(port)],
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    result = run("convert", folder, "-o", tmp_path / "whole.pt")
    assert result.exit_code == 0, result.stderr
    whole = load_torch(tmp_path / "whole.pt")
    assert whole["step"] == 11
    assert_same_state(whole["model"], FULL)


def test_hostile_dcp_metadata_is_refused_without_running(tmp_path, resnet_pt):
    folder = tmp_path / "dcp"
    assert run("convert", resnet_pt, "-o", folder, "--format", "dcp").exit_code == 0
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    result = run("inspect", folder)
    assert result.exit_code == 2 and "posix.system" in result.stderr
    assert not marker.exists()


def test_dcp_output_replaces_a_dcp_directory_only(tmp_path, resnet_pt):
    folder = tmp_path / "dcp"
    assert run("convert", resnet_pt, "-o", folder, "--format", "dcp").exit_code == 0
    assert run("zero", folder, "-p", "fc.bias", "--in-place").exit_code == 0
    assert json.loads(run("inspect", folder, "--json", "-p", "fc.bias").stdout)["tensors"][0]["stats"]["abs_max"] == 0
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    refused = run("convert", resnet_pt, "-o", other, "--format", "dcp")
    assert refused.exit_code == 2 and "not a DCP checkpoint" in refused.stderr
    assert (other / "cat.jpg").read_bytes() == b"meow"


def test_processes_report_sizes(tmp_path, big):
    result = run_process("inspect", big / "big.pt", "--no-stats")
    assert result.returncode == 0 and b"96 tensors, 100,663,296 parameters" in result.stdout


def test_progress_bar_on_a_terminal_only(tmp_path, big):
    """A bar with bytes and throughput on a terminal's stderr; nothing in a pipe or with NO_COLOR."""
    args = ("convert", big / "big.pt", "-o", tmp_path / "copy.safetensors")
    now = {"PARAMSURGEON_PROGRESS_DELAY": "0"}
    shown = run_on_terminal(*args, terminal=("stderr",), env=now)[1]
    assert b"writing" in shown and b"/s" in shown and b"402.7 MB" in shown
    assert b"writing" not in run_on_terminal(*args, terminal=("stderr",), env={**now, "NO_COLOR": "1"})[1]
    assert run_on_terminal(*args, terminal=(), env=now)[2].startswith(b"wrote ")
