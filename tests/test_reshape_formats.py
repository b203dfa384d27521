"""resize, transpose, split and concat on every input format the tool reads (legacy torch, torch zip,
safetensors, a sharded directory, DCP), each output read back by that format's own library and
compared with torch indexing, t() and torch.split."""

import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import bits, register_input, run
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

FORMATS = ["legacy.pt", "zip.pt", "model.safetensors", "sharded", "dcp"]


def state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"body.weight": torch.randn(6, 4, generator=g), "head.weight": torch.randn(10, 6, generator=g),
            "head.bias": torch.randn(10, generator=g), "attn.c_attn.weight": torch.randn(4, 12, generator=g)}


def write(sd: dict, folder, name: str) -> str:
    path = os.path.join(folder, name)
    if name == "legacy.pt":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif name == "zip.pt":
        torch.save(sd, path)
    elif name == "model.safetensors":
        save_file(sd, path)
    elif name == "sharded":
        save_file(sd, os.path.join(folder, "whole.safetensors"))
        assert run("convert", os.path.join(folder, "whole.safetensors"), "-o", path,
                   "--max-shard-size", "200B").exit_code == 0
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({n: t.clone() for n, t in sd.items()}, checkpoint_id=path)
    return path


def read(path: str) -> dict:
    """The output as its own format's library reads it."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, ".metadata")):
        whole = path + ".pt"
        dcp_to_torch_save(path, whole)
        return torch.load(whole, weights_only=True)
    if os.path.isdir(path):
        merged = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                merged.update(load_file(os.path.join(path, name)))
        return merged
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, weights_only=True)


def output(tmp_path, name: str, step: str) -> str:
    suffix = {"legacy.pt": ".pt", "zip.pt": ".pt", "model.safetensors": ".safetensors"}.get(name, "")
    return str(tmp_path / f"{step}{suffix}")


@pytest.mark.parametrize("name", FORMATS)
def test_resize_and_transpose_in_every_format(request, tmp_path, name):
    sd = state()
    source = register_input(request, write(sd, tmp_path, name))
    kept, flipped = output(tmp_path, name, "kept"), output(tmp_path, name, "flipped")
    result = run("resize", source, "-p", "head.*", "--keep", "7,0:3", "-o", kept)
    assert result.exit_code == 0, result.stderr
    result = run("transpose", kept, "-p", "attn.c_attn.weight", "-o", flipped)
    assert result.exit_code == 0, result.stderr
    after = read(flipped)
    index = torch.tensor([7, 0, 1, 2])
    assert sorted(after) == sorted(sd)
    assert bits(after["head.weight"]) == bits(sd["head.weight"][index])
    assert bits(after["head.bias"]) == bits(sd["head.bias"][index])
    assert bits(after["attn.c_attn.weight"]) == bits(sd["attn.c_attn.weight"].t().contiguous())
    assert bits(after["body.weight"]) == bits(sd["body.weight"])


@pytest.mark.parametrize("name", FORMATS)
def test_split_and_concat_in_every_format(request, tmp_path, name):
    sd = state()
    source = register_input(request, write(sd, tmp_path, name))
    parts, back = output(tmp_path, name, "parts"), output(tmp_path, name, "back")
    targets = ["attn.q.weight", "attn.k.weight", "attn.v.weight"]
    result = run("split", source, "--from", "attn.c_attn.weight", "--to", *targets, "--dim", "1", "-o", parts)
    assert result.exit_code == 0, result.stderr
    split = read(parts)
    for got, expected in zip((split[t] for t in targets), torch.split(sd["attn.c_attn.weight"], 4, dim=1)):
        assert bits(got) == bits(expected.contiguous())
    assert "attn.c_attn.weight" not in split
    result = run("concat", parts, "--from", *targets, "--to", "attn.c_attn.weight", "--dim", "1", "-o", back)
    assert result.exit_code == 0, result.stderr
    again = read(back)
    assert sorted(again) == sorted(sd)
    assert all(bits(again[n]) == bits(t) for n, t in sd.items())
