"""convert: change the format or the sharding of a checkpoint, nothing else."""

from typing import Annotated, Optional

import typer

from .. import formats
from ..units import human_bytes
from .common import note, open_checkpoint, progress
from .options import READ, WRITE, ReadOptions, WriteOptions, options
from .reports import CKPT


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

    Example: paramsurgeon convert samples/resnet.pt -o resnet.safetensors
    """
    checkpoint = open_checkpoint(ckpt, read)
    target = formats.resolve_target(checkpoint, write.output, write.format, write.in_place, max_shard_size)
    tensors = checkpoint.tensors
    size = sum(t.nbytes for t in tensors.values())
    where = target.path or "standard output"
    layout = f"{target.family}, sharded by {human_bytes(target.max_shard_size)}" if target.sharded else target.family
    if write.dry_run:
        note(f"would write {len(tensors)} tensors ({human_bytes(size)}) to {where} as {layout}")
        return
    with progress(size, "writing") as advance:
        formats.save(checkpoint, target, dedupe=write.dedupe, tensors_only=write.tensors_only, progress=advance)
    note(f"wrote {where} ({layout}, {len(tensors)} tensors, {human_bytes(size)})")
