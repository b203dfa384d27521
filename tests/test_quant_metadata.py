"""The quantization_config of a checkpoint with no config.json beside it: a safetensors output records it
in its ``__metadata__`` (as config.json names it), a file read without a config.json takes it from there,
and a torch file, which has nowhere to record it, is refused when a reader would need it.

Ground truth: DeepSeek's fp8-block layout and weight_dequant computed in torch (fp8_reference.py), the
metadata read with safetensors.safe_open.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8_reference import dequantize, quantize
from helpers import bits, register_input, run

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}


def metadata(path) -> dict:
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def recorded(path) -> dict | None:
    text = metadata(path).get("quantization_config")
    return None if text is None else json.loads(text)


def tensors(path) -> dict:
    with safe_open(path, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture
def float_file(request, tmp_path):
    torch.manual_seed(3)
    weight = torch.randn(256, 512)
    weight[:64, 384:] = 0  # an all-zero tile in every block tried: scale 1
    path = tmp_path / "float.safetensors"
    save_file({"W": weight, "b": torch.zeros(256)}, path)
    register_input(request, path)
    return path, weight


def assert_within_e4m3(values: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]):
    """e4m3 keeps 3 mantissa bits (half an ulp: 2^-4 relative); subnormals below 2^-6 step by 2^-9 of the scale."""
    tiles = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:weight.shape[0], :weight.shape[1]]
    assert bool(((values - weight).abs() <= weight.abs() * 2 ** -4 + tiles * 2 ** -10).all())


@pytest.mark.parametrize("block", [(32, 32), (64, 128)])
def test_quantize_to_one_safetensors_file_records_its_block_and_dequantize_reads_it_back(float_file, tmp_path, block):
    path, weight = float_file
    out, back = tmp_path / "q.safetensors", tmp_path / "d.safetensors"
    result = run("quantize", path, "-p", "W", "--scheme", "fp8-block", "--block", "x".join(map(str, block)), "-o", out)
    assert result.exit_code == 0, result.stderr
    codes, scale = quantize(weight, block)
    written = tensors(out)
    assert bits(written["W"]) == bits(codes) and bits(written["W_scale_inv"]) == bits(scale)
    assert recorded(out) == {**FP8, "weight_block_size": list(block)}

    result = run("dequantize", out, "--dtype", "float32", "-o", back)
    assert result.exit_code == 0, result.stderr
    values = tensors(back)["W"]
    assert bits(values) == bits(dequantize(codes, scale, torch.float32, block))
    assert_within_e4m3(values, weight, scale, block)
    assert recorded(back) is None  # nothing quantized is left: no stale config


def test_the_default_block_is_recorded_and_a_file_without_the_record_still_reads_as_128x128(float_file, tmp_path):
    path, weight = float_file
    out = tmp_path / "q.safetensors"
    assert run("quantize", path, "-p", "W", "--scheme", "fp8-block", "-o", out).exit_code == 0
    assert recorded(out) == {**FP8, "weight_block_size": [128, 128]}

    codes, scale = quantize(weight)
    bare = tmp_path / "bare.safetensors"  # as another tool writes DeepSeek's layout: no metadata
    save_file({"W": codes, "W_scale_inv": scale}, bare)
    result = run("dequantize", bare, "--dtype", "float32", "-o", tmp_path / "d.safetensors")
    assert result.exit_code == 0, result.stderr
    assert bits(tensors(tmp_path / "d.safetensors")["W"]) == bits(dequantize(codes, scale, torch.float32))


def test_a_rename_of_the_quantized_file_keeps_it_readable_and_a_value_change_drops_the_record(float_file, tmp_path):
    path, weight = float_file
    out, renamed = tmp_path / "q.safetensors", tmp_path / "r.safetensors"
    assert run("quantize", path, "-p", "W", "--scheme", "fp8-block", "--block", "32x32", "-o", out).exit_code == 0
    result = run("rename", out, "--from", "W", "--to", "V", "-o", renamed)
    assert result.exit_code == 0, result.stderr
    assert sorted(tensors(renamed)) == ["V", "V_scale_inv", "b"]
    assert recorded(renamed) == {**FP8, "weight_block_size": [32, 32]}
    result = run("dequantize", renamed, "--dtype", "float32", "-o", tmp_path / "d.safetensors")
    assert result.exit_code == 0, result.stderr
    codes, scale = quantize(weight, 32)
    assert bits(tensors(tmp_path / "d.safetensors")["V"]) == bits(dequantize(codes, scale, torch.float32, 32))

    result = run("zero", renamed, "-p", "V", "-o", tmp_path / "z.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "quantization_config" not in metadata(tmp_path / "z.safetensors")


def test_a_torch_file_cannot_record_another_block_and_is_refused_the_default_is_written(float_file, tmp_path):
    path, weight = float_file
    out = tmp_path / "q.pt"
    result = run("quantize", path, "-p", "W", "--scheme", "fp8-block", "--block", "32x32", "-o", out)
    assert result.exit_code == 2
    assert result.stderr == ("paramsurgeon: error: a single torch file has no metadata to record the quantization_config"
                             " that 1 quantized weight (W) needs to be read back; write a .safetensors file or a"
                             " directory (-o DIR/), or dequantize them; nothing written\n")
    assert not out.exists()

    assert run("quantize", path, "-p", "W", "--scheme", "fp8-block", "-o", out).exit_code == 0
    result = run("dequantize", out, "--dtype", "float32", "-o", tmp_path / "d.safetensors")
    assert result.exit_code == 0, result.stderr
    codes, scale = quantize(weight)
    assert bits(tensors(tmp_path / "d.safetensors")["W"]) == bits(dequantize(codes, scale, torch.float32))


def fp8_directory(request, tmp_path, config: dict, dtype: str):
    """A directory of one fp8-block weight W [200, 300] in 64x128 blocks, its config.json holding ``config``
    and ``dtype``; (folder, codes, scale)."""
    torch.manual_seed(4)
    codes, scale = quantize(torch.randn(200, 300), (64, 128))
    folder = tmp_path / "fp8"
    folder.mkdir()
    save_file({"W": codes, "W_scale_inv": scale}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"torch_dtype": dtype, "quantization_config": config}))
    return register_input(request, folder), codes, scale


def test_a_quantized_directory_converted_to_one_file_records_its_config_which_a_config_json_overrides(request,
                                                                                                     tmp_path):
    config = {**FP8, "weight_block_size": [64, 128], "modules_to_not_convert": ["lm_head"]}
    folder, codes, scale = fp8_directory(request, tmp_path, config, "float32")
    out = tmp_path / "one.safetensors"
    result = run("convert", folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert recorded(out) == config
    result = run("dequantize", out, "--dtype", "float32", "-o", tmp_path / "d.safetensors")
    assert result.exit_code == 0, result.stderr
    assert bits(tensors(tmp_path / "d.safetensors")["W"]) == bits(dequantize(codes, scale, torch.float32, (64, 128)))

    beside = tmp_path / "beside"  # a config.json beside the file wins over its metadata
    beside.mkdir()
    (beside / "config.json").write_text(json.dumps({"quantization_config": {**FP8, "weight_block_size": [128, 128]}}))
    (beside / "one.safetensors").write_bytes(out.read_bytes())
    result = run("dequantize", beside / "one.safetensors", "-o", tmp_path / "d2.safetensors")
    assert result.exit_code == 2
    assert "the scale grid [4, 3] float32 does not fit [200, 300] in 128x128 blocks" in result.stderr


def test_quantize_of_a_single_file_into_a_directory_writes_the_config_json_that_reads_it_back(float_file, tmp_path):
    path, weight = float_file
    out = tmp_path / "qdir"
    assert run("quantize", path, "-p", "W", "--scheme", "fp8-block", "--block", "64x128", "-o", f"{out}/").exit_code == 0
    config = {**FP8, "weight_block_size": [64, 128]}
    assert json.loads((out / "config.json").read_text()) == {"quantization_config": config, "torch_dtype": "float32"}
    assert recorded(out / "model.safetensors") == config
    result = run("dequantize", out, "--dtype", "float32", "-o", tmp_path / "d.safetensors")
    assert result.exit_code == 0, result.stderr
    codes, scale = quantize(weight, (64, 128))
    assert bits(tensors(tmp_path / "d.safetensors")["W"]) == bits(dequantize(codes, scale, torch.float32, (64, 128)))


@pytest.mark.parametrize("layout", [["--format", "pt"], ["--format", "pt", "--max-shard-size", "100KB"],
                                    ["--max-shard-size", "100KB"], ["--format", "dcp"]],
                         ids=["torch", "torch-sharded", "safetensors-sharded", "dcp"])
def test_a_single_file_of_another_block_converted_to_a_directory_carries_its_config_json_and_reads_back(
        float_file, tmp_path, layout):
    path, weight = float_file
    one, folder = tmp_path / "q.safetensors", tmp_path / "dir"
    assert run("quantize", path, "-p", "W", "--scheme", "fp8-block", "--block", "32x32", "-o", one).exit_code == 0
    result = run("convert", one, "-o", f"{folder}/", *layout)
    assert result.exit_code == 0, result.stderr
    config = {**FP8, "weight_block_size": [32, 32]}
    assert json.loads((folder / "config.json").read_text()) == {"quantization_config": config, "torch_dtype": "float32"}
    assert "note: config.json: quantization_config added" in result.stderr

    result = run("inspect", folder, "--json", "--no-stats")
    assert result.exit_code == 0, result.stderr
    shown = {t["name"]: t for t in json.loads(result.stdout)["tensors"]}
    assert shown["W"]["quant"]["block"] == [32, 32] and shown["W"]["dtype"] == "float32"
    result = run("dequantize", folder, "-o", tmp_path / "d.safetensors")  # the default dtype: the recorded one
    assert result.exit_code == 0, result.stderr
    codes, scale = quantize(weight, 32)
    assert bits(tensors(tmp_path / "d.safetensors")["W"]) == bits(dequantize(codes, scale, torch.float32, 32))

    again = run("convert", one, "-o", f"{folder}/", *layout)  # the config.json there already says it: no note
    assert again.exit_code == 0 and "config.json" not in again.stderr, again.stderr
    assert run("quantize", path, "-p", "W", "--scheme", "fp8-block", "--block", "64x64", "-o", one).exit_code == 0
    result = run("convert", one, "-o", f"{folder}/", *layout)
    assert result.exit_code == 0, result.stderr  # the config.json there is updated for the new block
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["weight_block_size"] == [64, 64]
    result = run("dequantize", folder, "--dtype", "float32", "-o", tmp_path / "d64.safetensors")
    assert result.exit_code == 0, result.stderr
    codes, scale = quantize(weight, 64)
    assert bits(tensors(tmp_path / "d64.safetensors")["W"]) == bits(dequantize(codes, scale, torch.float32, 64))


def test_one_file_records_the_dtype_its_weights_dequantize_to_so_file_and_directory_agree(request, tmp_path):
    config = {**FP8, "weight_block_size": [64, 128]}
    folder, codes, scale = fp8_directory(request, tmp_path, config, "float16")
    one = tmp_path / "one.safetensors"
    assert run("convert", folder, "-o", one).exit_code == 0
    assert metadata(one)["torch_dtype"] == "float16"
    for source, out in [(folder, tmp_path / "from-dir.safetensors"), (one, tmp_path / "from-file.safetensors")]:
        result = run("dequantize", source, "-o", out)
        assert result.exit_code == 0, result.stderr
        assert bits(tensors(out)["W"]) == bits(dequantize(codes, scale, torch.float16, (64, 128)))
    assert "torch_dtype" not in metadata(tmp_path / "from-file.safetensors")  # nothing quantized is left

    bare = tmp_path / "bare.safetensors"  # a file with the config but not the dtype: the default, bfloat16
    save_file({"W": codes, "W_scale_inv": scale}, bare, metadata={"quantization_config": json.dumps(config)})
    assert run("dequantize", bare, "-o", tmp_path / "d.safetensors").exit_code == 0
    assert tensors(tmp_path / "d.safetensors")["W"].dtype == torch.bfloat16
