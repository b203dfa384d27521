"""Which layer a tensor belongs to, inferred from its name, its shape and its siblings.

Tensors are grouped by module (the name without its last part). The module's kind
follows from the tensors it holds: running statistics make a BatchNorm; weight_ih and
weight_hh pairs an LSTM, GRU or RNN (or one of their cells); a 3-5-D weight a convolution;
a 2-D weight with a matching bias a Linear (a bias of shape[1] entries: a Linear stored
(in, out), as GPT-2's Conv1D stores it: layouts.py tells which); a 1-D weight with a bias
of the same size a normalisation, one with no bias in a norm's place an RMSNorm. Where shapes
cannot tell (a 2-D weight alone may be a Linear or an Embedding), the module's name must say so,
or the kind is 'unknown'.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from itertools import compress, repeat
from operator import attrgetter, itemgetter, not_
from dataclasses import dataclass
from typing import Mapping

from ..bulk import paused_gc
from .tensor import Tensor

LAYER_KINDS = ("conv", "linear", "batchnorm", "layernorm", "groupnorm", "rmsnorm", "norm", "embedding", "prelu",
               "rnn")
KINDS = LAYER_KINDS + ("unknown",)
ROLES = ("weight", "bias", "buffer", "parameter")
NORMS = ("batchnorm", "layernorm", "groupnorm", "rmsnorm", "norm")
# ... and transformers' buffers named like biases: DeepSeek-V3's router correction, BART's logits bias
KNOWN_BUFFERS = {"running_mean", "running_var", "num_batches_tracked", "position_ids", "inv_freq",
                 "masked_bias", "token_type_ids", "e_score_correction_bias", "final_logits_bias"}

# GGUF's llama-style names (llama.cpp's tensor names) too: token_embd, attn_q, attn_output, ffn_up, output
_EMBEDDING = re.compile(r"(^|_)(embed\w*|emb|embd|wte|wpe)$")
_LINEAR = re.compile(r"(^|_)(proj|fc\d*|linear\d*|dense|head|classifier|query|key|value|qkv|gate|lin\d*|"
                     r"out|output|up|down|w[123]|[qkvo])(_\w+)?$")
_LAYERNORM = re.compile(r"(layernorm|layer_norm|ln(_?\w+)?|ln\d*)$")
_GROUPNORM = re.compile(r"(groupnorm|group_norm|gn\d*)$")
_RMSNORM = re.compile(r"(rmsnorm|rms_norm)\w*$")
_NORM = re.compile(r"norm")
_PRELU = re.compile(r"prelu")
# nn.LSTM/GRU/RNN: weight_ih_l0, bias_hh_l1_reverse, weight_hr_l0 (proj_size); their cells: weight_ih, bias_hh
RECURRENT = re.compile(r"(weight|bias)_(ih|hh|hr)(_l\d+(_reverse)?)?")


@dataclass(frozen=True)
class Kind:
    """The layer a tensor belongs to (one of LAYER_KINDS, or 'unknown') and its role in it."""

    layer: str
    role: str

    def matches(self, wanted: str) -> bool:
        """Whether this is what ``--kind wanted`` selects."""
        if wanted == "norm":
            return self.layer in NORMS
        if wanted == "parameter":
            return self.role != "buffer"
        if wanted in ROLES:
            return self.role == wanted
        return self.layer == wanted

    def matches_all(self, wanted: list[str]) -> bool:
        """Whether this is what ``-k`` for each of ``wanted`` selects: any of the layer
        kinds asked for (when any is), and any of the roles asked for (when any is)."""
        layers = [w for w in wanted if w not in ROLES]
        roles = [w for w in wanted if w in ROLES]
        return all(not family or any(self.matches(w) for w in family) for family in (layers, roles))


def split_name(name: str) -> tuple[str, str]:
    """(module, leaf) of a tensor name; 'attn.in_proj_weight' is leaf 'weight' of module 'attn.in_proj'."""
    prefix, _, leaf = name.rpartition(".")
    if leaf.endswith(_SUFFIXES):
        for suffix in _SUFFIXES:
            if leaf.endswith(suffix) and len(leaf) > len(suffix):
                stem = leaf[: -len(suffix)]
                return (f"{prefix}.{stem}" if prefix else stem), suffix[1:]
    return prefix, leaf


_SUFFIXES = ("_weight", "_bias")


def infer_kinds(tensors: Mapping[str, Tensor]) -> dict[str, Kind]:
    """The kind of every tensor, by name, in the same order."""
    return dict(zip(tensors, kinds_in_order(tensors)))


@paused_gc()
def kinds_in_order(tensors: Mapping[str, Tensor]) -> list[Kind]:
    """The kind of each tensor, in order.

    A checkpoint of 100,000 tensors repeats a few module shapes, and each step here is a pass in
    C over all tensors. A module of one tensor (most of a large model's) is told by (its name's
    last part, the leaf, shape and dtype); a module of several by its last part, leaves and
    shapes, grouped one by one. Numbered modules ('layers.7', a Sequential's '0') have no name
    to go by and share one."""
    names, values = list(tensors), list(tensors.values())
    parts = list(map(str.rpartition, names, repeat(".")))
    prefixes, leaves = list(map(_FIRST, parts)), list(map(_LAST, parts))
    module_leaves = leaves
    if any(map(str.endswith, leaves, repeat(_SUFFIXES))):  # 'in_proj_weight' is leaf 'weight' of 'in_proj'
        pairs = list(map(split_name, names))
        prefixes, module_leaves = list(map(_FIRST, pairs)), list(map(_SECOND, pairs))
    components = list(map(_LAST, map(str.rpartition, prefixes, repeat("."))))
    numbered = dict.fromkeys(filter(str.isdigit, components), "")
    if numbered:  # a list's or Sequential's index says nothing of the module
        components = list(map(numbered.get, components, components))
    shapes, dtypes = list(map(_SHAPE, values)), list(map(_DTYPE_NAME, values))
    if len(set(prefixes)) == len(prefixes):
        alone = None  # every module holds one tensor
    else:
        sizes = Counter(prefixes)
        alone = list(map(_ONE, map(sizes.__getitem__, prefixes)))
    keys = list(compress(zip(components, module_leaves, leaves, shapes, dtypes), alone or repeat(True)))
    kind_of = {key: Kind(module_kind(key[0], {key[1]: tensor}), role(key[2], tensor))
               for key, tensor in dict(zip(keys, compress(values, alone or repeat(True)))).items()}
    singles = map(kind_of.__getitem__, keys)
    if alone is None:
        return list(singles)
    several = list(map(not_, alone))
    together: dict[str, dict[str, Tensor]] = {}
    for prefix, leaf, tensor in compress(zip(prefixes, module_leaves, values), several):
        together.setdefault(prefix, {})[leaf] = tensor
    components_of, layer_of_key, layer_of = dict(zip(prefixes, components)), {}, {}
    for prefix, held in together.items():
        key = (components_of[prefix], *held, *map(_SHAPE, held.values()))
        layer = layer_of_key.get(key)
        if layer is None:
            layer_of_key[key] = layer = module_kind(key[0], held)
        layer_of[prefix] = layer
    keys = list(zip(map(layer_of.__getitem__, compress(prefixes, several)), compress(leaves, several),
                    compress(dtypes, several), map(len, compress(shapes, several))))
    kind_of = {key: Kind(key[0], role(key[1], tensor))
               for key, tensor in dict(zip(keys, compress(values, several))).items()}
    grouped = map(kind_of.__getitem__, keys)
    return [next(singles) if one else next(grouped) for one in alone]


_SHAPE, _FIRST, _SECOND, _LAST = attrgetter("shape"), itemgetter(0), itemgetter(1), itemgetter(2)
_DTYPE_NAME = attrgetter("dtype.name")
_ONE = (1).__eq__


def role(leaf: str, tensor: Tensor) -> str:
    """'weight', 'bias', 'buffer' or 'other' for a tensor named ``...leaf``."""
    if leaf in KNOWN_BUFFERS or not (tensor.dtype.floating or tensor.dtype.complex):
        return "buffer"
    if leaf == "weight" or leaf.endswith("_weight") or leaf in ("weight_g", "weight_v", "weight_orig"):
        return "weight"
    if (leaf == "bias" or leaf.endswith("_bias")) and (len(tensor.shape) <= 1 or leaf.endswith("_proj_bias")):
        return "bias"  # a projection's bias may be stacked per expert: gpt-oss's experts.down_proj_bias [E, out]
    recurrent = RECURRENT.fullmatch(leaf)
    if recurrent and len(tensor.shape) == {"weight": 2, "bias": 1}[recurrent.group(1)]:
        return recurrent.group(1)
    return "other"


def module_kind(prefix: str, leaves: Mapping[str, Tensor]) -> str:
    """The layer kind of the module ``prefix`` holding ``leaves`` (leaf name -> tensor)."""
    component = prefix.rpartition(".")[2].lower()
    weight, bias = leaves.get("weight"), leaves.get("bias")
    if ("running_mean" in leaves or "running_var" in leaves) and (weight is None or len(weight.shape) == 1):
        return "batchnorm"
    if weight is None:
        return "rnn" if _recurrent(leaves) else "unknown"
    ndim = len(weight.shape)
    bias_ok = bias is None or (len(bias.shape) == 1 and _conv_bias_fits(weight, bias.shape[0]))
    if ndim in (3, 4, 5) and bias_ok:
        return "conv"
    if ndim == 2:
        if bias is not None:
            return "linear" if len(bias.shape) == 1 and bias.shape[0] in weight.shape else "unknown"
        return _named_2d(component)
    if ndim == 1:
        if bias is not None and bias.shape == weight.shape:
            return _norm_kind(component) or "norm"
        if _PRELU.search(component):
            return "prelu"
        return _biasless_norm_kind(component) or "unknown"
    return "unknown"


def fans(shape: tuple[int, ...], in_out: bool = False) -> tuple[int, int]:
    """(fan_in, fan_out) as torch.nn.init computes them, for a weight stored (out, in, *kernel), or
    with ``in_out`` (in, out) as GPT-2's Conv1D stores it."""
    field = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * field, shape[0] * field
    return (fan_out, fan_in) if in_out else (fan_in, fan_out)


@functools.lru_cache(maxsize=4096)
def _named_2d(component: str) -> str:
    """The kind of a lone 2-D weight, from its module's name (names repeat across layers: cached)."""
    if _EMBEDDING.search(component):
        return "embedding"
    return "linear" if _LINEAR.search(component) else "unknown"


def _recurrent(leaves: Mapping[str, Tensor]) -> bool:
    """Whether ``leaves`` are an LSTM/GRU/RNN's: every weight_ih has a weight_hh of as many
    gate rows, and every leaf is one of theirs."""
    if not all(RECURRENT.fullmatch(leaf) for leaf in leaves):
        return False
    pairs = [(w, leaves.get("weight_hh" + leaf[len("weight_ih"):])) for leaf, w in leaves.items()
             if leaf.startswith("weight_ih")]
    return bool(pairs) and all(hh is not None and len(w.shape) == len(hh.shape) == 2 and w.shape[0] == hh.shape[0]
                               for w, hh in pairs)


def _conv_bias_fits(weight: Tensor, size: int) -> bool:
    """Whether a convolution weight admits a bias of ``size``: its out channels (dim 0), or for
    a transposed one (in, out/groups, ...) dim 1 times a number of groups dividing dim 0."""
    if size == weight.shape[0]:
        return True
    if len(weight.shape) < 2 or not weight.shape[1] or size % weight.shape[1]:
        return False
    groups = size // weight.shape[1]
    return groups > 0 and weight.shape[0] % groups == 0


def _biasless_norm_kind(component: str) -> str | None:
    """A norm's 1-D weight with no bias beside it: an RMSNorm (Llama's input_layernorm and
    model.norm, T5's layer_norm, Mistral's), as LayerNorm always carries a bias; GroupNorm keeps its name."""
    kind = _norm_kind(component)
    return "rmsnorm" if kind in ("layernorm", "norm") else kind


def _norm_kind(component: str) -> str | None:
    if _RMSNORM.search(component):
        return "rmsnorm"
    if _GROUPNORM.fullmatch(component) or "groupnorm" in component or "group_norm" in component:
        return "groupnorm"
    if _LAYERNORM.fullmatch(component) or "layernorm" in component or "layer_norm" in component:
        return "layernorm"
    if _NORM.search(component):
        return "norm"
    return None
