"""The merge plan: every input checked against the checkpoint written (names, shapes, dtypes,
ties), every problem reported at once; then one lazy Change per merged tensor or tie group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ...checkpoint import Checkpoint, Tensor
from ...dtypes import DType
from ...errors import PlanError
from ...selection import matches
from ...sizes import plural
from ..plan import Change, Plan, names_list, overflow_error, overflow_problem, tie_units
from ..schemes import tensor_seed
from ..spec import with_warnings


@dataclass
class MergePlan(Plan):
    """A merge's plan, with what a dry run shows beside the changes."""

    method: str = ""
    inputs: list[str] = field(default_factory=list)
    base: str | None = None
    weights: list[float] = field(default_factory=list)

    def document(self) -> dict:
        """The merge's own entries of the --json plan."""
        return {"method": self.method, "inputs": self.inputs, "base": self.base, "weights": self.weights,
                "kept": self.kept}


def plan_merge(merge, ckpt: Checkpoint, others: list[Checkpoint], kept_in: str | None = None) -> MergePlan:
    """The plan of ``merge`` (a Merge) writing ``ckpt``, with ``others`` read beside it;
    ``kept_in`` names where the tensors not merged stay, when not in ``ckpt`` (a recipe's own)."""
    warnings: list[str] = []
    tensors = ckpt.tensors
    selected, problems = merge.choose(tensors, ckpt.key)
    warnings += problems
    first = ckpt.source
    kept: list[dict] = []
    unselected = [n for n in tensors if n not in set(selected)]
    kept += [{"name": n, "reason": "not selected"} for n in unselected]

    hard, mismatched = [], []  # problems: never allowed / allowed with --skip-mismatched
    floats = []
    for name in selected:
        tensor = tensors[name]
        kinds = [(other.source, other.tensors[name]) for other in others if name in other.tensors]
        odd = [f"{t.dtype} in {src}" for src, t in kinds if t.dtype.floating != tensor.dtype.floating]
        if odd:
            hard.append(f"'{name}' is {tensor.dtype} in {first} but {', '.join(odd)} (integer tensors are never"
                        " combined with floating-point ones)")
        elif tensor.dtype.floating:
            floats.append(name)
        else:
            kept.append({"name": name, "reason": f"{tensor.dtype} (not combined)"})

    units = tie_units(ckpt, floats, follow=merge.follow_ties, untie=merge.untie, command="merge")
    ties = [_tie_map(c) for c in [ckpt] + others] if not merge.untie else None
    merged_units = []
    missing = {other.source: [n for unit in units for n in unit if n not in other.tensors] for other in others}
    for unit in units:
        found = _mismatches(unit, ckpt, others, ties)
        if found:
            mismatched += [f for f in found if not any(n in missing[o.source] for o in others for n in unit)]
            kept += [{"name": n, "reason": "; ".join(found)} for n in unit]
        else:
            merged_units.append(unit)
    mismatched[:0] = [f"{plural(len(names), 'tensor')} of {first} {'is' if len(names) == 1 else 'are'} missing"
                      f" from {source}: {names_list(names)}" for source, names in missing.items() if names]
    if not merge.selector.narrows:
        everywhere = set(tensors)
        for other in others:
            extra = [n for n in other.tensors if n not in everywhere
                     and not any(matches(n, x) for x in merge.exclude)]
            if extra:
                mismatched.append(f"{other.source} has {plural(len(extra), 'tensor')} that {first} lacks:"
                                  f" {names_list(extra)}")
    if mismatched and not merge.skip_mismatched:
        hard += mismatched
    if hard:
        shown = "; ".join(hard[:8]) + (f"; and {len(hard) - 8} more" if len(hard) > 8 else "")
        fix = f"; pass --skip-mismatched to take those from {kept_in or first}" \
            if mismatched and not merge.skip_mismatched else ""
        raise PlanError(f"merge: {shown}{fix}")

    weights = merge.weight_values
    description = _description(merge, ckpt, others)
    plan = MergePlan("merge", description, heading=description, method=merge.method,
                     inputs=[ckpt.source] + [o.source for o in others] if merge.base is None
                     else [o.source for o in others], base=ckpt.source if merge.base is not None else None,
                     weights=weights if "weights" in merge.merge_method.takes else [],
                     kept=[{**k, "shape": list(tensors[k["name"]].shape), "dtype": tensors[k["name"]].dtype.name}
                           for k in kept])
    guarded = not merge.allow_overflow and not merge.merge_method.bounded(merge.params)
    for unit in merged_units:
        tensor = tensors[unit[0]]
        values = [tensor] + [other.tensors[unit[0]] for other in others]
        plan.changes.append(Change(unit, merge.method, tensor.shape, tensor.dtype.name,
                                   _compute(merge, unit[0], values, guarded), lazy=True, guarded=guarded))
    plan.notes += _notes(kept, kept_in or first, mismatched if merge.skip_mismatched else [])
    return with_warnings(plan, warnings)


