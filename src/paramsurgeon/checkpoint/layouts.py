"""Which way each 2-D weight of a checkpoint is stored: nn.Linear's (out, in), ``linear``, or GPT-2
Conv1D's (in, out), ``transposed``. PEFT lays an adapter over a module by its type, whatever the
adapter's config says: it forces ``fan_in_fan_out`` on for a Conv1D and off for an nn.Linear
(tuners/lora/layer.py ``dispatch_default``), so one adapter of a GPT-2 holds both layouts.

A checkpoint holds no module types; the tensors tell them. A weight with a bias of length shape[0]
only is (out, in), of length shape[1] only (in, out); a 2-D weight without a bias is an nn.Linear's
(transformers' Conv1D always has a bias). A square weight with a bias follows the weights told so
nearest it in the model (its block's, else its layer's, ...): GPT-2's ``attn.c_proj`` follows
``attn.c_attn``, BERT's ``query`` its layer's ``intermediate.dense``. Where the nearest disagree, or
there are none, the layout is not told (None).
"""

from __future__ import annotations

from typing import Mapping

from .kinds import split_name
from .tensor import Tensor


def weight_layouts(tensors: Mapping[str, Tensor]) -> dict[str, str | None]:
    """The layout of every 2-D weight in ``tensors``, by name: 'linear', 'transposed' or None."""
    modules: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for name, tensor in tensors.items():
        module, leaf = split_name(name)
        if leaf in ("weight", "bias"):
            modules.setdefault(module, {})[leaf] = (name, tensor)
    layouts, told, pending = {}, {}, {}
    for module, leaves in modules.items():
        if "weight" not in leaves or len(leaves["weight"][1].shape) != 2:
            continue
        name, weight = leaves["weight"]
        rows, columns = weight.shape
        bias = leaves.get("bias", (None, None))[1]
        if bias is None or len(bias.shape) != 1:
            layouts[name] = "linear"
        elif bias.shape[0] == rows != columns:
            layouts[name] = told[module] = "linear"
        elif bias.shape[0] == columns != rows:
            layouts[name] = told[module] = "transposed"
        else:
            pending[module] = name
    near: dict[str, set[str]] = {}  # each module path -> the layouts told under it
    for module, layout in told.items():
        for prefix in _ancestors(module):
            near.setdefault(prefix, set()).add(layout)
    for module, name in pending.items():
        found = next((near[p] for p in _ancestors(module) if p in near), set())
        layouts[name] = next(iter(found)) if len(found) == 1 else None
    return layouts


def stored_in_out(tensors: Mapping[str, Tensor]) -> set[str]:
    """The 2-D weights told to be stored (in, out), as GPT-2's Conv1D stores them: their fan-in is dim 0."""
    return {name for name, layout in weight_layouts(tensors).items() if layout == "transposed"}


def _ancestors(module: str):
    """'a.b.c' -> 'a.b', 'a', '' (the model)."""
    while module:
        module = module.rpartition(".")[0]
        yield module
