"""Names a Hugging Face file leaves out because they are tied: ``save_pretrained`` writes a tied
output embedding once, under its partner's name, and ``config.json`` says the model ties them
(``tie_word_embeddings``, True unless stated). Read back as aliases of the partner, the checkpoint
holds what ``torch.save(model.state_dict())`` holds: both names, one storage.

Only with evidence: the config says tied, the name is missing, exactly one partner is present (one
storage, a row per token of the config's ``vocab_size``), and for an output head, the model class
the config names has one (``GPT2LMHeadModel`` does, ``GPT2ForSequenceClassification`` does not)
and the file holds the module around it (``cls.predictions`` for ``cls.predictions.decoder.weight``).
"""

from __future__ import annotations

import re

from .checkpoint import Checkpoint
from .tensor import Tensor, view_key

# transformers' ``_tied_weights_keys`` of the common models: the name left out -> its partners.
_EMBEDDINGS = r"\w+\.embeddings\.word_embeddings\.weight"  # BERT, RoBERTa, ELECTRA, DeBERTa, ...
_OMITTED = {
    "encoder.embed_tokens.weight": r"shared\.weight",  # T5
    "decoder.embed_tokens.weight": r"shared\.weight",
    "model.encoder.embed_tokens.weight": r"model\.shared\.weight",  # BART, Pegasus, ...
    "model.decoder.embed_tokens.weight": r"model\.shared\.weight",
    "lm_head.weight": r"transformer\.wte\.weight"  # GPT-2, GPT-J, CodeGen
                      r"|model\.(\w+\.)?embed_tokens\.weight"  # Llama, Qwen, Gemma, OPT, Llava, ...
                      r"|(model\.)?shared\.weight"  # T5, BART
                      r"|gpt_neox\.embed_in\.weight|transformer\.word_embeddings\.weight"  # Pythia, BLOOM
                      r"|backbone\.embeddings\.weight",  # Mamba
    "cls.predictions.decoder.weight": _EMBEDDINGS,
    "cls.predictions.decoder.bias": r"cls\.predictions\.bias",
    "lm_head.decoder.weight": _EMBEDDINGS,
    "lm_head.decoder.bias": r"lm_head\.bias",
}
_PARTNER_ENDS = ("wte.weight", "embed_tokens.weight", "shared.weight", "embed_in.weight", "embeddings.weight",
                 "predictions.bias", "lm_head.bias")
_HEADS = ("LMHeadModel", "ForCausalLM", "ForMaskedLM", "ForConditionalGeneration", "ForPreTraining")


def ties_word_embeddings(config: dict | None) -> bool:
    """Whether ``config`` (a parsed config.json) ties the word embeddings (transformers' default: yes)."""
    return isinstance(config, dict) and config.get("tie_word_embeddings", True) is True


def restore_omitted(ckpt: Checkpoint, config: dict | None) -> None:
    """Add the names ``config`` says are tied and the file left out, as aliases, with a note each."""
    if not ties_word_embeddings(config):
        return
    heads = _has_head(config)
    missing = [n for n in _OMITTED if n not in ckpt.container and (heads or "embed_tokens" in n)]
    if not missing:
        return
    candidates = [n for n in ckpt.tensors if n.endswith(_PARTNER_ENDS)]  # one pass, then a few regexes
    for name in missing:
        partner = _partner(ckpt.tensors, candidates, re.compile(_OMITTED[name]), config.get("vocab_size"))
        if partner is None or not _module_present(name, ckpt):
            continue
        ckpt[name] = _alias(ckpt.tensors[partner])
        ckpt.omitted.add(name)
        ckpt.notes.append(f"{name} is not in the file: config.json ties it to {partner}; read as its alias")


def written(group: list[str]) -> str:
    """The name of a tie group that ``save_pretrained`` writes: the first not left out for its
    partner (``model.embed_tokens.weight``, not ``lm_head.weight``), else the first."""
    return next((n for n in group if n not in _OMITTED), group[0])


def _has_head(config: dict) -> bool:
    """Whether the model class the config names (any, when it names none) has a tied output head."""
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        return True
    return any(isinstance(a, str) and a.endswith(_HEADS) for a in architectures)


def _module_present(name: str, ckpt: Checkpoint) -> bool:
    """Whether the file holds the module around the left-out layer ('cls.predictions' for
    'cls.predictions.decoder.weight'; the model itself for 'lm_head.weight')."""
    parts = name.split(".")
    prefix = ".".join(parts[:-2]) + "." if len(parts) > 2 else ""
    return any(n.startswith(prefix) for n in ckpt.tensors)


def _partner(tensors: dict[str, Tensor], candidates: list[str], pattern: re.Pattern, vocab_size) -> str | None:
    """The one candidate matching ``pattern`` (several count as one when they share a storage),
    with one row per token of the config's ``vocab_size`` when it gives one."""
    found = [n for n in candidates if pattern.fullmatch(n)]
    if not found or len({view_key(tensors[n]) for n in found}) > 1:
        return None
    shape = tensors[found[0]].shape
    if isinstance(vocab_size, int) and not (shape and shape[0] == vocab_size):
        return None
    return found[0]


def _alias(tensor: Tensor) -> Tensor:
    alias = Tensor(tensor.storage, tensor.dtype, tensor.shape, tensor.stride, tensor.offset)
    alias.requires_grad, alias.parameter = tensor.requires_grad, tensor.parameter
    return alias
