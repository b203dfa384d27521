"""compressed-tensors (pack-quantized, float-quantized, int-quantized, nvfp4-pack-quantized,
mxfp4-pack-quantized) and bitsandbytes (nf4, fp4, LLM.int8) checkpoints read as what they mean: one
logical tensor per quantized weight whose values are the packages' own dequantization.

Each checkpoint is made by the real package from real nn.Linear weights: compressed-tensors'
ModelCompressor compresses a quantized module tree (scales from its calculate_qparams) and writes
its quantization_config; bitsandbytes' Linear4bit / Linear8bitLt quantize on the CPU and their
state_dict() gives the key layout. The expected values are the packages' own decompressors
(ModelCompressor.decompress_model, which runs the format's compressor: PackedQuantizationCompressor,
NVFP4PackedCompressor, MXFP4PackedCompressor, ...; bitsandbytes.functional.dequantize_4bit and
int8_vectorwise_dequant), rounded to the config's dtype.
"""

import json
import math
import shutil

import bitsandbytes as bnb
import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import bits, json_of, register_input, run

import paramsurgeon.formats as formats
from paramsurgeon.checkpoint.quantized import Quantized
from paramsurgeon.checkpoint.values import to_torch

UP, DOWN, HEAD = "model.up.weight", "model.down.weight", "lm_head.weight"
DYNAMIC_FP8 = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
DYNAMIC_INT8 = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}

# variant -> (the scheme paramsurgeon names, the weights' QuantizationArgs, input activations)
CT = {
    "int4-group": ("pack-quantized", {"num_bits": 4, "strategy": "group", "group_size": 32}, None),
    "int4-group-asym": ("pack-quantized", {"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False}, None),
    "int8-channel-packed": ("pack-quantized", {"num_bits": 8, "strategy": "channel"}, None),
    "int3-channel-asym": ("pack-quantized", {"num_bits": 3, "strategy": "channel", "symmetric": False}, None),
    "int4-tensor-asym": ("pack-quantized", {"num_bits": 4, "strategy": "tensor", "symmetric": False}, None),
    "fp8-channel": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"}, DYNAMIC_FP8),
    "fp8-tensor": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "tensor"}, DYNAMIC_FP8),
    "fp8-group": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32}, DYNAMIC_FP8),
    "fp8-block": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]},
                  {**DYNAMIC_FP8, "strategy": "group", "group_size": 128}),
    "int8-channel": ("int-quantized", {"num_bits": 8, "strategy": "channel"}, DYNAMIC_INT8),
    "nvfp4": ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                                       "scale_dtype": torch.float8_e4m3fn, "zp_dtype": torch.float8_e4m3fn}, None),
    "mxfp4": ("mxfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32,
                                       "scale_dtype": torch.uint8, "zp_dtype": torch.uint8}, None),
}


class Tiny(torch.nn.Module):
    """Two projections (shapes that leave partial groups of packed words and partial 128x128 blocks)
    and a head the config ignores."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.up = torch.nn.Linear(256, 96, bias=False)
        self.model.down = torch.nn.Linear(96, 200, bias=False)
        self.lm_head = torch.nn.Linear(256, 10, bias=False)


def observed(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The min and max of each scale's span of ``weight`` (what a min-max observer records)."""
    if args.strategy == "tensor":
        return weight.amin().reshape(1), weight.amax().reshape(1)
    if args.strategy == "channel":
        return weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    if args.strategy in ("group", "tensor_group"):
        groups = weight.unflatten(1, (-1, args.group_size))
        return groups.amin(-1), groups.amax(-1)
    bm, bn = args.block_structure
    rows, columns = math.ceil(weight.shape[0] / bm), math.ceil(weight.shape[1] / bn)
    padded = torch.nn.functional.pad(weight, (0, columns * bn - weight.shape[1], 0, rows * bm - weight.shape[0]))
    tiles = padded.reshape(rows, bm, columns, bn).transpose(1, 2)
    return tiles.amin((-1, -2)), tiles.amax((-1, -2))


