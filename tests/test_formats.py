"""Round trips through every format are bit-identical, keep ties and the rest of the file,
and load into the real module with strict=True."""

import json
import os
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
from helpers import (SAMPLES, assert_same_state, file_bytes, load_torch, run, run_on_terminal, run_process,
                     safetensors_metadata, same_storage)
from models import ResNet, TinyGPT
from safetensors.torch import load_file, save_file

import paramsurgeon
from paramsurgeon.formats import torchzip


def header_names(data: bytes) -> list[str]:
    """Tensor names in the order a safetensors header lists them."""
    length = int.from_bytes(data[:8], "little")
    return [k for k in json.loads(data[8:8 + length]) if k != "__metadata__"]


def test_torch_to_torch_is_what_torch_save_writes(tmp_path, resnet):
    """Our zip layout matches torch.save record for record (only torch's random id differs)."""
    reference = tmp_path / "model.pt"
    torch.save(resnet.state_dict(), reference)
    out = tmp_path / "out" / "model.pt"
    out.parent.mkdir()
    assert run("convert", reference, "-o", out).exit_code == 0
    ours, theirs = zipfile.ZipFile(out), zipfile.ZipFile(reference)
    names = [i.filename for i in ours.infolist()]
    assert names == [i.filename for i in theirs.infolist() if not i.filename.endswith("serialization_id")]
    for info in ours.infolist():
        assert ours.read(info) == theirs.read(info.filename), info.filename
        assert info.header_offset == theirs.getinfo(info.filename).header_offset, info.filename


def test_torch_safetensors_torch_round_trip(tmp_path, resnet_pt, resnet):
    st, back = tmp_path / "m.safetensors", tmp_path / "back.pt"
    assert run("convert", resnet_pt, "-o", st).exit_code == 0
    assert_same_state(load_file(st), resnet.state_dict(), ordered=False)
    assert header_names(file_bytes(st)) == list(resnet.state_dict())
    assert run("convert", st, "-o", back).exit_code == 0
    assert_same_state(load_torch(back), resnet.state_dict())
    ResNet().load_state_dict(torch.load(back, weights_only=True, mmap=True), strict=True)
    # what load_file gives, saved by torch: a plain dict of the file's names in the file's order
    loaded = torch.load(back, weights_only=True)
    assert type(loaded) is type(load_file(st)) is dict and list(loaded) == header_names(file_bytes(st))


def test_single_sharded_single_round_trip(tmp_path, resnet_pt, resnet):
    folder, single = tmp_path / "sharded", tmp_path / "single.safetensors"
    result = run("convert", resnet_pt, "-o", folder, "--max-shard-size", "60KB", "--format", "safetensors")
    assert result.exit_code == 0, result.stderr
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:  # every shard within the limit unless a single tensor is larger
        loaded = load_file(folder / shard)
        assert sum(t.numel() * t.element_size() for t in loaded.values()) <= 60_000 or len(loaded) == 1
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in resnet.state_dict().values())
    assert run("convert", folder, "-o", single).exit_code == 0
    assert_same_state(load_file(single), resnet.state_dict(), ordered=False)


def test_sharded_torch_bins(tmp_path, resnet_pt, resnet):
    folder = tmp_path / "bins"
    assert run("convert", resnet_pt, "-o", folder, "--max-shard-size", "100KB").exit_code == 0
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    merged = {}
    for shard in sorted(set(index["weight_map"].values())):
        assert shard.startswith("pytorch_model-") and shard.endswith(".bin")
        merged.update(load_torch(folder / shard))
    ResNet().load_state_dict(merged, strict=True)
    assert run("convert", folder, "-o", tmp_path / "one.pt").exit_code == 0
    assert_same_state(load_torch(tmp_path / "one.pt"), resnet.state_dict())


def test_stdin_to_stdout_round_trip(resnet_pt, resnet):
    result = run("convert", "--format", "safetensors", input=file_bytes(resnet_pt))
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load

    assert_same_state(load(result.stdout_bytes), resnet.state_dict(), ordered=False)


def test_real_pipe_between_processes(tmp_path, resnet_pt, resnet):
    with open(resnet_pt, "rb") as stdin:
        first = run_process("convert", "--format", "safetensors", stdin=stdin)
    assert first.returncode == 0, first.stderr
    (tmp_path / "piped.safetensors").write_bytes(first.stdout)
    with open(tmp_path / "piped.safetensors", "rb") as stdin:
        second = run_process("convert", "--format", "pt", "-o", tmp_path / "piped.pt", stdin=stdin)
    assert second.returncode == 0, second.stderr
    assert_same_state(load_torch(tmp_path / "piped.pt"), resnet.state_dict())


