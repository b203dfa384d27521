"""Everything in a checkpoint besides its named tensors, summarised in a line each
('epoch: 7', 'optimizer: Adam state for 62 params')."""

from __future__ import annotations

from typing import Any

from ..sizes import human_bytes, plural
from .checkpoint import Checkpoint
from .opaque import Opaque, describe
from .tensor import Tensor

_OPTIMIZERS = [
    ({"exp_avg", "exp_avg_sq"}, "Adam"),
    ({"momentum_buffer"}, "SGD"),
    ({"square_avg"}, "RMSprop"),
    ({"sum"}, "Adagrad"),
    ({"exp_avg"}, "Lion"),
]


def extras(ckpt: Checkpoint) -> list[dict]:
    """One entry per non-tensor item: {'path', 'summary'} and 'value' for plain scalars."""
    return [_entry(path, value) for path, value in ckpt.extra_items()]


def _entry(path: str, value: Any) -> dict:
    entry = {"path": path, "summary": summarize(value)}
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 200):
        entry["value"] = value
    return entry


def summarize(value: Any) -> str:
    """A one-line description of a value read from a checkpoint."""
    if isinstance(value, Tensor):
        return f"tensor {list(value.shape)} {value.dtype}"
    if isinstance(value, dict):
        optimizer = _optimizer(value)
        if optimizer:
            return optimizer
        tensors = _count_tensors(value)
        if tensors and len(value) and all(isinstance(v, Tensor) for v in value.values()):
            return f"{plural(len(value), 'tensor')} ({human_bytes(sum(v.nbytes for v in value.values()))})"
        shown = ", ".join(f"{k}={describe(v, 24)}" for k, v in list(value.items())[:5])
        more = ", ..." if len(value) > 5 else ""
        return f"{{{shown}{more}}}" + (f" with {plural(tensors, 'tensor')}" if tensors else "")
    if isinstance(value, (list, tuple)):
        optimizers = [_optimizer(v) for v in value if isinstance(v, dict)]
        if value and all(optimizers) and len(optimizers) == len(value):
            return "; ".join(optimizers)
        if len(value) <= 4 and all(isinstance(v, (int, float, str, bool)) or v is None for v in value):
            return repr(value)
        return f"{type(value).__name__} of {plural(len(value), 'item')}"
    if isinstance(value, (bytes, bytearray)):
        return plural(len(value), 'byte')
    return describe(value)


def is_optimizer_state(value: Any) -> bool:
    """Whether ``value`` looks like ``optimizer.state_dict()``: per-parameter state and param groups."""
    return isinstance(value, dict) and isinstance(value.get("state"), dict) \
        and isinstance(value.get("param_groups"), list)


def _optimizer(state: dict) -> str | None:
    """'Adam state for 62 params, 1 param group (lr 0.001)' for an optimizer state_dict."""
    if not is_optimizer_state(state):
        return None
    slots = set()
    for per_param in state["state"].values():
        if isinstance(per_param, dict):
            slots |= set(per_param)
    name = next((n for keys, n in _OPTIMIZERS if keys <= slots), "optimizer")
    groups = state["param_groups"]
    lrs = [g.get("lr") for g in groups if isinstance(g, dict) and isinstance(g.get("lr"), (int, float))]
    lr = f", lr {lrs[0]:g}" if lrs else ""
    size = human_bytes(sum(t.nbytes for t in tensors_in(state["state"])))
    return f"{name} state for {plural(len(state['state']), 'param')} ({size}), {plural(len(groups), 'param group')}{lr}"


def tensors_in(value: Any) -> list[Tensor]:
    """Every Tensor reachable from ``value``, depth first (each shared object visited once; by a
    stack, not recursion: a hostile file's lists may nest deeper than Python recurses)."""
    found, seen, stack = [], set(), [value]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, Tensor):
            found.append(value)
            continue
        if isinstance(value, dict):
            items = list(value.values())
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, Opaque):
            items = [*value.args, value.state, *value.items, *(v for _, v in value.dictitems)]
        else:
            continue
        stack.extend(reversed(items))
    return found


def _count_tensors(value: Any) -> int:
    return len(tensors_in(value))
