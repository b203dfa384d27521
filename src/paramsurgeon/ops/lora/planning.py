"""The merge-lora plan: each adapter tensor mapped to the base tensor it updates, every mismatch
reported at once; then one lazy Change per updated base tensor, computed when the writer reaches it
(one base tensor and its adapter pair in memory at a time)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ...checkpoint import Checkpoint, Tensor
from ...checkpoint.contents import same_values
from ...dtypes import DType
from ...errors import PlanError
from ...sizes import plural
from ..plan import Change, Plan, fail, names_list, overflow_error, overflow_problem
from ..values import cast_change, cast_target
from .adapter import Adapter, Pair
from ...checkpoint.layouts import weight_layouts


@dataclass
class Fold:
    """New values of one base tensor: ``start`` (the base's values, or a whole tensor from the
    adapter) updated by ``pair`` as ``role`` says (weight, bias, or replace: no update)."""

    name: str
    start: Tensor
    role: str
    pair: Pair | None = None
    layout: str = ""
    scaling: float = 1.0

    @property
    def action(self) -> str:
        if self.role == "replace":
            return "replace"
        if self.role == "bias":
            return "lora bias"
        return "dora" if self.pair.dora else "lora"


@dataclass
class LoraPlan(Plan):
    adapter: str = ""
    modules: list[dict] = field(default_factory=list)

    def document(self) -> dict:
        return {"adapter": self.adapter, "modules": self.modules}


def plan_merge_lora(op, ckpt: Checkpoint, adapter: Adapter) -> LoraPlan:
    """The plan of ``op`` (a MergeLora) folding ``adapter`` into ``ckpt``."""
    tensors = ckpt.tensors
    problems: list[str] = []
    folds: dict[str, Fold] = {}
    replaced: dict[str, Tensor] = {}
    unmatched, unmatched_modules = [], []
    for name, (key, tensor) in adapter.whole.items():
        target = _base_name(tensors, name)
        if target is None:
            unmatched.append(key)
        elif tuple(tensor.shape) != tuple(tensors[target].shape):
            rows = tensor.shape[1:] == tensors[target].shape[1:] and tensor.shape[:1] != tensors[target].shape[:1]
            problems.append(f"'{key}' is {list(tensor.shape)} but the base's '{target}' is"
                            f" {list(tensors[target].shape)}" + ("; the adapter was trained on a model with"
                                                                 " another vocabulary: resize the base the same way"
                                                                 " first" if rows else ""))
        else:
            replaced[target] = tensor
            folds[target] = Fold(target, tensor, "replace")
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    told: dict[str, str | None] = {}  # the base's layouts, read when a square pair needs them
    against_config = []
    modules = []
    for module, pair in adapter.pairs.items():
        weight = _base_name(tensors, f"{module}.weight")
        if weight is None:
            unmatched_modules.append(module)
            continue
        a, b = pair.tensors["A"].shape, pair.tensors["B"].shape
        if not told and not pair.embedding and len(a) == 2 and a[1:] == b[:1]:
            told.update(weight_layouts(tensors))
        layout, problem = _layout(pair, tensors[weight], told.get(weight) or
                                  ("transposed" if fan_in_fan_out else "linear"))
        if problem:
            problems.append(f"'{module}': {problem}")
            continue
        if layout in ("linear", "transposed") and (layout == "transposed") != fan_in_fan_out:
            against_config.append(module)
        scaling = adapter.scaling(pair) * op.scale
        start = replaced.get(weight, tensors[weight])
        folds[weight] = Fold(weight, start, "weight", pair, layout, scaling)
        modules.append({"module": module, "tensor": weight, "layout": layout, "r": pair.r, "alpha": pair.alpha,
                        "scaling": scaling, "dora": pair.dora})
        if "bias" in pair.tensors:
            bias = _base_name(tensors, f"{module}.bias")
            if bias is None:
                problems.append(f"'{pair.keys['bias']}' (lora_bias) has no base bias to update: '{module}.bias'"
                                " does not exist (PEFT cannot merge it either)")
            else:
                folds[bias] = Fold(bias, replaced.get(bias, tensors[bias]), "bias", pair, layout, scaling)
        magnitude = pair.tensors.get("magnitude")
        out = tensors[weight].shape[1] if layout in ("transposed", "embedding") else tensors[weight].shape[0]
        if magnitude is not None and magnitude.numel != out:
            problems.append(f"'{pair.keys['magnitude']}' has {plural(magnitude.numel, 'value')} for {plural(out, 'output feature')}")
    if unmatched_modules:
        n = len(unmatched_modules)
        problems.insert(0, f"{n} adapted module{'s match' if n > 1 else ' matches'} no tensor of {ckpt.source}:"
                        f" {names_list(unmatched_modules, 4)} (looked for '<module>.weight' and"
                        " '<module>.base_layer.weight'); is this the adapter's base model?")
    if unmatched:
        n = len(unmatched)
        problems.insert(0, f"{n} tensor{'s' if n > 1 else ''} of the adapter saved whole match{'' if n > 1 else 'es'}"
                        f" no tensor of {ckpt.source}: {names_list(unmatched, 4)} (looked for the name without"
                        " 'base_model.model.', with and without '.base_layer')")
    integers = [n for n in folds if not tensors[n].dtype.floating]
    if integers:
        problems.append(f"{names_list(integers)} {'is' if len(integers) == 1 else 'are'} not floating-point")
    fail("merge-lora", problems)

    description = f"merge-lora {adapter.path} into {ckpt.source} ({_settings(adapter, op.scale)})"
    plan = LoraPlan("merge-lora", description, heading=description, adapter=adapter.path, modules=modules)
    order = {name: i for i, name in enumerate(tensors)}
    units, notes = _units(ckpt, sorted(_once_per_tie(ckpt, folds), key=order.__getitem__), not op.untie)
    target = cast_target(op.dtype) if op.dtype is not None else None
    for unit in units:
        fold, tensor = folds[unit[0]], tensors[unit[0]]
        dtype = target or tensor.dtype
        plan.changes.append(Change(unit, fold.action, tensor.shape, dtype.name,
                                   _compute(fold, dtype, op.allow_overflow), lazy=True,
                                   guarded=not op.allow_overflow and _may_overflow(fold, dtype)))
    if target is not None:
        plan.changes += _casts(ckpt, {n for unit in units for n in unit}, target, op.allow_overflow)
    plan.notes += notes
    if against_config:
        plan.notes.append(f"note: {len(against_config)} weight{'s are' if len(against_config) > 1 else ' is'} stored"
                          f" {'(in, out)' if not fan_in_fan_out else '(out, in)'}, against the config's fan_in_fan_out"
                          f" {str(fan_in_fan_out).lower()}: {names_list(against_config, 3)}; followed the base's"
                          " layout, as PEFT does (a square weight whose layout the base does not tell follows the"
                          " config)")
    if replaced and op.scale != 1:
        plan.notes.append(f"note: --scale does not apply to {plural(len(replaced), 'tensor')} the adapter replaces whole")
    return plan


def _settings(adapter: Adapter, scale: float) -> str:
    """'r 8, alpha 16: scaling 2; rank_pattern 2 keys; DoRA; scale 0.5' for the plan's heading."""
    config = adapter.config
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    scaling = alpha / (r ** 0.5 if adapter.rslora else r)
    parts = [f"r {r}, alpha {alpha:g}: scaling {scaling:g}{' (rslora)' if adapter.rslora else ''}"]
    parts += [f"{key} {len(config[key])} key{'s' if len(config[key]) > 1 else ''}"
              for key in ("rank_pattern", "alpha_pattern") if config.get(key)]
    parts += ["DoRA"] if any(p.dora for p in adapter.pairs.values()) else []
    parts += [f"scale {scale:g}"] if scale != 1 else []
    return "; ".join(parts)


