"""Tiny transformers models for the layers, stack and experts tests (random weights from configs, no
downloads), saved with save_pretrained; and references assembled in torch from their modules."""

import copy
import os
from contextlib import contextmanager

import torch
from torch import nn

TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def llama(seed=0, layers=4, intermediate=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def qwen2(layers=4):
    """Qwen2 with sliding-window layers from layer 2 on: layer_types is a per-layer list in its config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                        sliding_window=3, max_window_layers=2, max_position_embeddings=64)).eval()


def gpt2(layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=layers, n_head=2)).eval()


def bert(layers=4):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=32)).eval()


def t5(layers=3, decoder_layers=2):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=layers,
                                               num_decoder_layers=decoder_layers, num_heads=4)).eval()


def bart(**options):
    """BART (post-norm blocks: the norm follows the residual sum), or another encoder-decoder of its family."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        **options)).eval()


def opt(**options):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=48, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=32, **options)).eval()


def falcon():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    return FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=3)).eval()


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                            num_hidden_layers=3, max_position_embeddings=64)).eval()


def llava():
    """Llava: a Llama language model and a CLIP vision tower of as many layers (2), each with its block list."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, max_position_embeddings=64)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2,
                              image_size=16, patch_size=8, projection_dim=32)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=63,
                                                     vision_feature_layer=-1)).eval()


def with_list(model, path: str, order: list[int]):
    """A copy of ``model`` whose block list at ``path`` ('decoder.block') holds copies of its blocks in ``order``."""
    result = copy.deepcopy(model)
    holder, _, attribute = path.rpartition(".")
    holder = result.get_submodule(holder)
    setattr(holder, attribute, nn.ModuleList(copy.deepcopy(getattr(holder, attribute)[i]) for i in order))
    return result


def blocks_of(model) -> tuple[nn.Module, str]:
    """The module holding ``model``'s block list, and the list's attribute name."""
    for path in ("model", "transformer", "encoder"):
        holder = getattr(model, path, None)
        for attribute in ("layers", "h", "layer"):
            if holder is not None and isinstance(getattr(holder, attribute, None), nn.ModuleList):
                return holder, attribute
    raise AssertionError(f"no block list in {type(model).__name__}")


def with_blocks(model, blocks: list[nn.Module]):
    """A copy of ``model`` whose blocks are ``blocks`` (copied), as a user would assemble it in torch."""
    result = copy.deepcopy(model)
    holder, attribute = blocks_of(result)
    setattr(holder, attribute, nn.ModuleList(copy.deepcopy(b) for b in blocks))
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(result.config, name):
            setattr(result.config, name, len(blocks))
    return result


def reordered(model, order: list[int]):
    """``model`` with its blocks in ``order`` (source indices: repeated ones are copies)."""
    holder, attribute = blocks_of(model)
    layers = getattr(holder, attribute)
    result = with_blocks(model, [layers[i] for i in order])
    if getattr(model.config, "layer_types", None):  # the model reads each layer's type from the config's list
        result.config.layer_types = [model.config.layer_types[i] for i in order]
    return result


@torch.no_grad()
def logits(model) -> torch.Tensor:
    """The model's output on TOKENS (logits, or the last hidden state of an encoder)."""
    out = model(input_ids=TOKENS, use_cache=False) if hasattr(model, "lm_head") else model(input_ids=TOKENS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def load(path, cls=None):
    """The model at ``path``, read by transformers' from_pretrained, which finds every weight it needs in the
    files and no other (a missing one would be initialised at random)."""
    import transformers

    cls = cls or getattr(transformers, transformers.AutoConfig.from_pretrained(path).architectures[0])
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), {k: v for k, v in info.items() if v}
    return model.eval()


def moe(kind: str, **overrides):
    """A tiny mixture-of-experts model: mixtral, qwen2moe (a shared expert), qwen3moe, dsv3 (a dense first
    layer, shared experts, sigmoid routing with e_score_correction_bias)."""
    import transformers as T

    common = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64)
    configs = {
        "mixtral": (T.MixtralConfig, dict(intermediate_size=48, num_hidden_layers=2, num_local_experts=4)),
        "qwen2moe": (T.Qwen2MoeConfig, dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                                            shared_expert_intermediate_size=24, num_experts=4)),
        "qwen3moe": (T.Qwen3MoeConfig, dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                                            num_experts=4, head_dim=8)),
        "dsv3": (T.DeepseekV3Config, dict(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                                          first_k_dense_replace=1, n_routed_experts=8, n_group=1, topk_group=1,
                                          q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                          v_head_dim=8, n_shared_experts=1, num_key_value_heads=4)),
    }
    cls, options = configs[kind]
    config = cls(**{**common, **options, **overrides})
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):  # zeros when made: a trained model's are not
                module.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model


def llama4(layers=4):
    """Llama 4's text model: experts in every second layer (moe_layers [1, 3]), no RoPE in every fourth."""
    import transformers as T

    torch.manual_seed(0)
    return T.Llama4ForCausalLM(T.Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_hidden_layers=layers, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, max_position_embeddings=64)).eval()


