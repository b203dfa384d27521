"""What the commands that change tensors do: init, zero, scale, cast, copy, tie, untie,
rename, drop and apply. Each builds a Plan through the library (every check made before
anything is computed), then prints it (--dry-run) or applies and writes it.
"""

import secrets
from typing import Callable, Optional

from .. import formats
from ..ops import recipes, spec as steps, values as ops
from ..report import render as report
from ..checkpoint import Checkpoint
from ..errors import UsageError
from ..formats.files import refuse_terminal
from ..checkpoint.extras import summarize
from ..ops.plan import Plan, apply
from ..sizes import human_bytes
from .console import color_on_stdout, emit, note, open_checkpoint, progress, source_loader, terminal_width
from .options import PlanOptions, ReadOptions, SelectOptions, TieOptions, WriteOptions


def _open_for_writing(path: Optional[str], read: ReadOptions, write: WriteOptions,
                      plan_options: PlanOptions) -> tuple[Checkpoint, formats.Target]:
    """The checkpoint and where its result goes, refusing impossible outputs before any work."""
    ckpt = open_checkpoint(path, read)
    target = formats.resolve_target(ckpt, write.output, write.format, write.in_place)
    if target.path is None and not write.dry_run:
        refuse_terminal()  # before any value is computed
        if plan_options.json:
            raise UsageError("--json prints the plan on standard output, where the checkpoint is going;"
                             " pass -o PATH or --dry-run")
    return ckpt, target


def _write_result(command: str, ckpt: Checkpoint, target: formats.Target, write: WriteOptions, summary: str) -> None:
    tensors = ckpt.tensors
    size = sum(t.nbytes for t in tensors.values())
    with progress(size, "writing") as advance:
        formats.save(ckpt, target, dedupe=write.dedupe, tensors_only=write.tensors_only, progress=advance)
    note(f"{command}: {summary}; wrote {target.path or 'standard output'} ({len(tensors)} tensors,"
         f" {human_bytes(size)})")


def _run(command: str, path: Optional[str], read: ReadOptions, write: WriteOptions, plan_options: PlanOptions,
         build: Callable[[Checkpoint], Plan]) -> None:
    """Open, plan, then print the plan (--dry-run) or apply it and write the result."""
    ckpt, target = _open_for_writing(path, read, write, plan_options)
    plan = build(ckpt)
    for message in plan.notes:
        note(f"{command}: {message}")
    rows = plan.rows(ckpt)
    if plan_options.json:
        emit(report.to_json(report.plan_document(plan, rows, ckpt, target.path, write.dry_run)), raw=True)
    elif write.dry_run:
        emit(report.plan_text(plan, rows, terminal_width(), color_on_stdout()))
    if write.dry_run:
        return
    _warn_about_optimizer(command, ckpt, plan.touched, plan_options.reset_optimizer)
    with progress(sum(ckpt[c.names[0]].nbytes for c in plan.changes), "computing") as advance:
        apply(ckpt, plan, advance)
    _write_result(command, ckpt, target, write, _summary(plan))


def _summary(plan: Plan) -> str:
    """'3 x zero, 1 tied' for the stderr line after a write."""
    actions: dict[str, int] = {}
    for change in plan.changes:
        action = change.action.split(" from ")[0]
        actions[action] = actions.get(action, 0) + len(change.names)
    parts = [f"{n} x {action}" for action, n in actions.items()]
    parts += [f"{len(plan.aliases)} tied"] if plan.aliases else []
    parts += [f"{len(plan.drops)} dropped"] if plan.drops else []
    parts += [f"{len(plan.renames)} renamed"] if plan.renames else []
    return ", ".join(parts) if parts else "nothing changed"


def _warn_about_optimizer(command: str, ckpt: Checkpoint, touched: list[str], reset: bool) -> None:
    paths = ops.optimizer_paths(ckpt)
    if not paths or not touched:
        if reset:
            note(f"{command}: no optimizer state to reset")
        return
    if reset:
        for path in ops.reset_optimizer(ckpt):
            note(f"{command}: cleared the per-parameter state of '{path}' (param groups kept)")
        return
    where = ", ".join(".".join(map(str, p)) for p in paths)
    note(f"{command}: note: {ckpt.source} also holds optimizer state at '{where}' ({summarize(ckpt.at(paths[0]))}), which no"
         " longer matches the changed tensors; pass --reset-optimizer to clear its moments")


def _step(op: str, path: Optional[str], read: ReadOptions, write: WriteOptions, plan: PlanOptions,
          **options) -> None:
    """Run ``op`` with the given options (None values left out) through the library's steps."""
    chosen = steps.normalize(op, {k: v for k, v in options.items() if v is not None and v != []
                                  and v is not False}, op)
    if steps.needs_seed(op, chosen) and "seed" not in chosen and not write.dry_run:
        chosen["seed"] = secrets.randbelow(2**31)
        note(f"{op}: seed {chosen['seed']} (pass --seed {chosen['seed']} to repeat this exactly)")
    load = source_loader(read)
    _run(op, path, read, write, plan, lambda ckpt: steps.build_plan(ckpt, op, chosen, load))


