"""apply: an ordered list of operations from a TOML recipe, with one read and one write.

    seed = 3                        # optional: the seed of every step that draws values
    [[step]]
    op = "init"                     # a command name
    pattern = ["features.*.weight"] # that command's options, without the dashes
    scheme = "normal(std=0.02)"

The whole recipe is checked before anything is computed: every step is planned against a
simulation of the steps before it (names, shapes, dtypes and ties, no values), and an error
names its step and key.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Callable

from . import spec as steps
from ..checkpoint import Checkpoint
from ..errors import ParamSurgeonError, UsageError
from .plan import Plan, apply

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class Step:
    number: int
    op: str
    options: dict[str, Any]


def parse(text: str, where: str, default_seed: int | None = None) -> list[Step]:
    """The steps of a recipe, each with checked options; ``default_seed`` fills seedless random steps."""
    try:
        recipe = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where}: not valid TOML ({e})") from e
    unknown = [k for k in recipe if k not in ("step", "seed")]
    if unknown:
        raise UsageError(f"{where}: unknown top-level key '{unknown[0]}'; a recipe has [[step]] tables and"
                         " an optional seed")
    seed = recipe.get("seed", default_seed)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise UsageError(f"{where}: seed must be a whole number")
    tables = recipe.get("step")
    if not isinstance(tables, list) or not tables:
        raise UsageError(f"{where}: no steps; write each operation as a [[step]] table with op = \"...\"")
    parsed = []
    for number, table in enumerate(tables, 1):
        here = f"{where}: step {number}"
        if "op" not in table:
            raise UsageError(f"{here}: missing op (one of {', '.join(steps.OPTIONS)})")
        options = dict(table)
        op = options.pop("op")
        options = steps.normalize(str(op), options, f"{here} ({op})")
        if seed is not None and "seed" not in options and steps.needs_seed(op, options):
            options["seed"] = seed
        parsed.append(Step(number, op, options))
    return parsed


def unseeded(recipe: list[Step]) -> list[Step]:
    """Steps that draw random values but have no seed."""
    return [s for s in recipe if steps.needs_seed(s.op, s.options) and "seed" not in s.options]


def check(ckpt: Checkpoint, recipe: list[Step], load: Callable, where: str) -> list[tuple[Step, Plan, list[dict]]]:
    """Plan every step against a simulation of the ones before it; (step, plan, rows) each."""
    simulated = structural_copy(ckpt)
    planned = []
    for step in recipe:
        plan = _plan(simulated, step, load, where)
        planned.append((step, plan, plan.rows(simulated)))
        apply(simulated, plan, simulate=True)
    return planned


def run(ckpt: Checkpoint, recipe: list[Step], load: Callable, where: str,
        progress: Callable[[int], None] | None = None) -> list[Plan]:
    """Plan and apply each step in turn on ``ckpt`` (call ``check`` first)."""
    plans = []
    for step in recipe:
        plan = _plan(ckpt, step, load, where)
        apply(ckpt, plan, progress)
        plans.append(plan)
    return plans


def _plan(ckpt: Checkpoint, step: Step, load: Callable, where: str) -> Plan:
    try:
        return steps.build_plan(ckpt, step.op, step.options, load)
    except ParamSurgeonError as e:
        e.args = (f"{where}: step {step.number} ({step.op}): {e}", *e.args[1:])
        raise


def structural_copy(ckpt: Checkpoint) -> Checkpoint:
    """A copy whose containers can be changed without touching ``ckpt`` (tensors are shared)."""
    return dataclasses.replace(ckpt, root=_copy_along(ckpt.root, ckpt.key), metadata=dict(ckpt.metadata),
                               notes=list(ckpt.notes))


def _copy_along(node: Any, path: tuple) -> Any:
    clone = copy.copy(node)
    if not path:
        if isinstance(getattr(node, "_metadata", None), dict):
            clone._metadata = dict(node._metadata)
        return clone
    clone[path[0]] = _copy_along(node[path[0]], path[1:])
    return clone
