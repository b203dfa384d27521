"""Which layer a tensor belongs to, inferred from its name, its shape and its siblings.

Tensors are grouped by module (the name without its last part). The module's kind
follows from the tensors it holds: running statistics make a BatchNorm; weight_ih and
weight_hh pairs an LSTM, GRU or RNN (or one of their cells); a 3-5-D weight a convolution;
a 2-D weight with a matching bias a Linear; a 1-D weight with a bias of the same size a
normalisation. Where shapes cannot tell (a 2-D weight alone may be a Linear or an
Embedding), the module's name must say so, or the kind is 'unknown'.
"""

from __future__ import annotations

import functools
import re
from itertools import repeat
from operator import attrgetter, itemgetter
from dataclasses import dataclass
from typing import Mapping

from ..bulk import paused_gc
from .tensor import Tensor

LAYER_KINDS = ("conv", "linear", "batchnorm", "layernorm", "groupnorm", "rmsnorm", "norm", "embedding", "prelu",
               "rnn")
KINDS = LAYER_KINDS + ("unknown",)
ROLES = ("weight", "bias", "buffer", "parameter")
NORMS = ("batchnorm", "layernorm", "groupnorm", "rmsnorm", "norm")
KNOWN_BUFFERS = {"running_mean", "running_var", "num_batches_tracked", "position_ids", "inv_freq",
                 "masked_bias", "token_type_ids"}

_EMBEDDING = re.compile(r"(^|_)(embed\w*|emb|wte|wpe)$")
_LINEAR = re.compile(r"(^|_)(proj|fc\d*|linear\d*|dense|head|classifier|query|key|value|qkv|gate|lin\d*|"
                     r"out|w[123]|[qkvo])(_\w+)?$")
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


@paused_gc()
def infer_kinds(tensors: Mapping[str, Tensor]) -> dict[str, Kind]:
    """The kind of every tensor, in the same order.

    A checkpoint of 100,000 tensors repeats a few module shapes: a module's layer kind is worked
    out once per (its name's last part, leaf names, shapes), and a tensor's kind once per
    (layer kind, leaf, floating or not, number of dimensions); numbered modules ('layers.7',
    a Sequential's '0') have no name to go by and share one."""
    modules: dict[str, dict[str, Tensor]] = {}
    prefixes, leaves_of = [], []
    add_prefix, add_leaf, module = prefixes.append, leaves_of.append, modules.get
    for name, tensor in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        add_leaf(leaf)
        if leaf.endswith(_SUFFIXES):
            prefix, leaf = split_name(name)
        leaves = module(prefix)
        if leaves is None:
            modules[prefix] = {leaf: tensor}
        else:
            leaves[leaf] = tensor
        add_prefix(prefix)
    layers: dict[tuple, str] = {}
    found = []
    for leaves, component in zip(modules.values(), map(_LAST, map(str.rpartition, modules, repeat(".")))):
        if component.isdigit():
            component = ""
        if len(leaves) == 1:
            [(leaf, tensor)] = leaves.items()
            key = (component, leaf, tensor.shape)
        else:
            key = (component, *leaves, *map(_SHAPE, leaves.values()))
        layer = layers.get(key)
        if layer is None:
            layers[key] = layer = module_kind(component, leaves)
        found.append(layer)
    layer_of = dict(zip(modules, found))
    kinds: dict[tuple, Kind] = {}
    found = []
    add, known = found.append, kinds.get
    for layer, leaf, tensor in zip(map(layer_of.__getitem__, prefixes), leaves_of, tensors.values()):
        dtype = tensor.dtype
        key = (layer, leaf, dtype.floating or dtype.complex, len(tensor.shape))
        kind = known(key)
        if kind is None:
            kinds[key] = kind = Kind(layer, role(leaf, tensor))
        add(kind)
    return dict(zip(tensors, found))


_SHAPE, _LAST = attrgetter("shape"), itemgetter(2)


def role(leaf: str, tensor: Tensor) -> str:
    """'weight', 'bias', 'buffer' or 'other' for a tensor named ``...leaf``."""
    if leaf in KNOWN_BUFFERS or not (tensor.dtype.floating or tensor.dtype.complex):
        return "buffer"
    if leaf == "weight" or leaf.endswith("_weight") or leaf in ("weight_g", "weight_v", "weight_orig"):
        return "weight"
    if (leaf == "bias" or leaf.endswith("_bias")) and len(tensor.shape) <= 1:
        return "bias"
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
            return "linear" if len(bias.shape) == 1 and bias.shape[0] == weight.shape[0] else "unknown"
        return _named_2d(component)
    if ndim == 1:
        if bias is not None and bias.shape == weight.shape:
            return _norm_kind(component) or "norm"
        if _PRELU.search(component):
            return "prelu"
        return _norm_kind(component) or "unknown"
    return "unknown"


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
