"""The format registry is the one list every part reads: the inspect schema names exactly its
formats, and a format it reads but cannot write is read by every command and never written."""

import dataclasses
import json
from importlib import resources

import pytest
import torch
from helpers import json_of, run
from safetensors.torch import load_file, save_file

from paramsurgeon.formats import registry, safetensors


def test_inspect_schema_names_exactly_the_registered_formats():
    with resources.files("paramsurgeon").joinpath("schemas/inspect.json").open() as f:
        schema = json.load(f)
    assert schema["properties"]["format"]["enum"] == registry.names()


def test_inspect_json_of_a_dcp_checkpoint_matches_its_schema(tmp_path, resnet_pt):
    folder = tmp_path / "dcp"
    assert run("convert", resnet_pt, "-o", folder, "--format", "dcp").exit_code == 0
    assert json_of("inspect", folder, schema="inspect")["format"] == "dcp"


@pytest.fixture
def fake_format(monkeypatch):
    """A read-only format registered as a new one would be: safetensors bytes in a .fake file."""
    fake = registry.Format("fake", "fake", "fake test", (".fake",), lambda file, head: file.name.endswith(".fake"),
                           lambda file, options: dataclasses.replace(safetensors.read(file), format="fake"))
    monkeypatch.setattr(registry, "FORMATS", (fake,) + registry.FORMATS)
    monkeypatch.setattr(registry, "_BY_NAME", {**registry._BY_NAME, "fake": fake})


def test_a_read_only_format_is_read_but_never_written(tmp_path, fake_format, resnet):
    path = tmp_path / "model.fake"
    save_file(resnet.state_dict(), path)
    before = path.read_bytes()

    assert json.loads(run("inspect", path, "--json").stdout)["format"] == "fake"
    for args in (["-o", tmp_path / "out"], ["-o", tmp_path / "dir/"], ["-o", tmp_path / "x.npz"], ["--in-place"], []):
        result = run("zero", path, "-p", "fc.bias", *args)
        assert result.exit_code == 2, result.stderr
        assert "reads fake test checkpoints but does not write them" in result.stderr
        assert "--format pt|safetensors|dcp, or an output named .pt or .safetensors\n" in result.stderr
        assert "Traceback" not in result.stderr
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.fake"]

    out = tmp_path / "out.safetensors"  # a writable format named by the output is written
    assert run("zero", path, "-p", "fc.bias", "-o", out).exit_code == 0
    written = load_file(out)
    assert torch.equal(written["fc.bias"], torch.zeros_like(resnet.fc.bias))
    assert torch.equal(written["fc.weight"], resnet.fc.weight)


def test_shards_of_a_format_without_a_sharded_layout_are_refused(tmp_path, fake_format, resnet):
    save_file(resnet.state_dict(), tmp_path / "model-00001-of-00001.fake")
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00001.fake" for name in resnet.state_dict()}}
    (tmp_path / "model.fake.index.json").write_text(json.dumps(index))
    result = run("inspect", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "its shards are fake files, which paramsurgeon reads only alone" in result.stderr


def test_merge_key_leaves_a_sharded_torch_input_flat_as_a_sharded_safetensors_one(tmp_path, training_pt):
    training = torch.load(training_pt, weights_only=True)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in training["state_dict"].items()}
    torch.save(other, tmp_path / "other.pt")
    shards = tmp_path / "other-sharded"
    assert run("convert", tmp_path / "other.pt", "-o", shards, "--max-shard-size", "20KB").exit_code == 0
    assert json.loads(run("inspect", shards, "--json").stdout)["format"] == "torch-sharded"
    out = tmp_path / "merged.pt"
    result = run("merge", training_pt, shards, "--key", "state_dict", "-o", out)
    assert result.exit_code == 0, result.stderr
    merged = torch.load(out, weights_only=True)["state_dict"]
    for name, value in training["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(merged[name], (value + other[name]) / 2)


def test_what_is_not_a_checkpoint_is_refused_with_the_formats_the_registry_reads(tmp_path, fake_format, resnet):
    """The refusal of unknown bytes, and of a directory without a checkpoint, name what the
    registry reads (a new format included), not a list written by hand."""
    noise = tmp_path / "noise.bin"
    noise.write_bytes(b"\x00\x01" * 64)
    read = [f.display for f in registry.FORMATS if f.sniff and f.reader and not f.directory]
    assert "fake test" in read
    result = run("inspect", noise)
    assert result.exit_code == 2
    assert result.stderr == (f"paramsurgeon: error: {noise}: not a checkpoint format paramsurgeon reads (first bytes"
                             f" 00 01 00 01 00 01 00 01); expected a {', '.join(read[:-1])} or {read[-1]} file, or"
                             " a shard index\n")
    (tmp_path / "empty").mkdir()
    result = run("inspect", tmp_path / "empty")
    assert result.exit_code == 2 and "*.fake" in result.stderr
    extensions = ", ".join(f"*{e}" for e in registry.weight_extensions())
    assert result.stderr == (f"paramsurgeon: error: {tmp_path / 'empty'}: a directory without a checkpoint (no"
                             f" *.index.json, {extensions})\n")


def test_a_directory_format_refuses_shards_by_the_registry_name_of_its_checkpoints(tmp_path, resnet_pt):
    result = run("convert", resnet_pt, "-o", tmp_path / "out", "--format", "dcp", "--max-shard-size", "10MB")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.stderr == ("paramsurgeon: error: --max-shard-size writes a Hugging Face sharded directory, not a DCP"
                             " checkpoint; drop one of them\n")


def test_the_formats_a_refusal_lists_are_those_that_write_the_input(tmp_path, fake_format, resnet):
    """Each format the refusal suggests writes the checkpoint (read back by torch, safetensors and DCP);
    GGUF, written only from a GGUF input, is not suggested, and refuses it."""
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "model.fake"
    save_file(resnet.state_dict(), path)
    refused = run("zero", path, "-p", "fc.bias", "--format", "npz", "-o", tmp_path / "out")
    assert refused.exit_code == 2 and refused.stderr.endswith(": error: --format npz: expected pt, safetensors or dcp\n")
    for fmt in ("pt", "safetensors", "dcp"):
        assert run("zero", path, "-p", "fc.bias", "--format", fmt, "-o", tmp_path / fmt).exit_code == 0
    assert torch.equal(torch.load(tmp_path / "pt", weights_only=True)["fc.weight"], resnet.fc.weight)
    assert torch.equal(load_file(tmp_path / "safetensors")["fc.weight"], resnet.fc.weight)
    assert "fc.weight" in dcp.FileSystemReader(tmp_path / "dcp").read_metadata().state_dict_metadata
    gguf = run("zero", path, "-p", "fc.bias", "--format", "gguf", "--dry-run", "-o", tmp_path / "out.gguf")
    assert gguf.exit_code == 2 and "GGUF is written from a GGUF input" in gguf.stderr
    assert gguf.stderr.endswith("is fake: write it as .pt or .safetensors\n")