def compressed_tensors_dir(folder, weights: dict, activations: dict | None):
    """A checkpoint compressed by compressed-tensors, and the weights its decompressor gives back."""
    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights),
                                input_activations=QuantizationArgs(**activations) if activations else None)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in (model.model.up, model.model.down):
        low, high = observed(module.weight.data, scheme.weights)
        glob = None
        if hasattr(module, "weight_global_scale"):  # nvfp4: the scales' own scale, from the whole weight
            glob = generate_gparam(low.amin(), high.amax())
            module.weight_global_scale.data.copy_(glob)
        scale, zero = calculate_qparams(low, high, scheme.weights, global_scale=glob)
        module.weight_scale.data.copy_(scale)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    stored = {name: value.detach().clone().contiguous() for name, value in model.state_dict().items()}
    folder.mkdir()
    save_file(stored, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "bfloat16"}))
    compressor.update_config(str(folder))
    compressor.decompress_model(model)
    reference = {name: getattr(module, "weight").detach().to(torch.bfloat16).clone()
                 for name, module in ((UP, model.model.up), (DOWN, model.model.down), (HEAD, model.lm_head))}
    return stored, reference


@pytest.fixture(scope="module")
def ct_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    return {variant: (root / variant, *compressed_tensors_dir(root / variant, weights, activations))
            for variant, (_, weights, activations) in CT.items()}


