"""What a merge method declares (after mergekit's merge_methods/base.py): its name, the options it
takes, whether it needs a --base or exactly two inputs, its own checks, and its formula."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Params:
    """The numbers of one merge, defaults filled in, as the formulas take them."""

    weights: list[float]
    normalize: bool
    t: float
    lambda_: float
    density: float
    seed: int


class MergeMethod:
    """One merge method; a subclass per method, listed once in the registry (registry/__init__.py)."""

    name: ClassVar[str]
    family: ClassVar[str] = ""  # methods of one family ('dare') are named together in --help ('dare-*')
    takes: ClassVar[frozenset[str]] = frozenset({"weights", "normalize"})  # keys of Merge's options
    task: ClassVar[bool] = False  # adds task vectors to a base model: --base required
    normalized: ClassVar[bool] = False  # divides by the weights unless --no-normalize
    hints: ClassVar[dict[str, str]] = {}  # flag -> what to pass instead, when the method refuses it

    @property
    def random(self) -> bool:
        """Whether the method draws random numbers (--seed)."""
        return "seed" in self.takes

    def problems(self, inputs: list[str]) -> list[str]:
        """What the method itself refuses of these inputs (the shared checks are Merge's)."""
        return []

    def bounded(self, params: Params) -> bool:
        """Whether the merged values surely stay within the inputs' range (no overflow check then)."""
        return False

    def details(self, params: Params, normalize: bool | None) -> list[str]:
        """The parameters the plan's description shows ('weights 1, 1', 'density 0.5', ...);
        ``normalize``: the --normalize given, if any."""
        shown = []
        if "t" in self.takes:
            shown.append(f"t {params.t:g}")
        if "weights" in self.takes:
            shown.append(f"weights {', '.join(f'{w:g}' for w in params.weights)}")
        if normalize is not None and normalize != self.normalized and "normalize" in self.takes:
            shown.append("normalised" if normalize else "not normalised")
        if "density" in self.takes:
            shown.append(f"density {params.density:g}")
        if "lambda" in self.takes:
            shown.append(f"lambda {params.lambda_:g}")
        if self.random:
            shown.append(f"seed {params.seed}")
        return shown

    def compute(self, views: list[Any], params: Params, work: Any, dtype: Any, generator: Any) -> Any:
        """The merged values of one tensor from torch ``views`` of it (the written input first),
        worked in ``work`` and returned in ``dtype``; ``generator``: seeded for a random method."""
        raise NotImplementedError
