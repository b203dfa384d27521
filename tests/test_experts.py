"""experts on transformers mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3), per-expert
(save_pretrained, the hub's layout) and fused (experts stacked in one tensor): the pruned model loads with
from_pretrained and computes what the original computes when its routers may pick the kept experts only."""

import json
import os

import pytest
import torch
from helpers import config_json, register_input, registered_model, run
from safetensors.torch import load_file

import layer_models as lm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(kind, layout)``: the model of ``kind``, saved once per module in ``layout``."""
    made = {}
    root = tmp_path_factory.mktemp("moe")

    def save(kind, layout):
        if (kind, layout) not in made:
            model, path = lm.moe(kind), root / f"{kind}-{layout}"
            model.save_pretrained(path) if layout == "per-expert" else lm.save_fused(model, path)
            made[kind, layout] = (model, str(path))
        return made[kind, layout]

    return save


@pytest.mark.parametrize("kind, layout, args, kept, key", [
    ("mixtral", "per-expert", ["--keep", "0,2"], [0, 2], "num_local_experts"),
    ("mixtral", "fused", ["--drop", "1"], [0, 2, 3], "num_local_experts"),
    ("qwen2moe", "per-expert", ["--drop", "0"], [1, 2, 3], "num_experts"),
    ("qwen3moe", "fused", ["--keep", "1..3"], [1, 2, 3], "num_local_experts"),
    ("dsv3", "fused", ["--drop", "2,5"], [0, 1, 3, 4, 6, 7], "n_routed_experts"),
    ("dsv3", "per-expert", ["--keep", "0..3", "--layer", "1..2"], [0, 1, 2, 3], "n_routed_experts"),
])
def test_pruned_experts_compute_the_restricted_routing(request, saved, tmp_path, kind, layout, args, kept, key):
    model, path = registered_model(request, saved, kind, layout)
    out = tmp_path / "pruned"
    result = run("experts", path, *args, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert config_json(out)[key] == len(kept)
    pruned = lm.load(out)
    with lm.restricted(model, kept) as reference:
        expected = lm.logits(reference)
    assert not torch.allclose(expected, lm.logits(model))  # the routing restriction shows
    torch.testing.assert_close(lm.logits(pruned), expected, rtol=1e-6, atol=1e-6)


def test_router_rows_and_correction_bias_are_sliced(request, saved, tmp_path):
    _, path = registered_model(request, saved, "dsv3", "fused")
    out = tmp_path / "pruned"
    assert run("experts", path, "--keep", "1,3,4,6", "-o", f"{out}/").exit_code == 0
    before, after = load_file(os.path.join(path, "model.safetensors")), load_file(out / "model.safetensors")
    kept = [1, 3, 4, 6]
    for name in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "mlp.experts.gate_up_proj",
                 "mlp.experts.down_proj"):
        assert torch.equal(after[f"model.layers.2.{name}"], before[f"model.layers.2.{name}"][kept]), name
    assert torch.equal(after["model.layers.2.mlp.shared_experts.down_proj.weight"],
                       before["model.layers.2.mlp.shared_experts.down_proj.weight"])


def test_per_expert_tensors_are_renumbered(request, saved, tmp_path):
    _, path = registered_model(request, saved, "mixtral", "per-expert")
    out = tmp_path / "pruned"
    assert run("experts", path, "--drop", "0,1", "-o", f"{out}/").exit_code == 0
    before, after = load_file(os.path.join(path, "model.safetensors")), load_file(out / "model.safetensors")
    prefix = "model.layers.1.block_sparse_moe.experts"
    assert torch.equal(after[f"{prefix}.0.w2.weight"], before[f"{prefix}.2.w2.weight"])
    assert not any(n.startswith(f"{prefix}.2.") for n in after)


def test_recipe_step(request, saved, tmp_path):
    _, path = registered_model(request, saved, "qwen3moe", "fused")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\nop = "experts"\nkeep = "0..2"\n')
    assert run("apply", path, recipe, "-o", f"{tmp_path / 'a'}/").exit_code == 0
    assert run("experts", path, "--keep", "0..2", "-o", f"{tmp_path / 'b'}/").exit_code == 0
    assert run("diff", tmp_path / "a", tmp_path / "b").exit_code == 0
    assert config_json(tmp_path / "a")["num_local_experts"] == 3


@pytest.mark.parametrize("args, message", [
    (["--keep", "3"], "experts: model.layers.0.mlp would keep 1 expert, fewer than the router picks"
                      " (num_experts_per_tok 2 in config.json); keep at least 2"),
    (["--drop", "4"], "experts: --drop 4: index 4 is out of range; model.layers.0.mlp has 4 experts (0..3)"),
    (["--keep", "0,1", "--layer", "1"], "experts: --layer 1 leaves other blocks with their experts"),
    (["--keep", "0,1", "--drop", "2"], "experts: pass one of --keep LIST or --drop LIST"),
])
def test_bad_input_is_refused_and_nothing_written(request, saved, tmp_path, args, message):
    _, path = registered_model(request, saved, "qwen3moe", "fused")
    result = run("experts", path, *args, "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_multimodal_models_experts_are_counted_in_its_text_config(request, tmp_path):
    """Qwen3-VL-MoE counts its experts and the router's top-k in text_config: the count there follows, and
    the top-k there is enforced."""
    model, path = lm.qwen3_vl_moe(), tmp_path / "vl"
    model.save_pretrained(path)
    register_input(request, str(path))
    out = tmp_path / "pruned"
    result = run("experts", path, "--keep", "1,3", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert config_json(out)["text_config"]["num_local_experts"] == 2 and config_json(out)["vision_config"] == config_json(path)["vision_config"]
    pruned = lm.load(out)
    with lm.restricted(model, [1, 3]) as reference:
        expected = lm.logits(reference)
    assert not torch.allclose(expected, lm.logits(model))  # the routing restriction shows
    torch.testing.assert_close(lm.logits(pruned), expected, rtol=1e-6, atol=1e-6)
    result = run("experts", path, "--keep", "1", "-o", f"{tmp_path / 'one'}/")
    assert result.exit_code == 2 and "fewer than the router picks (num_experts_per_tok 2" in result.stderr
    assert not (tmp_path / "one").exists()


def test_a_model_without_experts(request, tmp_path):
    path = tmp_path / "llama"
    lm.llama(layers=2).save_pretrained(path)
    register_input(request, str(path))
    result = run("experts", path, "--keep", "0", "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 2 and "experts: no mixture-of-experts block" in result.stderr
    assert not (tmp_path / "out").exists()


def test_fp8_experts_keep_their_stored_parts(request, tmp_path):
    """DeepSeek-V3's FP8 layout (codes and a weight_scale_inv per expert projection): the kept experts'
    parts are renamed byte for byte, the router's rows and correction bias sliced; a duplicated layer copies
    every part."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {"model.layers.0.mlp.gate.weight": torch.randn(4, 16),
               "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(4)}
    for expert in range(4):
        name = f"model.layers.0.mlp.experts.{expert}.down_proj.weight"
        tensors[name] = torch.randn(16, 8).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = torch.rand(1, 1) + 0.5
    folder = tmp_path / "fp8"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "n_routed_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 1, "quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    register_input(request, str(folder))
    out = tmp_path / "out"
    assert run("experts", folder, "--drop", "1", "-o", out).exit_code == 0
    after = load_file(out / "model.safetensors")
    for new, old in ((0, 0), (1, 2), (2, 3)):
        for part in ("weight", "weight_scale_inv"):
            name = "model.layers.0.mlp.experts.{}.down_proj." + part
            assert after[name.format(new)].dtype == tensors[name.format(old)].dtype
            assert torch.equal(after[name.format(new)].view(torch.uint8), tensors[name.format(old)].view(torch.uint8))
    assert "model.layers.0.mlp.experts.3.down_proj.weight" not in after
    assert torch.equal(after["model.layers.0.mlp.gate.e_score_correction_bias"],
                       tensors["model.layers.0.mlp.gate.e_score_correction_bias"][[0, 2, 3]])
    assert config_json(out)["n_routed_experts"] == 3
    assert run("layers", folder, "--duplicate", "0", "-o", tmp_path / "deeper").exit_code == 0
    deeper = load_file(tmp_path / "deeper" / "model.safetensors")
    copy = "model.layers.1.mlp.experts.2.down_proj.weight"
    assert deeper[copy].dtype == torch.float8_e4m3fn and deeper[copy + "_scale_inv"].shape == (1, 1)
    assert torch.equal(deeper[copy].view(torch.uint8), tensors[copy.replace("layers.1", "layers.0")].view(torch.uint8))


