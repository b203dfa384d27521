"""A model directory whose quantized weights are partly written as plain tensors (a partial dequantize,
a value change of a quantized weight): config.json's quantization_config names their modules in the
list its method leaves unquantized, so that transformers loads the result.

Ground truth: transformers itself (from_pretrained on the CPU for bitsandbytes NF4 and fine-grained FP8;
its quantizers' module replacement on the meta device; its matcher should_convert_module), bitsandbytes'
``dequantize_4bit`` for the NF4 values, DeepSeek's layout from fp8_reference, and compressed-tensors'
own ``apply_quantization_config`` for its ``ignore`` list.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8_reference import dequantize, quantize
from helpers import SAMPLES, bits, register_input, run

NF4 = Path(SAMPLES) / "llama-nf4"

LAYER0 = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
          "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
          "model.layers.0.mlp.down_proj")


def stored(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def quantization_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def converted(folder) -> dict[str, str]:
    """Module name -> the class transformers' quantizer of ``folder``'s quantization_config makes it for a
    pre-quantized checkpoint (on the meta device, dequantizing on load turned off: what a GPU loads)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    config = AutoConfig.from_pretrained(folder)
    quantization = AutoQuantizationConfig.from_dict(dict(config.quantization_config))
    if hasattr(quantization, "dequantize"):
        quantization.dequantize = False
    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    quantizer.preprocess_model(model, device_map={"": "cpu"})
    return {name: type(module).__name__ for name, module in model.named_modules()}


# bitsandbytes NF4: from_pretrained on the CPU


def test_a_partly_dequantized_nf4_llama_loads_with_plain_layers_of_the_values_written(request, tmp_path):
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    source = register_input(request, NF4)
    out = tmp_path / "partial"
    result = run("dequantize", source, "-p", "model.layers.0.*", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    held = quantization_config(source)
    # null: transformers' defaults (lm_head); a list replaces them, so it names every plain matrix's module
    assert held["llm_int8_skip_modules"] is None
    skipped = quantization_config(out).pop("llm_int8_skip_modules")
    assert sorted(skipped) == sorted([*LAYER0, "lm_head", "model.embed_tokens"])
    assert {**quantization_config(out), "llm_int8_skip_modules": None} == held

    original = AutoModelForCausalLM.from_pretrained(source, device_map="cpu").eval()
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    written = stored(out / "model.safetensors")
    for name in LAYER0:
        quantized, plain = original.get_submodule(name), loaded.get_submodule(name)
        values = F.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state).to(torch.bfloat16)
        assert type(plain) is torch.nn.Linear and bits(plain.weight.data) == bits(values), name
        assert bits(written[name + ".weight"]) == bits(values), name
        assert not any(n.startswith(name + ".weight.") for n in written), name  # its parts dropped
        setattr(original.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], _linear(values))
    assert type(loaded.get_submodule("model.layers.1.mlp.down_proj")).__name__ == "Linear4bit"
    assert type(loaded.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)  # layer 0 plain in both, the rest NF4


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    layer.weight.data = weight.clone()
    return layer


def test_a_value_change_of_an_nf4_weight_loads_as_a_plain_layer_with_the_new_values(request, tmp_path):
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    source = register_input(request, NF4)
    name = "model.layers.1.self_attn.o_proj"
    out = tmp_path / "scaled"
    result = run("scale", source, "-p", name + ".weight", "--by", "2", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert "quantization_config.llm_int8_skip_modules added" in result.stderr and name in result.stderr
    assert converted(out)[name] == "Linear" and converted(out)["model.layers.1.self_attn.q_proj"] == "Linear4bit"
    original = AutoModelForCausalLM.from_pretrained(source, device_map="cpu")
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    quantized = original.get_submodule(name)
    expected = F.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state).to(torch.bfloat16) * 2
    assert type(loaded.get_submodule(name)) is torch.nn.Linear
    assert bits(loaded.get_submodule(name).weight.data) == bits(expected)


