"""The ``quantization_config`` of a checkpoint written where no config.json describes it: recorded in
a safetensors output's metadata (hfconfig.METADATA_KEY, the JSON text), so that a single file quantized
with another block than the default reads back as it was written; a torch file, which has no place for
it, is refused when a reader would need it.

    with_quantization(ckpt, inputs)   ``ckpt`` with the config of its quantized weights in its metadata
    refuse_unrecorded(ckpt, target)   OutputError when a torch file would hold weights it cannot read back
"""

from __future__ import annotations

import dataclasses
import json

from .. import quant
from ..checkpoint import Checkpoint
from ..checkpoint.quantized import Quantized
from ..errors import OutputError
from ..sizes import plural
from .hfconfig import METADATA_KEY, config_path, quantization_read
from .inputs import Inputs
from .quantconfig import quantized
from .sidefiles import config_updates
from .target import Target


def with_quantization(ckpt: Checkpoint, inputs: Inputs) -> Checkpoint:
    """``ckpt`` with the ``quantization_config`` of the quantized weights it lays out in its metadata: the
    input's (its config.json's, or its own metadata's) as a config.json written for it would hold it
    (sidefiles.config_updates: made for weights quantized anew, its list of modules left unquantized
    updated); none when no quantized weight is left."""
    metadata = {k: v for k, v in ckpt.metadata.items() if k != METADATA_KEY}
    recorded = _recorded(ckpt, inputs) if quantized(ckpt) else None
    if recorded is not None:
        metadata[METADATA_KEY] = json.dumps(recorded, separators=(",", ":"), sort_keys=True)
    return ckpt if metadata == ckpt.metadata else dataclasses.replace(ckpt, metadata=metadata)


def _recorded(ckpt: Checkpoint, inputs: Inputs) -> dict | None:
    config = quantization_read(ckpt.path, ckpt.config, ckpt.metadata) or {}
    changes, _ = config_updates(config, ckpt, inputs)  # its notes are config.json's, which this file is not
    change = changes.get("quantization_config", quant.quantization_config(config))  # REMOVED is no dict
    return change if isinstance(change, dict) and change else None


def refuse_unrecorded(ckpt: Checkpoint, target: Target) -> None:
    """Refuse a single torch file (no metadata) holding quantized weights that a reader without their
    ``quantization_config`` would not read as they are (an fp8-block weight of another block than
    128x128), unless it is rewritten in place beside the config.json that records it.

    Raises:
        OutputError: naming the weights and the fix.
    """
    if not ckpt.laid_out or (target.path is not None and target.inputs.permits(target.path)
                             and config_path(target.path) is not None):
        return
    alone = quant.group(dataclasses.replace(ckpt, laid_out={}, notes=[], partial=[]), None).tensors
    unread = [n for n, t in ckpt.laid_out.items()
              if not (type(alone.get(n)) is Quantized and (alone[n].scheme, alone[n].params) == (t.scheme, t.params))]
    if unread:
        shown = ", ".join(unread[:4]) + (f" and {len(unread) - 4} more" if len(unread) > 4 else "")
        raise OutputError(f"a single {target.family} file has no metadata to record the quantization_config that"
                          f" {plural(len(unread), 'quantized weight')} ({shown}) {'needs' if len(unread) == 1 else 'need'}"
                          " to be read back; write a .safetensors file or a directory (-o DIR/), or dequantize them;"
                          " nothing written")