@pytest.mark.parametrize("args, kept", [(["--drop", "1"], [0, 2, 3]), (["--drop", "2"], [0, 1, 3]),
                                        (["--keep", "2,3"], [2, 3])])
def test_the_skip_list_of_a_quantized_model_follows_its_experts(request, tmp_path, args, kept):
    """fp8 experts, some stored plain and named in modules_to_not_convert (one projection of expert 2 of
    layer 0, the whole expert 3 of layer 1): after pruning, transformers' own matcher (should_convert_module)
    leaves unquantized exactly the projections the output stores plain."""
    from safetensors.torch import save_file
    from transformers.quantizers.quantizers_utils import should_convert_module

    torch.manual_seed(0)
    tensors = {}
    for layer in range(2):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(4, 16)
        for expert in range(4):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"
                if (layer, expert) == (1, 3) or (layer, expert, projection) == (0, 2, "down_proj"):
                    tensors[name] = torch.randn(16, 16).to(torch.bfloat16)
                else:
                    tensors[name] = torch.randn(16, 16).to(torch.float8_e4m3fn)
                    tensors[name + "_scale_inv"] = torch.rand(1, 1) + 0.5
    folder = tmp_path / "fp8"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "n_routed_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2, "quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
            "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.experts.2.down_proj",
                                       "model.layers.1.mlp.experts.3"]}}))
    out = tmp_path / "out"
    result = run("experts", register_input(request, str(folder)), *args, "-o", out)
    assert result.exit_code == 0, result.stderr
    stored = {n.removesuffix(".weight"): dtype for n, dtype in lm.stored_dtypes(out).items()
              if ".experts." in n and n.endswith(".weight")}
    plain = {n for n, dtype in stored.items() if dtype == "BF16"}
    expected = {f"model.layers.0.mlp.experts.{kept.index(2)}.down_proj"} if 2 in kept else set()
    if 3 in kept:
        expected |= {f"model.layers.1.mlp.experts.{kept.index(3)}.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert plain == expected  # the stored weights moved with their experts
    skipped = config_json(out)["quantization_config"]["modules_to_not_convert"]
    assert {n for n in stored if not should_convert_module(n, skipped)} == plain
    assert not should_convert_module("lm_head", skipped)
