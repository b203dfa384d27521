"""Recipes: an ordered list of operations from a TOML file, run with one read and one write.

    seed = 3                        # optional: the seed of every step that draws values
    [[step]]
    op = "init"                     # a command name
    pattern = ["features.*.weight"] # that command's options, without the dashes
    scheme = "normal(std=0.02)"

Each step's keys are checked by the operation's own declaration (declare.from_mapping),
so a step does exactly what the command with the same options does.
"""

from __future__ import annotations

import sys

from .. import declare
from ..errors import ParamSurgeonError, UsageError
from ..parsing import parse_document
from . import OPERATIONS
from .surgery import Step

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


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
        if op not in OPERATIONS:
            shown = f" ({op}): unknown op '{op}'" if op is not None else ": missing op"
            raise UsageError(f"{where}: step {number}{shown}; choose from {', '.join(OPERATIONS)}")
        label = f"{where}: step {number} ({op})"
        try:
            operation = declare.from_mapping(OPERATIONS[op], options, label)
        except ParamSurgeonError as e:
            raise type(e)(e.args[0] if str(e).startswith(label) else f"{label}: {e}") from e
        steps.append(Step(operation, label, f"step {number} ({op})"))
    return steps, seed
