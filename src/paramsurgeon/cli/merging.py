"""The merge command: a one-step run (cli/operations.run_steps) whose steps read every input;
each merged tensor is computed when the writer reaches it."""

from __future__ import annotations

from typing import Optional

from .. import formats
from ..checkpoint import Checkpoint
from ..errors import ParamSurgeonError, SelectionError
from ..formats import inputs, registry
from ..ops.merge import Merge
from ..ops.merge.registry import NAMES
from ..ops.surgery import Step
from .operations import run_steps
from .options import Read, Surgery, Unquantized, Write

EXAMPLE = "paramsurgeon merge ft-a.pt ft-b.pt --base base.pt --method ties --density 0.5 -o merged.pt"


def run_merge(merge: Merge, read: Read, write: Write, surgery: Surgery, unquantized: Unquantized | None = None) -> None:
    """Combine checkpoints tensor by tensor: average, slerp, task arithmetic, TIES, DARE.

    Methods: {methods}; streaming, one tensor
    of each input in memory at a time.

    The first checkpoint (the --base for task methods) is the one written: tensors that are not
    merged (integers, unselected) and the rest of the file come from it.
    """
    for number, path in enumerate(merge.inputs, 1):
        inputs.record(path, f"merge input {number}")
    inputs.record(merge.base, "--base")
    run_steps("merge", merge.written, [Step(merge)], None, read, write, surgery, sources=_loader(read),
              unquantized=unquantized)


run_merge.__doc__ = run_merge.__doc__.format(methods=", ".join(NAMES))  # the registry's, in its order


def _loader(read: Read):
    """``load(path, key)`` opening each input once; --key applies to the torch inputs (a
    safetensors or sharded input is already a flat mapping of names to tensors)."""
    opened: dict = {}
    options = {"allow_globals": tuple(read.allow_global), "unsafe_pickle": read.unsafe_pickle}

    def open_one(path: Optional[str]) -> Checkpoint:
        try:
            return formats.load(path, key=read.key, **options)
        except SelectionError as e:
            if read.key is None or path in (None, "-"):
                raise
            try:
                flat = formats.load(path, **options)
            except ParamSurgeonError:
                raise e from None
            if registry.get(flat.format).nested:
                raise
            return flat

    def load(path: Optional[str], _key: Optional[str]) -> Checkpoint:
        if path not in opened:
            opened[path] = open_one(path)
        return opened[path]

    return load


__all__ = ["EXAMPLE", "run_merge"]
