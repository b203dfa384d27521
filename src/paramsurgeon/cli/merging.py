"""The merge command: a one-step run (cli/operations.run_steps) whose steps read every input;
each merged tensor is computed when the writer reaches it."""

from __future__ import annotations

from ..ops.merge import Merge
from ..ops.merge.registry import NAMES
from ..ops.surgery import Step
from .console import loader
from .operations import run_steps
from .options import Read, Surgery, Unquantized, Write

EXAMPLE = "paramsurgeon merge ft-a.pt ft-b.pt --base base.pt --method ties --density 0.5 -o merged.pt"


def run_merge(merge: Merge, read: Read, write: Write, surgery: Surgery, unquantized: Unquantized | None = None) -> None:
    """Combine checkpoints tensor by tensor: average, interpolate, or add task vectors to a base.

    Methods: {methods}; streaming, one tensor
    of each input in memory at a time.

    The first checkpoint (the --base for task methods) is the one written: tensors that are not
    merged (integers, unselected) and the rest of the file come from it.
    """
    load = loader(read, shared_key=True)  # one --key for the torch inputs (a safetensors or sharded one is flat)
    for number, path in enumerate(merge.inputs, 1):
        load.inputs.record(path, f"merge input {number}")
    load.inputs.record(merge.base, "--base")
    run_steps("merge", merge.written, [Step(merge)], None, load, write, surgery, unquantized=unquantized)


run_merge.__doc__ = run_merge.__doc__.format(methods=", ".join(NAMES))  # the registry's, in its order


__all__ = ["EXAMPLE", "run_merge"]
