"""Build the sample checkpoints in this folder from real torch.nn modules.

    python samples/make_samples.py

Each file is written the way real projects write it: torch.save of a state_dict, a
training checkpoint with Adam state, safetensors via the safetensors library, and a
Hugging Face style sharded directory. Seeded, so values are the same on every run.
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


def llama_fp8() -> None:
    """A tiny Llama, a few AdamW steps in, its layers' linear weights stored as DeepSeek-V3 ships them."""
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
    folder = os.path.join(HERE, "llama-fp8")
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, value in model.to(torch.bfloat16).state_dict().items():
        if name.startswith("model.layers.") and value.dim() == 2:
            tensors[name], tensors[name + "_scale_inv"] = fp8_block(value)
        else:
            tensors[name] = value.contiguous()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    settings = {**config.to_diff_dict(), "torch_dtype": "bfloat16", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    settings.pop("transformers_version", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(sorted(settings.items())), f, indent=2)
        f.write("\n")


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
    llama_fp8()
    for name in sorted(os.listdir(HERE)):
        path = os.path.join(HERE, name)
        if name.endswith((".pt", ".safetensors")) or os.path.isdir(path) and not name.startswith("__"):
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if os.path.isdir(path) \
                else os.path.getsize(path)
            print(f"{name:28s} {size:>10,} bytes")


if __name__ == "__main__":
    main()
