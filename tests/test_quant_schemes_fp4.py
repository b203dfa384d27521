"""MXFP4 (gpt-oss) and NVFP4 (ModelOpt) checkpoints read as the weights they stand for.

MXFP4: a tiny gpt-oss made by transformers, its experts quantized here (an E8M0 exponent per 32
values, e2m1 codes two a byte, low nibble first, as gpt-oss stores ``*_blocks``/``*_scales``); the
ground truth is transformers itself (``from_pretrained`` with ``Mxfp4Config(dequantize=True)`` and
``convert_moe_packed_tensors``) and a loop over every code written from gpt-oss's format.
NVFP4: real nn.Linear weights quantized as ModelOpt's ``NVFP4QTensor.quantize`` does (a global
scale amax / (6 * 448), a float8 scale per 16 values); the reference is a loop written from its
``dequantize``: e2m1 * (float(weight_scale) * weight_scale_2) in float32, rounded to the dtype.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import bits, json_of, register_input, run

import paramsurgeon.formats as formats
from paramsurgeon.checkpoint.quantized import Quantized
from paramsurgeon.checkpoint.values import to_torch

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
EXPERTS = "model.layers.0.mlp.experts."
GATE_UP, DOWN = EXPERTS + "gate_up_proj", EXPERTS + "down_proj"


def e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """The nearest e2m1 code (sign bit 8) of each value."""
    magnitude = (scaled.abs()[..., None] - torch.tensor(E2M1[:8])).abs().argmin(-1)
    return (magnitude | ((scaled < 0).long() << 3)).to(torch.uint8)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes a byte along the last dimension, the first in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def mxfp4_quantize(weight: torch.Tensor):
    """gpt-oss's ``*_blocks`` [E, out, in/32, 16] and ``*_scales`` [E, out, in/32] of a dequantized
    expert weight [E, in, out] (the layout transformers' GptOssExperts holds)."""
    w = weight.float().transpose(1, 2)
    blocks = w.reshape(*w.shape[:2], -1, 32)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=2.0 ** -120) / 6)).clamp(-127, 127)
    codes = e2m1_codes(blocks / torch.exp2(exponent)[..., None])
    return pack(codes), (exponent + 127).to(torch.uint8).contiguous()


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """Every value, one at a time: value [e, k, n] is e2m1 of nibble k % 32 of block k // 32 of
    output n, times 2 ** (scale - 127)."""
    experts, columns, groups, _ = blocks.shape
    out = torch.empty(experts, groups * 32, columns, dtype=torch.float64)
    for e in range(experts):
        for n in range(columns):
            for g in range(groups):
                factor = 2.0 ** (int(scales[e, n, g]) - 127)
                for b, byte in enumerate(blocks[e, n, g].tolist()):
                    out[e, g * 32 + 2 * b, n] = E2M1[byte & 0x0F] * factor
                    out[e, g * 32 + 2 * b + 1, n] = E2M1[byte >> 4] * factor
    return out.to(dtype)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """A tiny gpt-oss saved as OpenAI ships it: experts in mxfp4, the rest in bfloat16."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"])
    torch.manual_seed(0)
    state = GptOssForCausalLM(config).to(torch.bfloat16).state_dict()
    tensors = {}
    for name, value in state.items():
        if name in (GATE_UP, DOWN):
            tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4_quantize(value)
        else:
            tensors[name] = value.contiguous()
    folder = tmp_path_factory.mktemp("gpt-oss")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    document = config.to_dict()
    document.update(torch_dtype="bfloat16", quantization_config={
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]})
    (folder / "config.json").write_text(json.dumps(document))
    return folder, tensors


@pytest.fixture
def gpt_oss_dir(request, gpt_oss):
    register_input(request, gpt_oss[0])
    return gpt_oss


def stored(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_mxfp4_experts_read_as_transformers_dequantizes_them(gpt_oss_dir):
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder, tensors = gpt_oss_dir
    loaded = GptOssForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True),
                                               dtype=torch.bfloat16).state_dict()
    ckpt = formats.load(str(folder))
    for name in (GATE_UP, DOWN):
        tensor = ckpt[name]
        assert isinstance(tensor, Quantized) and tensor.scheme.name == "mxfp4" and tensor.dtype.name == "bfloat16"
        values = to_torch(tensor)
        assert values.shape == loaded[name].shape and bits(values) == bits(loaded[name]), name
        blocks, scales = tensors[name + "_blocks"], tensors[name + "_scales"]
        assert bits(values) == bits(convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
        assert bits(values) == bits(mxfp4_reference(blocks, scales)), name


def test_mxfp4_through_inspect_and_a_rename(gpt_oss_dir, tmp_path):
    folder, tensors = gpt_oss_dir
    rows = {t["name"]: t for t in json_of("inspect", folder, "--json", schema="inspect")["tensors"]}
    assert GATE_UP in rows and GATE_UP + "_blocks" not in rows and GATE_UP + "_scales" not in rows
    assert EXPERTS + "gate_up_proj_bias" in rows  # a plain tensor beside the group stays one
    values = mxfp4_reference(tensors[GATE_UP + "_blocks"], tensors[GATE_UP + "_scales"]).double()
    assert rows[GATE_UP]["shape"] == [4, 64, 128] and rows[GATE_UP]["dtype"] == "bfloat16"
    stats = rows[GATE_UP]["stats"]
    assert stats["std"] == pytest.approx(values.std().item(), rel=1e-6)
    assert (stats["min"], stats["max"]) == (values.min().item(), values.max().item())

    out = tmp_path / "renamed.safetensors"
    assert run("rename", folder, "--from", EXPERTS + "*", "--to", "model.layers.0.mlp.moe.*", "-o", out).exit_code == 0
    moved = {name.replace(".experts.", ".moe."): value for name, value in tensors.items()}
    got = stored(out)
    assert sorted(got) == sorted(moved) and all(bits(got[n]) == bits(v) for n, v in moved.items())


@pytest.mark.parametrize("change, why", [
    (lambda t: t.pop(DOWN + "_scales"), f"{DOWN}_blocks: mxfp4 codes without their block scales {DOWN}_scales"),
    (lambda t: t.pop(DOWN + "_blocks"), f"{DOWN}_scales: mxfp4 block scales without their codes {DOWN}_blocks"),
    (lambda t: t.update({DOWN + "_scales": t[DOWN + "_scales"][:, :, :1].clone()}),
     f"{DOWN}_blocks [4, 64, 2, 16] with {DOWN}_scales [4, 64, 1] uint8: not the [experts, out, blocks, 16] codes"),
])
def test_an_mxfp4_part_without_its_partner_is_named(request, gpt_oss, tmp_path, change, why):
    folder, tensors = gpt_oss
    tensors = dict(tensors)
    change(tensors)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text((folder / "config.json").read_text())
    register_input(request, bad)
    document = json_of("inspect", bad, "--json", schema="inspect")
    assert why in "\n".join(document["notes"])
    names = {t["name"] for t in document["tensors"]}
    assert GATE_UP in names and DOWN not in names


@pytest.mark.parametrize("args, kept", [(["--keep", "1,3"], [1, 3]), (["--drop", "2"], [0, 1, 3])])
def test_experts_slices_the_mxfp4_parts_and_the_result_computes_the_kept_experts(gpt_oss_dir, tmp_path, args, kept):
    """The kept experts' blocks and scales, byte for byte (still mxfp4, the config's quantization kept), which
    transformers dequantizes to exactly the kept experts' values; its logits are the original's with the router
    restricted to them."""
    from layer_models import logits, restricted
    from transformers import GptOssForCausalLM, Mxfp4Config

    folder, tensors = gpt_oss_dir
    out = tmp_path / "pruned"
    result = run("experts", folder, *args, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert "written as plain" not in result.stderr
    got = stored(out / "model.safetensors")
    for name in (GATE_UP, DOWN):
        assert name not in got
        for part in ("_blocks", "_scales"):
            assert got[name + part].dtype == torch.uint8 and bits(got[name + part]) == bits(tensors[name + part][kept])
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == len(kept)
    assert config["quantization_config"] == json.loads((folder / "config.json").read_text())["quantization_config"]

    def load(path):
        return GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.bfloat16).eval()

    original, pruned = load(folder), load(out)
    before, after = original.state_dict(), pruned.state_dict()
    for name in (GATE_UP, DOWN):
        assert bits(after[name]) == bits(before[name][kept]), name
        assert bits(after[name]) == bits(mxfp4_reference(tensors[name + "_blocks"], tensors[name + "_scales"])[kept])
    with torch.no_grad(), restricted(original, kept) as reference:
        expected = logits(reference)
        assert not torch.allclose(expected, logits(original))  # the restriction shows
        torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=0)


def test_dequantizing_one_of_the_experts_two_weights_says_transformers_cannot_load_the_module(gpt_oss_dir, tmp_path):
    """gpt-oss's experts module holds both: transformers quantizes a module as a whole."""
    folder, _ = gpt_oss_dir
    result = run("dequantize", folder, "-p", GATE_UP, "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 0, result.stderr
    assert ("note: config.json: model.layers.0.mlp.experts holds plain and quantized weights at once, which"
            " transformers cannot load (it quantizes a module as a whole); dequantize the others too") in result.stderr
    listed = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert listed[-1] == "model.layers.0.mlp.experts"


def test_a_layer_of_experts_dequantized_is_left_unconverted_and_loads_with_its_values(request, tmp_path):
    """Two layers, the first's experts dequantized: modules_to_not_convert names that experts module, as
    transformers' mxfp4 integration matches it (should_convert_module of '<mlp>.experts'), and the model loads
    (dequantized on the CPU) with exactly the values the experts stand for."""
    from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    torch.manual_seed(1)
    state = GptOssForCausalLM(config).to(torch.bfloat16).state_dict()
    tensors, values = {}, {}
    for name, value in state.items():
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4_quantize(value)
            values[name] = mxfp4_reference(tensors[name + "_blocks"], tensors[name + "_scales"])
        else:
            tensors[name] = values[name] = value.contiguous()
    folder = tmp_path / "gpt-oss"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    held = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": "bfloat16",
                                                    "quantization_config": held}))
    register_input(request, folder)
    out = tmp_path / "out"
    assert run("dequantize", folder, "-p", "model.layers.0.mlp.experts.*", "-o", f"{out}/") \
        .exit_code == 0
    listed = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert listed == [*held["modules_to_not_convert"], "model.layers.0.mlp.experts"]
    assert not should_convert_module("model.layers.0.mlp.experts", listed)
    assert should_convert_module("model.layers.1.mlp.experts", listed)
    got = stored(out / "model.safetensors")
    assert bits(got["model.layers.0.mlp.experts.down_proj"]) == bits(values["model.layers.0.mlp.experts.down_proj"])
    assert bits(got["model.layers.1.mlp.experts.down_proj_blocks"]) == bits(
        tensors["model.layers.1.mlp.experts.down_proj_blocks"])
    loaded = GptOssForCausalLM.from_pretrained(out, quantization_config=Mxfp4Config(dequantize=True),
                                               dtype=torch.bfloat16).eval()
    assert all(bits(value) == bits(values[name]) for name, value in loaded.state_dict().items())


