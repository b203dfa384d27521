"""Running operations on a checkpoint: seeds, a rehearsal that checks every step before
anything is computed, then the real run, and what it means for the optimizer state.

One command is a one-step run; a recipe is a run of several steps.
"""

from __future__ import annotations

import copy
import dataclasses
import secrets
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..checkpoint import Checkpoint
from ..errors import ParamSurgeonError
from ..parallel import Work
from .optimizer import optimizer_notes
from ..checkpoint.quantized import Quantized, refuse_partial
from .plan import Plan, apply, names_list
from .quantization import refuse_unread
from .spec import Operation, Sources


@dataclass
class Step:
    """An operation to run, and how errors and notes name it ('' for a lone command)."""

    operation: Operation
    label: str = ""
    short: str = ""


def draw_seeds(steps: list[Step], seed: int | None) -> tuple[list[Step], list[str]]:
    """Give ``seed`` to every step that draws values and names no seed; without one, draw it
    (and say which, so that the run can be repeated exactly)."""
    unseeded = [s for s in steps if s.operation.random and s.operation.seed is None]
    if not unseeded:
        return steps, []
    notes = []
    if seed is None:
        seed = secrets.randbelow(2**31)
        notes.append(f"seed {seed} (pass --seed {seed} to repeat this exactly)")
    return [dataclasses.replace(s, operation=s.operation.seeded(seed)) if s in unseeded else s for s in steps], notes


def rehearse(ckpt: Checkpoint, steps: list[Step], sources: Sources) -> list[tuple[Step, Plan, list[dict]]]:
    """Plan every step against a simulation of the ones before it (names, shapes, dtypes and
    ties, no values): (step, plan, rows) each. ``ckpt`` is not changed."""
    simulated = structural_copy(ckpt)
    planned = []
    for step in steps:
        plan = _plan(simulated, step, sources)
        planned.append((step, plan, plan.rows(simulated)))
        apply(simulated, plan, simulate=True)
    return planned


def perform(ckpt: Checkpoint, steps: list[Step], sources: Sources, *, reset_optimizer: bool = False,
            progress: Callable[[int], None] | None = None, work: Work = Work()) -> tuple[list[Plan], list[str]]:
    """Plan and apply each step in turn on ``ckpt`` (rehearse first to check them all), overflow
    checks spread over ``work``'s workers; returns the plans and notes about the optimizer state."""
    plans = []
    for step in steps:
        plan = _plan(ckpt, step, sources)
        with _named(step):
            apply(ckpt, plan, progress, work=work)
        plans.append(plan)
    return plans, optimizer_notes(ckpt, plans, reset_optimizer)


def run(ckpt: Checkpoint, steps: list[Step], *, sources: Sources, seed: int | None = None,
        reset_optimizer: bool = False) -> list[Plan]:
    """The library's way to run ``steps`` on ``ckpt`` in memory: seeds drawn where none is named,
    every step checked first, then applied; notes (the seed drawn, the optimizer state) are
    added to the last plan's notes."""
    steps, notes = draw_seeds(steps, seed)
    rehearse(ckpt, steps, sources)
    plans, after = perform(ckpt, steps, sources, reset_optimizer=reset_optimizer)
    plans[-1].notes += notes + after
    return plans


def check_values(ckpt: Checkpoint, steps: list[Step], sources: Sources, plans: list[Plan]) -> None:
    """What a dry run must refuse as the real run would, though only computed values show it
    (new Inf/NaN): when any change may overflow, the steps are performed on a copy, nothing kept."""
    if any(change.guarded for plan in plans for change in plan.changes):
        done, _ = perform(structural_copy(ckpt), steps, sources)
        for change in (c for plan in done for c in plan.changes if c.lazy and c.guarded):
            change.compute()  # a lazy change checks its values when they are computed


def _plan(ckpt: Checkpoint, step: Step, sources: Sources) -> Plan:
    with _named(step):
        return quantized_groups(ckpt, step.operation.plan(ckpt, sources))


def quantized_groups(ckpt: Checkpoint, plan: Plan) -> Plan:
    """``plan``, refused when it changes the values of a part of a group that does not make one (it
    would orphan its partner) or of a checkpoint quantized by a method not read (its tensors may be
    codes), with a note naming the quantized weights it writes as plain tensors."""
    changed = [(n, c) for c in plan.changes for n in c.names if n in ckpt.tensors]
    if any(not c.same_values for _, c in changed):
        refuse_unread(ckpt, plan.command, "they cannot be changed as values")
    refuse_partial(ckpt, [n for n, _ in changed], plan.command)
    plain = [n for n, c in changed if type(ckpt[n]) is Quantized and not (c.dequantizes or c.stored_as)
             and not ckpt[n].scheme.native]
    if plain:
        schemes = sorted({ckpt[n].scheme.name for n in plain})
        dtypes = sorted({c.dtype for n, c in changed if n in plain})
        plan.notes.append(f"{names_list(plain)} {'was' if len(plain) == 1 else 'were'} {' and '.join(schemes)}:"
                          f" written as plain {' and '.join(dtypes)} (the quantized parts dropped)")
    return plan


@contextmanager
def _named(step: Step) -> Iterator[None]:
    """Errors inside carry the step's label (a recipe's 'r.toml: step 2 (init)')."""
    try:
        yield
    except ParamSurgeonError as e:
        if step.label:
            e.within(step.label)
        raise


def structural_copy(ckpt: Checkpoint) -> Checkpoint:
    """A copy whose containers can be changed without touching ``ckpt`` (tensors are shared)."""
    return dataclasses.replace(ckpt, root=_copy_along(ckpt.root, ckpt.key), metadata=dict(ckpt.metadata),
                               notes=list(ckpt.notes), plain=set(ckpt.plain))


def _copy_along(node: Any, path: tuple) -> Any:
    if type(node) in (dict, OrderedDict):  # copied in C (copy.copy sets 100,000 items one by one)
        clone = node.copy()
        if type(node) is OrderedDict:
            clone.__dict__.update(vars(node))  # a state dict's _metadata, as copy.copy keeps it
    else:
        clone = copy.copy(node)
    if not path:
        if isinstance(getattr(node, "_metadata", None), dict):
            clone._metadata = dict(node._metadata)
        return clone
    clone[path[0]] = _copy_along(node[path[0]], path[1:])
    return clone