def bnb4_state(quant_type: str, nested: bool, shape=(129, 201)) -> tuple[dict, dict]:
    """A Linear4bit quantized on the CPU: its state_dict under model.layers.0.mlp.down_proj, and the
    values dequantize_4bit gives back, in bfloat16."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(shape[1], shape[0], bias=True).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=True, quant_type=quant_type, compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested)
    layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu")
    prefix = "model.layers.0.mlp.down_proj."
    stored = {prefix + name: value.detach().clone() for name, value in layer.state_dict().items()}
    stored["model.norm.weight"] = torch.ones(201, dtype=torch.bfloat16)
    values = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return stored, {prefix + "weight": values.to(torch.bfloat16)}


def bnb8_state() -> tuple[dict, dict]:
    torch.manual_seed(2)
    linear = torch.nn.Linear(200, 130, bias=True)
    layer = bnb.nn.Linear8bitLt(200, 130, bias=True, has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")
    stored = {"model.proj." + name: value.detach().clone() for name, value in layer.state_dict().items()}
    values = bnb.functional.int8_vectorwise_dequant(stored["model.proj.weight"], stored["model.proj.SCB"])
    return stored, {"model.proj.weight": values.to(torch.float16)}


def write(folder, stored: dict, config: dict | None):
    folder.mkdir()
    save_file(stored, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


BNB4 = [(quant_type, nested) for quant_type in ("nf4", "fp4") for nested in (False, True)]


@pytest.fixture(scope="module")
def bnb_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    made = {}
    for quant_type, nested in BNB4:
        stored, reference = bnb4_state(quant_type, nested)
        config = {"torch_dtype": "bfloat16", "quantization_config": {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": nested, "bnb_4bit_compute_dtype": "bfloat16"}}
        made[quant_type, nested] = (write(root / f"{quant_type}-{nested}", stored, config), stored, reference)
    stored, reference = bnb8_state()
    config = {"torch_dtype": "float16", "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    made["int8"] = (write(root / "int8", stored, config), stored, reference)
    return made


def stored_file(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def assert_reads_as(folder, reference: dict, scheme: str, stored: dict):
    """The library and ``inspect --json`` see one logical tensor per weight with the reference values."""
    ckpt = formats.load(str(folder))
    assert not ckpt.partial, ckpt.notes
    quantized = [name for name, tensor in ckpt.tensors.items() if isinstance(tensor, Quantized)]
    assert sorted(quantized) == sorted(n for n in reference if n != HEAD)
    laid_out = {n for name, tensor in ckpt.tensors.items()
                for n in (tensor.part_names(name).values() if name in quantized else [name])}
    assert laid_out == set(stored)  # every stored tensor is a part of one logical tensor or a tensor of its own
    for name, values in reference.items():
        tensor = ckpt[name]
        assert name == HEAD or tensor.scheme.name == scheme
        assert bits(to_torch(tensor)) == bits(values), name

    document = json_of("inspect", folder, "--json", schema="inspect")
    rows = {t["name"]: t for t in document["tensors"]}
    parts = {n for name in quantized for n in ckpt[name].part_names(name).values()} - set(quantized)
    assert not parts & set(rows), "a part listed as a tensor of its own"
    for name, values in reference.items():
        expected = values.double()
        assert rows[name]["shape"] == list(values.shape)
        assert rows[name]["dtype"] == str(values.dtype).removeprefix("torch.")
        stats = rows[name]["stats"]
        assert stats["mean"] == pytest.approx(expected.mean().item(), rel=1e-6, abs=1e-12)
        assert stats["std"] == pytest.approx(expected.std().item(), rel=1e-6)
        assert (stats["min"], stats["max"]) == (expected.min().item(), expected.max().item())


@pytest.mark.parametrize("variant", list(CT))
def test_compressed_tensors_weights_read_as_its_decompressor_gives_them(request, ct_dirs, variant):
    folder, stored, reference = ct_dirs[variant]
    register_input(request, folder)
    assert_reads_as(folder, reference, CT[variant][0], stored)


@pytest.mark.parametrize("quant_type,nested", BNB4)
def test_bitsandbytes_4bit_weights_read_as_dequantize_4bit_gives_them(request, bnb_dirs, quant_type, nested):
    folder, stored, reference = bnb_dirs[quant_type, nested]
    register_input(request, folder)
    assert_reads_as(folder, reference, quant_type, stored)


def test_bitsandbytes_8bit_weights_read_as_int8_vectorwise_dequant_gives_them(request, bnb_dirs):
    folder, stored, reference = bnb_dirs["int8"]
    register_input(request, folder)
    assert_reads_as(folder, reference, "bnb-int8", stored)


def test_without_a_config_the_layout_comes_from_the_stored_shapes(request, ct_dirs, bnb_dirs, tmp_path):
    for key, (folder, _, reference) in [*((v, ct_dirs[v]) for v in ("int4-group-asym", "fp8-block", "nvfp4", "mxfp4")),
                                         (("nf4", True), bnb_dirs["nf4", True])]:
        bare = tmp_path / str(key)
        bare.mkdir()
        shutil.copy(folder / "model.safetensors", bare)
        ckpt = formats.load(str(bare))
        for name, values in reference.items():
            if name != HEAD:  # no torch_dtype without the config: read as bfloat16, as the config said
                assert isinstance(ckpt[name], Quantized) and bits(to_torch(ckpt[name])) == bits(values), (key, name)


@pytest.mark.parametrize("key,pattern", [("int4-group-asym", ("model.*", "body.*")),
                                         (("nf4", True), ("model.layers.0.*", "model.layers.5.*")),
                                         ("int8", ("model.proj.*", "model.out.*"))])
def test_a_rename_moves_every_part(request, ct_dirs, bnb_dirs, tmp_path, key, pattern):
    folder, stored, _ = ct_dirs[key] if key in ct_dirs else bnb_dirs[key]
    register_input(request, folder)
    out = tmp_path / "renamed.safetensors"
    assert run("rename", folder, "--from", pattern[0], "--to", pattern[1], "-o", out).exit_code == 0
    prefix_from, prefix_to = pattern[0].rstrip("*"), pattern[1].rstrip("*")
    moved = {(prefix_to + n[len(prefix_from):] if n.startswith(prefix_from) else n): v for n, v in stored.items()}
    got = stored_file(out)
    assert sorted(got) == sorted(moved)
    for name, value in moved.items():
        assert got[name].dtype == value.dtype and bits(got[name]) == bits(value), name


def test_changing_values_writes_a_plain_tensor_in_place_of_every_part(request, ct_dirs, tmp_path):
    folder, stored, reference = ct_dirs["int4-group-asym"]
    register_input(request, folder)
    out = tmp_path / "scaled.safetensors"
    assert run("scale", folder, "-p", UP, "--by", "2", "-o", out).exit_code == 0
    got = stored_file(out)
    assert sorted(got) == sorted([UP, *(n for n in stored if not n.startswith(UP))])
    assert bits(got[UP]) == bits((reference[UP].float() * 2).to(torch.bfloat16))
    for name in got.keys() - {UP}:
        assert bits(got[name]) == bits(stored[name]), name


def test_values_computed_in_many_small_bands_are_the_same(request, ct_dirs, bnb_dirs, tmp_path, monkeypatch):
    """Large weights are dequantized a band of rows (or blocks) at a time: tiny bands give the same values."""
    from test_quantized import dequantize as deepseek_dequant, quantize as deepseek_quant

    import paramsurgeon.quant.tiles as tiles

    monkeypatch.setattr(tiles, "ELEMENTS", 512)  # 2 rows of 256, one 128-row block band, 8 blocks of 64
    for folder, _, reference in [*ct_dirs.values(), *bnb_dirs.values()]:
        ckpt = formats.load(str(folder))
        for name, values in reference.items():
            assert bits(to_torch(ckpt[name])) == bits(values), (folder.name, name)
    codes, scale = deepseek_quant(torch.randn(300, 200) * 0.02)  # fp8-block shares the bands
    save_file({"w.weight": codes, "w.weight_scale_inv": scale}, tmp_path / "fp8.safetensors")
    tensor = formats.load(str(tmp_path / "fp8.safetensors"))["w.weight"]
    assert tensor.scheme.name == "fp8-block" and bits(to_torch(tensor)) == bits(deepseek_dequant(codes, scale))


# Bad input: each broken group is listed as its stored tensors with a note naming it, never guessed.

def notes_of(folder) -> tuple[list[str], str]:
    document = json_of("inspect", folder, "--json", schema="inspect")
    return sorted(t["name"] for t in document["tensors"]), "\n".join(document["notes"])


def test_compressed_tensors_parts_without_their_partners_are_named(request, ct_dirs, tmp_path):
    _, stored, _ = ct_dirs["int4-group-asym"]
    broken = dict(stored)
    del broken["model.up.weight_scale"]  # packed codes without their scale
    del broken["model.down.weight_packed"]  # a scale, zero point and shape without their codes
    folder = write(tmp_path / "orphans", broken, None)
    names, notes = notes_of(folder)
    assert names == sorted(broken)
    assert "packed codes without their model.up.weight_scale" in notes
    assert "model.down.weight_scale without its weight model.down.weight (or model.down.weight_packed)" in notes


@pytest.mark.parametrize("field, value", [("ignore", True), ("ignore", "lm_head"), ("targets", "Linear")])
def test_a_list_of_the_config_given_as_one_value_reads_as_the_decompressor_gives(request, ct_dirs, tmp_path,
                                                                                field, value):
    """``ignore`` or a group's ``targets`` written as one name (or true) instead of a list: read as a
    list of that name (or none), not a crash."""
    folder, stored, reference = ct_dirs["nvfp4"]
    config = json.loads((folder / "config.json").read_text())
    where = config["quantization_config"]
    where = where if field == "ignore" else where["config_groups"]["group_0"]
    where[field] = value
    assert_reads_as(write(tmp_path / "listed", stored, config), reference, "nvfp4-pack-quantized", stored)


@pytest.mark.parametrize("field, value", [("ignore", True), ("ignore", [[0, 0], "lm_head", "lm_head"]),
                                          ("quant_method", {}), ("quant_method", [])])
def test_a_rename_keeps_a_broken_list_or_method_of_the_config_as_it_is(request, ct_dirs, tmp_path, field, value):
    """A rename whose config holds a list entry or quant_method that is no name: the weights move, and
    what is no name is kept where it was (a name is kept once), not a crash."""
    folder, stored, _ = ct_dirs["int4-group-asym"]
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"][field] = value
    out = tmp_path / "renamed"
    result = run("rename", write(tmp_path / "broken", stored, config), "--from", "model.*", "--to", "net.*", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert sorted(stored_file(out / "model.safetensors")) == sorted("net." + n[6:] if n.startswith("model.") else n
                                                                    for n in stored)
    written = json.loads((out / "config.json").read_text())["quantization_config"][field]
    assert written == ([[0, 0], "lm_head"] if isinstance(value, list) and field == "ignore" else value)


def test_a_block_structure_larger_than_the_weight_is_the_whole_weight(request, ct_dirs, tmp_path):
    """block_structure [2**40, 128]: up's 96 rows are one block, as [128, 128] makes them (read as the
    decompressor gives them, not a scale repeated 2**40 times); down's 200 rows were two (named)."""
    folder, stored, reference = ct_dirs["fp8-block"]
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["block_structure"] = [1 << 40, 128]
    folder = write(tmp_path / "huge", stored, config)
    assert bits(to_torch(formats.load(str(folder))[UP])) == bits(reference[UP])
    names, notes = notes_of(folder)
    assert UP in names and "model.down.weight_scale" in names and "the scale [2, 1] does not fit [200, 96]" in notes


