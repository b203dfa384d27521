"""One writing operation described by its options, as a command line or a recipe step
gives them ({'pattern': ['fc.*'], 'scheme': 'normal(std=0.02)', 'seed': 3}), turned into a Plan.

The CLI commands and ``apply`` recipes both come through here, so a recipe step does
exactly what the command with the same options does.
"""

from __future__ import annotations

from typing import Any, Callable

from . import schemes
from . import values as ops
from ..checkpoint import Checkpoint
from ..errors import UsageError
from ..checkpoint.kinds import LAYER_KINDS
from .plan import Plan
from ..selection import Selector, select

SELECTION = {"pattern": list, "regex": list, "exclude": list, "kind": list, "allow_empty": bool}
TIES = {"follow_ties": bool, "untie": bool}
OPTIONS: dict[str, dict[str, type]] = {
    "init": {**SELECTION, **TIES, "all": bool, "const": (int, float), "scheme": str, "seed": int, "layer": str},
    "zero": {**SELECTION, **TIES, "all": bool, "below": (int, float)},
    "scale": {**SELECTION, **TIES, "all": bool, "by": (int, float)},
    "cast": {**SELECTION, **TIES, "all": bool, "dtype": str},
    "copy": {**SELECTION, **TIES, "from": str, "to": str, "source": str, "source_key": str, "skip_mismatched": bool},
    "tie": {**TIES, "source": str, "target": list},
    "untie": {**SELECTION, "all": bool},
    "rename": {"from": str, "to": str},
    "drop": {**SELECTION, "all": bool},
}
REQUIRED = {"scale": ("by",), "cast": ("dtype",), "tie": ("source", "target"), "rename": ("from", "to")}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32",
                 "fp64": "float64", "double": "float64"}


def normalize(op: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """Check names and types of ``options`` for ``op``; a repeatable option may be one string."""
    if op not in OPTIONS:
        raise UsageError(f"{where}: unknown op '{op}'; choose from {', '.join(OPTIONS)}")
    spec = OPTIONS[op]
    result: dict[str, Any] = {}
    for key, value in options.items():
        if key not in spec:
            raise UsageError(f"{where}: {op} has no option '{key}'; it takes {', '.join(sorted(spec))}")
        kind = spec[key]
        if kind is list:
            value = [value] if isinstance(value, str) else value
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise UsageError(f"{where}: '{key}' must be a string or a list of strings")
        elif kind is bool:
            if not isinstance(value, bool):
                raise UsageError(f"{where}: '{key}' must be true or false")
        elif not isinstance(value, kind) or isinstance(value, bool):
            expected = "a number" if kind == (int, float) else ("a whole number" if kind is int else "a string")
            raise UsageError(f"{where}: '{key}' must be {expected}")
        result[key] = value
    missing = [k for k in REQUIRED.get(op, ()) if k not in result]
    if missing:
        raise UsageError(f"{where}: {op} needs '{missing[0]}'")
    for key in SELECTION:
        if spec.get(key) is list:
            result.setdefault(key, [])
    return result


def needs_seed(op: str, options: dict[str, Any]) -> bool:
    """Whether the step draws random values (and so needs a seed)."""
    return op == "init" and "scheme" in options and schemes.parse(options["scheme"]).random


def build_plan(ckpt: Checkpoint, op: str, options: dict[str, Any],
               load: Callable[[str, str | None], Checkpoint]) -> Plan:
    """The plan of ``op`` with normalized ``options`` on ``ckpt``; ``load(path, key)`` opens --source files."""
    warnings: list[str] = []
    plan = _build(ckpt, op, options, load, warnings)
    plan.notes[:0] = [f"warning: {w}" for w in warnings]
    return plan


def _build(ckpt: Checkpoint, op: str, options: dict[str, Any], load: Callable, warnings: list[str]) -> Plan:
    follow, untie = options.get("follow_ties", False), options.get("untie", False)

    def targets() -> list[str]:
        return _targets(op, ckpt, options, warnings)

    if op == "init":
        return ops.plan_init(ckpt, targets(), _scheme(options), options.get("seed", 0),
                             layer=_layer(options.get("layer")), follow=follow, untie=untie)
    if op == "zero":
        if options.get("below") is not None and options["below"] < 0:
            raise UsageError("zero: --below must not be negative")
        return ops.plan_zero(ckpt, targets(), below=options.get("below"), follow=follow, untie=untie)
    if op == "scale":
        return ops.plan_scale(ckpt, targets(), options["by"], follow=follow, untie=untie)
    if op == "cast":
        return ops.plan_cast(ckpt, targets(), _dtype(options["dtype"]), follow=follow, untie=untie)
    if op == "copy":
        return _copy(ckpt, options, load, warnings)
    if op == "tie":
        names, _ = select(ckpt.tensors, Selector(patterns=options["target"]))
        return ops.plan_tie(ckpt, options["source"], names, follow=follow, untie=untie)
    if op == "untie":
        return ops.plan_untie(ckpt, targets())
    if op == "rename":
        return ops.plan_rename(ckpt, options["from"], options["to"])
    return ops.plan_drop(ckpt, targets())


def _selector(options: dict[str, Any]) -> Selector:
    return Selector(options.get("pattern", []), options.get("regex", []), options.get("exclude", []),
                    options.get("kind", []))


def _targets(op: str, ckpt: Checkpoint, options: dict[str, Any], warnings: list[str]) -> list[str]:
    selector = _selector(options)
    if not (selector.narrows or options.get("all")):
        raise UsageError(f"{op}: choose tensors with -p/--pattern, --regex or -k/--kind, or pass --all"
                         " for every tensor")
    names, problems = select(ckpt.tensors, selector, allow_empty=options.get("allow_empty", False), key=ckpt.key)
    warnings += problems
    return names


def _scheme(options: dict[str, Any]) -> schemes.Scheme:
    if ("const" in options) == ("scheme" in options):
        raise UsageError("init: pass either --const V or --scheme SPEC")
    if "const" in options:
        return schemes.Scheme("constant", {"val": options["const"]})
    return schemes.parse(options["scheme"])


def _layer(layer: str | None) -> str | None:
    if layer is not None and layer not in LAYER_KINDS:
        raise UsageError(f"--layer {layer}: choose from {', '.join(LAYER_KINDS)}")
    return layer


def _dtype(text: str) -> str:
    name = text.removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in ops.CAST_TARGETS:
        raise UsageError(f"--dtype {text}: choose from {', '.join(ops.CAST_TARGETS)}")
    return name


def _copy(ckpt: Checkpoint, options: dict[str, Any], load: Callable, warnings: list[str]) -> Plan:
    source_glob, target_glob, source = options.get("from"), options.get("to"), options.get("source")
    if (source_glob is None) != (target_glob is None):
        raise UsageError("copy: pass --from and --to together")
    if source_glob is None and source is None:
        raise UsageError("copy: pass --from SRC --to DST, or --source OTHER")
    other = ckpt if source is None else load(source, options.get("source_key"))
    selector = _selector(options)
    narrowed = None
    if selector.narrows:
        narrowed, problems = select(ckpt.tensors, selector, allow_empty=options.get("allow_empty", False), key=ckpt.key)
        warnings += problems
    pairs, report = ops.copy_pairs(ckpt, other, source_glob, target_glob, narrowed)
    return ops.plan_copy(ckpt, other, pairs, skip_mismatched=options.get("skip_mismatched", False),
                         follow=options.get("follow_ties", False), untie=options.get("untie", False), report=report)
