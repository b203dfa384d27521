"""Options shared by many commands, declared once and added to each command's signature.

A command lists the groups it takes (``@options(READ, SELECT)``) and receives each group
as one object (``read: ReadOptions``), the way sqlite-utils shares its option decorators.
"""

import functools
import inspect
from dataclasses import dataclass
from typing import Annotated, Callable, List, Optional

import typer


@dataclass
class ReadOptions:
    key: Optional[str]
    unsafe_pickle: bool
    allow_global: List[str]
    debug: bool


@dataclass
class SelectOptions:
    pattern: List[str]
    regex: List[str]
    exclude: List[str]
    kind: List[str]
    allow_empty: bool


@dataclass
class WriteOptions:
    output: Optional[str]
    format: Optional[str]
    in_place: bool
    dry_run: bool
    dedupe: bool
    tensors_only: bool


@dataclass
class PlanOptions:
    reset_optimizer: bool
    json: bool


@dataclass
class TieOptions:
    follow_ties: bool
    untie: bool


@dataclass
class OptionGroup:
    name: str
    build: Callable
    params: list


def _param(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


READ = OptionGroup("read", ReadOptions, [
    _param("key", Annotated[Optional[str], typer.Option(
        "--key", help="Path to the tensors inside a nested checkpoint, e.g. state_dict or model.ema.")], None),
    _param("unsafe_pickle", Annotated[bool, typer.Option(
        "--unsafe-pickle", help="Accept any pickled global in a file you trust (nothing is executed).")], False),
    _param("allow_global", Annotated[List[str], typer.Option(
        "--allow-global", metavar="MODULE.NAME", help="Admit one pickled global by name (repeatable).")], []),
    _param("debug", Annotated[bool, typer.Option(
        "--debug", help="Show the Python traceback of an error.")], False),
])

SELECT = OptionGroup("select", SelectOptions, [
    _param("pattern", Annotated[List[str], typer.Option(
        "--pattern", "-p", metavar="GLOB", help="Select names matching the glob ('*' crosses dots); repeatable.")], []),
    _param("regex", Annotated[List[str], typer.Option(
        "--regex", metavar="RE", help="Select names the regex matches in full; repeatable.")], []),
    _param("exclude", Annotated[List[str], typer.Option(
        "--exclude", "-x", metavar="GLOB", help="Leave out names matching the glob; repeatable.")], []),
    _param("kind", Annotated[List[str], typer.Option(
        "--kind", "-k", metavar="KIND",
        help="Select by layer: conv, linear, batchnorm, layernorm, groupnorm, rmsnorm, norm, embedding, prelu;"
             " or role: weight, bias, buffer. Repeatable.")], []),
    _param("allow_empty", Annotated[bool, typer.Option(
        "--allow-empty", help="Warn instead of failing when a selector matches nothing.")], False),
])

WRITE = OptionGroup("write", WriteOptions, [
    _param("output", Annotated[Optional[str], typer.Option(
        "--output", "-o", metavar="PATH", help="Where to write ('-' or omitted: standard output).")], None),
    _param("format", Annotated[Optional[str], typer.Option(
        "--format", metavar="pt|safetensors", help="Output format (default: from the output's extension,"
        " else the input's).")], None),
    _param("in_place", Annotated[bool, typer.Option(
        "--in-place", help="Rewrite the input checkpoint (atomically).")], False),
    _param("dry_run", Annotated[bool, typer.Option(
        "--dry-run", help="Print what would be written; write nothing.")], False),
    _param("dedupe", Annotated[bool, typer.Option(
        "--dedupe", help="safetensors: write tied tensors once (as Hugging Face does); the ties are recorded.")], False),
    _param("tensors_only", Annotated[bool, typer.Option(
        "--tensors-only", help="Write only the tensors of a nested checkpoint (all that safetensors can hold).")], False),
])


EVERY = OptionGroup("every", lambda all: all, [
    _param("all", Annotated[bool, typer.Option(
        "--all", help="Every tensor (commands that change tensors need a selection or --all).")], False),
])

TIES = OptionGroup("ties", TieOptions, [
    _param("follow_ties", Annotated[bool, typer.Option(
        "--follow-ties", help="Change every tensor tied to a selected one, as the model would see it.")], False),
    _param("untie", Annotated[bool, typer.Option(
        "--untie", help="Give the selected tensors storage of their own before changing them.")], False),
])

PLAN = OptionGroup("plan", PlanOptions, [
    _param("reset_optimizer", Annotated[bool, typer.Option(
        "--reset-optimizer", help="Clear the optimizer's per-parameter state (moments), which no longer matches.")], False),
    _param("json", Annotated[bool, typer.Option(
        "--json", help="Print the plan as JSON on standard output (with --dry-run, or with -o).")], False),
])


def options(*groups: OptionGroup):
    """Add the parameters of ``groups`` to a command; it receives each group as one object."""

    def decorate(func):
        signature = inspect.signature(func, eval_str=True)
        names = {g.name for g in groups}
        params = [p for p in signature.parameters.values() if p.name not in names]
        params += [p for g in groups for p in g.params]

        @functools.wraps(func)
        def command(**kwargs):
            for group in groups:
                kwargs[group.name] = group.build(**{p.name: kwargs.pop(p.name) for p in group.params})
            return func(**kwargs)

        command.__signature__ = signature.replace(parameters=params)
        return command

    return decorate