FC1, FC2 = "model.layers.0.mlp.fc1", "model.layers.0.mlp.fc2"


def nvfp4_quantize(weight: torch.Tensor):
    """ModelOpt's export of ``weight`` [out, in]: packed codes, float8 block scales, global scale."""
    scale_2 = weight.abs().amax().float() / (6.0 * 448.0)
    blocks = weight.float().reshape(weight.shape[0], -1, 16)
    scale = blocks.abs().amax(-1) / (6.0 * scale_2)
    scale[scale == 0] = 1.0
    scale = scale.to(torch.float8_e4m3fn)
    codes = e2m1_codes(blocks / (scale.float() * scale_2)[..., None]).reshape(weight.shape)
    return pack(codes), scale, scale_2.reshape(())


def nvfp4_reference(codes: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, dtype) -> torch.Tensor:
    """Each value: e2m1 of its nibble times (float32 block scale * global scale), in float32."""
    rows, half = codes.shape
    out = torch.empty(rows, half * 2, dtype=torch.float32)
    for r in range(rows):
        for c, byte in enumerate(codes[r].tolist()):
            block = torch.tensor(float(scale[r, c * 2 // 16].float()), dtype=torch.float32) * scale_2.float()
            out[r, 2 * c] = torch.tensor(E2M1[byte & 0x0F], dtype=torch.float32) * block
            out[r, 2 * c + 1] = torch.tensor(E2M1[byte >> 4], dtype=torch.float32) * block
    return out.to(dtype)


@pytest.fixture
def nvfp4_dir(request, tmp_path):
    torch.manual_seed(0)
    layers = {FC1: torch.nn.Linear(64, 48, bias=False), FC2: torch.nn.Linear(48, 64, bias=False)}
    tensors, expected = {"model.norm.weight": torch.ones(64, dtype=torch.float16)}, {}
    for name, layer in layers.items():
        codes, scale, scale_2 = nvfp4_quantize(layer.weight.detach())
        tensors.update({name + ".weight": codes, name + ".weight_scale": scale, name + ".weight_scale_2": scale_2,
                        name + ".input_scale": torch.tensor(0.01)})
        expected[name + ".weight"] = nvfp4_reference(codes, scale, scale_2, torch.float16)
    folder = tmp_path / "nvfp4"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "float16", "quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}}))
    return register_input(request, folder), tensors, expected


def test_nvfp4_reads_as_modelopt_dequantizes(nvfp4_dir):
    folder, _, expected = nvfp4_dir
    ckpt = formats.load(str(folder))
    assert sorted(ckpt.tensors) == sorted(["model.norm.weight", FC1 + ".weight", FC2 + ".weight"])
    for name, values in expected.items():
        tensor = ckpt[name]
        assert isinstance(tensor, Quantized) and tensor.scheme.name == "nvfp4" and tensor.params["block"] == [1, 16]
        assert sorted(tensor.parts) == ["codes", "input_scale", "scale", "scale_2"]
        assert bits(to_torch(tensor)) == bits(values), name


def test_nvfp4_without_a_config_is_told_by_names_and_dtypes(request, nvfp4_dir, tmp_path):
    _, tensors, expected = nvfp4_dir
    alone = tmp_path / "alone.safetensors"
    save_file(tensors, alone)
    register_input(request, alone)
    tensor = formats.load(str(alone))[FC2 + ".weight"]
    assert tensor.scheme.name == "nvfp4" and tensor.dtype.name == "bfloat16"  # no config: the default dtype
    assert bits(to_torch(tensor)) == bits(expected[FC2 + ".weight"].float().to(torch.bfloat16))


def test_nvfp4_through_inspect_and_a_rename(nvfp4_dir, tmp_path):
    folder, tensors, expected = nvfp4_dir
    rows = {t["name"]: t for t in json_of("inspect", folder, "--json", schema="inspect")["tensors"]}
    assert sorted(rows) == sorted(["model.norm.weight", FC1 + ".weight", FC2 + ".weight"])
    values = expected[FC1 + ".weight"].double()
    assert rows[FC1 + ".weight"]["shape"] == [48, 64] and rows[FC1 + ".weight"]["dtype"] == "float16"
    assert rows[FC1 + ".weight"]["stats"]["mean"] == pytest.approx(values.mean().item(), rel=1e-6)

    out = tmp_path / "renamed.safetensors"
    assert run("rename", folder, "--from", "*.fc1.*", "--to", "*.up.*", "-o", out).exit_code == 0
    moved = {name.replace(".fc1.", ".up."): value for name, value in tensors.items()}
    got = stored(out)
    assert sorted(got) == sorted(moved) and all(bits(got[n]) == bits(v) for n, v in moved.items())


@pytest.mark.parametrize("change, why", [
    (lambda t: t.pop(FC1 + ".weight_scale_2"),
     f"{FC1}.weight, {FC1}.weight_scale: nvfp4 codes and block scales without their global scale"
     f" {FC1}.weight_scale_2"),
    (lambda t: t.pop(FC1 + ".weight_scale"), f"an nvfp4 global scale without its {FC1}.weight_scale"),
    (lambda t: t.update({FC1 + ".weight_scale": t[FC1 + ".weight_scale"][:, :2].clone()}),
     f"{FC1}.weight [48, 32] uint8, {FC1}.weight_scale [48, 2] float8_e4m3fn, {FC1}.weight_scale_2 []: not uint8"
     " codes with a float8_e4m3fn scale per 16 values and one global scale"),
    (lambda t: t.update({FC1 + ".pre_quant_scale": torch.ones(64)}),
     f"nvfp4 codes with a {FC1}.pre_quant_scale (NVFP4_AWQ) are not read"),
])
def test_an_nvfp4_part_without_its_partner_is_named(request, nvfp4_dir, tmp_path, change, why):
    _, tensors, _ = nvfp4_dir
    change(tensors)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "model.safetensors")
    register_input(request, bad)
    document = json_of("inspect", bad, "--json", schema="inspect")
    assert why in "\n".join(document["notes"])
    names = {t["name"] for t in document["tensors"]}
    assert FC2 + ".weight" in names and FC2 + ".weight_scale" not in names
