"""Outputs that are not regular files, and outputs that would land on an input (issue 23, points 1-3):
what the user ran, through the CLI, with the inputs' bytes checked before and after and the outputs read
back by torch and safetensors. Devices are scratch twins (mknod), never the machine's own."""

import io
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading

import pytest
import torch
from helpers import digest, file_bytes, load_torch, register_input, run, run_process
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file

NULL, FULL = (1, 3), (1, 7)


def twin(path, device):
    """A character device like /dev/null or /dev/full at ``path`` (needs CAP_MKNOD)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(*device))
    except PermissionError:
        pytest.skip("mknod of a character device needs root (CAP_MKNOD)")
    return path


def kind(path) -> str:
    mode = os.lstat(path).st_mode
    return "link" if stat.S_ISLNK(mode) else "fifo" if stat.S_ISFIFO(mode) else "char" if stat.S_ISCHR(mode) \
        else "file" if stat.S_ISREG(mode) else "other"


def read_fifo(path) -> tuple[threading.Thread, list]:
    """A reader of the FIFO at ``path``, as `cat fifo > out` would be: returns (thread, [bytes])."""
    received: list = []

    def reader():
        with open(path, "rb") as f:
            received.append(f.read())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    return thread, received


def assert_same_values(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# ---- 1. FIFOs, devices and links ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_fifo_output_is_written_through_and_stays_a_fifo(tmp_path, resnet_pt, fmt):
    regular = tmp_path / f"regular.{fmt}"
    assert run("zero", resnet_pt, "-p", "fc.bias", "-o", regular).exit_code == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    thread, received = read_fifo(fifo)
    result = run("zero", resnet_pt, "-p", "fc.bias", "-o", fifo, "--format", fmt)
    thread.join(60)
    assert result.exit_code == 0, result.stderr
    assert kind(fifo) == "fifo"
    if fmt == "pt":
        assert_same_values(torch.load(io.BytesIO(received[0]), weights_only=True), load_torch(regular))
    else:
        assert received[0] == file_bytes(regular)
        assert_same_values(load_safetensors(received[0]), load_file(regular))


def test_device_output_is_written_through_and_stays_a_device(tmp_path, resnet_pt):
    null = twin(tmp_path / "null", NULL)
    result = run("zero", resnet_pt, "-p", "fc.bias", "-o", null)
    assert result.exit_code == 0, result.stderr
    assert kind(null) == "char" and os.stat(null).st_rdev == os.makedev(*NULL)
    assert sorted(os.listdir(tmp_path)) == ["null", "resnet.pt"]


def test_link_to_a_device_is_followed_and_both_stay(tmp_path, resnet_pt):
    null = twin(tmp_path / "null", NULL)
    link = tmp_path / "link"
    os.symlink(null, link)
    assert run("convert", resnet_pt, "-o", link).exit_code == 0
    assert kind(link) == "link" and kind(null) == "char"


def test_link_to_a_fifo_carries_the_checkpoint_in_the_format_its_name_says(tmp_path, resnet_pt):
    fifo, link = tmp_path / "fifo", tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    os.symlink(fifo, link)
    thread, received = read_fifo(fifo)
    assert run("convert", resnet_pt, "-o", link).exit_code == 0
    thread.join(60)
    assert kind(link) == "link" and kind(fifo) == "fifo"
    assert_same_values(load_safetensors(received[0]), load_torch(resnet_pt))


def test_link_to_standard_output_writes_to_the_pipe(tmp_path, resnet_pt):
    link = tmp_path / "link"
    os.symlink("/proc/self/fd/1", link)
    result = run_process("convert", resnet_pt, "-o", link)
    assert result.returncode == 0, result.stderr
    assert kind(link) == "link" and os.readlink(link) == "/proc/self/fd/1"
    assert_same_values(torch.load(io.BytesIO(result.stdout), weights_only=True), load_torch(resnet_pt))


def test_link_to_a_regular_file_replaces_its_target_and_stays(tmp_path, resnet_pt):
    target, link = tmp_path / "target.pt", tmp_path / "link.pt"
    target.write_bytes(b"old")
    os.symlink(target.name, link)
    assert run("zero", resnet_pt, "-p", "fc.bias", "-o", link).exit_code == 0
    assert kind(link) == "link" and os.readlink(link) == "target.pt" and kind(target) == "file"
    assert torch.equal(load_torch(target)["fc.bias"], torch.zeros_like(load_torch(resnet_pt)["fc.bias"]))


@pytest.mark.rewrites_input
def test_in_place_through_a_link_rewrites_its_target(tmp_path, resnet):
    target, link = tmp_path / "target.pt", tmp_path / "link.pt"
    torch.save(resnet.state_dict(), target)
    os.symlink(target.name, link)
    assert run("zero", link, "-p", "fc.bias", "--in-place").exit_code == 0
    assert kind(link) == "link" and kind(target) == "file"
    assert torch.equal(load_torch(target)["fc.bias"], torch.zeros_like(resnet.state_dict()["fc.bias"]))


def test_a_full_device_is_exit_2_with_one_line(tmp_path, resnet_pt):
    full = twin(tmp_path / "full", FULL)
    result = run("zero", resnet_pt, "-p", "fc.bias", "-o", full)
    assert result.exit_code == 2
    assert result.stderr == (f"paramsurgeon: error: cannot write '{full}': No space left on device; what was"
                             " written is incomplete\n")
    assert kind(full) == "char"


@pytest.mark.parametrize("command", [["zero", "-p", "fc.bias", "-o", "-"], ["inspect"], ["inspect", "--json"]],
                         ids=["checkpoint", "table", "json"])
def test_standard_output_on_a_full_device_is_exit_2_with_one_line(tmp_path, resnet_pt, command):
    full = twin(tmp_path / "full", FULL)
    with open(full, "wb") as stdout:
        result = subprocess.run([sys.executable, "-m", "paramsurgeon", command[0], resnet_pt, *command[1:]],
                                stdout=stdout, stderr=subprocess.PIPE, timeout=300)
    assert result.returncode == 2
    assert result.stderr == (b"paramsurgeon: error: cannot write to standard output: No space left on device; what"
                             b" was written is incomplete\n")


def test_a_socket_is_refused(tmp_path, resnet_pt):
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        result = run("convert", resnet_pt, "-o", path)
    finally:
        server.close()
    assert result.exit_code == 2
    assert result.stderr == (f"paramsurgeon: error: -o {path} is a socket; an output is a regular file, a directory,"
                             " a FIFO or a character device; nothing was written\n")
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_closed_pipe_ends_the_command_quietly(request, tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"w": torch.randn(512, 1024)}, path)  # 2 MiB: far more than a pipe holds
    register_input(request, path)
    writer = subprocess.Popen([sys.executable, "-m", "paramsurgeon", "zero", path, "-p", "w", "-o", "-"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-c", "100"], stdin=writer.stdout, capture_output=True, timeout=120)
    writer.stdout.close()
    stderr = writer.stderr.read()
    code = writer.wait(120)
    assert len(head.stdout) == 100
    assert code in (0, 141, -13), stderr
    assert stderr == b""


# ---- 2. No input is ever overwritten ---------------------------------------------------------


def refused(inputs: list, *args, message: str):
    """Run ``args``: exit 2, exactly ``message`` on one line, every input byte-identical."""
    before = {str(p): digest(p) for p in inputs}
    result = run(*args)
    assert (result.exit_code, result.stderr) == (2, f"paramsurgeon: error: {message}\n")
    assert {str(p): digest(p) for p in inputs} == before


def test_report_onto_its_checkpoint(tmp_path, resnet_pt):
    pytest.importorskip("matplotlib")
    refused([resnet_pt], "report", resnet_pt, "-o", resnet_pt,
            message=f"-o {resnet_pt} is the input {resnet_pt} (the checkpoint); nothing was written; write elsewhere")


def test_report_onto_the_checkpoint_it_is_against(tmp_path, resnet_pt):
    pytest.importorskip("matplotlib")
    other = tmp_path / "other.pt"
    shutil.copy(resnet_pt, other)
    refused([resnet_pt, other], "report", resnet_pt, "--against", other, "-o", other,
            message=f"-o {other} is the input {other} (--against); nothing was written; write elsewhere")


def test_merge_into_the_directory_of_its_second_input(tmp_path, resnet_pt):
    b = tmp_path / "b"
    b.mkdir()
    assert run("convert", resnet_pt, "-o", b / "model.safetensors").exit_code == 0
    out = b / "model.safetensors"
    refused([resnet_pt, b], "merge", resnet_pt, b, "-o", out,
            message=f"-o {out} is inside the input {b} (merge input 2); nothing was written; write elsewhere")


def test_copy_onto_its_source(tmp_path, resnet_pt):
    source = tmp_path / "source.pt"
    shutil.copy(resnet_pt, source)
    refused([resnet_pt, source], "copy", resnet_pt, "--source", source, "-o", source,
            message=f"-o {source} is the input {source} (--source); nothing was written; write elsewhere")
    refused([resnet_pt, source], "copy", resnet_pt, "--source", source, "-o", source, "--dry-run",
            message=f"-o {source} is the input {source} (--source); nothing was written; write elsewhere")


def test_merge_lora_onto_its_adapter(tmp_path):
    pytest.importorskip("peft")
    from lora_models import llama, make_adapter, state

    model = llama()
    base = tmp_path / "base.safetensors"
    save_file(state(model), base)
    adapter = make_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    out = adapter / "adapter_model.safetensors"
    refused([base, adapter], "merge-lora", base, adapter, "-o", out,
            message=f"-o {out} is inside the input {adapter} (the adapter); nothing was written; write elsewhere")


def test_convert_onto_a_shard_of_its_input(tmp_path, resnet_pt):
    shd = tmp_path / "shd"
    assert run("convert", resnet_pt, "-o", shd, "--max-shard-size", "100KB", "--format", "safetensors").exit_code == 0
    shard = shd / sorted(n for n in os.listdir(shd) if n.startswith("model-0"))[0]
    refused([shd], "convert", shd, "-o", shard,
            message=f"-o {shard} is inside the input {shd} (the checkpoint); nothing was written; write elsewhere")


def test_apply_onto_its_recipe(tmp_path, resnet_pt):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[step]]\nop = "zero"\npattern = "fc.bias"\n')
    refused([resnet_pt, recipe], "apply", resnet_pt, recipe, "-o", recipe,
            message=f"-o {recipe} is the input {recipe} (the recipe); nothing was written; write elsewhere")


def test_a_hard_link_or_a_link_to_an_input_is_the_input(tmp_path, resnet_pt):
    source = tmp_path / "source.pt"
    shutil.copy(resnet_pt, source)
    hard, soft = tmp_path / "hard.pt", tmp_path / "soft.pt"
    os.link(source, hard)
    os.symlink(source, soft)
    for out in (hard, soft):
        refused([resnet_pt, source], "copy", resnet_pt, "--source", source, "-o", out,
                message=f"-o {out} is the input {source} (--source); nothing was written; write elsewhere")


# ---- 3. Directory outputs hold only what the command writes ----------------------------------


def project(tmp_path):
    """A working directory holding a script and a data folder."""
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "train.py").write_text("print('training')\n")
    (folder / "data" / "tokens.bin").write_bytes(b"\x01\x02")
    return folder


def test_extract_lora_into_a_working_directory_is_refused(tmp_path, monkeypatch, resnet):
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    weights = {n: t for n, t in resnet.state_dict().items() if t.is_floating_point()}
    save_file(weights, base)
    save_file({**weights, "fc.weight": weights["fc.weight"] + 0.1}, tuned)
    folder = project(tmp_path)
    monkeypatch.chdir(folder)
    for extra in ([], ["--dry-run"]):
        refused([folder, base, tuned], "extract-lora", base, tuned, "-o", ".", "--rank", "4", *extra,
                message="-o . holds data/, train.py, which are not part of a PEFT adapter; nothing was written;"
                        " pass a new or empty directory")


def test_extract_lora_output_holding_its_input_is_refused(tmp_path, monkeypatch, resnet):
    folder = project(tmp_path)
    base, tuned = folder / "base.safetensors", folder / "tuned.safetensors"
    weights = {n: t for n, t in resnet.state_dict().items() if t.is_floating_point()}
    save_file(weights, base)
    save_file({**weights, "fc.weight": weights["fc.weight"] + 0.1}, tuned)
    monkeypatch.chdir(folder)
    refused([folder], "extract-lora", "base.safetensors", "tuned.safetensors", "-o", ".", "--rank", "4",
            message="-o . holds the input base.safetensors (base); nothing was written; write elsewhere")


def test_sharded_output_into_a_directory_of_other_files_is_refused(tmp_path, resnet_pt):
    folder = project(tmp_path)
    refused([folder], "convert", resnet_pt, "-o", folder, "--max-shard-size", "100KB",
            message=f"-o {folder} holds data/, train.py, which are not part of a sharded checkpoint; nothing was"
                    " written; pass a new or empty directory")


def test_a_model_directory_is_replaced_and_its_model_files_kept(tmp_path, resnet_pt, resnet):
    folder = tmp_path / "model"
    assert run("convert", resnet_pt, "-o", folder, "--max-shard-size", "100KB", "--format", "pt").exit_code == 0
    (folder / "config.json").write_text('{"model_type": "resnet"}')
    (folder / "tokenizer.json").write_text("{}")
    result = run("convert", resnet_pt, "-o", folder, "--max-shard-size", "200KB", "--format", "safetensors")
    assert result.exit_code == 0, result.stderr
    names = os.listdir(folder)
    assert "config.json" in names and "tokenizer.json" in names
    assert not [n for n in names if n.startswith("pytorch_model")]
    loaded = {}
    for name in names:
        if name.endswith(".safetensors"):
            loaded.update(load_file(folder / name))
    assert sorted(loaded) == sorted(n for n, t in resnet.state_dict().items())


def test_a_path_ending_in_a_slash_is_a_directory_output(tmp_path, resnet_pt):
    folder = tmp_path / "new"
    assert run("convert", resnet_pt, "-o", f"{folder}{os.sep}").exit_code == 0
    assert os.listdir(folder) == ["pytorch_model.bin"]
    assert_same_values(load_torch(folder / "pytorch_model.bin"), load_torch(resnet_pt))


def test_a_link_to_a_directory_output_stays_a_link(tmp_path, resnet_pt):
    folder, link = tmp_path / "real", tmp_path / "link"
    folder.mkdir()
    os.symlink(folder, link)
    assert run("convert", resnet_pt, "-o", link, "--max-shard-size", "100KB").exit_code == 0
    assert kind(link) == "link" and any(n.endswith(".index.json") for n in os.listdir(folder))


@pytest.mark.rewrites_input
def test_in_place_keeps_a_model_directory_and_whatever_else_it_holds(tmp_path, resnet_pt):
    folder = tmp_path / "clone"
    assert run("convert", resnet_pt, "-o", folder, "--max-shard-size", "100KB").exit_code == 0
    (folder / "notes.txt").write_text("mine")
    result = run("zero", folder, "-p", "fc.bias", "--in-place")
    assert result.exit_code == 0, result.stderr
    assert (folder / "notes.txt").read_text() == "mine"
