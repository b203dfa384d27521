"""Tiny models and PEFT adapters for the LoRA tests: random weights from configs (no downloads), adapters
saved by PEFT's own save_pretrained with every trained part made non-zero, and PEFT's merge_and_unload
as the ground truth."""

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn


def llama(dtype=torch.float32, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).to(dtype).eval()


def gpt2(tie=True, dtype=torch.float32):
    """GPT-2: Conv1D attention and MLP (attn.c_proj square, 24x24); untied, lm_head is an nn.Linear of its own."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=80, n_positions=32, n_embd=24, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, tie_word_embeddings=tie)
    return GPT2LMHeadModel(config).to(dtype).eval()


class Convs(nn.Module):
    """Conv2d 3x3 and 1x1, a grouped conv, Conv1d, Conv3d and a Linear head."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 6, 1)
        self.grouped = nn.Conv2d(6, 6, 3, groups=2)
        self.d1 = nn.Conv1d(4, 6, 5)
        self.d3 = nn.Conv3d(2, 4, (1, 2, 3))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)


def convs():
    torch.manual_seed(0)
    return Convs().eval()


def state(model) -> dict:
    """The model's state dict, cloned (ties kept as ties)."""
    seen, out = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen[key] = tensor.detach().clone()
        out[name] = seen[key]
    return out


def make_adapter(model, folder, seed=1, **config):
    """Train nothing, but move every trainable tensor (seeded), as training would, and save the adapter
    with PEFT's save_pretrained into ``folder``."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:  # what training would change: LoRA pairs, modules_to_save, biases
                noise = torch.randn(param.shape, generator=g).to(param.dtype)
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.1 * noise)
                else:
                    param.add_(0.3 * noise)
    peft_model.save_pretrained(folder)
    return folder


def peft_merged(model, folder, scale=None) -> dict:
    """PEFT's own merge of the adapter in ``folder`` into (a copy of) ``model``: the ground truth."""
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), folder)
    if scale is not None:
        from peft.tuners.lora import LoraLayer

        for module in loaded.modules():
            if isinstance(module, LoraLayer):
                module.set_scale("default", scale)
    return {k: v.detach().clone() for k, v in loaded.merge_and_unload().state_dict().items()}
