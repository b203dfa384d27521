"""GPTQ and AWQ checkpoints read as the weights they stand for.

The checkpoints are made here from real nn.Linear weights: a min-max quantizer gives integer codes,
zero points and scales, which are packed as AutoGPTQ's ``QuantLinear.pack`` and AutoAWQ's
``WQLinear_GEMM.from_linear`` pack them (word by word, in uint32, their loops written out below).
The reference values come from those integers before packing (scale * (code - zero) of each
input's group, in float32, rounded to the dtype), never from unpacking: what paramsurgeon reads
must be what the quantizer meant, for both GPTQ zero-point conventions, every bit width and act-order.
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import bits, json_of, register_input, run

import paramsurgeon.formats as formats
from paramsurgeon.checkpoint.quantized import Quantized
from paramsurgeon.checkpoint.values import to_torch

Q, K = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
NORM = "model.norm.weight"
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize(weight: torch.Tensor, bits_: int, group: int, act_order: bool, seed: int = 0):
    """Asymmetric min-max codes of ``weight`` [out, in] by groups of inputs: codes [in, out],
    zero points and float16 scales [groups, out], and each input's group (permuted under act-order)."""
    out_features, in_features = weight.shape
    maxq = 2 ** bits_ - 1
    order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed)) if act_order \
        else torch.arange(in_features)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = torch.arange(in_features, dtype=torch.int32) // group
    groups = -(-in_features // group)
    scales = torch.empty(groups, out_features, dtype=torch.float16)
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    codes = torch.empty(in_features, out_features, dtype=torch.int64)
    w = weight.t().float()
    for g in range(groups):
        rows = g_idx == g
        low, high = w[rows].min(0).values.clamp(max=0), w[rows].max(0).values.clamp(min=0)
        scale = ((high - low) / maxq).clamp(min=1e-8).half()
        zero = torch.round(-low / scale.float()).clamp(0, maxq).long()
        scales[g], zeros[g] = scale, zero
        codes[rows] = (torch.round(w[rows] / scale.float()) + zero).clamp(0, maxq).long()
    return codes, zeros, scales, g_idx


def reference(codes, zeros, scales, g_idx, dtype=torch.float16) -> torch.Tensor:
    """scale * (code - zero) of each input's group, in float32, as the [out, in] weight of ``dtype``."""
    index = g_idx.long()
    return ((codes - zeros[index]).float() * scales[index].float()).t().contiguous().to(dtype)


def pack_gptq(values: np.ndarray, bits_: int) -> torch.Tensor:
    """AutoGPTQ's ``QuantLinear.pack`` loop: ``values`` [n, m] into int32 rows, down the columns."""
    values = values.astype(np.uint32)
    packed = np.zeros((values.shape[0] // 32 * bits_, values.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < packed.shape[0]:
        if bits_ in (2, 4, 8):
            for j in range(i, i + 32 // bits_):
                packed[row] |= values[j] << (bits_ * (j - i))
            i += 32 // bits_
            row += 1
        else:  # 3 bits: 32 values in three words, two of them split across a boundary
            for j in range(i, i + 10):
                packed[row] |= values[j] << (3 * (j - i))
            i += 10
            packed[row] |= values[i] << 30
            row += 1
            packed[row] |= (values[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                packed[row] |= values[j] << (3 * (j - i) + 1)
            i += 10
            packed[row] |= values[i] << 31
            row += 1
            packed[row] |= (values[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                packed[row] |= values[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return torch.from_numpy(packed.view(np.int32))


def gptq_parts(weight, bits_, group, act_order, fmt="gptq"):
    """The stored parts of a GPTQ layer and the values they stand for (float16)."""
    codes, zeros, scales, g_idx = quantize(weight, bits_, group, act_order)
    stored_zeros = (zeros - 1) & (2 ** bits_ - 1) if fmt == "gptq" else zeros  # v1 stores zero - 1
    parts = {"qweight": pack_gptq(codes.numpy(), bits_),
             "qzeros": pack_gptq(stored_zeros.t().contiguous().numpy(), bits_).t().contiguous(),
             "scales": scales, "g_idx": g_idx}
    return parts, reference(codes, zeros, scales, g_idx)


def pack_awq(values: np.ndarray) -> torch.Tensor:
    """AutoAWQ's ``WQLinear_GEMM.from_linear`` loop: 4-bit ``values`` [n, m] into [n, m/8] int32,
    nibble i of each word holding column AWQ_ORDER[i] of its eight."""
    values = values.astype(np.uint32)
    packed = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
    for col in range(packed.shape[1]):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return torch.from_numpy(packed.view(np.int32))


def awq_parts(weight, group):
    codes, zeros, scales, g_idx = quantize(weight, 4, group, act_order=False)
    parts = {"qweight": pack_awq(codes.numpy()), "qzeros": pack_awq(zeros.numpy()), "scales": scales}
    return parts, reference(codes, zeros, scales, g_idx)


def layers(seed=0):
    torch.manual_seed(seed)
    return {Q: torch.nn.Linear(256, 64).weight.detach(), K: torch.nn.Linear(256, 32).weight.detach()}


def write(folder, tensors: dict, quantization: dict | None, dtype="float16"):
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    config = {"torch_dtype": dtype}
    if quantization is not None:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def gptq_dir(request, path, bits_=4, group=32, act_order=True, fmt="gptq", config=True, **overrides):
    tensors, expected = {NORM: torch.ones(64, dtype=torch.float16)}, {}
    for name, weight in layers().items():
        parts, expected[name + ".weight"] = gptq_parts(weight, bits_, group, act_order, fmt)
        tensors.update({f"{name}.{role}": value for role, value in parts.items()})
        tensors[name + ".bias"] = torch.zeros(weight.shape[0], dtype=torch.float16)
    quantization = {"quant_method": "gptq", "bits": bits_, "group_size": group, "desc_act": act_order,
                    "sym": False, "checkpoint_format": fmt, **overrides} if config else None
    return register_input(request, write(path, tensors, quantization)), tensors, expected


def stored(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits_", [2, 3, 4, 8])
def test_gptq_reads_the_values_the_quantizer_meant(request, tmp_path, bits_, fmt, act_order):
    folder, _, expected = gptq_dir(request, tmp_path / "gptq", bits_, 32, act_order, fmt)
    ckpt = formats.load(str(folder))
    assert sorted(ckpt.tensors) == sorted([NORM, Q + ".weight", Q + ".bias", K + ".weight", K + ".bias"])
    for name, values in expected.items():
        tensor = ckpt[name]
        assert isinstance(tensor, Quantized) and tensor.scheme.name == "gptq" and tensor.params["bits"] == bits_
        assert tensor.shape == tuple(values.shape) and tensor.dtype.name == "float16"
        assert bits(to_torch(tensor)) == bits(values), name


@pytest.mark.parametrize("key", ["checkpoint_format", "format"])  # GPTQModel's newer name for it
def test_the_zero_point_convention_is_the_configs(request, tmp_path, key):
    """The same stored bytes read as v1 (zero + 1) and as v2 (zero as stored) differ by one scale."""
    folder, tensors, expected = gptq_dir(request, tmp_path / "v1", fmt="gptq")
    as_v2 = write(tmp_path / "v2", tensors, {"quant_method": "gptq", "bits": 4, "group_size": 32, key: "gptq_v2"})
    v1, v2 = to_torch(formats.load(str(folder))[Q + ".weight"]), to_torch(formats.load(str(as_v2))[Q + ".weight"])
    assert bits(v1) == bits(expected[Q + ".weight"]) and bits(v2) != bits(v1)


def test_gptq_without_a_config_is_told_by_its_shapes_as_v1(request, tmp_path):
    folder, _, expected = gptq_dir(request, tmp_path / "plain", bits_=8, act_order=False, config=False)
    ckpt = formats.load(str(folder))
    assert ckpt[Q + ".weight"].params["bits"] == 8
    assert bits(to_torch(ckpt[Q + ".weight"])) == bits(expected[Q + ".weight"])


def test_gptq_group_size_minus_one_is_one_group(request, tmp_path):
    folder, _, expected = gptq_dir(request, tmp_path / "one", bits_=4, group=256, act_order=False, group_size=-1)
    assert formats.load(str(folder))[K + ".weight"].params["block"] == [1, 256]
    assert bits(to_torch(formats.load(str(folder))[K + ".weight"])) == bits(expected[K + ".weight"])


def test_inspect_lists_one_row_a_layer_with_the_dequantized_statistics(request, tmp_path):
    folder, _, expected = gptq_dir(request, tmp_path / "gptq")
    document = json_of("inspect", folder, "--json", schema="inspect")
    rows = {t["name"]: t for t in document["tensors"]}
    assert sorted(rows) == sorted([NORM, Q + ".weight", Q + ".bias", K + ".weight", K + ".bias"])
    for name, values in expected.items():
        values = values.double()
        assert rows[name]["shape"] == list(values.shape) and rows[name]["dtype"] == "float16"
        stats = rows[name]["stats"]
        assert stats["mean"] == pytest.approx(values.mean().item(), rel=1e-6)
        assert stats["std"] == pytest.approx(values.std().item(), rel=1e-6)
        assert (stats["min"], stats["max"]) == (values.min().item(), values.max().item())


def test_a_rename_moves_every_gptq_part(request, tmp_path):
    folder, tensors, _ = gptq_dir(request, tmp_path / "gptq")
    out = tmp_path / "renamed.safetensors"
    assert run("rename", folder, "--from", "model.layers.0.*", "--to", "model.layers.5.*", "-o", out).exit_code == 0
    moved = {name.replace("layers.0", "layers.5"): value for name, value in tensors.items()}
    got = stored(out)
    assert sorted(got) == sorted(moved)
    for name, value in moved.items():
        assert got[name].dtype == value.dtype and bits(got[name]) == bits(value), name


@pytest.mark.parametrize("change, why", [
    (lambda t: t.pop(Q + ".scales"), f"{Q}.qweight without its {Q}.scales"),
    (lambda t: t.pop(Q + ".qzeros"), f"{Q}.qweight without its {Q}.qzeros"),
    (lambda t: t.pop(Q + ".qweight"), f"{Q}.qzeros: a gptq qzeros without its codes {Q}.qweight"),
    (lambda t: t.update({Q + ".g_idx": t[Q + ".g_idx"][:100].clone()}),
     f"g_idx [100] int32 does not name a group for each of the 256 inputs of {Q}.qweight"),
    (lambda t: t.update({Q + ".scales": t[Q + ".scales"][:, :32].clone()}),
     "qweight [32, 64] int32, qzeros [8, 8] int32, scales [8, 32] float16 do not fit 4-bit codes of 32 outputs"),
])
def test_a_gptq_layer_that_does_not_fit_is_named_and_listed_as_stored(request, tmp_path, change, why):
    _, tensors, _ = gptq_dir(request, tmp_path / "good")
    change(tensors)
    folder = register_input(request, write(tmp_path / "bad", tensors, {"quant_method": "gptq", "bits": 4,
                                                                        "group_size": 32}))
    document = json_of("inspect", folder, "--json", schema="inspect")
    names = {t["name"] for t in document["tensors"]}
    assert K + ".weight" in names and not names & {K + ".qweight", K + ".scales"}  # the good layer is one row
    assert why in "\n".join(document["notes"])
    assert not any(name.startswith(Q) and name.endswith(".weight") for name in names)  # never guessed


@pytest.mark.parametrize("value", ["marlin", [0, 0]])  # another layout, and a broken config's list
def test_a_checkpoint_format_that_is_not_read_is_named(request, tmp_path, value):
    _, tensors, _ = gptq_dir(request, tmp_path / "good")
    folder = register_input(request, write(tmp_path / "marlin", tensors, {"quant_method": "gptq", "bits": 4,
                                                                          "checkpoint_format": value}))
    notes = "\n".join(json_of("inspect", folder, "--json", schema="inspect")["notes"])
    assert f"checkpoint_format {value!r} is not read (only gptq and gptq_v2)" in notes


def test_a_g_idx_naming_a_group_the_scales_lack_is_an_error_not_a_value(request, tmp_path):
    _, tensors, _ = gptq_dir(request, tmp_path / "good")
    tensors[Q + ".g_idx"] = tensors[Q + ".g_idx"].clone()
    tensors[Q + ".g_idx"][7] = 8
    folder = register_input(request, write(tmp_path / "bad", tensors, {"quant_method": "gptq", "bits": 4}))
    result = run("inspect", folder)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert f"{Q}.g_idx names groups 0..8 where its scales hold groups 0..7" in result.stderr


def awq_dir(request, path, config=True, group=32):
    tensors, expected = {NORM: torch.ones(64, dtype=torch.float16)}, {}
    for name, weight in layers(1).items():
        parts, expected[name + ".weight"] = awq_parts(weight, group)
        tensors.update({f"{name}.{role}": value for role, value in parts.items()})
    quantization = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                    "version": "gemm"} if config else None
    return register_input(request, write(path, tensors, quantization)), tensors, expected


@pytest.mark.parametrize("config", [True, False])
def test_awq_reads_the_values_the_quantizer_meant(request, tmp_path, config):
    folder, _, expected = awq_dir(request, tmp_path / "awq", config)
    ckpt = formats.load(str(folder))
    for name, values in expected.items():
        tensor = ckpt[name]
        assert isinstance(tensor, Quantized) and tensor.scheme.name == "awq" and tensor.params["block"] == [1, 32]
        assert tensor.shape == tuple(values.shape)
        assert bits(to_torch(tensor)) == bits(values), name


def test_awq_through_inspect_and_a_rename(request, tmp_path):
    folder, tensors, expected = awq_dir(request, tmp_path / "awq", group=64)
    rows = {t["name"]: t for t in json_of("inspect", folder, "--json", schema="inspect")["tensors"]}
    assert sorted(rows) == sorted([NORM, Q + ".weight", K + ".weight"])
    values = expected[K + ".weight"].double()
    assert rows[K + ".weight"]["shape"] == [32, 256]
    assert rows[K + ".weight"]["stats"]["std"] == pytest.approx(values.std().item(), rel=1e-6)
    out = tmp_path / "renamed.safetensors"
    assert run("rename", folder, "--from", "*.k_proj.*", "--to", "*.key.*", "-o", out).exit_code == 0
    got = stored(out)
    moved = {name.replace("k_proj", "key"): value for name, value in tensors.items()}
    assert sorted(got) == sorted(moved) and all(bits(got[n]) == bits(v) for n, v in moved.items())


@pytest.mark.parametrize("change, quantization, why", [
    (lambda t: t.pop(K + ".qzeros"), {}, f"{K}.qweight without its {K}.qzeros"),
    (lambda t: t.pop(K + ".qweight"), {}, f"{K}.scales: an awq scales without its codes {K}.qweight"),
    (lambda t: t.update({K + ".scales": t[K + ".scales"][:3].clone()}), {},
     "qweight [256, 4], qzeros [8, 4], scales [3, 32] do not fit 4-bit codes of 32 outputs in groups of 32 inputs"),
    (lambda t: None, {"version": "gemv"}, "awq version gemv with 4 bits is not read (only the 4-bit gemm layout)"),
])
def test_an_awq_layer_that_does_not_fit_is_named(request, tmp_path, change, quantization, why):
    _, tensors, _ = awq_dir(request, tmp_path / "good")
    change(tensors)
    config = {"quant_method": "awq", "bits": 4, "group_size": 32, **quantization}
    folder = register_input(request, write(tmp_path / "bad", tensors, config))
    document = json_of("inspect", folder, "--json", schema="inspect")
    assert why in "\n".join(document["notes"])
    assert K + ".weight" not in {t["name"] for t in document["tensors"]}


def test_a_checkpoint_without_quantized_names_is_not_searched_by_any_scheme(request, tmp_path, monkeypatch):
    """Group finding costs one pass over the names when none ends like a part (counted, not timed)."""
    import paramsurgeon.quant as quant

    asked = []
    for scheme in quant.SCHEMES:
        original = type(scheme).find
        monkeypatch.setattr(type(scheme), "find", lambda self, tensors, config, original=original: (
            asked.append(self.name), (yield from original(self, tensors, config))))
    plain = tmp_path / "plain.safetensors"
    save_file({f"blocks.{i}.layers.{j}.weight": torch.zeros(2) for i in range(100) for j in range(1000)}, plain)
    register_input(request, plain)
    assert len(formats.load(str(plain)).tensors) == 100_000 and asked == []

    folder, _, _ = gptq_dir(request, tmp_path / "gptq")
    formats.load(str(folder))
    assert "gptq" in asked  # a quantization_config asks every scheme


def test_changing_a_gptq_layer_writes_a_plain_weight_and_drops_every_part(request, tmp_path):
    folder, tensors, expected = gptq_dir(request, tmp_path / "gptq", bits_=3)
    out = tmp_path / "scaled.safetensors"
    assert run("scale", folder, "-p", Q + ".weight", "--by", "2", "-o", out).exit_code == 0
    got = stored(out)
    kept = [n for n in tensors if not n.startswith(Q + ".q") and n not in (Q + ".scales", Q + ".g_idx")]
    assert sorted(got) == sorted([*kept, Q + ".weight"])
    assert bits(got[Q + ".weight"]) == bits((expected[Q + ".weight"].float() * 2).half())
    assert all(bits(got[n]) == bits(tensors[n]) for n in kept)  # the other layer's parts as stored


def test_dequantizing_some_gptq_layers_of_a_directory_keeps_the_rest_and_their_config(request, tmp_path):
    """The layers left quantized still need the config's quantization_config (it was an internal error)."""
    folder, tensors, expected = gptq_dir(request, tmp_path / "gptq")
    result = run("dequantize", folder, "-p", Q + ".weight", "-o", str(tmp_path / "out") + "/")
    assert result.exit_code == 0, result.stderr
    got = stored(tmp_path / "out" / "model.safetensors")
    assert bits(got[Q + ".weight"]) == bits(expected[Q + ".weight"]) and Q + ".qweight" not in got
    assert all(bits(got[K + "." + role]) == bits(tensors[K + "." + role]) for role in ("qweight", "qzeros", "scales"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((folder / "config.json").read_text())["quantization_config"]
