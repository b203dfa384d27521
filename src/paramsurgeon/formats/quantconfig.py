"""The ``quantization_config`` of a model directory's ``config.json`` after a surgery: removed when no
quantized weight is left, written for weights quantized anew, and, when some quantized weights were
written as plain tensors (a partial dequantize, a value change), those modules added to the list of
modules the method's transformers quantizer leaves unquantized, so that the result loads.

    quantization_changes(...)  the new quantization_config (or REMOVED), and notes
    quantized(ckpt)            its quantized weights, also those a writer laid out as their parts
"""

from __future__ import annotations

import json
from typing import Callable

from .. import quant
from ..checkpoint import Checkpoint
from ..checkpoint.moves import followed
from ..checkpoint.quantized import Quantized
from .skiplists import moved_list, unique

REMOVED = object()  # a key config_updates takes out of config.json

# quant_method -> (the quantization_config key naming the modules its transformers quantizer leaves
# unquantized, whether a null list means transformers' own defaults: the output embedding and the tied
# and last modules, which a list written instead turns off). transformers matches each entry to a full
# module name from its start (a module and its children) or as its suffix (quantizers_utils.should_convert_
# module); compressed-tensors matches an ``ignore`` entry as the module name (or ``re:`` a regex).
# gptq has none: optimum's GPTQQuantizer only keeps modules_in_block_to_quantize, by suffix in every block.
SKIPS = {
    "bitsandbytes": ("llm_int8_skip_modules", True),  # quantizer_bnb_4bit.py, quantizer_bnb_8bit.py
    "fp8": ("modules_to_not_convert", True),  # quantizer_finegrained_fp8.py (FineGrainedFP8Config)
    "mxfp4": ("modules_to_not_convert", True),  # quantizer_mxfp4.py
    "awq": ("modules_to_not_convert", False),  # quantizer_awq.py: add_default_skips=True
    "compressed-tensors": ("ignore", False),  # quantizer_compressed_tensors.py: ct_config.ignore
}


def quantization_changes(config: dict, before: Checkpoint, after: Checkpoint,
                         theirs: Callable[[str], dict | None]) -> tuple[dict, list[str]]:
    """``quantization_config`` removed when the surgery left no quantized weight of the input's
    (dequantize), written when it quantized weights as the input held none (quantize), or with its list
    of modules left unquantized following the modules the surgery renumbered (skiplists; ``theirs(path)``:
    the config of a checkpoint a stack took blocks from) and naming those of the weights it wrote plain;
    and notes."""
    held = quant.quantization_config(config)
    if held and quantized(before) and not quantized(after) and not after.partial:
        return {"quantization_config": REMOVED}, []
    kinds = {_kind(t) for t in quantized(before)}
    made = [t for t in quantized(after) if t.scheme.quantizes and _kind(t) not in kinds]
    if made:
        return {"quantization_config": made[0].scheme.quantization_config(made[0].params)}, []
    if not held:
        return {}, []
    moved, notes = _moved(held, after, theirs)
    plain = _written_plain(before, after) + _taken_plain(held, after, theirs)
    changes, more = _skipping(moved, plain, after) if plain else ({}, [])
    if not changes and moved != held:
        changes = {"quantization_config": moved}
    return changes, notes + more


def _moved(held: dict, after: Checkpoint, theirs: Callable[[str], dict | None]) -> tuple[dict, list[str]]:
    """``held`` with its list of modules left unquantized following the modules ``after``'s operations
    renumbered (a null list, transformers' defaults, stays null); notes."""
    method, skips = held.get("quant_method"), _skips(held)
    if not after.moves or skips is None or not isinstance(held.get(skips[0]), (list, str)):
        return held, []
    key = skips[0]

    def their_list(path: str) -> list | None:
        their = quant.quantization_config(theirs(path))
        return _entries(their.get(key)) if their.get("quant_method") == method else None

    listed, notes = moved_list(_entries(held[key]), after.moves, their_list, f"config.json: quantization_config.{key}")
    return {**held, key: listed}, notes


