"""A quantized weight is one logical tensor made of stored parts: what reads values sees the
dequantized tensor, what moves tensors moves every part, what changes values writes a plain tensor.

The checkpoint is a DeepSeek-V3-style FP8 directory made from real nn.Linear weights; the codes,
scales and dequantized values are computed with torch by tests/fp8_reference.py, from DeepSeek's
``weight_dequant`` (a float32 product of each code and the scale of its tile, rounded to the dtype).
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8_reference import dequantize, quantize
from helpers import bits, json_of, register_input, run

import paramsurgeon.formats as formats
from paramsurgeon.checkpoint.quantized import Quantized

DOWN, UP, NORM = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"


@pytest.fixture
def fp8_dir(request, tmp_path):
    """A DeepSeek-style FP8 directory: two quantized projections (edge tiles partial) and a bf16 norm."""
    torch.manual_seed(0)
    down, up = torch.nn.Linear(300, 200, bias=False), torch.nn.Linear(200, 130, bias=False)
    tensors, reference = {}, {}
    for name, layer in ((DOWN, down), (UP, up)):
        codes, scale = quantize(layer.weight.detach())
        tensors[name], tensors[name + "_scale_inv"] = codes, scale
        reference[name] = dequantize(codes, scale)
    tensors[NORM] = reference[NORM] = torch.ones(200, dtype=torch.bfloat16)
    folder = tmp_path / "fp8"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "torch_dtype": "bfloat16", "quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    register_input(request, folder)
    return folder, tensors, reference


def stored(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_reading_sees_one_logical_tensor_with_the_dequantized_values(fp8_dir):
    folder, _, reference = fp8_dir
    document = json_of("inspect", folder, "--json", schema="inspect")
    rows = {t["name"]: t for t in document["tensors"]}
    assert sorted(rows) == sorted([DOWN, UP, NORM])  # the scales are parts, not tensors of their own
    for name in (DOWN, UP):
        values = reference[name].double()
        assert rows[name]["shape"] == list(values.shape)
        assert rows[name]["dtype"] == "bfloat16"
        stats = rows[name]["stats"]
        assert stats["mean"] == pytest.approx(values.mean().item(), rel=1e-6)
        assert stats["std"] == pytest.approx(values.std().item(), rel=1e-6)
        assert (stats["min"], stats["max"]) == (values.min().item(), values.max().item())


def test_the_library_reads_values_as_torch_dequantizes_them_and_raw_reads_the_parts(fp8_dir):
    from paramsurgeon.checkpoint.values import to_torch

    folder, tensors, reference = fp8_dir
    ckpt = formats.load(str(folder))
    assert isinstance(ckpt[DOWN], Quantized) and ckpt[DOWN].scheme.name == "fp8-block"
    assert bits(to_torch(ckpt[DOWN])) == bits(reference[DOWN])
    raw = formats.load(str(folder), raw=True)
    assert sorted(raw.tensors) == sorted(tensors)
    assert bits(to_torch(raw[DOWN + "_scale_inv"])) == bits(tensors[DOWN + "_scale_inv"])


def test_a_rename_moves_every_part_and_a_drop_drops_them(fp8_dir, tmp_path):
    folder, tensors, _ = fp8_dir
    renamed = tmp_path / "renamed.safetensors"
    assert run("rename", folder, "--from", "model.layers.0.*", "--to", "model.layers.7.*", "-o", renamed).exit_code == 0
    out = stored(renamed)
    moved = {name.replace("layers.0", "layers.7"): value for name, value in tensors.items()}
    assert sorted(out) == sorted(moved)
    for name, value in moved.items():
        assert bits(out[name]) == bits(value) and out[name].dtype == value.dtype, name

    dropped = tmp_path / "dropped.safetensors"
    assert run("drop", folder, "-p", DOWN, "-o", dropped).exit_code == 0
    assert sorted(stored(dropped)) == sorted([UP, UP + "_scale_inv", NORM])


def test_changing_values_writes_a_plain_tensor_of_the_configs_dtype_in_place_of_the_group(fp8_dir, tmp_path):
    folder, tensors, reference = fp8_dir
    scaled = tmp_path / "scaled.safetensors"
    assert run("scale", folder, "-p", DOWN, "--by", "2", "-o", scaled).exit_code == 0
    out = stored(scaled)
    assert sorted(out) == sorted([DOWN, UP, UP + "_scale_inv", NORM])
    assert out[DOWN].dtype == torch.bfloat16
    assert bits(out[DOWN]) == bits((reference[DOWN].float() * 2).to(torch.bfloat16))
    assert bits(out[UP]) == bits(tensors[UP])  # the untouched group is written as it was stored


def test_diff_and_merge_read_dequantized_values(fp8_dir, tmp_path):
    folder, _, reference = fp8_dir
    plain = tmp_path / "plain.safetensors"
    save_file(reference, plain)
    document = json_of("diff", folder, plain, "--json", schema="diff")
    assert document["equal"] and document["identical"] == 3 and not document["changed"], document

    merged = tmp_path / "merged.safetensors"
    assert run("merge", folder, plain, "--method", "linear", "-o", merged).exit_code == 0
    out = stored(merged)
    assert sorted(out) == sorted([DOWN, UP, NORM])
    for name, value in reference.items():
        assert bits(out[name]) == bits(value), name


def test_a_scale_that_does_not_fit_or_has_no_weight_is_named_and_left_as_stored(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    codes, scale = quantize(torch.randn(300, 200) * 0.02)
    save_file({"a.weight": codes, "a.weight_scale_inv": scale[:2].clone(), "b.weight_scale_inv": scale}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    document = json_of("inspect", folder, "--json", schema="inspect")
    assert sorted(t["name"] for t in document["tensors"]) == ["a.weight", "a.weight_scale_inv", "b.weight_scale_inv"]
    notes = "\n".join(document["notes"])
    assert "a.weight, a.weight_scale_inv: the scale grid [2, 2] float32 does not fit [300, 200]" in notes
    assert "b.weight_scale_inv: a block scale without its weight b.weight" in notes


def test_the_block_size_comes_from_the_config(tmp_path):
    folder = tmp_path / "blocks"
    folder.mkdir()
    codes, scale = quantize(torch.randn(64, 96) * 0.02, block=32)
    expected = dequantize(codes, scale, torch.float16, block=32)
    save_file({"w.weight": codes, "w.weight_scale_inv": scale}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "float16", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [32, 32]}}))
    from paramsurgeon.checkpoint.values import to_torch

    tensor = formats.load(str(folder))["w.weight"]
    assert tensor.dtype.name == "float16" and tensor.params["block"] == [32, 32]
    assert bits(to_torch(tensor)) == bits(expected)


def test_a_block_larger_than_the_weight_is_the_whole_weight(tmp_path):
    """weight_block_size [2**40, 32] (a broken or hostile config): one block of rows, as [64, 32]
    gives; not a scale repeated 2**40 times (4 TiB asked of the allocator)."""
    folder = tmp_path / "huge"
    folder.mkdir()
    codes, scale = quantize(torch.randn(64, 96) * 0.02, block=64)
    save_file({"w.weight": codes, "w.weight_scale_inv": scale[:, :1].repeat(1, 3)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "float16", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [1 << 40, 32]}}))
    from paramsurgeon.checkpoint.values import to_torch

    tensor = formats.load(str(folder))["w.weight"]
    scales = scale[:, :1].repeat(1, 3).repeat_interleave(64, 0).repeat_interleave(32, 1)
    assert bits(to_torch(tensor)) == bits((codes.float() * scales).to(torch.float16))
    result = run("inspect", folder)
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("codes", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float8_codes_widen_to_the_bits_torch_converts_them_to(codes, dtype):
    from paramsurgeon.quant.widen import widen, widen_into

    every = torch.arange(256, dtype=torch.uint8).view(codes).reshape(16, 16)  # NaN and infinities included
    expected = bits(every.to(dtype))
    assert bits(widen(every, dtype)) == expected
    assert bits(widen_into(torch.empty(16, 16, dtype=dtype), every)) == expected
    assert bits(widen_into(torch.empty(8, 16, dtype=dtype), every[8:])) == bits(every[8:].to(dtype))


def test_computed_values_stream_in_the_chunks_of_the_whole_tensor(monkeypatch):
    """A tensor whose values come in pieces (a dequantized weight's bands, of any size) reduces in the
    same chunks, value for value, as the whole tensor would; widened on request."""
    from paramsurgeon import dtypes
    from paramsurgeon.checkpoint import Tensor
    from paramsurgeon.checkpoint.quantized import Streamed
    from paramsurgeon.checkpoint.values import chunks, value_chunks

    monkeypatch.setattr("paramsurgeon.checkpoint.values.CHUNK", 1000)
    values = torch.randn(37, 101, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    flat = values.reshape(-1)
    cuts = [0, 7, 7, 900, 1000, 2513, 3000, 3737]  # pieces smaller, larger and across chunk ends; one empty

    def pieces():
        return (flat[a:b] for a, b in zip(cuts, cuts[1:]))

    tensor = Tensor(Streamed(values.numel() * 2, lambda: values, pieces), dtypes.BY_NAME["bfloat16"], (37, 101))
    expected = [chunk.clone() for (chunk,) in chunks(values)]
    same = [chunk.clone() for chunk in value_chunks(tensor)]
    assert len(same) == len(expected) and all(bits(a) == bits(b) for a, b in zip(same, expected))
    got = [chunk.clone() for chunk in value_chunks(tensor, torch.float32)]
    assert [len(c) for c in got] == [1000, 1000, 1000, 737]
    assert all(c.dtype == torch.float32 and torch.equal(c, e.float()) for c, e in zip(got, expected))


def test_modelopt_fp8_is_read_as_its_codes_times_its_scale(tmp_path):
    """NVIDIA ModelOpt's FP8 export (config quant_method modelopt, quant_algo FP8): float8 weights with a
    float32 weight_scale each (and an input_scale) dequantize to code * scale, as ModelOpt computes
    them; they were listed as raw codes (std 118, max 448 for weights of std 1)."""
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    scale = weight.abs().max() / 448
    codes = (weight / scale).to(torch.float8_e4m3fn)
    model = tmp_path / "model"
    model.mkdir()
    save_file({"l.weight": codes, "l.weight_scale": scale.reshape(()), "l.input_scale": torch.tensor(0.5)},
              model / "model.safetensors")
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16",
                                                      "quantization_config": {"quant_method": "modelopt",
                                                                              "quant_algo": "FP8"}}))
    expected = (codes.float() * scale).to(torch.bfloat16)
    rows = {t["name"]: t for t in json_of("inspect", model, "--json", schema="inspect")["tensors"]}
    assert rows["l.weight"]["quant"]["scheme"] == "float-quantized" and "l.weight_scale" not in rows
    assert rows["l.weight"]["stats"]["max"] == expected.max().item()
    assert run("dequantize", model, "-o", tmp_path / "out/").exit_code == 0
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert bits(f.get_tensor("l.weight")) == bits(expected) and "l.weight_scale" not in f.keys()
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_modelopt_hf_quant_config_goes_when_nothing_is_quantized_any_more(tmp_path):
    """ModelOpt keeps its quantization in hf_quant_config.json (config.json has none); vLLM and TensorRT-LLM
    read it, so a dequantized output must not carry it as it was: left out when nothing is quantized any
    more, the modules now plain added to its exclude_modules when some are, kept by other surgery."""
    model, generator, state = tmp_path / "model", torch.Generator().manual_seed(6), {}
    model.mkdir()
    for module in ("a", "b"):
        weight = torch.randn(32, 32, generator=generator)
        scale = weight.abs().max() / 448
        state |= {f"{module}.weight": (weight / scale).to(torch.float8_e4m3fn), f"{module}.weight_scale": scale.reshape(()),
                  f"{module}.input_scale": torch.tensor(0.25)}
    save_file({**state, "norm.weight": torch.ones(32)}, model / "model.safetensors")
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    (model / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt", "version": "0.19.0"},
                                                            "quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head"]}}))
    full = run("dequantize", model, "-o", tmp_path / "full/")
    assert full.exit_code == 0 and "hf_quant_config.json left out: nothing is quantized any more" in full.stderr
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(tmp_path / "full" / "model.safetensors", "pt") as f:
        expected = (state["a.weight"].float() * state["a.weight_scale"]).to(torch.bfloat16)
        assert bits(f.get_tensor("a.weight")) == bits(expected)
    part = run("dequantize", model, "-p", "a.weight", "-o", tmp_path / "part/")
    assert part.exit_code == 0 and "note: hf_quant_config.json: exclude_modules added a\n" in part.stderr
    assert json.loads((tmp_path / "part" / "hf_quant_config.json").read_text()) == {
        "producer": {"name": "modelopt", "version": "0.19.0"},
        "quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head", "a"]}}
    other = run("zero", model, "-p", "norm.weight", "-o", tmp_path / "zeroed/")
    assert other.exit_code == 0 and "note: hf_quant_config.json" not in other.stderr
    assert (tmp_path / "zeroed" / "hf_quant_config.json").read_bytes() == (model / "hf_quant_config.json").read_bytes()