def test_a_weight_shape_that_disagrees_with_the_packed_codes_is_named(request, ct_dirs, tmp_path):
    folder, stored, _ = ct_dirs["int4-group"]
    broken = dict(stored, **{"model.up.weight_shape": torch.tensor([96, 512])})
    folder = write(tmp_path / "shape", broken, json.loads((folder / "config.json").read_text()))
    names, notes = notes_of(folder)
    assert names == sorted(set(broken) - {"model.down.weight_packed", "model.down.weight_scale",
                                          "model.down.weight_shape"} | {"model.down.weight"})
    assert ("model.up.weight_shape [96, 512] disagrees with model.up.weight_packed [96, 32]: no bit width packs that"
            " shape into those int32 words (4 bits in the config)") in notes


def test_a_scale_that_does_not_fit_its_weight_is_named(request, ct_dirs, tmp_path):
    folder, stored, _ = ct_dirs["fp8-group"]
    broken = dict(stored, **{"model.up.weight_scale": stored["model.up.weight_scale"][:, :4].clone()})
    folder = write(tmp_path / "scale", broken, json.loads((folder / "config.json").read_text()))
    names, notes = notes_of(folder)
    assert "model.up.weight_scale" in names and "model.down.weight_scale" not in names
    assert "the scale [96, 4] does not fit [96, 256] (expected group scales [96, 8])" in notes


