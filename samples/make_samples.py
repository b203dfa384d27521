"""Build the sample checkpoints in this folder from real torch.nn modules.

    python samples/make_samples.py

Each file is written the way real projects write it: torch.save of a state_dict, a
training checkpoint with Adam state, safetensors via the safetensors library, and a
Hugging Face style sharded directory, transformers models as save_pretrained writes them, a GGUF file
as llama.cpp's converter writes it, and one trained Llama quantized three ways (DeepSeek's FP8 blocks,
bitsandbytes NF4 through transformers, AutoGPTQ's 4-bit packing). Seeded, so values are the same on every run.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file, save_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import ResNet, SmallVGG, TinyGPT  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def trained_resnet():
    """A ResNet after a few Adam steps, so BatchNorm statistics and moments are real."""
    torch.manual_seed(0)
    model = ResNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def trained_gpt():
    torch.manual_seed(1)
    model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    tokens = torch.randint(0, 256, (4, 33))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    return model


def write_sharded(state_dict: dict, folder: str, shards: int) -> None:
    """Split like Hugging Face: consecutive tensors per shard, an index with a weight_map."""
    os.makedirs(folder, exist_ok=True)
    names = list(state_dict)
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per_shard:(i + 1) * per_shard]
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state_dict[n].contiguous() for n in part}, os.path.join(folder, filename),
                  metadata={"format": "pt"})
        weight_map.update({n: filename for n in part})
        total += sum(state_dict[n].numel() * state_dict[n].element_size() for n in part)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def transformers_models() -> None:
    """A 6-layer Llama and a 2-layer Mixtral of 4 experts, random from small configs, as save_pretrained
    writes their directories (config.json beside model.safetensors): the README's layers and experts."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(os.path.join(HERE, "llama"))
    torch.manual_seed(4)
    MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
                       ).save_pretrained(os.path.join(HERE, "mixtral"))


