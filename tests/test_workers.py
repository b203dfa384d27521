"""--workers and --resume (parallel/local.py, formats/journal.py), run as a user runs them:
the same bytes from one process and from several, values checked with torch; a run killed
with SIGKILL and finished with --resume (its verified shards kept, not rewritten); a journal
of another output refused; a worker process killed mid-run; counts that are no count."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8_reference import dequantize, quantize
from helpers import WORKER_DIED, register_input, run, run_process, worker_killed


def sharded(folder, shards: dict[str, dict[str, torch.Tensor]], config: dict | None = None):
    """A Hugging Face sharded directory written with safetensors, and its index."""
    folder.mkdir()
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards.values() for t in s.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def shard_names(count: int) -> list[str]:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def eight_shards(folder, rows: int = 64):
    torch.manual_seed(0)
    shards = {name: {f"layers.{i}.{j}.weight": torch.randn(rows, 96) for j in range(3)}
              for i, name in enumerate(shard_names(8))}
    return sharded(folder, shards, {"model_type": "llama", "torch_dtype": "float32"}), shards


def read_all(folder) -> dict[str, torch.Tensor]:
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                found.update({n: f.get_tensor(n) for n in f.keys()})
    return found


def files_of(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture
def eight(request, tmp_path):
    folder, shards = eight_shards(tmp_path / "in")
    register_input(request, folder)
    return folder, {n: t for s in shards.values() for n, t in s.items()}


def test_cast_writes_the_same_bytes_with_one_worker_and_with_three(eight, tmp_path):
    folder, tensors = eight
    outputs = []
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        result = run("cast", folder, "--all", "--dtype", "bfloat16", "-o", out, "--workers", workers)
        assert result.exit_code == 0, result.stderr
        outputs.append(files_of(out))
    assert outputs[0] == outputs[1]
    assert sorted(outputs[0]) == sorted(["config.json", "model.safetensors.index.json", *shard_names(8)])
    got = read_all(tmp_path / "out3")
    assert got.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(got[name], tensor.to(torch.bfloat16)), name


def test_dequantize_writes_the_same_bytes_with_one_worker_and_with_two(request, tmp_path):
    torch.manual_seed(1)
    shards, reference = {}, {}
    for i, name in enumerate(shard_names(4)):
        codes, scale = quantize(torch.randn(200, 300) * 0.02)
        shards[name] = {f"layers.{i}.mlp.weight": codes, f"layers.{i}.mlp.weight_scale_inv": scale}
        reference[f"layers.{i}.mlp.weight"] = dequantize(codes, scale)
    config = {"torch_dtype": "bfloat16", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    folder = sharded(tmp_path / "fp8", shards, config)
    register_input(request, folder)
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        result = run("dequantize", folder, "-o", out, "--workers", workers)
        assert result.exit_code == 0, result.stderr
        outputs.append(files_of(out))
    assert outputs[0] == outputs[1]
    got = read_all(tmp_path / "out2")
    assert got.keys() == reference.keys()
    for name, values in reference.items():
        assert torch.equal(got[name], values), name
    assert "quantization_config" not in json.loads(outputs[1]["config.json"])


def test_inspect_statistics_are_the_same_bytes_from_every_worker_count(eight):
    folder, tensors = eight
    documents = []
    for workers in ("1", "2", "5"):
        result = run("inspect", folder, "--json", "--hist", "--hash", "--workers", workers)
        assert result.exit_code == 0, result.stderr
        documents.append(result.stdout)
    assert documents[0] == documents[1] == documents[2]
    rows = {row["name"]: row for row in json.loads(documents[1])["tensors"]}
    for name, tensor in tensors.items():
        stats = rows[name]["stats"]
        assert stats["mean"] == pytest.approx(float(tensor.double().mean()), abs=1e-6)
        assert stats["std"] == pytest.approx(float(tensor.double().std()), rel=1e-5)
        assert stats["max"] == float(tensor.max())


def test_the_environment_gives_the_count_and_anything_but_a_positive_integer_is_refused(eight, tmp_path):
    folder, _ = eight
    for given in ("0", "-1", "two", "1.5", ""):
        result = run_process("cast", folder, "--all", "--dtype", "bfloat16", "-o", tmp_path / "out",
                             "--workers", given)
        assert result.returncode == 2
        assert result.stderr.decode() == (f"paramsurgeon: error: --workers {given}: the number of worker processes"
                                          " is a positive integer (1 runs everything in this process)\n")
        assert not (tmp_path / "out").exists()
    result = run_process("inspect", folder, env={"PARAMSURGEON_WORKERS": "zero"})
    assert result.returncode == 2 and result.stdout == b""
    assert b"PARAMSURGEON_WORKERS zero: the number of worker processes is a positive integer" in result.stderr
    result = run_process("cast", folder, "--all", "--dtype", "bfloat16", "-o", tmp_path / "env",
                         env={"PARAMSURGEON_WORKERS": "2"})
    assert result.returncode == 0, result.stderr
    assert files_of(tmp_path / "env") == files_of(_local(folder, tmp_path / "one"))


def _local(folder, out):
    result = run("cast", folder, "--all", "--dtype", "bfloat16", "-o", out, "--workers", "1")
    assert result.exit_code == 0, result.stderr
    return out


def test_resume_refuses_a_single_file_output(eight, tmp_path):
    folder, _ = eight
    result = run("cast", folder, "--all", "--dtype", "bfloat16", "-o", tmp_path / "one.safetensors", "--resume")
    assert result.exit_code == 2
    assert "--resume finishes an interrupted sharded write;" in result.stderr
    assert not (tmp_path / "one.safetensors").exists()


def _big(request, tmp_path, count: int = 24):
    """Shards large enough that a write of them can be killed part way."""
    torch.manual_seed(2)
    shards = {name: {f"block.{i}.weight": torch.randn(1024, 2048)} for i, name in enumerate(shard_names(count))}
    folder = sharded(tmp_path / "big", shards)
    register_input(request, folder)
    return folder


def _staging(out) -> list[str]:
    return [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.paramsurgeon-")]


def _kill_after(command: list, out, shards: int) -> None:
    """Run ``command`` and SIGKILL it once its journal records ``shards`` shards."""
    process = subprocess.Popen([sys.executable, "-m", "paramsurgeon", *map(str, command)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        journals = [out.parent / d / ".paramsurgeon-journal" for d in _staging(out)]
        if any(j.exists() and len(j.read_text().splitlines()) > shards for j in journals):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    assert process.wait() == -signal.SIGKILL, "the write ended before it could be interrupted"


def test_a_killed_sharded_write_is_finished_by_resume_keeping_its_verified_shards(request, tmp_path):
    folder = _big(request, tmp_path)
    out = tmp_path / "out"
    command = ["cast", folder, "--all", "--dtype", "bfloat16", "-o", out, "--workers", "1", "--resume"]
    _kill_after(command, out, shards=3)
    assert not out.exists()
    [staging] = _staging(out)
    journal = [json.loads(line) for line in (tmp_path / staging / ".paramsurgeon-journal").read_text().splitlines()]
    kept = {entry["shard"]: os.stat(tmp_path / staging / entry["shard"]).st_ino for entry in journal[1:]}
    assert len(kept) >= 3
    result = run_process(*command)
    assert result.returncode == 0, result.stderr
    assert _staging(out) == []
    assert {name: os.stat(out / name).st_ino for name in kept} == kept  # kept, not written again
    assert files_of(out) == files_of(_local(folder, tmp_path / "whole"))
    got, expected = read_all(out), read_all(folder)
    assert all(torch.equal(got[n], t.to(torch.bfloat16)) for n, t in expected.items())


def test_resume_writes_again_a_journaled_shard_that_no_longer_hashes_as_recorded(request, tmp_path):
    folder = _big(request, tmp_path)
    out = tmp_path / "out"
    command = ["cast", folder, "--all", "--dtype", "bfloat16", "-o", out, "--workers", "1", "--resume"]
    _kill_after(command, out, shards=2)
    [staging] = _staging(out)
    journal = [json.loads(line) for line in (tmp_path / staging / ".paramsurgeon-journal").read_text().splitlines()]
    damaged = tmp_path / staging / journal[1]["shard"]
    with open(damaged, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x7f")
    assert run_process(*command).returncode == 0
    assert files_of(out) == files_of(_local(folder, tmp_path / "whole"))


def test_resume_discards_a_stray_file_of_the_staging_directory_that_the_journal_does_not_name(request, tmp_path):
    folder = _big(request, tmp_path)
    out = tmp_path / "out"
    command = ["cast", folder, "--all", "--dtype", "bfloat16", "-o", out, "--workers", "1", "--resume"]
    _kill_after(command, out, shards=2)
    [staging] = _staging(out)
    stray = [shard_names(24)[-1], "notes.txt"]  # a shard the journal has not recorded, and a file of no shard
    for name in stray:
        (tmp_path / staging / name).write_bytes(b"not written by this output")
    result = run_process(*command)
    assert result.returncode == 0, result.stderr
    assert _staging(out) == [] and not (out / "notes.txt").exists()
    assert files_of(out) == files_of(_local(folder, tmp_path / "whole"))
    got, expected = read_all(out), read_all(folder)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], t.to(torch.bfloat16)) for n, t in expected.items())


def test_resume_refuses_the_journal_of_another_output_and_keeps_it(request, tmp_path):
    folder = _big(request, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    _kill_after(["cast", folder, "--all", "--dtype", "bfloat16", "-o", out, "--workers", "1", "--resume"], out, 2)
    result = run_process("cast", folder, "--all", "--dtype", "float16", "-o", out, "--workers", "1", "--resume")
    assert result.returncode == 2
    assert result.stderr.decode().startswith(f"paramsurgeon: error: --resume: the interrupted write of '{out}' was"
                                             " of another output")
    assert files_of(out) == {"model.safetensors": b"old"}
    assert len(_staging(out)) == 1  # still there for the write it belongs to
    result = run_process("cast", folder, "--all", "--dtype", "bfloat16", "-o", out, "--workers", "1", "--resume")
    assert result.returncode == 0, result.stderr
    assert files_of(out) == files_of(_local(folder, tmp_path / "whole"))


def test_without_resume_a_killed_write_is_cleared_and_written_anew(request, tmp_path):
    folder = _big(request, tmp_path)
    out = tmp_path / "out"
    _kill_after(["cast", folder, "--all", "--dtype", "bfloat16", "-o", out, "--workers", "1", "--resume"], out, 2)
    result = run_process("cast", folder, "--all", "--dtype", "bfloat16", "-o", out)
    assert result.returncode == 0, result.stderr
    assert _staging(out) == []
    assert files_of(out) == files_of(_local(folder, tmp_path / "whole"))


def test_a_worker_process_killed_mid_run_fails_the_command_and_nothing_is_written(request, tmp_path):
    folder = _big(request, tmp_path, count=32)
    out = tmp_path / "out"
    assert worker_killed("cast", folder, "--all", "--dtype", "float64", "-o", out, "--workers", "2") == \
        (2, WORKER_DIED)
    assert not out.exists() and _staging(out) == []


def test_check_health_finds_the_same_with_every_worker_count(request, tmp_path):
    torch.manual_seed(3)
    dead, broken = torch.zeros(64, 96), torch.randn(64, 96) * 0.02
    broken[3, 5] = float("nan")
    shards = {name: {f"layers.{i}.weight": torch.randn(64, 96) * 0.02} for i, name in enumerate(shard_names(4))}
    shards[shard_names(4)[1]]["layers.dead.weight"] = dead
    shards[shard_names(4)[2]]["layers.nan.weight"] = broken
    folder = sharded(tmp_path / "in", shards)
    register_input(request, folder)
    documents = []
    for workers in ("1", "3"):
        result = run("check", folder, "--health", "--json", "--workers", workers)
        assert result.exit_code == 1, result.stderr
        documents.append(result.stdout)
    assert documents[0] == documents[1]
    failed = {v["name"] for rule in json.loads(documents[1])["rules"] if not rule["ok"] for v in rule["violations"]}
    assert {"layers.dead.weight", "layers.nan.weight"} <= failed


def test_report_writes_the_same_page_with_every_worker_count(eight, tmp_path):
    """report's statistics and histograms are spread as inspect's are: the page is the same bytes."""
    folder, state = eight
    pages = []
    for workers in ("1", "3"):
        out = tmp_path / f"report-{workers}.html"
        result = run("report", folder, "-o", out, "--workers", workers)
        assert result.exit_code == 0, result.stderr
        pages.append(out.read_bytes())
    assert pages[0] == pages[1]
    name = sorted(state)[5]
    assert f"{state[name].double().max().item():.3g}".encode() in pages[1]


def test_scheduler_refuses_a_single_file_output_before_reaching_a_cluster(eight, tmp_path):
    folder, _ = eight
    result = run("cast", folder, "--all", "--dtype", "bfloat16", "-o", tmp_path / "one.safetensors",
                 "--scheduler", "tcp://127.0.0.1:9")
    assert result.exit_code == 2
    assert result.stderr == (f"paramsurgeon: error: --scheduler spreads the shards of a sharded output over a cluster;"
                             f" {tmp_path / 'one.safetensors'} is one file; write a directory (-o DIR/, with"
                             " --max-shard-size for convert) or use --workers\n")
    assert not (tmp_path / "one.safetensors").exists()


def test_scheduler_refuses_a_checkpoint_on_standard_input_which_workers_cannot_read_again(eight, tmp_path):
    folder, _ = eight
    source = tmp_path / "one.safetensors"
    save_file({"w": torch.randn(8, 8)}, source)
    message = ("paramsurgeon: error: --scheduler: the cluster's workers read the inputs from their paths, and a"
               " checkpoint on standard input has none; pass its path\n")
    for args in (("inspect", "-"), ("cast", "--all", "--dtype", "bfloat16", "-o", f"{tmp_path}/out/")):
        with open(source, "rb") as stdin:
            result = run_process(*args, "--scheduler", "tcp://127.0.0.1:9", stdin=stdin)
        assert result.returncode == 2
        assert result.stderr.decode().endswith(message), result.stderr
        assert result.stdout == b"" and not (tmp_path / "out").exists()