def test_fifo_and_process_substitution_inputs_are_read_as_streams(tmp_path, resnet_pt, resnet):
    """A path naming a pipe (a FIFO, bash's <(...) as /dev/fd/N) is read like standard input, not
    taken for an empty file because its size says 0."""
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(file_bytes(resnet_pt)), daemon=True)
    writer.start()
    result = run("inspect", fifo, "--json")
    writer.join(timeout=60)
    assert result.exit_code == 0, result.stderr
    rows = {t["name"]: t for t in json.loads(result.stdout)["tensors"]}
    state = resnet.state_dict()
    assert {n: r["shape"] for n, r in rows.items()} == {n: list(t.shape) for n, t in state.items()}
    assert {n: r["stats"]["max"] for n, r in rows.items()} == pytest.approx(
        {n: t.double().max().item() for n, t in state.items()})
    read, write = os.pipe()
    with open(resnet_pt, "rb") as source:
        feeder = subprocess.Popen(["cat"], stdin=source, stdout=write)
    os.close(write)
    compared = subprocess.run([sys.executable, "-m", "paramsurgeon", "diff", f"/dev/fd/{read}", resnet_pt],
                              pass_fds=(read,), capture_output=True, timeout=300)
    os.close(read)
    feeder.wait()
    assert compared.returncode == 0 and b"0 only in A" in compared.stdout, compared.stderr


def test_a_device_named_as_input_is_refused_not_read_for_ever(tmp_path):
    """/dev/zero is no pipe: read as one it would never end (a spool filling the disk)."""
    result = run_process("inspect", "/dev/zero")
    assert result.returncode == 2, result.stderr
    assert result.stderr == b"paramsurgeon: error: '/dev/zero' is a device, not a checkpoint file; pass a file," \
        b" a directory or a pipe\n"