def _base_name(tensors: dict[str, Tensor], name: str) -> str | None:
    """The base tensor ``name`` refers to: itself, or its module's ``base_layer`` (a PEFT-wrapped base)."""
    if name in tensors:
        return name
    module, _, leaf = name.rpartition(".")
    wrapped = f"{module}.base_layer.{leaf}" if module else None
    return wrapped if wrapped in tensors else None


def _layout(pair: Pair, weight: Tensor, told: str) -> tuple[str, str | None]:
    """How ``pair`` lays over ``weight`` (see arithmetic.py), or a problem; a square 2-D weight
    takes the layout ``told`` (the base's, see checkpoint/layouts.py, else the config's)."""
    a, b = tuple(pair.tensors["A"].shape), tuple(pair.tensors["B"].shape)
    shape = tuple(weight.shape)
    r = a[0]
    if pair.embedding:
        expected = (a[1], b[0]) if len(a) == 2 and len(b) == 2 else None
        if expected == shape and b[1] == r:
            return "embedding", None
        return "", f"lora_embedding_A {list(a)} and lora_embedding_B {list(b)} do not fit the weight {list(shape)}"
    if len(a) == 2:
        if len(b) != 2 or b[1] != r:
            return "", f"lora_A {list(a)} and lora_B {list(b)} are not a pair"
        out, inn = b[0], a[1]
        if shape == (out, inn) and (out != inn or told == "linear"):
            return "linear", None
        if shape == (inn, out):
            return "transposed", None
        return "", f"lora_A {list(a)} and lora_B {list(b)} make a {out}x{inn} update, but the weight is {list(shape)}"
    if len(b) != len(a) or len(shape) != len(a) or any(k != 1 for k in b[2:]):
        return "", f"lora_A {list(a)} and lora_B {list(b)} do not fit the weight {list(shape)}"
    if shape[0] == b[0] and shape[2:] == a[2:] and shape[1] != a[1] and a[1] % shape[1] == 0 and b[1] != r:
        return "", (f"a grouped convolution (groups={a[1] // shape[1]}): its LoRA update mixes every input channel,"
                    " which the grouped weight cannot hold (PEFT refuses to merge it too)")
    if shape != (b[0], a[1], *a[2:]) or b[1] != r:
        return "", f"lora_A {list(a)} and lora_B {list(b)} do not fit the weight {list(shape)}"
    return "conv", None