def _taken_plain(held: dict, after: Checkpoint, theirs: Callable[[str], dict | None]) -> list[str]:
    """The plain weights of the blocks a stack took from checkpoints whose entries ``_moved`` did not
    bring: not quantized by ``held``'s method (a plain model), or into a null list (transformers'
    defaults); no entry names them, yet the list must."""
    method, skips = held.get("quant_method"), _skips(held)
    null = skips is None or held.get(skips[0]) is None
    blocks = tuple(block + "." for number, step in enumerate(after.moves) for new, (path, _) in step.taken.items()
                   if null or quant.quantization_config(theirs(path)).get("quant_method") != method
                   for block in followed(new, after.moves[number + 1:]))
    return [n for n, t in after.tensors.items() if n.startswith(blocks) and _plain_matrix(n, t, after)] if blocks else []


def _skips(held: dict) -> tuple[str, bool] | None:
    """SKIPS of ``held``'s quant_method (None for a method without a list, or a quant_method that is not a name)."""
    method = held.get("quant_method")
    return SKIPS.get(method) if isinstance(method, str) else None


def _entries(listed) -> list:
    """A list of modules as a list (transformers also takes one name; anything else is no list)."""
    return [listed] if isinstance(listed, str) else list(listed) if isinstance(listed, list) else []


def _skipping(held: dict, plain: list[str], after: Checkpoint) -> tuple[dict, list[str]]:
    """``held`` with the modules of ``plain`` (quantized weights written as plain tensors) in its list of
    modules left unquantized, and notes."""
    modules = list(dict.fromkeys(_module(n) for n in plain))
    method, skips, notes = held.get("quant_method"), _skips(held), _mixed(modules, after)
    if skips is None:
        return {}, notes + [f"note: config.json: quantization_config kept as it was: its quant_method"
                            f" {json.dumps(method)} names no modules to leave unquantized, so transformers reads"
                            f" {_listed(modules)} as quantized; dequantize every quantized weight for a model it loads"]
    key, defaults = skips
    listed = _entries(held.get(key))
    if held.get(key) is None and defaults:  # the list replaces transformers' defaults: name every plain module
        listed += [_module(n) for n, t in after.tensors.items() if _plain_matrix(n, t, after)]
    updated = unique(listed + modules)
    if updated == held.get(key):
        return {}, notes
    return {"quantization_config": {**held, key: updated}}, notes


def _written_plain(before: Checkpoint, after: Checkpoint) -> list[str]:
    """The quantized weights of ``before`` that ``after`` holds as plain tensors (under the same name, or
    the names renumbering gave them)."""
    tensors = after.tensors
    return [m for n, t in before.tensors.items() if type(t) is Quantized and not t.scheme.native
            for m in followed(n, after.moves) if m in tensors and m not in after.laid_out
            and type(tensors[m]) is not Quantized]


def _mixed(modules: list[str], after: Checkpoint) -> list[str]:
    """A note naming the modules that hold plain and quantized weights at once (gpt-oss's experts, one
    of two dequantized): transformers quantizes a module as a whole, so it cannot load them."""
    quantized = {_module(n) for n in [*after.laid_out, *(n for n, t in after.tensors.items() if type(t) is Quantized)]}
    both = [m for m in modules if m in quantized]
    if not both:
        return []
    return [f"note: config.json: {_listed(both)} {'holds' if len(both) == 1 else 'hold'} plain and quantized weights"
            " at once, which transformers cannot load (it quantizes a module as a whole); dequantize the others too"]


def _plain_matrix(name: str, tensor, after: Checkpoint) -> bool:
    return name.endswith(".weight") and name not in after.laid_out and type(tensor) is not Quantized \
        and tensor.dtype.floating and len(tensor.shape) >= 2


def _module(name: str) -> str:
    """The module a weight belongs to: 'x.weight' -> 'x'; gpt-oss's 'x.experts.down_proj' -> 'x.experts'."""
    return name.rpartition(".")[0]


def _listed(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _kind(tensor: Quantized) -> str:
    return f"{tensor.scheme.name} {json.dumps(tensor.params, sort_keys=True)}"


def quantized(ckpt: Checkpoint) -> list[Quantized]:
    """The quantized weights of ``ckpt``, also those a writer laid out as their parts."""
    return list(ckpt.laid_out.values()) + [t for t in ckpt.tensors.values() if type(t) is Quantized]
