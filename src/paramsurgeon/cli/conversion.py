"""What convert does: change the format or the sharding of a checkpoint, nothing else."""

from .. import formats
from ..sizes import human_bytes
from .console import note, open_checkpoint, progress


def convert(ckpt, max_shard_size, read, write):
    """Convert between torch and safetensors, single file and sharded directory; values are untouched."""
    checkpoint = open_checkpoint(ckpt, read)
    target = formats.resolve_target(checkpoint, write.output, write.format, write.in_place, max_shard_size)
    tensors = checkpoint.tensors
    size = sum(t.nbytes for t in tensors.values())
    where = target.path or "standard output"
    layout = target.family
    if target.sharded:
        layout += f", sharded by {human_bytes(target.max_shard_size)}" if target.max_shard_size else ", sharded as before"
    if write.dry_run:
        note(f"would write {len(tensors)} tensors ({human_bytes(size)}) to {where} as {layout}")
        return
    with progress(size, "writing") as advance:
        formats.save(checkpoint, target, dedupe=write.dedupe, tensors_only=write.tensors_only, progress=advance)
    note(f"wrote {where} ({layout}, {len(tensors)} tensors, {human_bytes(size)})")
