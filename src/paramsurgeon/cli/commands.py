"""The command line: every command's name, options and --help, and nothing else.

Each body hands its arguments to the module that does the work, imported only then, so
that --help and header-only commands start without loading what they do not use.
"""

import importlib
from typing import Annotated, List, Optional

import typer

from .options import (EVERY, PLAN, READ, SELECT, TIES, WRITE, PlanOptions, ReadOptions, SelectOptions, TieOptions,
                      WriteOptions, options)

CKPT = Annotated[Optional[str], typer.Argument(
    metavar="CKPT", help="Checkpoint file, sharded directory or index; '-' or omitted: standard input.",
    show_default=False)]


def _act(module: str, name: str, arguments: dict) -> None:
    getattr(importlib.import_module(f".{module}", __package__), name)(**arguments)


@options(READ, SELECT)
def inspect(
    ckpt: CKPT = None,
    no_stats: Annotated[bool, typer.Option("--no-stats", help="Shapes and dtypes only: reads no tensor data.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document (schema in the README).")] = False,
    tree: Annotated[bool, typer.Option("--tree", help="Parameter counts per module instead of per tensor.")] = False,
    depth: Annotated[Optional[int], typer.Option("--depth", min=0, help="With --tree: levels to show.")] = None,
    hash_: Annotated[bool, typer.Option("--hash", help="Add the sha256 of each tensor's values.")] = False,
    read: ReadOptions = None,
    select: SelectOptions = None,
):
    """Show every tensor (name, kind, shape, dtype, statistics), ties, totals and the rest of the file.

    \b
    Example: paramsurgeon inspect samples/resnet.pt -p 'layer1.*'
    """
    _act("reports", "inspect", locals())


@options(READ, SELECT)
def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="The first checkpoint.", show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="The second checkpoint.", show_default=False)],
    atol: Annotated[float, typer.Option("--atol", min=0, help="Values within atol + rtol*|b| count as equal.")] = 0.0,
    rtol: Annotated[float, typer.Option("--rtol", min=0, help="Relative tolerance (see --atol).")] = 0.0,
    no_values: Annotated[bool, typer.Option("--no-values", help="Compare names, shapes and dtypes only (reads"
                                            " no tensor data).")] = False,
    tensors_only: Annotated[bool, typer.Option("--tensors-only", help="Compare the named tensors only, not the"
                                               " rest of the file (optimizer state, epoch) nor ties.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document (schema in the README).")] = False,
    read: ReadOptions = None,
    select: SelectOptions = None,
):
    """Compare two checkpoints: tensors, the rest of the file and ties; exit 0 when equal, 1 when not.

    The rest of the file (optimizer moments, EMA copies, the epoch) is compared by path, and ties
    (shared storage) by name; --tensors-only, or a selection, compares the chosen tensors only.

    \b
    Example: paramsurgeon diff before.pt after.safetensors --atol 1e-6
    """
    _act("reports", "diff", locals())


@options(READ, SELECT)
def check(
    ckpt: CKPT = None,
    finite: Annotated[bool, typer.Option("--finite", help="No NaN or Inf in any floating-point tensor"
                                         " (the rule when none is given).")] = False,
    max_abs: Annotated[Optional[float], typer.Option("--max-abs", metavar="X", help="Every |value| <= X.")] = None,
    like: Annotated[Optional[str], typer.Option("--like", metavar="OTHER", help="Same names, shapes and dtypes"
                                                " as OTHER.")] = None,
    expect: Annotated[List[str], typer.Option("--expect", metavar="NAME=SHAPE", help="This tensor exists, with"
                                              " this shape (64x3x7x7); repeatable.")] = [],
    expect_file: Annotated[Optional[str], typer.Option(
        "--expect-file", metavar="FILE", help="Expected tensors, one 'NAME [SHAPE] [DTYPE]' per line.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="D", help="Every floating-point tensor is"
                                                 " of dtype D.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document (schema in the README).")] = False,
    read: ReadOptions = None,
    select: SelectOptions = None,
):
    """Check rules for CI: exit 0 when every rule holds, 1 with a report of each violation.

    A sharded checkpoint is also checked for agreement between its index and its shards.

    \b
    Example: paramsurgeon check model.safetensors --finite --max-abs 100 --like reference.pt
    """
    _act("reports", "check", locals())


@options(READ, SELECT)
def groups(
    ckpt: CKPT = None,
    no_decay: Annotated[List[str], typer.Option("--no-decay", metavar="GLOB", help="Also exempt these names"
                                                " from weight decay; repeatable.")] = [],
    decay: Annotated[List[str], typer.Option("--decay", metavar="GLOB", help="Decay these names whatever the"
                                             " rules say; repeatable.")] = [],
    json_: Annotated[bool, typer.Option("--json", help='Print {"decay": [...], "no_decay": [...]}.')] = False,
    read: ReadOptions = None,
    select: SelectOptions = None,
):
    """Split parameters into weight-decay groups: biases, norm and PReLU weights get none.

    \b
    Example: paramsurgeon groups model.pt --json > groups.json
    """
    _act("reports", "groups", locals())


