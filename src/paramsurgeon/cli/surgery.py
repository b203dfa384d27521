"""Commands that change tensors: init, zero, scale, cast, copy, tie, untie, rename, drop.

Each parses its options, builds a Plan through the library (every check made before
anything is computed), then prints it (--dry-run) or applies and writes it.
"""

import secrets
import sys
from typing import Annotated, Callable, List, Optional

import typer

from .. import formats, ops, recipes, report, steps
from ..checkpoint import Checkpoint
from ..errors import OutputError, UsageError
from ..extras import summarize
from ..plan import Plan, apply
from ..units import human_bytes
from .common import color_on_stdout, emit, note, open_checkpoint, progress, selected_names, terminal_width
from .options import (EVERY, PLAN, READ, SELECT, TIES, WRITE, PlanOptions, ReadOptions, SelectOptions, TieOptions,
                      WriteOptions, options)
from .reports import CKPT


def _open_for_writing(path: Optional[str], read: ReadOptions, write: WriteOptions,
                      plan_options: PlanOptions) -> tuple[Checkpoint, formats.Target]:
    """The checkpoint and where its result goes, refusing impossible outputs before any work."""
    ckpt = open_checkpoint(path, read)
    target = formats.resolve_target(ckpt, write.output, write.format, write.in_place)
    if target.path is None and not write.dry_run:
        if sys.stdout.isatty():
            raise OutputError("refusing to write a binary checkpoint to the terminal; redirect it (> out.pt),"
                              " pipe it, or pass -o PATH")
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
        emit(report.to_json(report.plan_document(plan, rows, ckpt, target.path, write.dry_run)))
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
    node = ckpt.root
    for part in paths[0]:
        node = node[part]
    note(f"{command}: note: {ckpt.source} also holds optimizer state at '{where}' ({summarize(node)}), which no"
         " longer matches the changed tensors; pass --reset-optimizer to clear its moments")


def _step(op: str, path: Optional[str], read: ReadOptions, write: WriteOptions, plan: PlanOptions,
          **options) -> None:
    """Run ``op`` with the given options (None values left out) through the library's steps."""
    chosen = steps.normalize(op, {k: v for k, v in options.items() if v is not None and v != []
                                  and v is not False}, op)
    if steps.needs_seed(op, chosen) and "seed" not in chosen and not write.dry_run:
        chosen["seed"] = secrets.randbelow(2**31)
        note(f"{op}: seed {chosen['seed']} (pass --seed {chosen['seed']} to repeat this exactly)")

    def load(source: str, key: Optional[str]) -> Checkpoint:
        return formats.load(source, key=key, allow_globals=tuple(read.allow_global), unsafe_pickle=read.unsafe_pickle)

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


@options(READ, SELECT, EVERY, TIES, WRITE, PLAN)
def init(
    ckpt: CKPT = None,
    const: Annotated[Optional[str], typer.Option("--const", metavar="V", help="Fill with this value.")] = None,
    scheme: Annotated[Optional[str], typer.Option(
        "--scheme", metavar="SPEC", help="A torch.nn.init scheme with keyword arguments, e.g."
        " 'normal(std=0.02)', 'xavier_uniform(gain=relu)', 'kaiming_normal(mode=fan_out, nonlinearity=relu)';"
        " or 'default' for what each layer's reset_parameters gives.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Make the values reproducible (each tensor's"
                                                " generator comes from the seed and its name).")] = None,
    layer: Annotated[Optional[str], typer.Option(
        "--layer", metavar="KIND", help="With --scheme default: the layer kind, when it cannot be inferred.")] = None,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, ties: TieOptions = None,
    write: WriteOptions = None, plan: PlanOptions = None,
):
    """Re-initialise the selected tensors with a constant or a torch.nn.init scheme.

    Example: paramsurgeon init model.pt -p 'fc.*' --scheme 'xavier_uniform(gain=relu)' --seed 3 -o out.pt
    """
    _step("init", ckpt, read, write, plan, **_selection(select), **_ties(ties), all=every,
          const=_number(const, "--const") if const is not None else None, scheme=scheme, seed=seed, layer=layer)


@options(READ, SELECT, EVERY, TIES, WRITE, PLAN)
def zero(
    ckpt: CKPT = None,
    below: Annotated[Optional[float], typer.Option(
        "--below", metavar="T", min=0, help="Zero only the entries with |x| < T (magnitude pruning).")] = None,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, ties: TieOptions = None,
    write: WriteOptions = None, plan: PlanOptions = None,
):
    """Set the selected tensors to zero, or only their small entries with --below.

    Example: paramsurgeon zero model.pt -p 'layer*.1.bn2.weight' -o out.pt
    """
    _step("zero", ckpt, read, write, plan, **_selection(select), **_ties(ties), all=every, below=below)


@options(READ, SELECT, EVERY, TIES, WRITE, PLAN)
def scale(
    ckpt: CKPT = None,
    by: Annotated[float, typer.Option("--by", metavar="F", help="The factor.")] = ...,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, ties: TieOptions = None,
    write: WriteOptions = None, plan: PlanOptions = None,
):
    """Multiply the selected tensors by a factor.

    Example: paramsurgeon scale model.pt -p 'blocks.*.mlp.fc2.weight' --by 0.5 -o out.pt
    """
    _step("scale", ckpt, read, write, plan, **_selection(select), **_ties(ties), all=every, by=by)