def _once_per_tie(ckpt: Checkpoint, folds: dict[str, Fold]) -> list[str]:
    """The names of ``folds``, one per tie group whose names the adapter all replaces with the same
    values (PEFT saves every name of a module it saves whole: BERT's ``cls.predictions.bias`` and its
    alias ``cls.predictions.decoder.bias``); that one takes the group along (see _units)."""
    dropped = set()
    for group in ckpt.ties():
        replaced = [n for n in group if n in folds and folds[n].role == "replace"]
        if len(replaced) > 1 and all(same_values(folds[replaced[0]].start, folds[n].start) for n in replaced[1:]):
            dropped.update(replaced[1:])
    return [n for n in folds if n not in dropped]


def _units(ckpt: Checkpoint, names: list[str], follow: bool) -> tuple[list[list[str]], list[str]]:
    """Each updated name with the names that take its values: with ``follow`` (the default), its whole
    tie group, as merge_and_unload changes the shared weight; else alone (--untie: a tie to names the
    adapter does not update is broken, with a note)."""
    group_of = {n: g for g in ckpt.ties() for n in g}
    units, notes, problems = [], [], {}
    updated = set(names)
    for name in names:
        group = group_of.get(name, [name])
        others = [m for m in group if m != name]
        if not others:
            units.append([name])
        elif follow:
            both = [m for m in others if m in updated]
            if both:  # said once per tie group
                problems.setdefault(frozenset(group), f"'{name}' and {', '.join(repr(m) for m in both)} are tied but"
                                    " the adapter updates each, differently; pass --untie to give each its own values")
            units.append([name] + others)
            notes.append(f"note: '{name}' is tied to {', '.join(repr(m) for m in others)}:"
                         f" {'they take' if len(others) > 1 else 'it takes'} the merged values too and the tie stays,"
                         " as merge_and_unload leaves it (pass --untie to change only the adapted tensor)")
        else:
            units.append([name])
            kept = [m for m in others if m not in updated]
            if kept:
                notes.append(f"note: '{name}' was tied to {', '.join(repr(m) for m in kept)}; the tie is broken"
                             f" (--untie): {'they keep' if len(kept) > 1 else 'it keeps'} the base values, as the"
                             " unmerged adapted model computes them")
            else:
                notes.append(f"note: '{name}' was tied to {', '.join(repr(m) for m in others)}; each gets its own"
                             " merged values")
    if problems:
        raise PlanError(f"merge-lora: {'; '.join(problems.values())}")
    return units, notes


