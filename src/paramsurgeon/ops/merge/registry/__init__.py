"""The merge methods: one module per method, one entry each in METHODS (after mergekit's
merge_methods/registry.py). Everything that names a method (--method and its help, the checks,
the plan, recipe steps) reads this list, the first being the default; tests/test_merge.py holds
the plan schema's enum to it. A new method: a module here, an entry below, the schema's enum.

    base.py   MergeMethod (what a method declares) and Params (the numbers of one merge)
"""

from __future__ import annotations

from .base import MergeMethod, Params
from .dare_linear import DareLinear
from .dare_ties import DareTies
from .linear import Linear
from .slerp import Slerp
from .task_arithmetic import TaskArithmetic
from .ties import Ties

METHODS: tuple[MergeMethod, ...] = (Linear(), Slerp(), TaskArithmetic(), Ties(), DareLinear(), DareTies())
NAMES = tuple(m.name for m in METHODS)


def find(name: object) -> MergeMethod | None:
    """The method called ``name``, or None."""
    return next((m for m in METHODS if m.name == name), None)


def taking(option: str) -> list[str]:
    """The names of the methods that take ``option`` (the key of one of Merge's options)."""
    return [m.name for m in METHODS if option in m.takes]


def choices(names: list[str] | tuple[str, ...], last: str = "or") -> str:
    """'a, b, c or d'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def who(option: str, normalized: bool | None = None) -> str:
    """The methods taking ``option`` as --help names them: 'ties, dare-*' (a family whole, every
    member taking it, as 'dare-*'); ``normalized``: only those that normalise by default (True)
    or not (False), as 'a, b and c'."""
    methods = [m for m in METHODS if option in m.takes and normalized in (None, m.normalized)]
    if normalized is not None:
        return choices([m.name for m in methods], "and")
    shown: list[str] = []
    for method in methods:
        family = [m for m in METHODS if method.family and m.family == method.family]
        short = f"{method.family}-*" if len(family) > 1 and all(m in methods for m in family) else method.name
        if short not in shown:
            shown.append(short)
    return ", ".join(shown)


__all__ = ["METHODS", "NAMES", "MergeMethod", "Params", "choices", "find", "taking", "who"]
