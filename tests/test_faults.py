"""Crashes and faults lose nothing: a write killed at any moment, a full disk, a file size
limit, a read-only directory. The output path holds the old file or a complete new one,
never a partial one, and the next run clears what a killed one left behind."""

import json
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
from helpers import file_bytes, load_torch, register_input, run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """32 MiB of tensors, as a torch file and as a four-shard safetensors directory with a config.json."""
    folder = tmp_path_factory.mktemp("medium")
    state = {f"blocks.{i}.weight": torch.full((512, 1024), float(i + 1)) for i in range(16)}
    torch.save(state, folder / "medium.pt")
    torch.save({name: -value for name, value in state.items()}, folder / "negated.pt")
    sharded = folder / "sharded"
    sharded.mkdir()
    names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    weight_map = {name: names[i // 4] for i, name in enumerate(state)}
    for shard in names:
        save_file({n: t for n, t in state.items() if weight_map[n] == shard}, sharded / shard, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text('{"model_type": "blocks"}')
    return folder, state


def sharded_state(folder) -> dict:
    """Every tensor of a sharded directory, read with safetensors through its index."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_file(folder / shard))
    return state


def dcp_state(folder, scratch) -> dict:
    """A DCP directory's contents, read by torch.distributed.checkpoint itself."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, scratch)
    return load_torch(scratch)


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


def timed(*args) -> float:
    """Seconds that one uninterrupted run takes (to kill the next ones while they write)."""
    start = time.monotonic()
    process = paramsurgeon(*args)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()
    return time.monotonic() - start


def kill_during(args, rng: random.Random, duration: float, watch: list, window: float):
    """Run and SIGKILL: either at a random moment of the run, or up to ``window`` seconds after
    its first temporary file or directory appears in one of ``watch`` (while it writes)."""
    def leftovers():
        return {(folder, name) for folder in watch if folder.exists() for name in temporaries(folder)}

    before = leftovers()
    process = paramsurgeon(*args)
    if rng.random() < 0.4:
        time.sleep(rng.uniform(0.1, 1.1) * duration)
    else:
        deadline = time.monotonic() + 2 * duration
        while not leftovers() - before and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, window))
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_in_place_sharded_rewrite_leaves_old_or_new(tmp_path, medium):
    """Each run doubles one tensor in every shard, in place; killed at any moment, the directory
    holds every shard and the index of the state before, or of the state after, and its config.json."""
    source, state = medium
    folder = tmp_path / "sharded"
    shutil.copytree(source / "sharded", folder)
    names = sorted(os.listdir(folder))
    args = ["scale", folder, *[a for i in (0, 5, 10, 15) for a in ("-p", f"blocks.{i}.weight")], "--by", "2",
            "--in-place"]
    doubled = {f"blocks.{i}.weight" for i in (0, 5, 10, 15)}
    step = lambda before: {n: t * 2 if n in doubled else t for n, t in before.items()}  # noqa: E731
    timed(*args)  # warms the caches: the second run's duration is the one to aim at
    duration = timed(*args)
    current = step(step(state))
    assert same(sharded_state(folder), current)
    rng = random.Random("sharded")
    outcomes = {"old": 0, "new": 0}
    for _ in range(KILLS):
        kill_during(args, rng, duration, [tmp_path, folder], window=0.05)
        assert sorted(os.listdir(folder)) == names  # no shard of another layout, no file lost
        loaded = sharded_state(folder)
        assert same(loaded, current) or same(loaded, step(current))  # never a mix of the two
        outcomes["old" if same(loaded, current) else "new"] += 1
        current = loaded
        assert (folder / "config.json").read_text() == '{"model_type": "blocks"}'
    assert outcomes["old"] + outcomes["new"] == KILLS
    result = run(*args)  # the next run clears leftovers
    assert result.exit_code == 0, result.stderr
    assert same(sharded_state(folder), step(current))
    assert temporaries(tmp_path) == []


def test_sigkill_while_replacing_a_dcp_directory_leaves_old_or_new(request, tmp_path, medium):
    """convert alternately writes two checkpoints over one DCP directory; killed at any moment,
    it holds exactly one of them, and the file kept beside it."""
    source, state = medium
    register_input(request, source / "medium.pt")
    folder = tmp_path / "dcp"
    states = {"medium.pt": state, "negated.pt": {n: -t for n, t in state.items()}}
    duration = timed("convert", source / "negated.pt", "-o", folder, "--format", "dcp")
    (folder / "config.json").write_text("run 7")
    current = states["negated.pt"]
    rng = random.Random("dcp")
    for _ in range(KILLS // 2):
        name = "medium.pt" if same(current, states["negated.pt"]) else "negated.pt"
        kill_during(["convert", source / name, "-o", folder, "--format", "dcp"], rng, duration, [tmp_path, folder],
                    window=0.5)
        loaded = dcp_state(folder, tmp_path / "scratch.pt")
        assert same(loaded, current) or same(loaded, states[name])
        current = loaded
        assert (folder / "config.json").read_text() == "run 7"
        assert sorted(p for p in os.listdir(folder) if not p.endswith(".distcp")) == [".metadata", "config.json"]
    assert run("convert", source / "medium.pt", "-o", folder, "--format", "dcp").exit_code == 0
    assert same(dcp_state(folder, tmp_path / "scratch.pt"), state)
    assert temporaries(tmp_path) == []


CRASH = """
import os, sys
from paramsurgeon.formats import atomic
from paramsurgeon.cli import main

where = os.environ["CRASH"]
if where == "between-renames":  # no RENAME_EXCHANGE: two renames, killed between them
    atomic._exchange = lambda a, b: False
    rename = os.rename
    def rename_then_die(source, destination):
        rename(source, destination)
        if str(destination).endswith(".old"):
            os._exit(9)
    os.rename = rename_then_die
else:  # killed right after the exchange, before the old directory is removed
    swap = atomic._swap
    atomic._swap = lambda staging, target: (swap(staging, target), os._exit(9))
main()
"""


@pytest.mark.parametrize("crash", ["between-renames", "after-exchange"])
@pytest.mark.parametrize("kind", ["sharded", "dcp"])
def test_a_crash_inside_the_swap_is_recovered(tmp_path, medium, crash, kind):
    """Between two renames the directory is aside: the next read restores the old one. After
    the exchange the new one is in place and the old one is cleared by the next run."""
    source, state = medium
    folder = tmp_path / kind
    if kind == "sharded":
        shutil.copytree(source / "sharded", folder)
        args, read = ["zero", folder, "-p", "blocks.0.weight", "--in-place"], sharded_state
        new = {**state, "blocks.0.weight": torch.zeros(512, 1024)}
    else:
        assert run("convert", source / "medium.pt", "-o", folder, "--format", "dcp").exit_code == 0
        args, read = ["convert", source / "negated.pt", "-o", folder, "--format", "dcp"], \
            lambda f: dcp_state(f, tmp_path / "scratch.pt")
        new = {n: -t for n, t in state.items()}
    died = subprocess.run([sys.executable, "-c", CRASH, *map(str, args)], env={**os.environ, "CRASH": crash},
                          capture_output=True, timeout=300)
    assert died.returncode == 9, died.stderr.decode()
    if crash == "between-renames":
        assert not folder.exists() and [n.endswith(".old") for n in temporaries(tmp_path)] == [False, True]
        assert run("inspect", "--no-stats", folder).exit_code == 0  # reading restores it
        assert same(read(folder), state)
    else:
        assert same(read(folder), new) and len(temporaries(tmp_path)) == 1
        assert run("inspect", "--no-stats", folder).exit_code == 0
    assert run(*args).exit_code == 0
    assert same(read(folder), new) and temporaries(tmp_path) == []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_recover_restores_only_a_directory_left_aside_by_a_dead_process(tmp_path):
    from paramsurgeon.formats import atomic

    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old").write_text("old")
    staging = tmp_path / f".ckpt.paramsurgeon-{dead_pid()}-0123abcd.tmp"
    staging.mkdir()
    (staging / "new").write_text("new")
    target.rename(f"{staging}.old")  # the state between the two renames
    live = tmp_path / f".ckpt.paramsurgeon-{os.getpid()}-0123abcd.tmp.old"
    live.mkdir()  # another write, still running: not ours to touch
    assert atomic.recover(str(target)) == [str(staging)]
    assert os.listdir(target) == ["old"] and sorted(temporaries(tmp_path)) == [live.name]
    left = tmp_path / f".ckpt.paramsurgeon-{dead_pid()}-4567cdef.tmp.old"
    left.mkdir()  # died after the second rename: the target is the new one, this the old
    assert atomic.recover(str(target)) == [str(left)]
    assert os.listdir(target) == ["old"] and temporaries(tmp_path) == [live.name]


def test_two_renames_where_the_exchange_is_unavailable(tmp_path, medium, monkeypatch):
    from paramsurgeon.formats import atomic

    source, state = medium
    folder = tmp_path / "sharded"
    shutil.copytree(source / "sharded", folder)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    assert run("zero", folder, "-p", "blocks.5.weight", "--in-place").exit_code == 0
    assert same(sharded_state(folder), {**state, "blocks.5.weight": torch.zeros(512, 1024)})
    assert temporaries(tmp_path) == []