def test_a_targeted_fp8_weight_without_its_scale_is_named(request, ct_dirs, tmp_path):
    folder, stored, _ = ct_dirs["fp8-channel"]
    broken = {n: v for n, v in stored.items() if n != "model.down.weight_scale"}
    folder = write(tmp_path / "noscale", broken, json.loads((folder / "config.json").read_text()))
    _, notes = notes_of(folder)
    assert "model.down.weight has no model.down.weight_scale" in notes


def test_an_asymmetric_weight_without_its_zero_point_is_named(request, ct_dirs, tmp_path):
    folder, stored, _ = ct_dirs["int4-group-asym"]
    broken = {n: v for n, v in stored.items() if n != "model.up.weight_zero_point"}
    folder = write(tmp_path / "nozero", broken, json.loads((folder / "config.json").read_text()))
    _, notes = notes_of(folder)
    assert "asymmetric codes without their zero point model.up.weight_zero_point" in notes


def test_a_compressed_tensors_format_not_read_is_named_and_not_dequantized(request, tmp_path):
    """mxfp6 (6-bit codes, uint8 like mxfp4's): listed as stored with a note, refused by dequantize."""
    folder = tmp_path / "mxfp6"
    stored, _ = compressed_tensors_dir(folder, {"num_bits": 6, "type": "float", "strategy": "group", "group_size": 32,
                                                "scale_dtype": torch.uint8, "zp_dtype": torch.uint8}, None)
    register_input(request, folder)
    names, notes = notes_of(folder)
    assert names == sorted(stored)
    assert ("model.up.weight_packed [96, 192] uint8: compressed-tensors format mxfp6-pack-quantized is not read"
            " (only pack-quantized in int32, nvfp4-pack-quantized and mxfp4-pack-quantized)") in notes
    result = run("dequantize", folder, "-o", str(tmp_path / "out") + "/")
    assert result.exit_code == 2 and "mxfp6-pack-quantized is not read" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights, scale", [(CT["fp8-tensor"][1], "input_scale"), (CT["nvfp4"][1], "input_global_scale")])
