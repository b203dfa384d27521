"""Operations that give the selected tensors new values: init, zero, scale, cast.

Each checks every name, dtype and tie first and reports every problem at once; values are
computed only when the plan is applied (plan.apply), from the tensors' current values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import dtypes
from ..dtypes import DType
from ..checkpoint import Checkpoint, Tensor
from ..checkpoint.kinds import LAYER_KINDS, infer_kinds
from ..checkpoint.layouts import stored_in_out
from ..checkpoint.quantized import refuse_partial
from ..declare import REQUIRED, Number, option
from ..errors import UnfitTensorError, UsageError
from ..sizes import plural
from . import schemes
from .plan import Change, Plan, fail, names_list, tie_units
from .spec import Operation, Overflow, Sources, Targets, TiePolicy, with_warnings

CAST_TARGETS = ("float32", "float16", "bfloat16", "float64")


def computable(values):
    """``values`` as torch computes with them on the CPU (float8 as float32: checkpoint.values)."""
    from ..checkpoint.values import computable

    return computable(values)


def torch_values(tensor: Tensor):
    """``tensor`` as a torch tensor (imports torch)."""
    from ..checkpoint.values import to_torch

    return to_torch(tensor)


def cast_target(name: str) -> DType:
    """The floating-point dtype ``--dtype name`` asks for (a UsageError naming the choices otherwise)."""
    try:
        target = dtypes.by_name(name)
    except KeyError:
        target = None
    if target is None or target.name not in CAST_TARGETS:
        raise UsageError(f"--dtype {name}: choose from {', '.join(CAST_TARGETS)}")
    return target


def copy_of(tensor: Tensor, dtype) -> Callable:
    """What computes ``tensor``'s values as ``dtype``: its bytes, copied, when nothing converts
    (no torch needed), else torch's cast."""
    if tensor.dtype == dtype and tensor.is_contiguous:
        return lambda: bytearray(tensor.contiguous_bytes())
    return lambda: torch_values(tensor).to(dtypes.torch_dtype(dtype))


def narrows(source: DType, target: DType) -> bool:
    """Whether floating-point values of ``source`` may not fit ``target`` (float32 -> float16)."""
    return (target.floating or target.complex) and target.largest < source.largest


def whole(dtype: DType) -> bool:
    """Whether ``dtype`` holds integers (bool included)."""
    return not (dtype.floating or dtype.complex)


def may_misfit(source: DType, target: DType) -> bool:
    """Whether real values of ``source`` may not fit the integer ``target`` (float -> int8, int64 -> uint8)."""
    return whole(target) and not source.complex and (
        source.floating or source.lowest < target.lowest or source.largest > target.largest)


