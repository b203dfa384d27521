"""--workers on an output of one safetensors file (formats/placed.py): the parent writes the header
and the copied spans, worker processes compute the other tensors and write them at their offsets.
The file is the same bytes as from one process (filecmp), its values those torch computes, the work
was done in other processes, small work stays in one unless a count is named, and a worker killed
mid-run leaves nothing behind."""

import filecmp
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8_reference import dequantize, quantize
from helpers import WORKER_DIED, register_input, run, worker_killed
from paramsurgeon.formats import placed


def stored(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture
def pids(monkeypatch):
    """The processes that computed each unit of placed.fill's work, as the runs go."""
    found = []
    spread = placed.spread

    def recording(task, sizes, work, kind):
        for unit, pid in spread(lambda i: (task(i), os.getpid())[1], sizes, work, kind):
            found.append(pid)
            yield unit, None

    monkeypatch.setattr(placed, "spread", recording)
    return found


@pytest.fixture
def mixed(request, tmp_path):
    """Float tensors to cast, integer ones copied as they are between them, and many small ones."""
    torch.manual_seed(4)
    tensors = {}
    for i in range(6):
        tensors[f"layers.{i}.weight"] = torch.randn(256, 384)
        tensors[f"layers.{i}.position_ids"] = torch.arange(50 + i)
        tensors.update({f"layers.{i}.norm.{j}": torch.randn(7 + j) for j in range(40)})
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    register_input(request, path)
    return path, tensors


def test_cast_to_one_file_is_the_same_bytes_from_one_process_and_from_two(mixed, tmp_path, pids):
    path, tensors = mixed
    for workers in (1, 2):
        result = run("cast", path, "--all", "--dtype", "bfloat16", "-o", tmp_path / f"out{workers}.safetensors",
                     "--workers", workers)
        assert result.exit_code == 0, result.stderr
        assert result.stderr.endswith(f"wrote {tmp_path / f'out{workers}.safetensors'} (252 tensors, 1.2 MB)\n")
    assert filecmp.cmp(tmp_path / "out1.safetensors", tmp_path / "out2.safetensors", shallow=False)
    assert pids and os.getpid() not in pids  # the second run's values came from worker processes
    got = stored(tmp_path / "out2.safetensors")
    assert got.keys() == tensors.keys()
    for name, tensor in tensors.items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name


def test_dequantize_to_one_file_is_the_same_bytes_from_one_process_and_from_two(request, tmp_path, pids):
    torch.manual_seed(5)
    tensors, reference = {}, {}
    for i in range(4):
        codes, scale = quantize(torch.randn(260, 300) * 0.02)
        tensors[f"layers.{i}.mlp.weight"], tensors[f"layers.{i}.mlp.weight_scale_inv"] = codes, scale
        reference[f"layers.{i}.mlp.weight"] = dequantize(codes, scale)
        tensors[f"layers.{i}.norm.weight"] = reference[f"layers.{i}.norm.weight"] = torch.randn(300).bfloat16()
    folder = tmp_path / "fp8"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    register_input(request, folder)
    for workers in (1, 2):
        result = run("dequantize", folder, "-o", tmp_path / f"out{workers}.safetensors", "--workers", workers)
        assert result.exit_code == 0, result.stderr
    assert filecmp.cmp(tmp_path / "out1.safetensors", tmp_path / "out2.safetensors", shallow=False)
    assert pids and os.getpid() not in pids
    got = stored(tmp_path / "out2.safetensors")
    assert got.keys() == reference.keys()
    for name, values in reference.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], values), name


def test_small_work_stays_in_one_process_unless_a_count_is_named(mixed, tmp_path, pids, monkeypatch):
    path, _ = mixed
    monkeypatch.delenv("PARAMSURGEON_WORKERS", raising=False)
    result = run("cast", path, "--all", "--dtype", "bfloat16", "-o", tmp_path / "default.safetensors")
    assert result.exit_code == 0, result.stderr
    assert pids == []  # 1.2 MB of values: not worth a process
    result = run("cast", path, "--all", "--dtype", "bfloat16", "-o", tmp_path / "named.safetensors", "--workers", 3)
    assert result.exit_code == 0, result.stderr
    assert pids and os.getpid() not in pids
    assert filecmp.cmp(tmp_path / "default.safetensors", tmp_path / "named.safetensors", shallow=False)


def test_standard_output_and_a_torch_file_are_written_in_one_process_with_the_same_bytes(mixed, tmp_path, pids):
    path, _ = mixed
    piped = run("cast", path, "--all", "--dtype", "bfloat16", "-o", "-", "--workers", 2)
    assert piped.exit_code == 0, piped.stderr
    result = run("cast", path, "--all", "--dtype", "bfloat16", "-o", tmp_path / "two.safetensors", "--workers", 2)
    assert result.exit_code == 0, result.stderr
    assert piped.stdout_bytes == (tmp_path / "two.safetensors").read_bytes()
    assert len(pids) > 0  # the file only
    count = len(pids)
    for workers in (1, 2):  # in folders of their own: a torch file's archive is named after the file
        (tmp_path / str(workers)).mkdir()
        result = run("cast", path, "--all", "--dtype", "bfloat16", "-o", tmp_path / str(workers) / "out.pt",
                     "--workers", workers)
        assert result.exit_code == 0, result.stderr
    assert len(pids) == count
    assert filecmp.cmp(tmp_path / "1" / "out.pt", tmp_path / "2" / "out.pt", shallow=False)


def test_a_worker_killed_mid_run_fails_the_command_and_leaves_no_file(request, tmp_path):
    torch.manual_seed(6)
    source = tmp_path / "big.safetensors"
    save_file({f"block.{i}.weight": torch.randn(1024, 1024) for i in range(48)}, source)
    register_input(request, source)
    out = tmp_path / "out.safetensors"
    assert worker_killed("cast", source, "--all", "--dtype", "float64", "-o", out, "--workers", "2") == \
        (2, WORKER_DIED)
    assert sorted(os.listdir(tmp_path)) == ["big.safetensors"]