def _tie_map(ckpt: Checkpoint) -> dict[str, frozenset]:
    """Each tied name -> the names tied together with it (itself included)."""
    return {n: frozenset(g) for g in ckpt.ties() for n in g}


def _mismatches(unit: list[str], ckpt: Checkpoint, others: list[Checkpoint],
                ties: list[dict] | None) -> list[str]:
    """How the other inputs differ from ``ckpt`` for the names of ``unit`` (one tie group);
    ``ties``: the tie maps of ckpt and the others, or None not to compare ties (--untie)."""
    found = []
    for index, other in enumerate(others, 1):
        for name in unit:
            theirs = other.tensors.get(name)
            if theirs is None:
                found.append(f"'{name}' is missing from {other.source}")
            elif theirs.shape != ckpt[name].shape:
                found.append(f"'{name}' is {list(ckpt[name].shape)} in {ckpt.source} but {list(theirs.shape)} in"
                             f" {other.source}")
        if ties is not None and not found:
            mine, theirs_group = ties[0].get(unit[0], frozenset()), ties[index].get(unit[0], frozenset())
            if mine != theirs_group:
                found.append(_tie_difference(unit[0], ckpt.source, mine, other.source, theirs_group))
    return found


def _tie_difference(name: str, first: str, mine: frozenset, other: str, theirs: frozenset) -> str:
    def shown(group: frozenset) -> str:
        return ", ".join(sorted(group))

    if not theirs:
        return f"'{name}' is tied ({shown(mine)}) in {first} but not in {other}"
    if not mine:
        return f"'{name}' is tied ({shown(theirs)}) in {other} but not in {first}"
    return f"'{name}' is tied to {shown(mine)} in {first} but to {shown(theirs)} in {other}"


def _refuse_overflow(name: str, merged, dtype: DType, views: list) -> None:
    """Merged values (before their rounding to ``dtype``, or after) that ``dtype`` cannot hold, where
    every input was finite, are an error (raised while the writer streams: a file output is then
    never renamed into place)."""
    from ...checkpoint.values import overflowing

    count = overflowing(merged, dtype, *views)
    if count:
        raise overflow_error("merge", [overflow_problem(name, count, merged.numel(), dtype)])


def _compute(merge, name: str, values: list[Tensor], guarded: bool) -> Callable:
    """What computes the merged values of ``name`` from the lazy ``values`` (one per input, the
    written one first), in the written one's dtype. A dtype without Inf (float8_e4m3fn) hides an
    overflow in its rounding: when ``guarded``, such values are checked in the working dtype first."""
    method, params = merge.merge_method, merge.params

    def compute():
        import torch

        from ...checkpoint.values import to_torch
        from . import methods

        views = [to_torch(v) for v in values]
        work, dtype = methods.working_dtype(views), views[0].dtype
        wide = guarded and not values[0].dtype.has_inf
        generator = torch.Generator().manual_seed(tensor_seed(params.seed, name)) if method.random else None
        merged = method.compute(views, params, work, work if wide else dtype, generator)
        if not merge.allow_overflow:
            _refuse_overflow(name, merged, values[0].dtype, views)
        return merged.to(dtype)

    return compute


def _description(merge, ckpt: Checkpoint, others: list[Checkpoint]) -> str:
    """'merge ties of a.pt, b.pt over base.pt (weights 1, 1; density 0.5; lambda 1)' for the file's history."""
    if merge.base is not None:
        what = f"{', '.join(o.source for o in others)} over {ckpt.source}"
    else:
        what = ", ".join([ckpt.source] + [o.source for o in others])
    details = merge.merge_method.details(merge.params, merge.normalize)
    return f"merge {merge.method} of {what}" + (f" ({'; '.join(details)})" if details else "")


def _notes(kept: list[dict], first: str, mismatched: list[str]) -> list[str]:
    """One note per reason a tensor is taken from the first input."""
    by_reason: dict[str, list[str]] = {}
    for entry in kept:
        reason = entry["reason"]
        key = "integer" if reason.endswith("(not combined)") else ("mismatched" if reason != "not selected"
                                                                   else reason)
        by_reason.setdefault(key, []).append(entry["name"])
    notes = []
    if "integer" in by_reason:
        names = by_reason["integer"]
        notes.append(f"note: took {len(names)} integer tensor{'s' if len(names) > 1 else ''} from {first} (step"
                     f" counters are not combined): {names_list(names, 3)}")
    if "not selected" in by_reason:
        names = by_reason["not selected"]
        notes.append(f"took {len(names)} unselected tensor{'s' if len(names) > 1 else ''} from {first}:"
                     f" {names_list(names, 3)}")
    if mismatched:
        notes.append(f"note: took from {first}, because the inputs differ (--skip-mismatched): {'; '.join(mismatched)}")
    return notes