def write_llama_gguf(path: str) -> None:
    """A tiny llama as llama.cpp's converter writes it: q and k permuted for its rotary layout
    (convert_hf_to_gguf.py, LlamaModel.permute), matrices quantized, norms in F32."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    state = LlamaForCausalLM(config).state_dict()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(128)])

    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    tensors = [("token_embd.weight", state["model.embed_tokens.weight"], q8)]
    for i in range(2):
        layer = f"model.layers.{i}."
        tensors += [
            (f"blk.{i}.attn_norm.weight", state[layer + "input_layernorm.weight"], None),
            (f"blk.{i}.attn_q.weight", permute(state[layer + "self_attn.q_proj.weight"], 4), q4),
            (f"blk.{i}.attn_k.weight", permute(state[layer + "self_attn.k_proj.weight"], 2), q8),
            (f"blk.{i}.attn_v.weight", state[layer + "self_attn.v_proj.weight"], q8),
            (f"blk.{i}.attn_output.weight", state[layer + "self_attn.o_proj.weight"], q8),
            (f"blk.{i}.ffn_norm.weight", state[layer + "post_attention_layernorm.weight"], None),
            (f"blk.{i}.ffn_gate.weight", state[layer + "mlp.gate_proj.weight"], q4),
            (f"blk.{i}.ffn_up.weight", state[layer + "mlp.up_proj.weight"], q4),
            (f"blk.{i}.ffn_down.weight", state[layer + "mlp.down_proj.weight"], "F16"),
        ]
    tensors += [("output_norm.weight", state["model.norm.weight"], None), ("output.weight", state["lm_head.weight"], q8)]
    for name, values, kind in tensors:
        array = values.float().numpy()
        if kind is None:
            writer.add_tensor(name, array)
        elif kind == "F16":
            writer.add_tensor(name, array.astype("float16"))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def fp8_block(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's FP8 layout, tile by tile: scale_inv = amax / 448 (1 for an all-zero tile), e4m3 codes."""
    rows, columns = weight.shape
    scale = torch.ones(-(-rows // block), -(-columns // block))
    codes = torch.empty(rows, columns, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            if tile.abs().max() > 0:
                scale[i, j] = tile.abs().max() / 448
            codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return codes, scale


def trained_llama():
    """A tiny Llama, a few AdamW steps in (weights a checkpoint ships, not an initialisation), in bfloat16:
    the model the quantized samples store."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        tokens = torch.randint(0, 256, (4, 33))
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.to(torch.bfloat16)


def write_config(folder: str, config, dtype: str, quantization: dict) -> None:
    """config.json as save_pretrained writes it, its weights' dtype and their quantization_config."""
    settings = {**config.to_diff_dict(), "torch_dtype": dtype, "quantization_config": quantization}
    for key in ("transformers_version", "dtype"):  # dtype: transformers 5's name for torch_dtype
        settings.pop(key, None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(sorted(settings.items())), f, indent=2)
        f.write("\n")


def llama_fp8(model) -> None:
    """The trained Llama, its layers' linear weights stored as DeepSeek-V3 ships them."""
    folder = os.path.join(HERE, "llama-fp8")
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, value in model.state_dict().items():
        if name.startswith("model.layers.") and value.dim() == 2:
            tensors[name], tensors[name + "_scale_inv"] = fp8_block(value)
        else:
            tensors[name] = value.contiguous()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    write_config(folder, model.config, "bfloat16", {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})


def llama_nf4(model) -> None:
    """The trained Llama as a QLoRA base: transformers loads it in 4 bits with bitsandbytes on the CPU
    (NF4, double quantization: every nn.Linear of the layers becomes a Linear4bit) and save_pretrained
    writes its state_dict (codes, absmax, quant maps and the quant_state JSON blob of each weight)."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    quantized.save_pretrained(os.path.join(HERE, "llama-nf4"))


def gptq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's ``QuantLinear.pack`` for 4 bits: each column of ``values`` [n, m] (codes 0..15) packed
    down the rows, eight codes an int32 word, the first in the lowest bits."""
    values = values.to(torch.int64).reshape(values.shape[0] // 8, 8, values.shape[1])
    words = sum(values[:, i] << (4 * i) for i in range(8))
    return (words - (words >> 31 << 32)).to(torch.int32).contiguous()  # the uint32 bit pattern as int32


def gptq_layer(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """A linear weight [out, in] as AutoGPTQ stores it (4 bits, sym=True, desc_act=False, format v1):
    round-to-nearest codes of scale = 2 * amax / 15 per group of inputs, zero point 8 stored minus one."""
    out_features, in_features = weight.shape
    groups = weight.float().t().reshape(in_features // group, group, out_features)
    scales = (2 * groups.abs().amax(1) / 15).clamp(min=1e-8).half()  # [groups, out]
    codes = (torch.round(groups / scales.float()[:, None]) + 8).clamp(0, 15).reshape(in_features, out_features)
    zeros = torch.full((in_features // group, out_features), 8 - 1)
    return {"qweight": gptq_pack(codes), "qzeros": gptq_pack(zeros.t()).t().contiguous(), "scales": scales.contiguous(),
            "g_idx": torch.arange(in_features, dtype=torch.int32) // group}


def llama_gptq(model, group: int = 64) -> None:
    """The trained Llama as a GPTQ model on the hub: its layers' linear weights in 4 bits (qweight,
    qzeros, scales, g_idx), the rest in float16, the quantization_config AutoGPTQ writes."""
    folder = os.path.join(HERE, "llama-gptq")
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, value in model.state_dict().items():
        if name.startswith("model.layers.") and value.dim() == 2:
            base = name.removesuffix(".weight")
            tensors.update({f"{base}.{role}": part for role, part in gptq_layer(value.half(), group).items()})
        else:
            tensors[name] = value.half().contiguous()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    write_config(folder, model.config, "float16", {
        "quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": True,
        "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq"})


def main() -> None:
    resnet, optimizer = trained_resnet()
    torch.save(resnet.state_dict(), os.path.join(HERE, "resnet.pt"))
    save_file(resnet.state_dict(), os.path.join(HERE, "resnet.safetensors"), metadata={"format": "pt"})
    torch.save(resnet.state_dict(), os.path.join(HERE, "resnet-legacy.pt"), _use_new_zipfile_serialization=False)
    torch.save({
        "state_dict": resnet.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 7,
        "global_step": 2800,
        "hyper_parameters": {"lr": 1e-3, "batch_size": 8, "arch": "resnet-narrow", "widths": [8, 16, 24, 32]},
    }, os.path.join(HERE, "training.pt"))
    write_sharded(resnet.state_dict(), os.path.join(HERE, "resnet-sharded"), shards=3)

    torch.manual_seed(2)
    torch.save(ResNet(num_classes=5).state_dict(), os.path.join(HERE, "resnet-5class.pt"))
    vgg = SmallVGG()
    with torch.no_grad():
        vgg(torch.randn(4, 3, 16, 16))  # training-mode passes: real BatchNorm statistics
    torch.save(vgg.state_dict(), os.path.join(HERE, "vgg.pt"))

    gpt = trained_gpt()
    torch.save(gpt.state_dict(), os.path.join(HERE, "gpt.pt"))
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in gpt.state_dict().items()},
               os.path.join(HERE, "gpt-bf16.pt"))
    save_model(gpt, os.path.join(HERE, "gpt.safetensors"), metadata={"format": "pt"})
    transformers_models()
    write_llama_gguf(os.path.join(HERE, "llama.gguf"))
    llama = trained_llama()
    llama_fp8(llama)
    llama_nf4(llama)
    llama_gptq(llama)
    for name in sorted(os.listdir(HERE)):
        path = os.path.join(HERE, name)
        if name.endswith((".pt", ".safetensors", ".gguf")) or os.path.isdir(path) and not name.startswith("__"):
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if os.path.isdir(path) \
                else os.path.getsize(path)
            print(f"{name:28s} {size:>10,} bytes")


if __name__ == "__main__":
    main()
