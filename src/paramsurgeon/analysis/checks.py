"""Rules a checkpoint must satisfy in CI: finite values, a bound on magnitudes, the same
names, shapes and dtypes as a reference, expected tensors. Each rule reports every
violation, not just the first."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from .. import dtypes
from ..checkpoint import Checkpoint
from ..checkpoint.quantized import refuse_valueless
from ..errors import UsageError
from .stats import tensor_stats
from ..sizes import plural


@dataclass
class RuleResult:
    """One rule and what broke it (an empty list: the rule holds)."""

    rule: str
    violations: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, name: str | None, message: str) -> None:
        self.violations.append({"name": name, "message": message})


def parse_shape(text: str) -> tuple[int, ...]:
    """A shape as people and torch write it: '64x3x7x7', '[64, 3, 7, 7]', '(10,)',
    'torch.Size([10, 32])'; '()', '[]' and 'scalar' are the empty shape."""
    cleaned = re.sub(r"^torch\.Size\((.*)\)$", r"\1", text.strip()).strip().strip("[]()").strip()
    if cleaned in ("", "scalar"):
        return ()
    parts = re.split(r"\s*[x,]\s*", cleaned.removesuffix(",").strip())
    if not all(p.isdigit() for p in parts):
        raise UsageError(f"shape '{text}': expected dimensions like 64x3x7x7, [64, 3, 7, 7], (10,)"
                         f" or torch.Size([64, 3, 7, 7])")
    return tuple(int(p) for p in parts)


_SHAPE = r"torch\.Size\(\s*(?:\[[^\]]*\]|\([^)]*\))\s*\)|\[[^\]]*\]|\([^)]*\)|[^\s\[(]\S*"
_EXPECTATION = re.compile(rf"(\S+?)(?:[=\s]\s*({_SHAPE}))?(?:\s+(\S+))?")


def validate_dtype(dtype: str | None) -> str | None:
    """Refuse a dtype no floating-point tensor could be meant to have; returns its canonical name."""
    if dtype is None:
        return None
    try:
        resolved = dtypes.by_name(dtype)
    except KeyError:
        raise UsageError(f"--dtype {dtype}: unknown dtype; e.g. float32, bfloat16, float16") from None
    if not resolved.floating:
        raise UsageError(f"--dtype {dtype}: check --dtype is about floating-point tensors (integer buffers"
                         f" such as num_batches_tracked are not checked); give float32, bfloat16, float16 or"
                         f" float64")
    return resolved.name


def parse_expectations(lines: list[str], where: str) -> dict[str, tuple]:
    """'NAME', 'NAME=SHAPE' or 'NAME SHAPE [DTYPE]' lines -> name: (shape or None, dtype or None)."""
    expected = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _EXPECTATION.fullmatch(line)
        if not match:
            raise UsageError(f"{where}:{number}: expected NAME [SHAPE] [DTYPE], got '{line}'")
        name, shape, dtype = match.groups()
        if dtype is not None:
            try:
                dtype = dtypes.by_name(dtype).name
            except KeyError:
                raise UsageError(f"{where}:{number}: unknown dtype '{dtype}'") from None
        expected[name] = (parse_shape(shape) if shape else None, dtype)
    return expected


def run_rules(ckpt: Checkpoint, names: list[str], *, finite: bool = False, max_abs: float | None = None,
              like: Checkpoint | None = None, expect: dict[str, tuple] | None = None, dtype: str | None = None,
              progress: Callable[[int], None] | None = None) -> list[RuleResult]:
    """Check every rule asked for; values are read once, in bounded memory, only if a rule needs them.
    The rules about values (finite, max-abs, dtype) look at floating-point tensors only: integer
    step counters such as num_batches_tracked are not weights."""
    tensors = ckpt.tensors
    results = []
    if like is not None:
        results.append(_like(ckpt, names, like))
    if expect:
        results.append(_expect(ckpt, expect))
    if dtype is not None:
        rule = RuleResult(f"dtype {dtype}")
        for name in names:
            if tensors[name].dtype.floating and tensors[name].dtype.name != dtype:
                rule.add(name, f"is {tensors[name].dtype}, not {dtype}")
        results.append(rule)
    if finite or max_abs is not None:
        finite_rule, bound_rule = RuleResult("finite"), RuleResult(f"max-abs {max_abs:g}" if max_abs is not None else "")
        refuse_valueless(tensors, names, "check")
        for name in names:
            tensor = tensors[name]
            stats = tensor_stats(tensor) if tensor.dtype.floating else None
            if progress is not None:
                progress(tensor.nbytes)
            if stats is None:
                continue
            if finite and (stats.nan or stats.inf):
                finite_rule.add(name, f"has {stats.nan:,} NaN and {stats.inf:,} Inf of {plural(tensor.numel, 'value')}")
            broken = _beyond(stats, max_abs, tensor.numel) if max_abs is not None else None
            if broken:
                bound_rule.add(name, broken)
        results += [finite_rule] if finite else []
        results += [bound_rule] if max_abs is not None else []
    return results


def _like(ckpt: Checkpoint, names: list[str], other: Checkpoint) -> RuleResult:
    rule = RuleResult(f"like {other.source}")
    mine, theirs = ckpt.tensors, other.tensors
    chosen = set(names)
    for name in names:
        if name not in theirs:
            rule.add(name, f"is not in {other.source}")
        elif (mine[name].shape, mine[name].dtype) != (theirs[name].shape, theirs[name].dtype):
            rule.add(name, f"is {list(mine[name].shape)} {mine[name].dtype} but {list(theirs[name].shape)}"
                           f" {theirs[name].dtype} in {other.source}")
    for name in theirs:
        if name not in mine and (name in chosen or len(chosen) == len(mine)):
            rule.add(name, f"is missing (it is in {other.source})")
    return rule


def _expect(ckpt: Checkpoint, expect: dict[str, tuple]) -> RuleResult:
    rule = RuleResult("expect")
    tensors = ckpt.tensors
    for name, (shape, dtype) in expect.items():
        tensor = tensors.get(name)
        if tensor is None:
            rule.add(name, "is missing")
        elif shape is not None and tensor.shape != shape:
            rule.add(name, f"has shape {list(tensor.shape)}, expected {list(shape)}")
        elif dtype is not None and tensor.dtype.name != dtype:
            rule.add(name, f"is {tensor.dtype}, expected {dtype}")
    return rule


def _beyond(stats, bound: float, numel: int) -> str | None:
    """Why a tensor breaks ``--max-abs bound`` (an infinity, a finite value beyond it, a NaN), or None."""
    if stats.inf:
        return f"reaches |x| = inf > {bound:g}"
    if stats.abs_max is not None and stats.abs_max > bound:
        return f"reaches |x| = {stats.abs_max:g} > {bound:g}"
    if stats.nan:
        return f"has {plural(stats.nan, 'NaN')} of {plural(numel, 'value')}: no bound holds"
    return None