def test_an_explicit_skip_list_keeps_its_entries_and_gains_only_the_modules_written_plain(request, tmp_path):
    """A list the config names replaces transformers' defaults: paramsurgeon adds to it, nothing else."""
    folder = tmp_path / "nf4"
    shutil.copytree(NF4, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = ["lm_head"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    register_input(request, folder)
    out = tmp_path / "out"
    assert run("dequantize", folder, "-p", LAYER0[0] + ".weight", "-o", f"{out}/").exit_code == 0
    assert quantization_config(out)["llm_int8_skip_modules"] == ["lm_head", LAYER0[0]]
    modules = converted(out)
    assert modules[LAYER0[0]] == "Linear" and {modules[n] for n in LAYER0[1:]} == {"Linear4bit"}
    assert run("dequantize", out, "-p", LAYER0[0] + ".weight", "--allow-empty", "-o", f"{tmp_path / 'again'}/") \
        .exit_code == 0  # nothing more to dequantize: the list is left as it is
    assert quantization_config(tmp_path / "again")["llm_int8_skip_modules"] == ["lm_head", LAYER0[0]]


# fine-grained FP8 (DeepSeek's layout)


@pytest.fixture
def fp8_llama(request, tmp_path):
    """A tiny Llama (dimensions multiples of 128: transformers' CPU dequantization needs whole tiles) in
    DeepSeek's fp8 layout, and the values its weights stand for."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path / "llama-fp8"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tensors, values = {}, {}
    for name, value in stored(folder / "model.safetensors").items():
        if name.startswith("model.layers.") and value.dim() == 2:
            tensors[name], tensors[name + "_scale_inv"] = quantize(value)
            values[name] = dequantize(tensors[name], tensors[name + "_scale_inv"])
        else:
            tensors[name] = values[name] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    settings = json.loads((folder / "config.json").read_text())
    settings["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(settings, indent=2))
    return register_input(request, folder), values


def test_a_partly_dequantized_fp8_llama_keeps_its_plain_layers_plain_and_loads_on_the_cpu(fp8_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, values = fp8_llama
    out = tmp_path / "partial"
    result = run("dequantize", folder, "-p", "model.layers.0.mlp.*", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    plain = LAYER0[4:]
    assert sorted(quantization_config(out)["modules_to_not_convert"]) == sorted([*plain, "lm_head",
                                                                                  "model.embed_tokens"])
    modules = converted(out)  # what a GPU loads: FP8Linear where the codes are, nn.Linear where they are not
    assert {n: modules[n] for n in plain} == dict.fromkeys(plain, "Linear")
    assert {modules[n] for n in LAYER0[:4]} == {"FP8Linear"} and modules["lm_head"] == "Linear"
    before = converted(folder)  # the input's config: the codes' modules FP8Linear, so would a plain weight's be
    assert {before[n] for n in LAYER0} == {"FP8Linear"} and before["lm_head"] == "Linear"

    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()  # the CPU dequantizes the rest
    for name, value in loaded.state_dict().items():
        assert bits(value) == bits(values[name]), name
    reference = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.bfloat16).eval()
    reference.load_state_dict(values)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


# the other methods' lists, as their own matchers read them


def test_compressed_tensors_ignores_the_modules_written_plain(request, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from test_quant_schemes_ct_bnb import Tiny, compressed_tensors_dir

    folder = tmp_path / "ct"
    compressed_tensors_dir(folder, {"num_bits": 4, "strategy": "group", "group_size": 32}, None)
    register_input(request, folder)
    out = tmp_path / "out"
    assert run("dequantize", folder, "-p", "model.up.weight", "-o", f"{out}/").exit_code == 0
    held = quantization_config(out)
    assert held["ignore"] == ["lm_head", "model.up"]
    model = Tiny()
    apply_quantization_config(model, QuantizationConfig.model_validate(held))
    assert [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None)] == ["model.down"]


def test_awq_names_them_in_modules_to_not_convert_and_gptq_has_no_such_list(request, tmp_path):
    from test_quant_schemes_gptq_awq import Q, awq_dir, gptq_dir
    from transformers import AwqConfig
    from transformers.quantizers.quantizers_utils import should_convert_module

    folder = awq_dir(request, tmp_path / "awq")[0]
    out = tmp_path / "awq-out"
    assert run("dequantize", folder, "-p", Q + ".weight", "-o", f"{out}/").exit_code == 0
    skipped = AwqConfig.from_dict(quantization_config(out)).modules_to_not_convert
    module = Q
    assert skipped == [module]
    others = [n.removesuffix(".qweight") for n in stored(out / "model.safetensors") if n.endswith(".qweight")]
    assert others and not should_convert_module(module, skipped)
    assert all(should_convert_module(n, skipped) for n in others)

    folder = gptq_dir(request, tmp_path / "gptq")[0]
    result = run("dequantize", folder, "-p", Q + ".weight", "-o", f"{tmp_path / 'gptq-out'}/")
    assert result.exit_code == 0
    assert quantization_config(tmp_path / "gptq-out") == quantization_config(folder)
    assert (f'note: config.json: quantization_config kept as it was: its quant_method "gptq" names no modules to'
            f" leave unquantized, so transformers reads {module} as quantized") in result.stderr
