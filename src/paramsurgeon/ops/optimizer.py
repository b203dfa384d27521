"""Optimizer state in a training checkpoint: found, and reset when the parameters it
describes changed (Adam's moments no longer match new values)."""

from __future__ import annotations

from ..checkpoint import Checkpoint, Tensor
from ..checkpoint.extras import is_optimizer_state, summarize


def optimizer_paths(ckpt: Checkpoint) -> list[tuple]:
    """Paths of optimizer state dicts in the file (``optimizer``, Lightning's ``optimizer_states.0``)."""
    if not ckpt.has_extras():  # a file of tensors alone (told in C: 100,000 tensors are not visited one by one)
        return []
    found = []

    def visit(node, path: tuple) -> None:
        if path and path == ckpt.key:
            return
        if is_optimizer_state(node):
            found.append(path)
        elif len(path) < 3 and isinstance(node, (dict, list)):
            for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
                if not isinstance(value, Tensor):
                    visit(value, path + (key,))

    visit(ckpt.root, ())
    return found


def reset_optimizer(ckpt: Checkpoint) -> list[str]:
    """Empty the per-parameter state (moments) of every optimizer, keeping its param groups."""
    reset = []
    for path in optimizer_paths(ckpt):
        ckpt.at(path)["state"] = {}
        reset.append(".".join(map(str, path)))
    return reset


def optimizer_notes(ckpt: Checkpoint, plans: list, reset: bool) -> list[str]:
    """Reset the optimizer state (``reset``) or say that it no longer matches, where values changed.

    Renaming or dropping tensors leaves every value as it was, so it calls for no reset.
    """
    paths = optimizer_paths(ckpt)
    changed = any(plan.changes_values for plan in plans)
    if reset:
        if not paths:
            return ["no optimizer state to reset"]
        return [f"cleared the per-parameter state of '{path}' (param groups kept)" for path in reset_optimizer(ckpt)]
    if not paths or not changed:
        return []
    where = ", ".join(".".join(map(str, p)) for p in paths)
    return [f"note: {ckpt.source} also holds optimizer state at '{where}' ({summarize(ckpt.at(paths[0]))}), which no"
            " longer matches the changed tensors; pass --reset-optimizer to clear its moments"]