def _number(text: str, option: str):
    """'1' -> 1, '0.5' -> 0.5: an integral value stays an int, so that it fits integer tensors."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{option} {text}: expected a number") from None
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _selection(select: SelectOptions) -> dict:
    return {"pattern": select.pattern, "regex": select.regex, "exclude": select.exclude, "kind": select.kind,
            "allow_empty": select.allow_empty}


def _ties(ties: TieOptions) -> dict:
    return {"follow_ties": ties.follow_ties, "untie": ties.untie}


def init(ckpt, const, scheme, seed, layer, read, select, every, ties, write, plan):
    """Re-initialise the selected tensors with a constant or a torch.nn.init scheme."""
    _step("init", ckpt, read, write, plan, **_selection(select), **_ties(ties), all=every,
          const=_number(const, "--const") if const is not None else None, scheme=scheme, seed=seed, layer=layer)


def zero(ckpt, below, read, select, every, ties, write, plan):
    """Set the selected tensors to zero, or only their small entries with --below."""
    _step("zero", ckpt, read, write, plan, **_selection(select), **_ties(ties), all=every, below=below)


def scale(ckpt, by, read, select, every, ties, write, plan):
    """Multiply the selected tensors by a factor."""
    _step("scale", ckpt, read, write, plan, **_selection(select), **_ties(ties), all=every, by=by)


def cast(ckpt, dtype, read, select, every, ties, write, plan):
    """Change the dtype of the selected floating-point tensors (others are left as they are)."""
    _step("cast", ckpt, read, write, plan, **_selection(select), **_ties(ties), all=every, dtype=dtype)


def copy(ckpt, from_, to, source, source_key, skip_mismatched, read, select, ties, write, plan):
    """Copy values into existing tensors: from other tensors, or from another checkpoint."""
    _step("copy", ckpt, read, write, plan, **_selection(select), **_ties(ties), source=source, source_key=source_key,
          skip_mismatched=skip_mismatched, **{"from": from_, "to": to})


def tie(ckpt, source, target, read, ties, write, plan):
    """Make tensors share one storage (e.g. tie an LM head to the token embedding)."""
    _step("tie", ckpt, read, write, plan, **_ties(ties), source=source, target=target)


def untie(ckpt, read, select, every, write, plan):
    """Give each selected tensor storage of its own; values do not change."""
    _step("untie", ckpt, read, write, plan, **_selection(select), all=every)


def rename(ckpt, from_, to, read, write, plan):
    """Rename tensors by wildcard mapping, e.g. strip DataParallel's 'module.' prefix."""
    _step("rename", ckpt, read, write, plan, **{"from": from_, "to": to})


def drop(ckpt, read, select, every, write, plan):
    """Remove the selected tensors."""
    _step("drop", ckpt, read, write, plan, **_selection(select), all=every)


def apply_recipe(paths, seed, read, write, plan):
    """Run the operations of a TOML recipe in order, with one read and one write."""
    if len(paths) > 2:
        raise UsageError("apply: pass the checkpoint and one recipe")
    path, recipe_path = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
    try:
        with open(recipe_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read recipe '{recipe_path}': {e.strerror}") from e
    recipe = recipes.parse(text, recipe_path, seed)
    if recipes.unseeded(recipe) and not write.dry_run:
        drawn = secrets.randbelow(2**31)
        recipe = recipes.parse(text, recipe_path, drawn)
        note(f"apply: seed {drawn} (pass --seed {drawn} to repeat this exactly)")
    load = source_loader(read)
    ckpt, target = _open_for_writing(path, read, write, plan)
    planned = recipes.check(ckpt, recipe, load, recipe_path)
    for step, step_plan, _ in planned:
        for message in step_plan.notes:
            note(f"apply: step {step.number} ({step.op}): {message}")
    if plan.json:
        emit(report.to_json(report.recipe_document(planned, ckpt, target.path, write.dry_run)), raw=True)
    elif write.dry_run:
        emit("".join(report.plan_text(p, rows, terminal_width(), color_on_stdout(), f"step {s.number}: ")
                     for s, p, rows in planned))
    if write.dry_run:
        return
    _warn_about_optimizer("apply", ckpt, [n for _, p, _ in planned for n in p.touched], plan.reset_optimizer)
    with progress(sum(ckpt[c.names[0]].nbytes for _, p, _ in planned for c in p.changes if c.names[0] in ckpt.tensors),
                  "computing") as advance:
        done = recipes.run(ckpt, recipe, load, recipe_path, advance)
    _write_result("apply", ckpt, target, write, "; ".join(f"step {i} {p.command}: {_summary(p)}"
                                                           for i, p in enumerate(done, 1)))