def misfits(tensor: Tensor, target: DType, by: int = 1) -> int:
    """How many values of ``tensor``, times ``by``, the integer ``target`` cannot hold: outside
    its range or, from floating point, not whole or not finite. torch wraps or truncates them
    without a word (int8 100 * 3 is 44). Reads the values once, before anything is written."""
    import torch

    values = torch_values(tensor)
    lowest, largest = target.lowest, target.largest
    if tensor.dtype.floating:
        wide = values.double() * by
        return int((~torch.isfinite(wide) | (wide != wide.trunc()) | (wide < lowest) | (wide >= largest + 1)).sum())
    # the values v with lowest <= v * by <= largest, by exact integer division, within the source's range
    low, high = (-(-lowest // by), largest // by) if by > 0 else (-(largest // -by), lowest // by)
    low, high = max(low, tensor.dtype.lowest), min(high, tensor.dtype.largest)
    if tensor.dtype.name in ("uint16", "uint32", "bool"):  # torch compares these only as wider integers
        values = values.long()
    elif tensor.dtype.name == "uint64":  # as int64, values from 2**63 up are negative, below any low
        values = values.view(torch.int64)
    return int(((values < low) | (values > high)).sum())


def value_plan(command: str, description: str, ckpt: Checkpoint, names: list[str], ties: TiePolicy,
               change_for: Callable[[list[str], Tensor], Change]) -> Plan:
    """A plan changing the values of ``names``, one Change per tie unit; the UnfitTensorError of
    every unit that cannot take one is reported at once, in one PlanError."""
    refuse_partial(ckpt, names, command)  # before any check of its stored codes as if they were values
    plan = Plan(command, description)
    problems, advice = [], {}
    for unit in tie_units(ckpt, names, follow=ties.follow_ties, untie=ties.untie, command=command):
        try:
            plan.changes.append(change_for(unit, ckpt[unit[0]]))
        except UnfitTensorError as e:
            problems.append(f"'{unit[0]}' {e}")
            advice.setdefault(e.advice)
    fail(command, problems, [a for a in advice if a])
    return plan


@dataclass(kw_only=True)
class Init(Targets, TiePolicy, Overflow, Operation):
    """Re-initialise the selected tensors with a constant or a torch.nn.init scheme."""

    name = "init"
    example = "paramsurgeon init model.pt -p 'fc.*' --scheme 'xavier_uniform(gain=relu)' --seed 3 -o out.pt"

    const: Number | None = option(None, "--const", metavar="V", help="Fill with this value.")
    scheme: str | None = option(
        None, "--scheme", metavar="SPEC", help="A torch.nn.init scheme with keyword arguments, e.g. 'normal(std=0.02)',"
        " 'xavier_uniform(gain=relu)', 'kaiming_normal(mode=fan_out, nonlinearity=relu)'; or 'default' for what"
        " each layer's reset_parameters gives.")
    seed: int | None = option(None, "--seed", help="Make the values reproducible (each tensor's generator comes from"
                                                   " the seed and its name).")
    layer: str | None = option(None, "--layer", metavar="KIND",
                               help="With --scheme default: the layer kind, when it cannot be inferred.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.const is None) == (self.scheme is None):
            raise UsageError("init: pass either --const V or --scheme SPEC")
        if self.layer is not None and self.layer not in LAYER_KINDS:
            raise UsageError(f"--layer {self.layer}: choose from {', '.join(LAYER_KINDS)}")
        self._scheme = schemes.Scheme("constant", {"val": self.const}) if self.const is not None \
            else schemes.parse(self.scheme)

    @property
    def random(self) -> bool:
        return self._scheme.random

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        """Re-initialise the targets ('default': what each layer's reset_parameters gives)."""
        warnings: list[str] = []
        names = self.targets(ckpt, "init", warnings)
        scheme, seed = self._scheme, self.seed or 0
        kinds = infer_kinds(ckpt.tensors) if scheme.name == "default" else {}
        fans = scheme.name == "default" or scheme.name.startswith("kaiming")
        in_out = stored_in_out(ckpt.tensors) if fans else set()  # GPT-2's Conv1D: fan-in is dim 0
        tensors = ckpt.tensors

        def change_for(unit: list[str], tensor: Tensor):
            name = unit[0]
            resolved = scheme
            if scheme.name == "default":
                resolved = schemes.default_for(name, tensors, self.layer or kinds[name].layer, in_out)
            problem = resolved.problem(tensor.shape, tensor.dtype.floating)
            if resolved.name == "constant" and not problem:
                problem = schemes.constant_problem(resolved.kwargs["val"], tensor.dtype, self.allow_overflow)
            if problem:
                raise UnfitTensorError(problem)
            work = tensor.dtype if tensor.dtype.name == "float64" else dtypes.BY_NAME["float32"]
            if resolved.name in ("uniform", "trunc_normal") and resolved.reach() > work.largest:
                raise UnfitTensorError(f"draws its values in {work}, and {resolved} reaches beyond its range (|x| <="
                                       f" {work.largest:g})")
            shape, dtype = tensor.shape, dtypes.torch_dtype(tensor.dtype)
            flipped = name in in_out and resolved.name.startswith("kaiming")
            return Change(unit, str(resolved), shape, tensor.dtype.name,
                          lambda: schemes.fill(resolved, shape, dtype, seed, name, in_out=flipped),
                          guarded=resolved.reach() > tensor.dtype.largest and not self.allow_overflow)

        what = str(scheme) if scheme.name != "constant" else f"constant {scheme.kwargs['val']}"
        seeded = f", seed {seed}" if scheme.random else ""
        plan = value_plan("init", f"init {what}{seeded}: {names_list(names)}", ckpt, names, self, change_for)
        return with_warnings(self.buffer_note(ckpt, plan), warnings)


@dataclass(kw_only=True)
class Zero(Targets, TiePolicy, Operation):
    """Set the selected tensors to zero, or only their small entries with --below."""

    name = "zero"
    example = "paramsurgeon zero model.pt -p 'layer*.1.bn2.weight' -o out.pt"

    below: float | None = option(None, "--below", metavar="T", minimum=0,
                                 help="Zero only the entries with |x| < T (magnitude pruning).")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        warnings: list[str] = []
        names = self.targets(ckpt, "zero", warnings)
        below = self.below

        def change_for(unit: list[str], tensor: Tensor):
            if below is None:  # zero is all-zero bytes in every dtype: no torch needed
                return Change(unit, "zero", tensor.shape, tensor.dtype.name, lambda: bytearray(tensor.nbytes))
            if tensor.dtype.name == "bool" or tensor.dtype.complex:
                raise UnfitTensorError(f"is {tensor.dtype}, which has no magnitude to compare with --below")
            return Change(unit, f"zero where |x| < {below:g}", tensor.shape, tensor.dtype.name,
                          lambda: _prune(torch_values(tensor), below))

        what = f"zero |x| < {below:g}" if below is not None else "zero"
        plan = value_plan("zero", f"{what}: {names_list(names)}", ckpt, names, self, change_for)
        return with_warnings(self.buffer_note(ckpt, plan), warnings)


def _prune(values, below: float):
    import torch

    return torch.where(computable(values).abs() < below, torch.zeros((), dtype=values.dtype), values)


@dataclass(kw_only=True)
class Scale(Targets, TiePolicy, Overflow, Operation):
    """Multiply the selected tensors by a factor."""

    name = "scale"
    example = "paramsurgeon scale model.pt -p 'blocks.*.mlp.fc2.weight' --by 0.5 -o out.pt"

    by: Number = option(REQUIRED, "--by", metavar="F", help="The factor.")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        """Multiply the targets by ``by`` (in each tensor's own dtype)."""
        warnings: list[str] = []
        names = self.targets(ckpt, "scale", warnings)
        factor = self.by

        def change_for(unit: list[str], tensor: Tensor):
            if tensor.dtype.name == "bool":
                raise UnfitTensorError("is boolean and cannot be scaled")
            floating = tensor.dtype.floating or tensor.dtype.complex
            if not floating and factor != int(factor):
                raise UnfitTensorError(f"is {tensor.dtype}, and scaling it by {factor:g} would truncate")
            if not floating and not tensor.dtype.lowest <= factor <= tensor.dtype.largest:
                raise UnfitTensorError(f"is {tensor.dtype}, which holds {tensor.dtype.lowest} to"
                                       f" {tensor.dtype.largest}, so scaling it by {factor:g} would overflow")
            by = float(factor) if floating else int(factor)
            if not floating and not self.allow_overflow and by not in (0, 1):
                out = misfits(tensor, tensor.dtype, by)
                if out:
                    raise UnfitTensorError(
                        f"is {tensor.dtype}, which holds {tensor.dtype.lowest} to {tensor.dtype.largest}; {out:,} of"
                        f" its {plural(tensor.numel, 'value')} would leave that range multiplied by {by} and wrap"
                        " around; pass --allow-overflow to write them wrapped")
            return Change(unit, f"scale by {factor:g}", tensor.shape, tensor.dtype.name,
                          lambda: (computable(torch_values(tensor)) * by).to(dtypes.torch_dtype(tensor.dtype)),
                          guarded=floating and abs(by) > 1 and not self.allow_overflow, origin=tensor)

        plan = value_plan("scale", f"scale by {factor:g}: {names_list(names)}", ckpt, names, self, change_for)
        return with_warnings(self.buffer_note(ckpt, plan), warnings)


@dataclass(kw_only=True)
class Cast(Targets, TiePolicy, Overflow, Operation):
    """Change the dtype of the selected floating-point tensors (others are left as they are)."""

    name = "cast"
    example = "paramsurgeon cast model.pt --all --dtype bfloat16 -o model-bf16.safetensors"

    dtype: str = option(REQUIRED, "--dtype", metavar="D", help="float32, float16, bfloat16 or float64.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._target = cast_target(self.dtype)

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        warnings: list[str] = []
        names = self.targets(ckpt, "cast", warnings)
        target = self._target
        skipped = [n for n in names if not ckpt[n].dtype.floating]
        already = [n for n in names if ckpt[n].dtype == target]
        chosen = [n for n in names if n not in skipped and n not in already]

        def change_for(unit: list[str], tensor: Tensor):
            return Change(unit, f"cast to {target}", tensor.shape, target.name, copy_of(tensor, target),
                          guarded=narrows(tensor.dtype, target) and not self.allow_overflow, origin=tensor)

        plan = value_plan("cast", f"cast to {target}: {names_list(chosen)}", ckpt, chosen, self, change_for)
        if skipped:
            plan.notes.append(f"left {len(skipped)} non-floating-point tensors as they are ({names_list(skipped, 3)})")
        if already:
            plan.notes.append(f"{plural(len(already), 'tensor')} {'is' if len(already) == 1 else 'are'} already {target}")
        return with_warnings(plan, warnings)
