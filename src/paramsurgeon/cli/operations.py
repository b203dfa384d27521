"""The commands that change tensors: one per operation (built from its declaration), and
apply for a recipe of them. Each rehearses every step (all checks before anything is
computed), then prints the plan (--dry-run) or performs it and writes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .. import formats
from ..checkpoint import Checkpoint
from ..declare import REQUIRED, argument, option
from ..errors import UsageError
from ..formats.files import refuse_terminal
from ..ops import OPERATIONS, Operation
from ..ops.surgery import Step, check_values, draw_seeds, perform, rehearse
from ..report import render
from .console import (color_on_stdout, emit, loader, note, output_target, progress, show_notes, terminal_width,
                      work, write_checkpoint)
from .options import Input, NamedInput, Read, Surgery, Unquantized, Write

if TYPE_CHECKING:
    from ..formats.loader import Loader


def run_operation(given: Input | NamedInput, operation: Operation, read: Read, write: Write, surgery: Surgery,
                  unquantized: Unquantized | None = None) -> None:
    """One command: a one-step run."""
    run_steps(operation.name, given.ckpt, [Step(operation)], None, loader(read), write, surgery,
              unquantized=unquantized)


@dataclass(kw_only=True)
class Recipe:
    """apply's own arguments."""

    paths: list[str] = argument(REQUIRED, metavar="[CKPT] RECIPE",
                                help="The checkpoint ('-' or omitted: standard input) and the TOML recipe.")
    seed: int | None = option(None, "--seed", help="Seed for the steps that draw values and name none (a recipe's"
                                                   " own seed comes first).")


def apply_recipe(recipe: Recipe, read: Read, write: Write, surgery: Surgery,
                 unquantized: Unquantized | None = None) -> None:
    """Run the operations of a TOML recipe in order, with one read and one write."""
    from ..ops import recipes

    if len(recipe.paths) > 2:
        raise UsageError("apply: pass the checkpoint and one recipe")
    path, recipe_path = (recipe.paths[0], recipe.paths[1]) if len(recipe.paths) == 2 else (None, recipe.paths[0])
    load = loader(read)
    load.inputs.record(recipe_path, "the recipe")
    steps, seed = recipes.parse(recipes.read(recipe_path), recipe_path)
    run_steps("apply", path, steps, seed if seed is not None else recipe.seed, load, write, surgery,
              unquantized=unquantized)


def run_steps(command: str, path: Optional[str], steps: list[Step], seed: Optional[int], sources: Loader,
              write: Write, surgery: Surgery, unquantized: Unquantized | None = None) -> None:
    """Rehearse ``steps`` on the checkpoint at ``path``, then print the plan (--dry-run, --json) or
    perform it and write the result; ``sources``, the command's loader, opens the checkpoint and
    every other input the steps read; ``unquantized``: how a GGUF output stores what it cannot requantize."""
    steps, notes = draw_seeds(steps, seed)
    for message in notes:
        note(f"{command}: {message}")
    drawn = next((s.operation.seed for s in steps if s.operation.random), None) if notes else None
    ckpt = sources.checkpoint(path, sources.key, "the checkpoint")
    target = _target(ckpt, write, surgery, sources)
    if unquantized is not None and unquantized.dtype is not None:
        _store_unquantized(ckpt, target, unquantized.dtype)
    planned = rehearse(ckpt, steps, sources)
    _show_input_notes(ckpt, sources)  # the inputs the steps opened are known now
    if target.path is not None:
        sources.inputs.refuse_overwrite(target.path)  # the inputs the steps opened (--source), as a real run
    for step, plan, _ in planned:
        for message in plan.notes:
            note(f"{command}: {step.short + ': ' if step.short else ''}{message}")
    if write.dry_run:
        check_values(ckpt, steps, sources, [plan for _, plan, _ in planned])
    if surgery.json:
        document = render.plan_document(planned[0][1], planned[0][2], ckpt, target.path, write.dry_run) \
            if command != "apply" else render.recipe_document(planned, ckpt, target.path, write.dry_run)
        emit(render.to_json(document))
    elif write.dry_run:
        emit("".join(render.plan_text(plan, rows, terminal_width(), color_on_stdout(),
                                      f"step {number}: " if command == "apply" else "")
                     for number, (_, plan, rows) in enumerate(planned, 1)))
    if write.dry_run:
        return
    size = sum(ckpt[c.names[0]].nbytes for _, p, _ in planned for c in p.changes if c.names[0] in ckpt.tensors)
    with progress(size, "computing") as advance:
        plans, notes = perform(ckpt, steps, sources, reset_optimizer=surgery.reset_optimizer, progress=advance,
                               work=work(write, sources.inputs, drawn))
    for message in notes:
        note(f"{command}: {message}")
    summary = plans[0].summary() if command != "apply" else \
        "; ".join(f"step {i} {p.command}: {p.summary()}" for i, p in enumerate(plans, 1))
    _write_result(command, ckpt, target, write, summary, drawn)


def _target(ckpt: Checkpoint, write: Write, surgery: Surgery, sources: Loader) -> formats.Target:
    """Where the result goes (its notes shown); impossible outputs are refused before any work."""
    target = output_target(ckpt, write, sources.inputs)
    if target.path is None and not write.dry_run:
        refuse_terminal()  # before any value is computed
        if surgery.json:
            raise UsageError("--json prints the plan on standard output, where the checkpoint is going;"
                             " pass -o PATH or --dry-run")
    return target


def _show_input_notes(ckpt: Checkpoint, sources: Loader) -> None:
    """The notes of the checkpoint and of every other input the steps opened (merge's inputs, --source),
    each named after its input when there are several."""
    inputs = list({id(c): c for c in [ckpt, *sources.opened.values()]}.values())
    for each in inputs:
        show_notes(each, named=len(inputs) > 1)


def _store_unquantized(ckpt: Checkpoint, target: formats.Target, dtype: str) -> None:
    """--dtype: a GGUF output stores a changed tensor it cannot requantize as ``dtype``."""
    from ..dtypes import by_name
    from ..formats.ggufconvert import is_gguf

    if target.family != "gguf" or not is_gguf(ckpt):
        raise UsageError(f"--dtype {dtype} says how a GGUF output stores a changed tensor it cannot requantize;"
                         f" this output is {target.family}")
    try:
        resolved = by_name(dtype)
    except KeyError:
        resolved = None
    if resolved is None or resolved.name not in ("float16", "bfloat16", "float32"):
        raise UsageError(f"--dtype {dtype}: a GGUF stores a tensor unquantized as float16, bfloat16 or float32")
    ckpt.layout.unquantized = resolved


def _write_result(command: str, ckpt: Checkpoint, target: formats.Target, write: Write, summary: str,
                  seed: int | None) -> None:
    what = write_checkpoint(ckpt, target, write, seed)
    note(f"{command}: {summary}; wrote {target.path or 'standard output'} ({what})")


__all__ = ["OPERATIONS", "Recipe", "apply_recipe", "run_operation"]
