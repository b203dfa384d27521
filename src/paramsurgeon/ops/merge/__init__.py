"""merge: combine checkpoints tensor by tensor (linear, slerp, task arithmetic, TIES, DARE).

    __init__.py   Merge: the options, checked before any file is read
    planning.py   the plan: names, shapes, dtypes and ties of every input checked at once;
                  one lazy Change per merged tensor (or tie group)
    registry/     the methods: one module per method, registered in one list (registry.METHODS)
    methods.py    the formulas, in torch

The first input (the base, for the task methods) is the checkpoint that is written: every
tensor that is not merged, and the rest of the file, come from it. A merged tensor's values
are computed when the writer reaches it, from memory-mapped views of every input, so memory
holds one tensor of each input at a time, never whole checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...declare import REQUIRED, argument, option
from ...errors import UsageError
from ...selection import Selection
from ...sizes import plural
from ..plan import Plan
from ..spec import Operation, Overflow, Sources, TiePolicy
from .registry import METHODS, NAMES, MergeMethod, Params, choices, find, taking, who

OWN = "<the recipe's checkpoint>"  # in a recipe's merge step: the checkpoint the recipe is applied to


@dataclass(kw_only=True)
class Merge(Selection, TiePolicy, Overflow, Operation):
    """Combine checkpoints tensor by tensor: average, interpolate, or add task vectors to a base.

    The first checkpoint (the --base for task methods) is the one written: tensors that are not
    merged (integers, unselected) and the rest of the file come from it.
    """

    name: ClassVar[str] = "merge"
    example: ClassVar[str] = "paramsurgeon merge run/epoch-8.pt run/epoch-9.pt run/epoch-10.pt -o averaged.pt"

    inputs: list[str] = argument(REQUIRED, metavar="CKPT...", path=True,
                                 help="Two or more checkpoints to merge (one may be '-': standard input).")
    method: str = option(NAMES[0], "--method", metavar="M", help=f"{NAMES[0]} (default), {choices(NAMES[1:])}.")
    weights: str | None = option(None, "--weights", metavar="W,W,...", help="One weight per checkpoint (default: equal"
                                 " for linear, 1 for task methods).")
    base: str | None = option(None, "--base", metavar="BASE", path=True, help="The base model of the task methods (the"
                              " checkpoint written, and one of the two or more that take part).")
    t: float | None = option(None, "--t", metavar="T", help=f"{who('t')}: where between the first (0) and the second"
                             " (1) checkpoint; default 0.5.")
    lambda_: float | None = option(None, "--lambda", metavar="L", help="Task methods: the factor of the merged task"
                                   " vector; default 1.")
    density: float | None = option(None, "--density", metavar="D", help=f"{who('density')}: the fraction of each task"
                                   " vector kept, in (0, 1]; default 0.5.")
    normalize: bool | None = option(None, "--normalize/--no-normalize", help="Divide by the sum of the weights (default:"
                                    f" yes for {who('normalize', True)}, no for {who('normalize', False)}).")
    seed: int | None = option(None, "--seed", help=f"{who('seed')}: make the random drops reproducible (each tensor's"
                              " generator comes from the seed and its name).")
    skip_mismatched: bool = option(False, "--skip-mismatched", help="Take tensors whose names, shapes or ties differ"
                                   " between the inputs from the first input (with a note) instead of failing.")

    def __post_init__(self) -> None:
        if isinstance(self.weights, (list, tuple)):  # a library call may pass numbers
            self.weights = ",".join(repr(float(w)) for w in self.weights)
        super().__post_init__()
        problems = self._problems()
        if problems:
            raise UsageError(f"merge: {'; '.join(problems)}")

    def _problems(self) -> list[str]:
        method, inputs = self.merge_method, list(self.inputs)
        if method is None:
            return [f"--method {self.method}: choose from {', '.join(NAMES)}"]
        problems = []
        task, tasks = method.task, ", ".join(m.name for m in METHODS if m.task)
        taking_part = len(inputs) + (self.base is not None)
        if taking_part < 2:
            problems.append(f"needs at least two checkpoints ({taking_part} given)"
                            + ("; the task methods also take --base BASE" if task else ""))
        problems += method.problems(inputs)
        if task and self.base is None:
            problems.append(f"{method.name} adds task vectors to a base model: pass --base BASE")
        if not task and self.base is not None:
            problems.append(f"--base applies to {tasks}; {method.name} treats every checkpoint alike"
                            " (pass them all as CKPT)")
        given = {"t": self.t, "lambda": self.lambda_, "density": self.density, "weights": self.weights,
                 "normalize": self.normalize}
        problems += [_not_for(option, method) for option, value in given.items()
                     if value is not None and option not in method.takes]
        if self.t is not None and not 0 <= self.t <= 1:
            problems.append(f"--t must be between 0 and 1, not {self.t:g}")
        if self.density is not None and not 0 < self.density <= 1:
            problems.append(f"--density must be in (0, 1] (the fraction of each task vector kept), not {self.density:g}")
        stdin = [p for p in inputs + [self.base] if p in ("-",)]
        if len(stdin) > 1:
            problems.append("only one checkpoint can come from standard input ('-')")
        if self.weights is not None and "weights" in method.takes:
            try:
                weights = self.weight_values
            except ValueError as e:
                problems.append(str(e))
            else:
                if len(weights) != len(inputs):
                    what = "fine-tuned checkpoint (the base takes none)" if task else "checkpoint"
                    problems.append(f"--weights has {plural(len(weights), 'value')} for {plural(len(inputs), 'checkpoint')}; pass one per"
                                    f" {what}")
                elif self.normalizes and not task and math.fsum(weights) == 0:
                    problems.append("--weights sum to 0, so they cannot be normalised; pass --no-normalize")
        return problems

    @property
    def merge_method(self) -> MergeMethod | None:
        """The method, from the registry (None: unknown)."""
        return find(self.method)

    @property
    def params(self) -> Params:
        """The numbers the formulas take, defaults filled in."""
        return Params(self.weight_values, self.normalizes, 0.5 if self.t is None else self.t,
                      1.0 if self.lambda_ is None else self.lambda_, 0.5 if self.density is None else self.density,
                      self.seed or 0)

    @property
    def weight_values(self) -> list[float]:
        """The weights, one per checkpoint in ``inputs`` (defaults filled in)."""
        if self.weights is None:
            return [1.0] * len(self.inputs)
        values = []
        for text in self.weights.split(","):
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"--weights {self.weights}: '{text.strip()}' is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"--weights {self.weights}: {text.strip()} is not a finite number")
            values.append(value)
        return values

    @property
    def normalizes(self) -> bool:
        return self.normalize if self.normalize is not None else self.merge_method.normalized

    @property
    def random(self) -> bool:
        return self.merge_method.random

    @property
    def written(self) -> str:
        """The checkpoint whose file is written: the base for task methods, else the first input."""
        return self.base if self.base is not None else self.inputs[0]

    @property
    def others(self) -> list[str]:
        """The checkpoints read besides the one written, in order."""
        return list(self.inputs) if self.base is not None else list(self.inputs[1:])

    def plan(self, ckpt, sources: Sources) -> Plan:
        """Check every input against ``ckpt`` (the one written) and plan one Change per merged unit.

        In a recipe (an input is OWN, ``ckpt``) with a ``base`` of its own, ``ckpt`` is the first
        checkpoint merged over that base; its tensors that are not merged stay as they are.
        """
        from .planning import plan_merge

        if self.written == OWN or OWN not in self.inputs:
            return plan_merge(self, ckpt, [sources.checkpoint(path) for path in self.others])
        return plan_merge(self, sources.checkpoint(self.written),
                          [ckpt if path == OWN else sources.checkpoint(path) for path in self.others], ckpt.source)


def _not_for(option: str, method: MergeMethod) -> str:
    """'--t applies to slerp, not linear': an option the method does not take."""
    names = taking(option)
    others = [n for n in NAMES if n not in names]
    which = f"every method but {others[0]}" if len(others) == 1 else ", ".join(names)
    hint = method.hints.get(f"--{option}")
    return f"--{option} applies to {which}{f' ({hint})' if hint else ''}, not {method.name}"


__all__ = ["NAMES", "OWN", "Merge"]
