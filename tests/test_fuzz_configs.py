"""Broken quantization configs, by the hundred: each field of a real quantized directory's
``quantization_config`` (and the config's dtype) replaced by a value of another type, or removed.
Every case must end in success or in exit 2 with one clear line: no internal error, no output.

The directories are the other tests' real ones: DeepSeek fp8-block (tests/fp8_reference.py),
GPTQ and AWQ packed as their quantizers pack them, compressed-tensors' own int4 and nvfp4.
The mutations are drawn by a seeded generator, so the cases are the same on every run.
"""

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fp8_reference import quantize
from helpers import register_input, run
from test_quant_schemes_ct_bnb import CT, compressed_tensors_dir
from test_quant_schemes_gptq_awq import awq_dir, gptq_dir

CASES = 30  # mutations per directory
JUNK = [None, 0, -1, 3, 1 << 40, 1.5, "", "x", [], [1], [0, 0], {}, {"a": 1}, True]
REMOVED = object()


def fp8_dir(folder):
    folder.mkdir()
    torch.manual_seed(0)
    tensors = {"model.norm.weight": torch.ones(96, dtype=torch.bfloat16)}
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        tensors[name], tensors[name + "_scale_inv"] = quantize(torch.randn(96, 200) * 0.02, block=64)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "num_hidden_layers": 1,
                                                    "quantization_config": {"quant_method": "fp8",
                                                                            "weight_block_size": [64, 64]}}))
    return folder


def directory(variant: str, request, folder):
    """The real quantized directory ``variant``, registered as an input the test must leave unchanged."""
    if variant == "fp8-block":
        return register_input(request, fp8_dir(folder))
    if variant in ("gptq", "awq"):
        return (gptq_dir if variant == "gptq" else awq_dir)(request, folder)[0]
    compressed_tensors_dir(folder, *CT[variant][1:])
    return register_input(request, folder)


def fields(node, path=()):
    """Every key and index path under ``node``."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in children:
        yield path + (key,)
        yield from fields(value, path + (key,))


def mutated(config: dict, draw: random.Random) -> tuple[dict, tuple, object]:
    """``config`` with one field of its quantization_config (or its dtype) replaced or removed."""
    config = json.loads(json.dumps(config))
    paths = [("torch_dtype",)] + [("quantization_config",) + p for p in fields(config["quantization_config"])]
    path = draw.choice(paths)
    value = draw.choice(JUNK + [REMOVED] * isinstance(path[-1], str))
    node = config
    for key in path[:-1]:
        node = node[key]
    if value is REMOVED:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return config, path, value


@pytest.mark.parametrize("variant", ["fp8-block", "gptq", "awq", "int4-group-asym", "nvfp4"])
def test_broken_quantization_configs_end_in_a_result_or_one_line(request, tmp_path, variant):
    source = directory(variant, request, tmp_path / variant)
    config = json.loads((source / "config.json").read_text())
    draw = random.Random(variant)
    folder, out = tmp_path / "broken", tmp_path / "out"
    for _ in range(CASES):
        changed, path, value = mutated(config, draw)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
        (folder / "config.json").write_text(json.dumps(changed))
        for command in (("inspect", folder, "--json"), ("dequantize", folder, "-o", out),
                        ("rename", folder, "--from", "model.*", "--to", "net.*", "-o", out)):
            result = run(*command)
            case = (variant, path, value, command[0], result.stderr)
            assert result.exit_code in (0, 2), case
            if result.exit_code == 2:
                assert len(result.stderr.strip().splitlines()) == 1 and "internal error" not in result.stderr, case
                assert not out.exists(), case
            shutil.rmtree(out, ignore_errors=True)
