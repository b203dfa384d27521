"""Recipes: an ordered list of operations from a TOML file, run with one read and one write.

    seed = 3                        # optional: the seed of every step that draws values
    [[step]]
    op = "init"                     # a command name
    pattern = ["features.*.weight"] # that command's options, without the dashes
    scheme = "normal(std=0.02)"

    [[step]]
    op = "merge"                    # the recipe's checkpoint is the first input (the base of
    inputs = ["../ft/b.safetensors"] # the task methods); inputs lists the others
    method = "ties"

Each step's keys are checked by the operation's own declaration (declare.from_mapping),
so a step does exactly what the command with the same options does. Paths in a recipe
(``source``, ``inputs``, ``base``, ``adapter``) are relative to the recipe's directory.
"""

from __future__ import annotations

import os
import sys

from .. import declare
from ..errors import ParamSurgeonError, UsageError
from ..parsing import parse_document
from .catalog import OPERATIONS
from .merge import OWN, Merge
from .merge.registry import find
from .surgery import Step

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STEPS = {**OPERATIONS, "merge": Merge}  # what a step's op may name


def read(path: str) -> str:
    """The text of the recipe at ``path``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read recipe '{path}': {e.strerror}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not a TOML recipe (the file is not text; is it a checkpoint? pass the"
                         " checkpoint first, then the recipe)") from e


def parse(text: str, where: str) -> tuple[list[Step], int | None]:
    """The steps of a recipe, each checked, and its top-level seed (None when it names none)."""
    try:
        recipe = parse_document(tomllib.loads, text)
    except ValueError as e:
        raise UsageError(f"{where}: not valid TOML ({e})") from e
    unknown = [k for k in recipe if k not in ("step", "seed")]
    if unknown:
        raise UsageError(f"{where}: unknown top-level key {', '.join(repr(k) for k in unknown)}; a recipe has"
                         " [[step]] tables and an optional seed")
    seed = recipe.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise UsageError(f"{where}: seed must be a whole number")
    tables = recipe.get("step")
    if not isinstance(tables, list) or not tables:
        raise UsageError(f"{where}: no steps; write each operation as a [[step]] table with op = \"...\"")
    steps = []
    for number, table in enumerate(tables, 1):
        options = dict(table)
        op = options.pop("op", None)
        if op not in STEPS:
            shown = f" ({op}): unknown op '{op}'" if op is not None else ": missing op"
            raise UsageError(f"{where}: step {number}{shown}; choose from {', '.join(STEPS)}")
        label = f"{where}: step {number} ({op})"
        try:
            operation = declare.from_mapping(STEPS[op], _own_first(options) if op == "merge" else options, label,
                                             path=_beside(where))
        except ParamSurgeonError as e:
            e.within(label)
            raise
        steps.append(Step(operation, label, f"step {number} ({op})"))
    return steps, seed


def _own_first(options: dict) -> dict:
    """A merge step's options with the recipe's checkpoint as its first input: the base of the
    task methods unless the step names one, else the first checkpoint merged."""
    inputs = options.get("inputs")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list):
        return options  # missing, or not a list: declare reports it
    method = find(options.get("method"))
    if method is not None and method.task and "base" not in options:
        return {**options, "inputs": inputs, "base": OWN}
    return {**options, "inputs": [OWN, *inputs]}


def _beside(recipe: str):
    """``path(value)``: a path of the recipe at ``recipe``, relative to the recipe's directory
    (absolute paths, standard input '-' and URLs stay as they are); shown without 'dir/..'
    where that names the same file."""
    folder = os.path.dirname(recipe)

    def path(value: str) -> str:
        if value in ("-", OWN) or "://" in value:
            return value
        joined = os.path.join(folder, value)
        short = os.path.normpath(joined)
        return short if os.path.realpath(short) == os.path.realpath(joined) else joined

    return path
