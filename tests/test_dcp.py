"""DCP (torch.distributed.checkpoint) directories: written so that DCP itself reads them, read when
two ranks wrote them, never unpickled unsafely, and replaced only when they are DCP checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_same_state, load_torch, run, run_process

from models import ResNet


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


def test_optimizer_state_through_dcp_loads_into_the_optimizer(tmp_path, training_pt, resnet):
    """DCP stores optimizer.state_dict()'s integer keys as strings; read back, they are integers
    again (Optimizer.load_state_dict matches the moments to parameters by them)."""
    import torch.distributed.checkpoint as dcp

    original = load_torch(training_pt)
    written = tmp_path / "torch.dcp"
    with pytest.warns(UserWarning):
        dcp.save(original, checkpoint_id=str(written))  # as torch itself writes it
    for source in (written, tmp_path / "ours.dcp"):
        if source != written:
            assert run("convert", training_pt, "-o", source, "--format", "dcp").exit_code == 0
        back = tmp_path / "back.pt"
        assert run("convert", source, "-o", back).exit_code == 0
        restored = load_torch(back)["optimizer"]
        assert sorted(restored["state"]) == sorted(original["optimizer"]["state"])
        optimizer = torch.optim.Adam(resnet.parameters(), lr=1e-3)
        optimizer.load_state_dict(restored)
        for index, parameter in enumerate(resnet.parameters()):  # the moments reach their parameters
            assert_same_state(optimizer.state[parameter], original["optimizer"]["state"][index])
        assert run("diff", training_pt, back).exit_code == 0


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


def test_dcp_metadata_with_an_impossible_length_is_refused_in_one_line(tmp_path, resnet_pt):
    """A bytearray8 opcode claiming 4 EiB (a flipped bit in a length): Python's unpickler runs out of
    memory allocating it; the file is named as corrupt, in one line, through a real process."""
    import struct

    folder = tmp_path / "dcp"
    assert run("convert", resnet_pt, "-o", folder, "--format", "dcp").exit_code == 0
    (folder / ".metadata").write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 1 << 62) + bytes(16))
    result = run_process("inspect", folder)
    assert result.returncode == 2 and result.stderr.decode() == (
        f"paramsurgeon: error: {folder}/.metadata: the pickle is corrupt (a length in it is larger than the file)\n")


def test_dcp_output_replaces_a_dcp_directory_only(tmp_path, resnet_pt):
    folder = tmp_path / "dcp"
    assert run("convert", resnet_pt, "-o", folder, "--format", "dcp").exit_code == 0
    assert run("zero", folder, "-p", "fc.bias", "--in-place").exit_code == 0
    assert json.loads(run("inspect", folder, "--json", "-p", "fc.bias").stdout)["tensors"][0]["stats"]["abs_max"] == 0
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    refused = run("convert", resnet_pt, "-o", other, "--format", "dcp")
    assert refused.exit_code == 2 and "holds cat.jpg, which is not part of a DCP checkpoint" in refused.stderr
    assert (other / "cat.jpg").read_bytes() == b"meow"


@pytest.mark.parametrize("output", ["weights/", "weights"])
def test_dcp_input_with_format_safetensors_writes_a_safetensors_directory(tmp_path, resnet, output):
    """--format safetensors asks for safetensors, whatever the input's format: a DCP input written to a
    directory is a model directory holding model.safetensors, as a file input's directory output is."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    result = run("convert", tmp_path / "dcp", "--format", "safetensors", "-o", str(tmp_path / output))
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "weights")) == ["model.safetensors"]
    with safe_open(tmp_path / "weights" / "model.safetensors", "pt") as f:
        assert_same_state({k: f.get_tensor(k) for k in f.keys()}, resnet.state_dict(), ordered=False)
