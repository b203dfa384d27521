"""Options declared once, as dataclass fields, and read by every way of giving them.

An operation's (or any command's) options are the fields of a dataclass; ``option()``
adds what the command line shows (flags, metavar, help) and the bounds the value must
keep. The command line builds its commands from these fields, a recipe step's keys are
their names, and a library call passes them as keyword arguments: each is checked here,
with every problem reported at once.

    @dataclass(kw_only=True)
    class Zero(Operation):
        below: float | None = option(None, "--below", metavar="T", minimum=0,
                                     help="Zero only the entries with |x| < T.")
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Mapping, Union

from .errors import UsageError

Number = Union[int, float]  # an integral value stays an int, so that it fits integer tensors
REQUIRED = MISSING  # the default of an option that must be given


@dataclass(frozen=True)
class Flag:
    """How an option is spelled on the command line (no flags: a positional argument)."""

    flags: tuple[str, ...]
    help: str
    metavar: str | None = None
    minimum: float | None = None
    above: float | None = None  # exclusive lower bound
    greedy: bool = False  # a repeatable option that also takes the values after it: --to a b c
    path: bool = False  # its values name files (a recipe's are relative to the recipe)

    @property
    def shown(self) -> str:
        """The name a message uses: the long flag, or the metavar of an argument."""
        return self.flags[-1] if self.flags else (self.metavar or "")


def option(default: Any = MISSING, *flags: str, help: str, metavar: str | None = None,
           minimum: float | None = None, above: float | None = None, greedy: bool = False,
           path: bool = False) -> Any:
    """A dataclass field declared as a command-line option (``[]`` as default: a repeatable one;
    ``greedy``: one that also takes the values after it, up to the next option; ``path``: one
    whose values name files)."""
    flag = Flag(tuple(flags), help, metavar, minimum, above, greedy, path)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"flag": flag})
    return dataclasses.field(default=default, metadata={"flag": flag})


def argument(default: Any = MISSING, *, metavar: str, help: str, path: bool = False) -> Any:
    """A dataclass field declared as a positional command-line argument (``path``: naming files)."""
    return dataclasses.field(default=default, metadata={"flag": Flag((), help, metavar, path=path)})


@dataclass(frozen=True)
class Declared:
    """One declared field: its name, its type (Optional unwrapped) and its flag."""

    name: str
    type: Any
    optional: bool
    flag: Flag
    default: Any

    @property
    def key(self) -> str:
        """The name in a recipe or a JSON document: the field name without a trailing underscore."""
        return self.name.rstrip("_")

    @property
    def repeatable(self) -> bool:
        return self.type == list[str]


def declared(cls: type) -> list[Declared]:
    """The declared fields of ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    result = []
    for f in dataclasses.fields(cls):
        if "flag" not in f.metadata:
            continue
        kind, optional = _unwrap(hints[f.name])
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        result.append(Declared(f.name, kind, optional, f.metadata["flag"], default))
    return result


def _unwrap(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), True
    return hint, False


def problems(obj: Any) -> list[str]:
    """What is wrong with the values of ``obj``'s declared fields (types and bounds)."""
    found = []
    for d in declared(type(obj)):
        value = getattr(obj, d.name)
        if value is None and (d.optional or d.default is None):
            continue
        problem = _problem(d, value)
        if problem:
            found.append(f"{d.flag.shown or d.key} {problem}")
    return found


def _problem(d: Declared, value: Any) -> str | None:
    if d.type is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if d.repeatable:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else "must be a string or a list of strings"
    if d.type is str:
        return None if isinstance(value, str) else "must be a string"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (d.type is int and not isinstance(value, int)):
        return "must be a whole number" if d.type is int else "must be a number"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, not {value}"
    if d.flag.minimum is not None and value < d.flag.minimum:
        return f"must be at least {d.flag.minimum:g}, not {value:g}"
    if d.flag.above is not None and value <= d.flag.above:
        return f"must be more than {d.flag.above:g}, not {value:g}"
    return None


def check(obj: Any, where: str) -> None:
    """Raise one UsageError naming every declared field of ``obj`` that is wrong."""
    found = problems(obj)
    if found:
        raise UsageError(f"{where}: {'; '.join(found)}")


def check_all(objects: list[Any], where: str) -> None:
    """Raise one UsageError naming every wrong declared field of any of ``objects``."""
    found = [p for obj in objects for p in problems(obj)]
    if found:
        raise UsageError(f"{where}: {'; '.join(found)}")


def from_mapping(cls: type, values: Mapping[str, Any], where: str, path: Callable[[str], str] = str) -> Any:
    """``cls`` built from a recipe step's keys (a repeatable option may be one string); ``path``
    turns the values of options that name files into paths (a recipe's: beside the recipe)."""
    fields = {d.key: d for d in declared(cls)}
    unknown = [k for k in values if k.replace("-", "_") not in fields]
    if unknown:
        owner = getattr(cls, "name", cls.__name__.lower())
        close = [m for k in unknown for m in difflib.get_close_matches(k, fields, 1)]
        hint = f" (did you mean {', '.join(repr(m) for m in close)}?)" if close else ""
        raise UsageError(f"{where}: {owner} has no option {', '.join(repr(k) for k in unknown)}{hint}; it takes"
                         f" {', '.join(sorted(fields))}")
    chosen = {}
    for key, value in values.items():
        d = fields[key.replace("-", "_")]
        chosen[d.name] = [value] if d.repeatable and isinstance(value, str) else value
        if d.flag.path:
            chosen[d.name] = _paths(chosen[d.name], path)
    missing = [f"needs '{d.key}'" for d in fields.values() if d.default is MISSING and d.name not in chosen]
    wrong = [f"'{d.key}' {_problem(d, chosen[d.name])}" for d in fields.values()
             if d.name in chosen and chosen[d.name] is not None and _problem(d, chosen[d.name])]
    if missing or wrong:
        raise UsageError(f"{where}: {'; '.join(missing + wrong)}")
    return cls(**chosen)


def _paths(value: Any, path: Callable[[str], str]) -> Any:
    """``value`` with ``path`` applied to its strings (anything else is left for the checks)."""
    if isinstance(value, str):
        return path(value)
    return [path(v) if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


def from_text(d: Declared, text: str) -> Any:
    """A command-line value for ``d`` (an int stays an int where a number is asked)."""
    if d.type is str:
        return text
    if d.type is int or (d.type == Number and _integral(text)):
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{d.flag.shown} {text:.40}: expected a whole number") from None
        if d.type is int or abs(value) < 2**63:
            return value  # else beyond every integer dtype: a float (or inf, which is refused)
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{d.flag.shown} {text:.40}: expected a number") from None
    return value


def _integral(text: str) -> bool:
    return text.strip().lstrip("+-").isdigit()
