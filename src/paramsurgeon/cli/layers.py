"""The stack command: a one-step run (cli/operations.run_steps) of the checkpoint that gives the
tensors outside the blocks, whose step reads the block ranges of every source."""

from __future__ import annotations

from ..ops.layers import Stack
from ..ops.surgery import Step
from .console import loader
from .operations import run_steps
from .options import Read, Surgery, Write


def run_stack(stack: Stack, read: Read, write: Write, surgery: Surgery) -> None:
    """Build one model from block ranges of several checkpoints, in order (mergekit's passthrough).

    The blocks are renumbered 0..L-1; tensors outside them (embeddings, final norm, head) and
    config.json (its layer count and per-layer lists updated) come from the first source, or --rest.
    Blocks must agree in names, shapes and dtypes.
    """
    load = loader(read, shared_key=True)  # one --key for the torch inputs (a safetensors or sharded one is flat)
    for number, text in enumerate(stack.slices, 1):
        load.inputs.record(text.rpartition(":")[0], f"stack input {number}")
    load.inputs.record(stack.rest, "--rest")
    run_steps("stack", stack.written, [Step(stack)], None, load, write, surgery)
