"""Crashes and faults lose nothing: a write killed at any moment, a full disk, a file size
limit, a read-only directory. The output path holds the old file or a complete new one,
never a partial one, and the next run clears what a killed one left behind."""

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import file_bytes, register_input, run
from safetensors import safe_open
from safetensors.torch import save_file

KILLS = 12


def paramsurgeon(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "paramsurgeon", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def read_back(path, name: str) -> tuple[list[str], float]:
    """The sorted names of a written file and the absolute sum of one tensor, read by torch or safetensors
    without reading every tensor (a truncated file fails to open in both)."""
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            return sorted(f.keys()), f.get_tensor(name).abs().sum().item()
    state = torch.load(path, weights_only=True, mmap=True)
    return sorted(state), state[name].abs().sum().item()


def temporaries(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".paramsurgeon-" in name)


@pytest.mark.parametrize("source", ["large.safetensors", "large.pt"])
def test_sigkill_at_random_moments_leaves_old_or_new(request, tmp_path, large, source):
    register_input(request, large / source)
    out = tmp_path / ("out" + os.path.splitext(source)[1])
    old = {"old": torch.ones(3)}
    if out.suffix == ".pt":
        torch.save(old, out)
    else:
        save_file(old, out)
    before = file_bytes(out)
    rng = random.Random(source)
    with safe_open(large / "large.safetensors", "pt") as f:
        names = sorted(f.keys())
    outcomes = {"old": 0, "new": 0}
    for _ in range(KILLS // 2):
        process = paramsurgeon("zero", large / source, "-p", "blocks.3.weight", "-o", out)
        time.sleep(rng.uniform(0.2, 2.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if file_bytes(out) == before:
            outcomes["old"] += 1
            continue
        assert read_back(out, "blocks.3.weight") == (names, 0)  # complete, never partial
        outcomes["new"] += 1
        before = file_bytes(out)
    assert outcomes["old"] + outcomes["new"] == KILLS // 2
    result = run("zero", large / source, "-p", "blocks.4.weight", "-o", out)  # the next run clears leftovers
    assert result.exit_code == 0, result.stderr
    assert temporaries(tmp_path) == []


def limited(max_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


@pytest.mark.parametrize("source,target", [("large.safetensors", "out.pt"), ("large.pt", "out.safetensors")])
def test_file_size_limit_mid_write(request, tmp_path, large, source, target):
    register_input(request, large / source)
    process = paramsurgeon("convert", large / source, "-o", tmp_path / target, preexec_fn=limited(50 << 20))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2
    assert err.decode().startswith(f"paramsurgeon: error: cannot write '{tmp_path / target}': File too large;")
    assert err.decode().count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_full_disk_on_standard_output(request, large):
    register_input(request, large / "large.pt")
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, "-m", "paramsurgeon", "convert", str(large / "large.pt"),
                                 "--format", "safetensors"], stdout=full, stderr=subprocess.PIPE, timeout=300)
    assert result.returncode == 2
    assert b"No space left on device" in result.stderr and b"Traceback" not in result.stderr


def test_full_disk_mid_write_leaves_no_file(tmp_path, resnet_pt, monkeypatch):
    """ENOSPC from the kernel at the 10th write: exit 2, one line, nothing at the output path."""
    from paramsurgeon.formats import files

    writes = {"count": 0}
    real_write = os.write

    def failing_write(fd, data):
        writes["count"] += 1
        if writes["count"] >= 10:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(files.os, "write", failing_write)
    monkeypatch.setattr(files.os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    result = run("convert", resnet_pt, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2 and "No space left on device; nothing was written" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["resnet.pt"]


def test_read_only_directory(tmp_path, resnet_pt):
    folder = tmp_path / "locked"
    folder.mkdir()
    subprocess.run(["chattr", "+i", str(folder)], check=True)  # immutable: not even root may add a file
    try:
        result = run("convert", resnet_pt, "-o", folder / "out.pt")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert result.exit_code == 2
    assert result.stderr == f"paramsurgeon: error: cannot write '{folder / 'out.pt'}': Operation not permitted\n"
    assert os.listdir(folder) == []


@pytest.mark.rewrites_input
def test_in_place_on_a_memory_mapped_input(tmp_path, large):
    path = tmp_path / "model.safetensors"
    shutil.copyfile(large / "large.safetensors", path)
    result = run("scale", path, "-p", "blocks.[1-3].weight", "--by", "2", "--in-place")
    assert result.exit_code == 0, result.stderr
    with safe_open(path, "pt") as f:
        assert [f.get_slice(f"blocks.{i}.weight")[0:1, 0:1].item() for i in range(5)] == [0, 2, 4, 6, 4]
    assert temporaries(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, resnet_pt):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    dead = process.pid
    stale = tmp_path / f".out.pt.paramsurgeon-{dead}-0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    alive = tmp_path / f".out.pt.paramsurgeon-{os.getpid()}-0123abcd.tmp"
    alive.write_bytes(b"another run, still writing")
    assert run("convert", resnet_pt, "-o", tmp_path / "out.pt").exit_code == 0
    assert not stale.exists() and alive.exists()
