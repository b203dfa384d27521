"""Tiny transformers models for the layers, stack and experts tests (random weights from configs, no
downloads), saved with save_pretrained; and references assembled in torch from their modules."""

import copy

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
    """The model at ``path``, read by transformers' from_pretrained."""
    import transformers

    cls = cls or getattr(transformers, transformers.AutoConfig.from_pretrained(path).architectures[0])
    return cls.from_pretrained(path).eval()