@options(READ, SELECT, EVERY, TIES, WRITE, PLAN)
def cast(
    ckpt: CKPT = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="D", help="float32, float16, bfloat16 or float64.")] = ...,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, ties: TieOptions = None,
    write: WriteOptions = None, plan: PlanOptions = None,
):
    """Change the dtype of the selected floating-point tensors (others are left as they are).

    Example: paramsurgeon cast model.pt --all --dtype bfloat16 -o model-bf16.safetensors
    """
    _step("cast", ckpt, read, write, plan, **_selection(select), **_ties(ties), all=every, dtype=dtype)


@options(READ, SELECT, TIES, WRITE, PLAN)
def copy(
    ckpt: CKPT = None,
    from_: Annotated[Optional[str], typer.Option("--from", metavar="SRC", help="Source names (a glob).")] = None,
    to: Annotated[Optional[str], typer.Option("--to", metavar="DST", help="Target names, with the same"
                                              " wildcards as --from.")] = None,
    source: Annotated[Optional[str], typer.Option(
        "--source", metavar="OTHER", help="Read the sources from another checkpoint (e.g. pretrained weights);"
        " without --from/--to, copy every tensor whose name is in both.")] = None,
    source_key: Annotated[Optional[str], typer.Option(
        "--source-key", metavar="KEY", help="--key for the --source checkpoint.")] = None,
    skip_mismatched: Annotated[bool, typer.Option(
        "--skip-mismatched", help="Skip (and report) pairs whose shapes differ instead of failing.")] = False,
    read: ReadOptions = None, select: SelectOptions = None, ties: TieOptions = None, write: WriteOptions = None,
    plan: PlanOptions = None,
):
    """Copy values into existing tensors: from other tensors, or from another checkpoint.

    Example: paramsurgeon copy model.pt --source pretrained.pt --skip-mismatched -o init.pt
    """
    _step("copy", ckpt, read, write, plan, **_selection(select), **_ties(ties), source=source, source_key=source_key,
          skip_mismatched=skip_mismatched, **{"from": from_, "to": to})


@options(READ, TIES, WRITE, PLAN)
def tie(
    ckpt: CKPT = None,
    source: Annotated[str, typer.Option("--source", metavar="NAME", help="The tensor whose storage is shared.")] = ...,
    target: Annotated[List[str], typer.Option("--target", metavar="GLOB", help="Tensors that take the source's"
                                              " values and share its storage; repeatable.")] = ...,
    read: ReadOptions = None, ties: TieOptions = None, write: WriteOptions = None, plan: PlanOptions = None,
):
    """Make tensors share one storage (e.g. tie an LM head to the token embedding).

    Example: paramsurgeon tie gpt.pt --source wte.weight --target lm_head.weight -o tied.pt
    """
    _step("tie", ckpt, read, write, plan, **_ties(ties), source=source, target=target)


@options(READ, SELECT, EVERY, WRITE, PLAN)
def untie(
    ckpt: CKPT = None,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, write: WriteOptions = None,
    plan: PlanOptions = None,
):
    """Give each selected tensor storage of its own; values do not change.

    Example: paramsurgeon untie gpt.pt -p lm_head.weight -o untied.pt
    """
    _step("untie", ckpt, read, write, plan, **_selection(select), all=every)


@options(READ, WRITE, PLAN)
def rename(
    ckpt: CKPT = None,
    from_: Annotated[str, typer.Option("--from", metavar="GLOB", help="Names to rename.")] = ...,
    to: Annotated[str, typer.Option("--to", metavar="GLOB", help="New names, with the same wildcards.")] = ...,
    read: ReadOptions = None, write: WriteOptions = None, plan: PlanOptions = None,
):
    """Rename tensors by wildcard mapping, e.g. strip DataParallel's 'module.' prefix.

    Example: paramsurgeon rename model.pt --from 'module.*' --to '*' -o clean.pt
    """
    _step("rename", ckpt, read, write, plan, **{"from": from_, "to": to})


@options(READ, SELECT, EVERY, WRITE, PLAN)
def drop(
    ckpt: CKPT = None,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, write: WriteOptions = None,
    plan: PlanOptions = None,
):
    """Remove the selected tensors.

    Example: paramsurgeon drop model.pt -p 'fc.*' -o backbone.pt
    """
    _step("drop", ckpt, read, write, plan, **_selection(select), all=every)


@options(READ, WRITE, PLAN)
def apply_recipe(
    paths: Annotated[List[str], typer.Argument(
        metavar="[CKPT] RECIPE", help="The checkpoint ('-' or omitted: standard input) and the TOML recipe.",
        show_default=False)],
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for the steps that draw values and name"
                                                " none (a recipe's own seed comes first).")] = None,
    read: ReadOptions = None, write: WriteOptions = None, plan: PlanOptions = None,
):
    """Run the operations of a TOML recipe in order, with one read and one write.

    Example: paramsurgeon apply model.pt recipe.toml -o out.pt
    """
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

    def load(source: str, key: Optional[str]) -> Checkpoint:
        return formats.load(source, key=key, allow_globals=tuple(read.allow_global), unsafe_pickle=read.unsafe_pickle)

    ckpt, target = _open_for_writing(path, read, write, plan)
    planned = recipes.check(ckpt, recipe, load, recipe_path)
    for step, step_plan, _ in planned:
        for message in step_plan.notes:
            note(f"apply: step {step.number} ({step.op}): {message}")
    if plan.json:
        emit(report.to_json(report.recipe_document(planned, ckpt, target.path, write.dry_run)))
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
