"""A GGUF checkpoint as PyTorch holds it: each tensor a plain tensor (F32/F16/BF16 spans of the
file kept as they are, quantized ones dequantized), optionally under Hugging Face names with the
q/k permutation of llama.cpp's converter undone, and the config.json its metadata implies.
Values are computed one tensor at a time, when the writer reads them."""

from __future__ import annotations

import dataclasses
import json
import re

from .. import dtypes
from ..checkpoint import Checkpoint, Storage, Tensor
from ..checkpoint.quantized import Quantized, refuse_valueless
from ..dtypes import DType
from ..errors import UsageError
from .gguf import Layout
from .hfconfig import CONFIG

HF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
HF_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
            "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
            "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
            "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
            "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
            "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
            "ffn_down.weight": "mlp.down_proj.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def is_gguf(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` was read from a GGUF file (and still carries what a GGUF writer needs)."""
    return isinstance(ckpt.layout, Layout)


def plain(ckpt: Checkpoint, names: list[str] | None = None, dtype: DType | None = None,
          hf: bool = False) -> Checkpoint:
    """``ckpt``'s tensors ``names`` (default all) as plain tensors of ``dtype`` (default: a plain
    type's own dtype, float32 for a quantized one), without the GGUF metadata; with ``hf``, under
    Hugging Face names with q/k un-permuted, with the config.json a directory output gets (``made``)."""
    tensors = ckpt.tensors
    names = list(tensors) if names is None else names
    refuse_valueless(tensors, names, "convert")
    heads = _heads(ckpt) if hf else None
    renamed = _hf_names(ckpt, names) if hf else dict(zip(names, names))
    converted = {}
    for name in names:
        unpermute = heads.get(name.rsplit(".", 2)[-2]) if hf else None
        converted[renamed[name]] = _plain(tensors[name], dtype, unpermute)
    made = {CONFIG: (json.dumps(_config(ckpt, converted, dtype), indent=2) + "\n").encode()} if hf else {}
    metadata = {k: v for k, v in ckpt.metadata.items() if k not in ckpt.layout.keys}
    return dataclasses.replace(ckpt.with_container(converted), metadata=metadata, layout=None, made=made)


def _plain(tensor: Tensor, dtype: DType | None, heads: int | None) -> Tensor:
    quantized = isinstance(tensor, Quantized)
    wanted = dtype or (dtypes.BY_NAME["float32"] if quantized else tensor.dtype)
    if not quantized and wanted == tensor.dtype and heads is None:
        return tensor  # copied exactly
    source = Quantized(tensor.scheme, tensor.parts, tensor.shape, wanted, tensor.params) if quantized else tensor
    if quantized and not heads:
        return source.plain()  # streamed a few MiB of rows at a time

    def values():
        from ..checkpoint.values import to_torch
        from ..dtypes import torch_dtype

        result = source.dequantized() if quantized else to_torch(tensor).to(torch_dtype(wanted))
        return _unpermute(result, heads) if heads else result

    return Tensor(Storage(tensor.numel * wanted.itemsize, loader=values), wanted, tensor.shape)


def _unpermute(values, heads: int):
    """Undo llama.cpp's LlamaModel.permute (rows of each head interleaved for its rotary layout)."""
    rows = values.shape[0]
    return values.reshape(heads, rows // heads // 2, 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape) \
        .contiguous()


def _meta(ckpt: Checkpoint, key: str, default=None, required: bool = True):
    field = ckpt.metadata.get(key)
    if field is None:
        if default is None and required:
            raise UsageError(f"--names hf: {ckpt.source} has no metadata '{key}', which config.json needs")
        return default
    value = field.value
    if isinstance(value, float):
        return float(field)  # the float32 in its shortest form: 1e-05
    if not isinstance(value, (int, float, str)):
        raise UsageError(f"--names hf: metadata '{key}' of {ckpt.source} is {field}, not one number")
    return value


def _heads(ckpt: Checkpoint) -> dict[str, int]:
    """Which tensors llama.cpp permuted, and by how many heads (q by the heads, k by the kv heads)."""
    architecture = _meta(ckpt, "general.architecture")
    if architecture != "llama":
        raise UsageError(f"--names hf maps llama-architecture GGUF files to Hugging Face names; {ckpt.source} is"
                         f" '{architecture}'; convert without --names to keep GGUF's names")
    heads = _meta(ckpt, "llama.attention.head_count")
    kv = _meta(ckpt, "llama.attention.head_count_kv", heads)
    return {"attn_q": heads, "attn_k": kv}


def _hf_names(ckpt: Checkpoint, names: list[str]) -> dict[str, str]:
    renamed, unknown = {}, []
    for name in names:
        block = _BLOCK.fullmatch(name)
        new = HF_GLOBAL.get(name) if block is None else \
            (f"model.layers.{block[1]}.{HF_LAYER[block[2]]}" if block[2] in HF_LAYER else None)
        if new is None:
            unknown.append(name)
        renamed[name] = new
    if unknown:
        shown = ", ".join(f"'{n}'" for n in unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
        raise UsageError(f"--names hf: no Hugging Face llama name for {shown}; leave {'it' if len(unknown) == 1 else 'them'}"
                         f" out with -x {unknown[0]}")
    return renamed


def _config(ckpt: Checkpoint, converted: dict[str, Tensor], dtype: DType | None) -> dict:
    """The config.json of LlamaForCausalLM that the GGUF metadata describes."""
    heads = _meta(ckpt, "llama.attention.head_count")
    embed = converted.get("model.embed_tokens.weight")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": embed.shape[0] if embed is not None else _meta(ckpt, "llama.vocab_size"),
        "hidden_size": _meta(ckpt, "llama.embedding_length"),
        "intermediate_size": _meta(ckpt, "llama.feed_forward_length"),
        "num_hidden_layers": _meta(ckpt, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(ckpt, "llama.attention.head_count_kv", heads),
        "max_position_embeddings": _meta(ckpt, "llama.context_length"),
        "rms_norm_eps": _meta(ckpt, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _meta(ckpt, "llama.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in ckpt.tensors,
        "torch_dtype": (dtype or dtypes.BY_NAME["float32"]).name,
    }
    head_dim = _meta(ckpt, "llama.attention.key_length", required=False)
    if head_dim is not None:
        config["head_dim"] = head_dim
    for key in ("bos_token_id", "eos_token_id"):
        found = _meta(ckpt, f"tokenizer.ggml.{key}", required=False)
        if found is not None:
            config[key] = found
    return config