def gpt_oss():
    """gpt-oss unquantized: fused experts with stacked biases (experts.down_proj_bias [E, hidden]), which are
    not zeros (as in a trained model; they are made zeros)."""
    import transformers as T

    torch.manual_seed(0)
    model = T.GptOssForCausalLM(T.GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        max_position_embeddings=64)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.uniform_(-0.1, 0.1)
    return model


def qwen3_vl_moe():
    """Qwen3-VL-MoE: its language model's experts counted in text_config (num_local_experts, num_experts_per_tok)."""
    import transformers as T

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=4,
                num_key_value_heads=2, num_hidden_layers=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0])
    torch.manual_seed(0)
    return T.Qwen3VLMoeForConditionalGeneration(T.Qwen3VLMoeConfig(text_config=text, vision_config=vision)).eval()


def save_fused(model, path):
    """``model`` saved in its fused layout (experts stacked in one tensor per projection), as transformers
    holds it in memory; save_pretrained writes the per-expert layout of the hub."""
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


@contextmanager
def restricted(model, kept: list[int]):
    """``model`` (a copy) whose routers pick among the experts ``kept`` only: the logits of the others are
    -inf (as their e_score_correction_bias), so that no softmax, sigmoid or top-k gives them any weight."""
    reference = copy.deepcopy(model)
    masks = {}
    for module in reference.modules():
        if type(module).__name__.lower().endswith("router"):
            dropped = torch.ones(module.weight.shape[0], dtype=torch.bool)
            dropped[kept] = False
            masks[id(module.weight)] = dropped
            if hasattr(module, "e_score_correction_bias"):
                with torch.no_grad():
                    module.e_score_correction_bias[dropped] = float("-inf")
    assert masks, "no router found"
    real = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        out = real(x, weight, bias)
        return out.masked_fill(masks[id(weight)], float("-inf")) if id(weight) in masks else out

    torch.nn.functional.linear = linear
    try:
        yield reference
    finally:
        torch.nn.functional.linear = real


def fp8_llama(folder, plain: list[int], seed=2, layers=4) -> None:
    """A tiny Llama (dimensions multiples of 128, whole tiles) in DeepSeek's fp8 layout (fp8_reference),
    the matrices of the layers ``plain`` stored in bfloat16 and named ('model.layers.N') in
    quantization_config.modules_to_not_convert with lm_head."""
    import json

    from fp8_reference import quantize
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tensors = {}
    for name, value in load_file(os.path.join(folder, "model.safetensors")).items():
        if name.startswith("model.layers.") and value.dim() == 2 and int(name.split(".")[2]) not in plain:
            tensors[name], tensors[name + "_scale_inv"] = quantize(value)
        else:
            tensors[name] = value
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json")) as f:
        settings = json.load(f)
    settings["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128],
                                       "modules_to_not_convert": ["lm_head", *(f"model.layers.{i}" for i in plain)]}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(settings, f, indent=2)


def stored_dtypes(folder) -> dict[str, str]:
    """Name -> dtype ('BF16', 'F8_E4M3') of every tensor the directory's safetensors files store, as
    safe_open reads them."""
    from safetensors import safe_open

    dtypes = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(folder, file), "pt") as f:
                dtypes.update({name: f.get_slice(name).get_dtype() for name in f.keys()})
    return dtypes


def modelopt_fp8(folder) -> None:
    """Three layers of ModelOpt's FP8 layout (a down_proj each, with weight_scale and input_scale), layer 1's
    stored in bfloat16 and named in hf_quant_config.json's exclude_modules with 'lm_head' and '*mlp.gate'."""
    import json

    from safetensors.torch import save_file

    generator, state = torch.Generator().manual_seed(6), {}
    os.makedirs(folder)
    for layer in range(3):
        weight = torch.randn(32, 32, generator=generator)
        scale = weight.abs().max() / 448
        name = f"model.layers.{layer}.mlp.down_proj"
        state |= {f"{name}.weight": weight.to(torch.bfloat16)} if layer == 1 else {
            f"{name}.weight": (weight / scale).to(torch.float8_e4m3fn), f"{name}.weight_scale": scale.reshape(()),
            f"{name}.input_scale": torch.tensor(0.25)}
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "num_hidden_layers": 3}, f)
    with open(os.path.join(folder, "hf_quant_config.json"), "w") as f:
        json.dump({"producer": {"name": "modelopt"}, "quantization": {
            "quant_algo": "FP8", "exclude_modules": ["lm_head", "model.layers.1.mlp.down_proj", "*mlp.gate"]}}, f)


def ct_llama(folder, ignore: list[str]) -> None:
    """A tiny Llama compressed by compressed-tensors itself (fp8 weights per channel, ModelCompressor), the
    modules ``ignore`` names left in bfloat16."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file
    from test_quant_schemes_ct_bnb import observed

    model = llama(layers=3).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=args)}, ignore=ignore))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            module.weight_scale.data.copy_(calculate_qparams(*observed(module.weight.data, args), args)[0])
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    compressor.update_config(str(folder))