def test_a_static_input_scale_goes_with_its_weight_and_is_dropped_when_written_plain(request, tmp_path, weights, scale):
    """A module's calibrated input scale belongs to its quantized weight: a rename moves it, a dequantized
    (plain) layer keeps none (no plain layer reads one; transformers lists it as unexpected)."""
    folder = tmp_path / "static"
    activations = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False} if scale == "input_scale" \
        else {**CT["nvfp4"][1], "dynamic": "local"}
    stored, reference = compressed_tensors_dir(folder, weights, activations)
    register_input(request, folder)
    assert {f"model.up.{scale}", f"model.down.{scale}"} <= set(stored)
    rows = {t["name"]: t for t in json_of("inspect", folder, "--json", schema="inspect")["tensors"]}
    assert f"model.up.{scale}" in rows[UP]["quant"]["parts"] and f"model.up.{scale}" not in rows
    out = tmp_path / "out"
    assert run("dequantize", folder, "-p", UP, "-o", f"{out}/").exit_code == 0
    written = stored_file(out / "model.safetensors")
    assert f"model.up.{scale}" not in written and bits(written[f"model.down.{scale}"]) == bits(stored[f"model.down.{scale}"])
    assert bits(written[UP]) == bits(reference[UP])
    renamed = tmp_path / "renamed"
    assert run("rename", folder, "--from", "model.down.*", "--to", "model.low.*", "-o", f"{renamed}/").exit_code == 0
    assert bits(stored_file(renamed / "model.safetensors")[f"model.low.{scale}"]) == bits(stored[f"model.down.{scale}"])