def _casts(ckpt: Checkpoint, merged: set[str], target: DType, allow_overflow: bool) -> list[Change]:
    """--dtype: the floating-point tensors the merge leaves alone, cast to ``target`` (a tie group as one)."""
    tensors = ckpt.tensors
    group_of = {n: g for g in ckpt.ties() for n in g}
    changes, done = [], set(merged)
    for name, tensor in tensors.items():
        if name in done or not tensor.dtype.floating or tensor.dtype == target:
            continue
        unit = [m for m in group_of.get(name, [name]) if m not in done]
        done.update(unit)
        changes.append(cast_change(unit, f"cast to {target}", tensor, target, not allow_overflow))
    return changes


def _may_overflow(fold: Fold, dtype: DType) -> bool:
    """Whether ``fold``'s values might leave ``dtype``'s range (then a dry run computes them to check):
    always for float16 and float8 (narrow ranges); otherwise (bfloat16, float32) when a bound of the
    update, from the adapter's small tensors, is not below half the range (or not finite)."""
    if dtype.largest < 1e6:
        return True
    if fold.role == "replace":
        return fold.start.dtype.itemsize > dtype.itemsize
    from ...checkpoint.values import to_torch

    def largest(role: str) -> float:
        return float(to_torch(fold.pair.tensors[role]).float().abs().max())

    if fold.role == "bias":
        bound = abs(fold.scaling) * largest("bias")
    elif fold.pair.dora:
        bound = largest("magnitude")  # each value of m / ||row|| * row is at most m
    else:
        bound = abs(fold.scaling) * fold.pair.r * largest("A") * largest("B")
    return not bound <= dtype.largest / 2


def _compute(fold: Fold, target: DType, allow_overflow: bool) -> Callable:
    """What computes ``fold``'s values, in float32, cast to ``target``."""

    def compute():
        import torch

        from ...checkpoint.values import overflowing, to_torch
        from ... import dtypes
        from . import arithmetic

        dtype = dtypes.torch_dtype(target)
        start = to_torch(fold.start)
        if fold.role == "replace":
            return start.to(dtype, copy=True)
        pair = {role: to_torch(t) for role, t in fold.pair.tensors.items()}

        def merged(dtype):
            return arithmetic.merge(fold.layout, start, pair["A"], pair["B"], fold.scaling, pair.get("magnitude"),
                                    dtype)

        unrounded = None  # the float32 values, where kept
        if fold.role == "bias":
            unrounded = arithmetic.bias(start, pair["bias"], fold.scaling)
            low, high = (float(x) for x in torch.aminmax(unrounded)) if unrounded.numel() else (0.0, 0.0)
            values = unrounded.to(dtype)
        else:
            values, low, high = merged(dtype)
        # only when a value is out of range (or NaN, which fails both comparisons) look closer: it is slow
        if not allow_overflow and not -target.largest <= low <= high <= target.largest:
            if unrounded is None and not target.has_inf:  # its rounding clamps what overflows: compute them again
                unrounded = merged(torch.float32)[0]
            count = overflowing(values if unrounded is None else unrounded, target, start)
            if count:
                raise overflow_error("merge-lora", [overflow_problem(fold.name, count, values.numel(), target)])
        return values

    return compute
