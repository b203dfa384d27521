"""The operations: each turns a checkpoint and the user's choices into a Plan, checking
every name, shape, dtype and tie first and reporting every problem at once.

Nothing here reads a file or writes one; values are computed only when the plan is
applied (plan.apply), from the selected tensors' current values.
"""

from __future__ import annotations

from typing import Callable

from .. import dtypes
from . import schemes
from ..checkpoint import Checkpoint, Tensor
from ..errors import PlanError, SelectionError
from ..checkpoint.extras import is_optimizer_state
from ..checkpoint.kinds import infer_kinds
from .plan import Change, Plan, tie_units
from .schemes import Scheme
from ..selection import suggest, wildcard_map

CAST_TARGETS = ("float32", "float16", "bfloat16", "float64")


def _values(tensor: Tensor):
    from ..checkpoint.values import to_torch

    return to_torch(tensor)


def _copy_of(tensor: Tensor, dtype) -> Callable:
    """What computes ``tensor``'s values as ``dtype``: its bytes, copied, when nothing converts
    (no torch needed), else torch's cast."""
    if tensor.dtype == dtype and tensor.is_contiguous:
        return lambda: bytearray(tensor.contiguous_bytes())
    return lambda: _values(tensor).to(dtypes.torch_dtype(dtype))


