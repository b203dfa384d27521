"""Commands built from declared options (declare.py): each command is the option groups it
takes and a function that receives one instance of each.

Typer reads a command's parameters from a callable's signature; here that callable is a
dataclass made from the groups' fields, so its signature is the real ``__init__`` of its
fields, each annotated with the typer option the declaration describes. Values reach the
groups as text and are converted by the declaration (one message style, no pydantic).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from typing import Annotated, Any, Callable, List, Optional

import typer
from typer.core import TyperCommand

from .. import declare


class _Command(TyperCommand):
    """A command whose usage line names its arguments as declared: 'diff [OPTIONS] A B', and whose
    greedy options take every value up to the next option ('--to a b c' is '--to a --to b --to c'),
    or up to a path that exists (the checkpoint, given after them: '--to a b model.pt')."""

    greedy: tuple[str, ...] = ()

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        spread, taking = [], None
        for index, arg in enumerate(args):
            if arg == "--":
                spread += args[index:]
                break
            if arg.startswith("-") and arg != "-":
                taking = arg.split("=", 1)[0] if arg.split("=", 1)[0] in self.greedy else None
            elif taking is not None and spread[-1] != taking:
                if os.path.exists(arg):
                    taking = None
                else:
                    spread.append(taking)
            spread.append(arg)
        return super().parse_args(ctx, spread)

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                shown = param.metavar or param.name.upper()
                pieces.append(shown if param.required or param.nargs != 1 else f"[{shown}]")
        return pieces


def command(app: typer.Typer, name: str, groups: list[type], run: Callable[..., Any], doc: str) -> None:
    """Add command ``name`` to ``app``: its parameters are the declared fields of ``groups``,
    and ``run`` receives one instance of each group, in order. ``doc`` is its --help."""
    fields = [(group, d) for group in groups for d in _own_first(group)]
    names = [d.name for _, d in fields]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise TypeError(f"{name}: options declared twice: {', '.join(duplicated)}")

    def post_init(self) -> None:
        values = {d.name: _value(d, getattr(self, d.name)) for _, d in fields}
        instances = [group(**{d.name: values[d.name] for d in declare.declared(group)}) for group in groups]
        declare.check_all(instances, name)  # bounds of every group (operations check their own too)
        run(*instances)

    spec = [(d.name, _annotation(d), dataclasses.field(default=_default(d))) for _, d in fields]
    callback = dataclasses.make_dataclass(f"{name.title()}Command", spec, kw_only=True,
                                          namespace={"__post_init__": post_init, "__doc__": doc})
    greedy = tuple(f for _, d in fields if d.flag.greedy for f in d.flag.flags)
    cls = type(f"{name.title()}Click", (_Command,), {"greedy": greedy}) if greedy else _Command
    app.command(name, cls=cls, help=doc, short_help=" ".join(doc.split("\n\n")[0].split()))(callback)  # the first paragraph


def _own_first(group: type) -> list[declare.Declared]:
    """A group's fields, those it declares itself before those it inherits (--below before -p)."""
    own = vars(group).get("__annotations__", {})
    return sorted(declare.declared(group), key=lambda d: d.name not in own)


def _annotation(d: declare.Declared) -> Any:
    """The type typer sees: flags stay bool, repeatable options a list, all else text."""
    flag = d.flag
    if not flag.flags:
        kind = List[str] if d.repeatable else (str if d.default is declare.REQUIRED else Optional[str])
        return Annotated[kind, typer.Argument(metavar=flag.metavar, help=flag.help, show_default=False)]
    kind = bool if d.type is bool else (List[str] if d.repeatable else (
        str if d.default is declare.REQUIRED else Optional[str]))
    metavar = flag.metavar or _METAVARS.get(d.type)  # typer, given text, would show '<str>'
    return Annotated[kind, typer.Option(*flag.flags, metavar=metavar, help=flag.help, show_default=False)]


_METAVARS = {int: "INTEGER", float: "NUMBER", declare.Number: "NUMBER", str: "TEXT"}


def _default(d: declare.Declared) -> Any:
    if d.default is declare.REQUIRED:
        return dataclasses.MISSING
    if d.repeatable:
        return None  # typer gives an empty list
    return d.default if d.type is bool else None


def _value(d: declare.Declared, given: Any) -> Any:
    """What the declaration wants from what typer parsed."""
    if d.type is bool:
        return given
    if d.repeatable:
        return list(given or [])
    if given is None:
        return d.default
    return declare.from_text(d, given)


def groups_of(function: Callable) -> list[type]:
    """The option groups a command function takes: its parameters' annotated types, in order."""
    hints = typing.get_type_hints(function)
    return [hints[name] for name in function.__code__.co_varnames[:function.__code__.co_argcount]]


def described(doc: str, example: str) -> str:
    """A command's --help: its summary, then one example."""
    return f"{inspect.cleandoc(doc)}\n\n\b\nExample: {example}"