def test_nested_training_checkpoint_keeps_everything(tmp_path, training_pt):
    out = tmp_path / "out.pt"
    assert run("convert", training_pt, "-o", out).exit_code == 0
    original, copy = load_torch(training_pt), load_torch(out)
    assert list(copy) == list(original)
    assert copy["epoch"] == 7 and copy["hyper_parameters"] == original["hyper_parameters"]
    assert_same_state(copy["state_dict"], original["state_dict"])
    assert copy["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    for index, state in original["optimizer"]["state"].items():
        for slot, value in state.items():
            assert torch.equal(copy["optimizer"]["state"][index][slot], value)


def test_safetensors_output_refuses_to_drop_extras(tmp_path, training_pt):
    out = tmp_path / "weights.safetensors"
    result = run("convert", training_pt, "-o", out)
    assert result.exit_code == 2
    assert "optimizer" in result.stderr and "--tensors-only" in result.stderr
    assert not out.exists()
    assert run("convert", training_pt, "-o", out, "--tensors-only").exit_code == 0
    assert list(load_file(out)) == list(load_torch(training_pt)["state_dict"])


def test_ties_survive_every_format(tmp_path, gpt_pt, gpt):
    st, back = tmp_path / "gpt.safetensors", tmp_path / "back.pt"
    assert run("convert", gpt_pt, "-o", st).exit_code == 0
    assert set(load_file(st)) == set(gpt.state_dict())  # every name, for strict loaders
    assert run("convert", st, "-o", back).exit_code == 0
    state = load_torch(back)
    assert state["lm_head.weight"].untyped_storage().data_ptr() == state["wte.weight"].untyped_storage().data_ptr()
    TinyGPT().load_state_dict(state, strict=True)
    zip_records = [n for n in zipfile.ZipFile(back).namelist() if "/data/" in n]
    assert len(zip_records) == len(state) - 1  # the tied pair is stored once


def test_dedupe_writes_tied_tensor_once_and_restores_it(tmp_path, gpt_pt, gpt):
    st, back = tmp_path / "gpt.safetensors", tmp_path / "back.pt"
    assert run("convert", gpt_pt, "-o", st, "--dedupe").exit_code == 0
    assert "lm_head.weight" not in load_file(st)
    assert json.loads(safetensors_metadata(st)["paramsurgeon.ties"]) == [["wte.weight", "lm_head.weight"]]
    assert run("convert", st, "-o", back).exit_code == 0
    state = load_torch(back)
    assert same_storage(state, "wte.weight", "lm_head.weight")
    assert_same_state(state, gpt.state_dict())


def test_safetensors_save_model_alias_is_a_tie(tmp_path, gpt):
    from safetensors.torch import save_model

    path = tmp_path / "hf.safetensors"
    save_model(gpt, str(path))
    ckpt = paramsurgeon.load(str(path))
    assert sorted(ckpt.names) == sorted(gpt.state_dict())
    assert len(ckpt.ties()) == 1
    assert run("convert", path, "-o", tmp_path / "back.pt").exit_code == 0
    assert same_storage(load_torch(tmp_path / "back.pt"), "wte.weight", "lm_head.weight")


def test_legacy_format_converts_to_zip(tmp_path, resnet):
    legacy = tmp_path / "legacy.pt"
    torch.save(resnet.state_dict(), legacy, _use_new_zipfile_serialization=False)
    out = tmp_path / "new.pt"
    assert run("convert", legacy, "-o", out).exit_code == 0
    assert zipfile.is_zipfile(out)
    assert_same_state(load_torch(out), resnet.state_dict())


def test_non_contiguous_and_views_round_trip(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"t": base.t(), "row": base[1], "cols": base[:, 2:4], "scalar": torch.tensor(3.5),
             "empty": torch.zeros(0, 3), "half": torch.randn(5).half(), "bf": torch.randn(3, 2).bfloat16(),
             "f8": torch.randn(4).to(torch.float8_e4m3fn), "flag": torch.tensor([True, False]),
             "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16)}
    path = tmp_path / "views.pt"
    torch.save(state, path)
    for name in ("out.pt", "out.safetensors"):
        assert run("convert", path, "-o", tmp_path / name).exit_code == 0
    torch_out = load_torch(tmp_path / "out.pt")
    assert_same_state(torch_out, state)
    assert torch_out["t"].stride() == state["t"].stride()  # views stay views
    assert torch_out["row"].untyped_storage().data_ptr() == torch_out["t"].untyped_storage().data_ptr()
    assert_same_state(load_file(tmp_path / "out.safetensors"), {k: v.contiguous() for k, v in state.items()},
                      ordered=False)


def test_parameters_and_requires_grad_are_kept(tmp_path):
    state = {"p": torch.nn.Parameter(torch.randn(3)), "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False)}
    path, out = tmp_path / "params.pt", tmp_path / "out.pt"
    torch.save(state, path)
    assert run("convert", path, "-o", out).exit_code == 0
    loaded = load_torch(out)
    assert isinstance(loaded["p"], torch.nn.Parameter) and loaded["p"].requires_grad
    assert isinstance(loaded["frozen"], torch.nn.Parameter) and not loaded["frozen"].requires_grad


def test_zip64_layout_reads_in_torch(tmp_path, resnet_pt, resnet, monkeypatch):
    """Files past 4 GiB need zip64 records; force them on a small file and load it with torch."""
    monkeypatch.setattr(torchzip, "ZIP64_LIMIT", 256)
    out = tmp_path / "zip64.pt"
    assert run("convert", resnet_pt, "-o", out).exit_code == 0
    assert_same_state(load_torch(out), resnet.state_dict())
    assert_same_state(torch.load(out, weights_only=True, mmap=True), resnet.state_dict())
    assert zipfile.ZipFile(out).testzip() is None


def test_output_is_never_the_input(resnet_pt):
    before = file_bytes(resnet_pt)
    result = run("convert", resnet_pt, "-o", resnet_pt)
    assert result.exit_code == 2 and "--in-place" in result.stderr
    assert file_bytes(resnet_pt) == before


@pytest.mark.rewrites_input
def test_in_place_rewrites_atomically(tmp_path, resnet_pt, resnet):
    assert run("zero", resnet_pt, "-p", "fc.bias", "--in-place").exit_code == 0
    expected = {**resnet.state_dict(), "fc.bias": torch.zeros(10)}
    assert_same_state(load_torch(resnet_pt), expected)  # still a torch file: --in-place keeps the format
    assert [p.name for p in tmp_path.iterdir()] == ["resnet.pt"]  # no temporary file left


def test_dry_run_writes_nothing(tmp_path, resnet_pt):
    out = tmp_path / "never.safetensors"
    result = run("convert", resnet_pt, "-o", out, "--dry-run")
    assert result.exit_code == 0 and "would write 122 tensors" in result.stderr
    assert not out.exists()


def test_samples_load_into_their_modules():
    samples = os.path.join(os.path.dirname(__file__), "..", "samples")
    for name, model in (("resnet.pt", ResNet()), ("resnet.safetensors", ResNet()), ("resnet-legacy.pt", ResNet()),
                        ("resnet-sharded", ResNet()), ("gpt.pt", TinyGPT()), ("gpt.safetensors", TinyGPT())):
        ckpt = paramsurgeon.load(os.path.join(samples, name))
        from paramsurgeon.checkpoint.values import to_torch

        model.load_state_dict({n: to_torch(t) for n, t in ckpt.tensors.items()}, strict=True)


def test_library_save_and_select(tmp_path, resnet_pt):
    ckpt = paramsurgeon.load(str(resnet_pt))
    assert paramsurgeon.select(ckpt, ["layer1.*.bn*"])[:2] == ["layer1.0.bn1.weight", "layer1.0.bn1.bias"]
    paramsurgeon.save(ckpt, str(tmp_path / "lib.safetensors"))
    assert list(load_file(tmp_path / "lib.safetensors")) == ckpt.names


@pytest.mark.parametrize("name", ["out.pt", "out.safetensors"])
def test_output_bytes_do_not_depend_on_the_run(tmp_path, resnet_pt, name):
    """Converting twice gives the same bytes: nothing time- or run-dependent is written."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    assert run("convert", resnet_pt, "-o", tmp_path / "one" / name).exit_code == 0
    assert run("convert", resnet_pt, "-o", tmp_path / "two" / name).exit_code == 0
    assert file_bytes(tmp_path / "one" / name) == file_bytes(tmp_path / "two" / name)


def test_safetensors_written_by_the_library_reads_back(tmp_path):
    tensors = {"b": torch.randn(3, 4), "a": torch.arange(6, dtype=torch.int32), "flag": torch.ones(3, dtype=torch.bool)}
    path = tmp_path / "lib.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    ckpt = paramsurgeon.load(str(path))
    assert ckpt.metadata == {"format": "pt", "note": "x"}
    out = tmp_path / "out.safetensors"
    paramsurgeon.save(ckpt, str(out))
    assert_same_state({k: load_file(out)[k] for k in ckpt.names}, {k: tensors[k] for k in ckpt.names})


@pytest.mark.parametrize("command", [["convert"], ["zero", "-p", "fc.bias"]])
def test_binary_output_to_a_terminal_is_refused(resnet_pt, command):
    code, shown, errors = run_on_terminal(command[0], resnet_pt, *command[1:], terminal=("stdout",))
    assert code == 2 and shown == b""
    assert errors == b"paramsurgeon: error: refusing to write a binary checkpoint to the terminal; redirect it" \
                     b" (> out.pt), pipe it, or pass -o PATH\n"


def test_sharded_directory_in_place(tmp_path):
    import shutil

    folder = tmp_path / "sharded"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "samples", "resnet-sharded"), folder)
    (folder / "config.json").write_text("{}")
    result = run("zero", folder, "-p", "layer4.*.bn2.weight", "--in-place")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(os.listdir(os.path.join(SAMPLES, "resnet-sharded"))
                                                             + ["config.json"])  # the same shards, kept
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    original = json.loads(open(os.path.join(SAMPLES, "resnet-sharded", "model.safetensors.index.json")).read())
    assert index["weight_map"] == original["weight_map"]
    shard = load_file(folder / index["weight_map"]["layer4.1.bn2.weight"])
    assert shard["layer4.1.bn2.weight"].abs().sum() == 0
    assert run("convert", folder, "-o", tmp_path / "resharded", "--max-shard-size", "150KB").exit_code == 0
    assert len([p for p in (tmp_path / "resharded").iterdir() if p.suffix == ".safetensors"]) == 2


def test_dash_means_standard_input_and_output(resnet_pt, resnet):
    result = run("zero", "-", "-p", "fc.bias", "-o", "-", input=file_bytes(resnet_pt))
    assert result.exit_code == 0, result.stderr
    import io

    state = torch.load(io.BytesIO(result.stdout_bytes), weights_only=True)
    assert torch.equal(state["fc.bias"], torch.zeros(10)) and torch.equal(state["fc.weight"], resnet.state_dict()["fc.weight"])


def test_output_format_option_then_extension_then_input(tmp_path, resnet_pt):
    st = tmp_path / "in.safetensors"
    run("convert", resnet_pt, "-o", st)
    piped = run("zero", st, "-p", "fc.bias")  # no -o, no --format: the input's format
    assert piped.exit_code == 0 and piped.stdout_bytes[8:9] == b"{"
    run("zero", st, "-p", "fc.bias", "-o", tmp_path / "by-extension.pt")
    assert zipfile.is_zipfile(tmp_path / "by-extension.pt")
    run("zero", resnet_pt, "-p", "fc.bias", "-o", tmp_path / "forced.weights", "--format", "safetensors")
    assert load_file(tmp_path / "forced.weights")["fc.bias"].sum() == 0
    unknown = run("convert", resnet_pt, "-o", tmp_path / "weights.data")  # an unknown extension: the input's format
    assert unknown.exit_code == 0 and zipfile.is_zipfile(tmp_path / "weights.data")