def _fail(command: str, problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PlanError(f"{command}: {shown}")


def _names_list(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _value_plan(command: str, description: str, ckpt: Checkpoint, names: list[str], follow: bool, untie: bool,
                change_for: Callable[[list[str], Tensor], Change | str | None]) -> Plan:
    """A plan changing the values of ``names``, one Change per tie unit (or a problem string)."""
    plan = Plan(command, description)
    problems = []
    for unit in tie_units(ckpt, names, follow=follow, untie=untie, command=command):
        result = change_for(unit, ckpt[unit[0]])
        if isinstance(result, str):
            problems.append(f"'{unit[0]}' {result}")
        elif result is not None:
            plan.changes.append(result)
    _fail(command, problems)
    return plan


def plan_init(ckpt: Checkpoint, names: list[str], scheme: Scheme, seed: int, *, layer: str | None = None,
              follow: bool = False, untie: bool = False) -> Plan:
    """Re-initialise ``names`` with ``scheme`` ('default': what each layer's reset_parameters gives)."""
    kinds = infer_kinds(ckpt.tensors)
    tensors = ckpt.tensors

    def change_for(unit: list[str], tensor: Tensor):
        name = unit[0]
        resolved = scheme
        if scheme.name == "default":
            weight = tensors.get(name[: -len("bias")] + "weight") if name.endswith("bias") else tensor
            resolved = schemes.layer_default(layer or kinds[name].layer, name.rpartition(".")[2],
                                             weight.shape if weight else None)
            if isinstance(resolved, str):
                return resolved
        floating = tensor.dtype.floating
        problem = resolved.problem(tensor.shape, floating)
        if problem:
            return problem
        if tensor.dtype.name == "bool" and resolved.name == "constant" and resolved.kwargs["val"] not in (0, 1):
            return "is boolean; only --const 0 or 1 fits it"
        shape, dtype = tensor.shape, dtypes.torch_dtype(tensor.dtype)
        return Change(unit, str(resolved), shape, tensor.dtype.name,
                      lambda: schemes.fill(resolved, shape, dtype, seed, name))

    what = str(scheme) if scheme.name != "constant" else f"constant {scheme.kwargs['val']}"
    seeded = f", seed {seed}" if scheme.random else ""
    plan = _value_plan("init", "", ckpt, names, follow, untie, change_for)
    plan.description = f"init {what}{seeded}: {_names_list(names)}"
    return plan


def plan_zero(ckpt: Checkpoint, names: list[str], *, below: float | None = None, follow: bool = False,
              untie: bool = False) -> Plan:
    """Set ``names`` to zero, or with ``below`` only the entries whose magnitude is under it."""
    def change_for(unit: list[str], tensor: Tensor):
        if below is None:  # zero is all-zero bytes in every dtype: no torch needed
            return Change(unit, "zero", tensor.shape, tensor.dtype.name, lambda: bytearray(tensor.nbytes))
        if tensor.dtype.name == "bool" or tensor.dtype.complex:
            return f"is {tensor.dtype}, which has no magnitude to compare with --below"
        return Change(unit, f"zero where |x| < {below:g}", tensor.shape, tensor.dtype.name,
                      lambda: _prune(_values(tensor), below))

    what = f"zero |x| < {below:g}" if below is not None else "zero"
    return _value_plan("zero", f"{what}: {_names_list(names)}", ckpt, names, follow, untie, change_for)


def _prune(values, below: float):
    import torch

    return torch.where(values.abs() < below, torch.zeros((), dtype=values.dtype), values)


def plan_scale(ckpt: Checkpoint, names: list[str], factor: float, *, follow: bool = False,
               untie: bool = False) -> Plan:
    """Multiply ``names`` by ``factor`` (in each tensor's own dtype)."""
    def change_for(unit: list[str], tensor: Tensor):
        if tensor.dtype.name == "bool":
            return "is boolean and cannot be scaled"
        if not (tensor.dtype.floating or tensor.dtype.complex) and factor != int(factor):
            return f"is {tensor.dtype}, and scaling it by {factor:g} would truncate"
        by = factor if tensor.dtype.floating or tensor.dtype.complex else int(factor)
        return Change(unit, f"scale by {factor:g}", tensor.shape, tensor.dtype.name,
                      lambda: (_values(tensor) * by).to(dtypes.torch_dtype(tensor.dtype)))

    return _value_plan("scale", f"scale by {factor:g}: {_names_list(names)}", ckpt, names, follow, untie, change_for)


def plan_cast(ckpt: Checkpoint, names: list[str], dtype: str, *, follow: bool = False, untie: bool = False) -> Plan:
    """Change the dtype of the floating-point tensors among ``names``; others are left as they are."""
    target = dtypes.BY_NAME[dtype]
    skipped = [n for n in names if not ckpt[n].dtype.floating]
    already = [n for n in names if ckpt[n].dtype == target]
    chosen = [n for n in names if n not in skipped and n not in already]

    def change_for(unit: list[str], tensor: Tensor):
        return Change(unit, f"cast to {dtype}", tensor.shape, dtype, _copy_of(tensor, target))

    plan = _value_plan("cast", f"cast to {dtype}: {_names_list(chosen)}", ckpt, chosen, follow, untie, change_for)
    if skipped:
        plan.notes.append(f"left {len(skipped)} non-floating-point tensors as they are ({_names_list(skipped, 3)})")
    if already:
        plan.notes.append(f"{len(already)} tensors are already {dtype}")
    return plan


def copy_pairs(ckpt: Checkpoint, source: Checkpoint, from_glob: str | None, to_glob: str | None,
               targets: list[str] | None) -> tuple[dict[str, str], list[str]]:
    """Target name -> source name, and report lines (for --source without --from/--to).

    With globs: every source name matching ``from_glob`` maps to ``to_glob``; each target
    must exist. Without: every name present on both sides (restricted to ``targets``).
    """
    mine, theirs = ckpt.tensors, source.tensors
    if from_glob is None:
        allowed = set(targets) if targets is not None else set(mine)
        pairs = {n: n for n in mine if n in theirs and n in allowed}
        only_source = [n for n in theirs if n not in mine]
        only_target = [n for n in mine if n not in theirs and n in allowed]
        report = []
        if only_source:
            report.append(f"only in the source ({len(only_source)}): {_names_list(only_source)}")
        if only_target:
            report.append(f"only in the target, kept ({len(only_target)}): {_names_list(only_target)}")
        if not pairs:
            raise SelectionError(f"copy: no tensor name is in both {source.source} and {ckpt.source}"
                                 f"{suggest(next(iter(theirs), ''), list(mine))}; map names with --from/--to")
        return pairs, report
    mapping = wildcard_map(from_glob, to_glob, list(theirs))
    if not mapping:
        raise SelectionError(f"copy: --from '{from_glob}' matches no tensor in {source.source}"
                             f"{suggest(from_glob, list(theirs))}")
    missing = [t for t in mapping.values() if t not in mine]
    if missing:
        raise SelectionError(f"copy: no target tensor named {_names_list([repr(m) for m in missing])} in"
                             f" {ckpt.source}{suggest(missing[0], list(mine))}; copy writes into existing tensors")
    pairs = {t: s for s, t in mapping.items() if targets is None or t in targets}
    return pairs, []


def plan_copy(ckpt: Checkpoint, source: Checkpoint, pairs: dict[str, str], *, skip_mismatched: bool = False,
              follow: bool = False, untie: bool = False, report: list[str] | None = None) -> Plan:
    """Copy values from ``source`` (maybe ``ckpt`` itself) by ``pairs`` (target -> source name),
    cast to each target's dtype. Shapes must match unless ``skip_mismatched``."""
    theirs = source.tensors
    mismatched = {t: s for t, s in pairs.items() if ckpt[t].shape != theirs[s].shape}
    if mismatched and not skip_mismatched:
        shown = [f"'{s}' {list(theirs[s].shape)} -> '{t}' {list(ckpt[t].shape)}" for t, s in mismatched.items()]
        _fail("copy", [f"shape mismatch for {line}" for line in shown[:-1]]
              + [f"shape mismatch for {shown[-1]}; pass --skip-mismatched to skip"])
    pairs = {t: s for t, s in pairs.items() if t not in mismatched}
    notes = list(report or [])
    if mismatched:
        notes.insert(0, f"skipped {len(mismatched)} with a shape mismatch: "
                        + _names_list([f"{t} {list(ckpt[t].shape)} vs {list(theirs[s].shape)}"
                                       for t, s in mismatched.items()], 4))

    def change_for(unit: list[str], tensor: Tensor):
        sources = sorted({pairs[n] for n in unit if n in pairs})
        if len(sources) > 1:
            return f"is tied to {', '.join(unit[1:])}, and they would get different values; pass --untie"
        origin = theirs[sources[0]]
        where = "" if source is ckpt else f" of {source.source}"
        return Change(unit, f"copy from {sources[0]}{where}", tensor.shape, tensor.dtype.name,
                      _copy_of(origin, tensor.dtype))

    origin = "" if source is ckpt else f" from {source.source}"
    plan = _value_plan("copy", f"copy{origin}: {_names_list([f'{s}->{t}' for t, s in pairs.items()])}", ckpt,
                       list(pairs), follow, untie, change_for)
    plan.notes = notes
    return plan


def plan_tie(ckpt: Checkpoint, source: str, targets: list[str], *, follow: bool = False,
             untie: bool = False) -> Plan:
    """Make ``targets`` share ``source``'s storage (and so its values)."""
    tensors = ckpt.tensors
    if source not in tensors:
        raise SelectionError(f"tie: no tensor named '{source}'{suggest(source, list(tensors))}")
    src = tensors[source]
    group_of = {n: g for g in ckpt.ties() for n in g}
    problems, plan = [], Plan("tie", f"tie to {source}: {_names_list(targets)}")
    for target in targets:
        t = tensors[target]
        if target == source or target in group_of.get(source, []):
            continue
        if (t.shape, t.dtype) != (src.shape, src.dtype):
            problems.append(f"'{target}' {list(t.shape)} {t.dtype} cannot share the storage of '{source}'"
                            f" {list(src.shape)} {src.dtype}")
            continue
        others = [m for m in group_of.get(target, []) if m != target and m not in targets]
        if others and not (follow or untie):
            problems.append(f"'{target}' already shares its storage with {', '.join(others)}; pass --follow-ties"
                            " to tie them all, or --untie to move only it")
            continue
        plan.aliases.append((target, source))
        if follow:
            plan.aliases += [(m, source) for m in others if (m, source) not in plan.aliases]
    _fail("tie", problems)
    return plan


def plan_untie(ckpt: Checkpoint, names: list[str]) -> Plan:
    """Give each selected tensor storage of its own (values unchanged)."""
    plan = Plan("untie", f"untie: {_names_list(names)}")
    selected = set(names)
    for group in ckpt.ties():
        chosen = [n for n in group if n in selected]
        keep_first = len(chosen) == len(group)  # one of them may keep the shared storage
        for name in chosen[1:] if keep_first else chosen:
            tensor = ckpt[name]
            plan.changes.append(Change([name], "untie (own copy)", tensor.shape, tensor.dtype.name,
                                       _copy_of(tensor, tensor.dtype)))
    untied = set(n for c in plan.changes for n in c.names)
    if not plan.changes:
        plan.notes.append("none of the selected tensors shares its storage; nothing to untie")
    elif len(untied) < len(names):
        plan.notes.append(f"{len(names) - len(untied)} selected tensors were not tied (or keep the storage)")
    return plan


def plan_rename(ckpt: Checkpoint, from_glob: str, to_glob: str) -> Plan:
    """Rename by wildcard mapping (``--from 'module.*' --to '*'``); collisions are errors."""
    names = list(ckpt.tensors)
    matched = wildcard_map(from_glob, to_glob, names)
    if not matched:
        raise SelectionError(f"rename: --from '{from_glob}' matches no tensor{suggest(from_glob, names)}")
    mapping = {old: new for old, new in matched.items() if old != new}
    final: dict[str, list[str]] = {}
    for name in ckpt.container:
        final.setdefault(mapping.get(name, name), []).append(name)
    clashes = [f"{' and '.join(repr(o) for o in olds)} would {'both' if len(olds) == 2 else 'all'} be named '{new}'"
               for new, olds in final.items() if len(olds) > 1]
    _fail("rename", clashes)
    plan = Plan("rename", f"rename {from_glob} -> {to_glob}: {len(mapping)} tensors", renames=mapping)
    metadata = getattr(ckpt.container, "_metadata", None)
    if isinstance(metadata, dict):
        probe = "\0"
        for prefix in metadata:
            mapped = wildcard_map(from_glob, to_glob, [f"{prefix}.{probe}" if prefix else probe]).get(
                f"{prefix}.{probe}" if prefix else probe)
            if mapped is not None and mapped.endswith(probe):
                plan.module_renames[prefix] = mapped[:-1].rstrip(".")
    return plan


def plan_drop(ckpt: Checkpoint, names: list[str]) -> Plan:
    """Remove ``names`` from the checkpoint."""
    plan = Plan("drop", f"drop: {_names_list(names)}", drops=list(names))
    if len(names) == len(ckpt.tensors):
        plan.notes.append("every tensor is dropped")
    return plan


def optimizer_paths(ckpt: Checkpoint) -> list[tuple]:
    """Paths of optimizer state dicts in the file (``optimizer``, Lightning's ``optimizer_states.0``)."""
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