@options(READ, WRITE)
def convert(
    ckpt: CKPT = None,
    max_shard_size: Annotated[Optional[str], typer.Option(
        "--max-shard-size", metavar="SIZE", help="Write a Hugging Face sharded directory with shards of at most"
        " SIZE (5GB = 5*10^9 bytes, as the hub counts).")] = None,
    read: ReadOptions = None,
    write: WriteOptions = None,
):
    """Convert between torch and safetensors, single file and sharded directory; values are untouched.

    \b
    Example: paramsurgeon convert samples/resnet.pt -o resnet.safetensors
    """
    _act("conversion", "convert", locals())


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

    \b
    Example: paramsurgeon init model.pt -p 'fc.*' --scheme 'xavier_uniform(gain=relu)' --seed 3 -o out.pt
    """
    _act("surgery", "init", locals())


@options(READ, SELECT, EVERY, TIES, WRITE, PLAN)
def zero(
    ckpt: CKPT = None,
    below: Annotated[Optional[float], typer.Option(
        "--below", metavar="T", min=0, help="Zero only the entries with |x| < T (magnitude pruning).")] = None,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, ties: TieOptions = None,
    write: WriteOptions = None, plan: PlanOptions = None,
):
    """Set the selected tensors to zero, or only their small entries with --below.

    \b
    Example: paramsurgeon zero model.pt -p 'layer*.1.bn2.weight' -o out.pt
    """
    _act("surgery", "zero", locals())


@options(READ, SELECT, EVERY, TIES, WRITE, PLAN)
def scale(
    ckpt: CKPT = None,
    by: Annotated[float, typer.Option("--by", metavar="F", help="The factor.")] = ...,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, ties: TieOptions = None,
    write: WriteOptions = None, plan: PlanOptions = None,
):
    """Multiply the selected tensors by a factor.

    \b
    Example: paramsurgeon scale model.pt -p 'blocks.*.mlp.fc2.weight' --by 0.5 -o out.pt
    """
    _act("surgery", "scale", locals())


@options(READ, SELECT, EVERY, TIES, WRITE, PLAN)
def cast(
    ckpt: CKPT = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="D", help="float32, float16, bfloat16 or float64.")] = ...,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, ties: TieOptions = None,
    write: WriteOptions = None, plan: PlanOptions = None,
):
    """Change the dtype of the selected floating-point tensors (others are left as they are).

    \b
    Example: paramsurgeon cast model.pt --all --dtype bfloat16 -o model-bf16.safetensors
    """
    _act("surgery", "cast", locals())


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

    \b
    Example: paramsurgeon copy model.pt --source pretrained.pt --skip-mismatched -o init.pt
    """
    _act("surgery", "copy", locals())


@options(READ, TIES, WRITE, PLAN)
def tie(
    ckpt: CKPT = None,
    source: Annotated[str, typer.Option("--source", metavar="NAME", help="The tensor whose storage is shared.")] = ...,
    target: Annotated[List[str], typer.Option("--target", metavar="GLOB", help="Tensors that take the source's"
                                              " values and share its storage; repeatable.")] = ...,
    read: ReadOptions = None, ties: TieOptions = None, write: WriteOptions = None, plan: PlanOptions = None,
):
    """Make tensors share one storage (e.g. tie an LM head to the token embedding).

    \b
    Example: paramsurgeon tie gpt.pt --source wte.weight --target lm_head.weight -o tied.pt
    """
    _act("surgery", "tie", locals())


@options(READ, SELECT, EVERY, WRITE, PLAN)
def untie(
    ckpt: CKPT = None,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, write: WriteOptions = None,
    plan: PlanOptions = None,
):
    """Give each selected tensor storage of its own; values do not change.

    \b
    Example: paramsurgeon untie gpt.pt -p lm_head.weight -o untied.pt
    """
    _act("surgery", "untie", locals())


@options(READ, WRITE, PLAN)
def rename(
    ckpt: CKPT = None,
    from_: Annotated[str, typer.Option("--from", metavar="GLOB", help="Names to rename.")] = ...,
    to: Annotated[str, typer.Option("--to", metavar="GLOB", help="New names, with the same wildcards.")] = ...,
    read: ReadOptions = None, write: WriteOptions = None, plan: PlanOptions = None,
):
    """Rename tensors by wildcard mapping, e.g. strip DataParallel's 'module.' prefix.

    \b
    Example: paramsurgeon rename model.pt --from 'module.*' --to '*' -o clean.pt
    """
    _act("surgery", "rename", locals())


@options(READ, SELECT, EVERY, WRITE, PLAN)
def drop(
    ckpt: CKPT = None,
    read: ReadOptions = None, select: SelectOptions = None, every: bool = False, write: WriteOptions = None,
    plan: PlanOptions = None,
):
    """Remove the selected tensors.

    \b
    Example: paramsurgeon drop model.pt -p 'fc.*' -o backbone.pt
    """
    _act("surgery", "drop", locals())


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

    \b
    Example: paramsurgeon apply model.pt recipe.toml -o out.pt
    """
    _act("surgery", "apply_recipe", locals())