def test_int32_packed_codes_of_another_format_the_config_names_are_not_read_as_pack_quantized(request, ct_dirs, tmp_path):
    """marlin-24 also stores int32 weight_packed (2:4 sparse, reordered): the config's format decides, not the dtype."""
    folder = tmp_path / "marlin"
    shutil.copytree(ct_dirs["int4-group"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    quantization = config["quantization_config"]
    quantization["format"] = quantization["config_groups"]["group_0"]["format"] = "marlin-24"
    (folder / "config.json").write_text(json.dumps(config))
    register_input(request, folder)
    _, notes = notes_of(folder)
    assert ("model.up.weight_packed [96, 32] int32: compressed-tensors format marlin-24 is not read (only"
            " pack-quantized in int32") in notes
    result = run("dequantize", folder, "-o", str(tmp_path / "out") + "/")
    assert result.exit_code == 2 and "marlin-24 is not read" in result.stderr
    assert not (tmp_path / "out").exists()


def test_mxfp8_float8_codes_with_exponent_scales_are_named_as_their_format_not_float_quantized(request, tmp_path):
    """MXFP8 stores float8 codes as float-quantized does, but with E8M0 (uint8) scales: its format is named."""
    folder = tmp_path / "mxfp8"
    stored, _ = compressed_tensors_dir(folder, {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32,
                                                "scale_dtype": torch.uint8, "zp_dtype": torch.uint8}, None)
    register_input(request, folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "mxfp8-quantized"
    names, notes = notes_of(folder)
    assert names == sorted(stored)
    assert ("model.up.weight, model.up.weight_scale: compressed-tensors format mxfp8-quantized is not read:"
            " model.up.weight is [96, 256] float8_e4m3fn with a uint8 scale") in notes
    result = run("dequantize", folder, "-o", str(tmp_path / "out") + "/")
    assert result.exit_code == 2 and "mxfp8-quantized is not read" in result.stderr
    assert not (tmp_path / "out").exists()


def test_fp4_parts_that_do_not_fit_or_lack_their_global_scale_are_named(request, ct_dirs, tmp_path):
    folder, stored, _ = ct_dirs["nvfp4"]
    config = json.loads((folder / "config.json").read_text())
    broken = {n: v for n, v in stored.items() if n != "model.up.weight_global_scale"}
    names, notes = notes_of(write(tmp_path / "noglobal", broken, config))
    assert "model.up.weight_packed" in names and "model.down.weight" in names
    assert "nvfp4-pack-quantized codes without their model.up.weight_global_scale" in notes

    folder, stored, _ = ct_dirs["mxfp4"]
    short = dict(stored, **{"model.up.weight_scale": stored["model.up.weight_scale"][:, :4].clone()})
    names, notes = notes_of(write(tmp_path / "short", short, None))
    assert "model.up.weight_scale" in names and "model.down.weight" in names
    assert ("model.up.weight_packed [96, 128] uint8, model.up.weight_scale [96, 4] uint8: not 2-D uint8 codes with a"
            " uint8 scale per 32 values") in notes


def test_health_fails_a_zero_nvfp4_global_scale(request, ct_dirs, tmp_path):
    folder, stored, _ = ct_dirs["nvfp4"]
    broken = dict(stored, **{"model.up.weight_global_scale": torch.zeros(1)})
    result = run("check", write(tmp_path / "zero", broken, json.loads((folder / "config.json").read_text())), "--health")
    assert result.exit_code == 1
    assert "model.up.weight_global_scale has 1 zero of 1 scales" in result.stdout


def test_fp4_checkpoints_dequantize_to_their_decompressors_values(request, ct_dirs, tmp_path):
    for variant in ("nvfp4", "mxfp4"):
        folder, stored, reference = ct_dirs[variant]
        register_input(request, folder)
        out = tmp_path / variant
        assert run("dequantize", folder, "-o", str(out) + "/").exit_code == 0
        got = stored_file(out / "model.safetensors")
        assert sorted(got) == sorted(reference)
        assert all(bits(got[name]) == bits(values) for name, values in reference.items()), variant
        assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_a_bitsandbytes_state_blob_that_is_not_json_is_named(request, bnb_dirs, tmp_path):
    _, stored, _ = bnb_dirs["nf4", False]
    blob = "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"
    broken = dict(stored, **{blob: torch.frombuffer(bytearray(b'{"quant_type": "nf4", "blocksize'), dtype=torch.uint8)})
    folder = write(tmp_path / "blob", broken, None)
    names, notes = notes_of(folder)
    assert names == sorted(broken)
    assert f"{blob}: not valid JSON" in notes


def test_bitsandbytes_parts_that_do_not_fit_or_lack_their_blob_are_named(request, bnb_dirs, tmp_path):
    _, stored, _ = bnb_dirs["fp4", True]
    prefix = "model.layers.0.mlp.down_proj.weight"
    short = dict(stored, **{prefix + ".absmax": stored[prefix + ".absmax"][:-1].clone()})
    names, notes = notes_of(write(tmp_path / "short", short, None))
    assert names == sorted(short)
    assert f"{prefix}.absmax has {stored[prefix + '.absmax'].numel() - 1} values, not one per block of 64" in notes

    blob = prefix + ".quant_state.bitsandbytes__fp4"
    state = json.loads(bytes(stored[blob].tolist()))
    wider_state = json.dumps({**state, "shape": [129, 300]}).encode()
    wider = dict(stored, **{blob: torch.tensor(list(wider_state), dtype=torch.uint8)})
    names, notes = notes_of(write(tmp_path / "wider", wider, None))
    assert names == sorted(wider)
    assert f"{prefix} holds {(129 * 201 + 1) // 2} bytes, not the {129 * 150} that 4-bit codes of [129, 300] take" in notes

    orphan = {n: v for n, v in stored.items() if "quant_state" not in n}
    names, notes = notes_of(write(tmp_path / "orphan", orphan, None))
    assert names == sorted(orphan)
    assert (f"bitsandbytes 4-bit parts of {prefix} without their quant_state blob"
            f" ({prefix}.quant_state.bitsandbytes__nf4 or fp4)") in notes
    assert notes.count("without their quant_state blob") == 1


def test_bitsandbytes_8bit_parts_without_their_partner_or_in_a_gpu_layout_are_named(request, bnb_dirs, tmp_path):
    folder, stored, _ = bnb_dirs["int8"]
    config = json.loads((folder / "config.json").read_text())
    lonely = {"model.proj.SCB": stored["model.proj.SCB"], "model.other.weight": stored["model.proj.weight"]}
    names, notes = notes_of(write(tmp_path / "lonely", lonely, config))
    assert names == sorted(lonely)
    assert "model.proj.SCB without its weight model.proj.weight" in notes
    assert "model.other.weight: an int8 weight of a load_in_8bit checkpoint without its model.other.SCB" in notes
    scaled = run("scale", tmp_path / "lonely", "-p", "model.other.weight", "--by", "2", "-o", f"{tmp_path / 'out'}/")
    assert scaled.exit_code == 2 and not (tmp_path / "out").exists()  # its codes are no values to check for overflow
    assert "scale: model.other.weight (an int8 weight of a load_in_8bit checkpoint without its model.other.SCB" \
        in scaled.stderr and "--allow-overflow" not in scaled.stderr, scaled.stderr

    col32 = dict(stored, **{"model.proj.weight_format": torch.tensor(1, dtype=torch.uint8)})
    names, notes = notes_of(write(tmp_path / "col32", col32, config))
    assert names == sorted(col32)
    assert "model.proj.weight_format is col32, a GPU tile layout, not the row-major codes read here" in notes
