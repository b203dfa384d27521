"""The ``quantization_config`` of a checkpoint written where no config.json describes it, with the
``torch_dtype`` its quantized weights dequantize to: recorded in a safetensors output's metadata
(hfconfig.METADATA_KEY, the JSON text, and hfconfig.DTYPE_KEY), and in the config.json a directory output
gets when the input's is not carried there, so that weights quantized with another block than the default
read back as they were written, in the dtype they had; a single torch file, which has no place for it, is
refused when a reader would need it.

    recorded_config(ckpt, inputs)     the config keys its quantized weights need: quantization_config, torch_dtype
    with_quantization(ckpt, recorded) ``ckpt`` with those keys in its metadata
    with_config(ckpt, target, recorded)  ``ckpt`` with a config.json holding them, for a directory output
    refuse_unrecorded(ckpt, target)   OutputError when a torch file would hold weights it cannot read back
"""

from __future__ import annotations

import dataclasses
import json
import os

from .. import quant
from ..checkpoint import Checkpoint
from ..checkpoint.quantized import Quantized
from ..errors import OutputError
from ..sizes import plural
from . import registry
from .hfconfig import CONFIG, DTYPE_KEY, METADATA_KEY, config_path, quantization_read, read_config
from .inputs import Inputs
from .quantconfig import quantized
from .sidefiles import config_updates, model_directory, shown_change
from .target import Target


def recorded_config(ckpt: Checkpoint, inputs: Inputs) -> dict:
    """The keys of a model config that the quantized weights ``ckpt`` holds (or lays out) need to be read
    back as written: their ``quantization_config``, the input's (its config.json's, or its own metadata's)
    as a config.json written for it would hold it (sidefiles.config_updates: made for weights quantized
    anew, its list of modules left unquantized updated), and ``torch_dtype``, the dtype most of them
    dequantize to; {} when no quantized weight is left."""
    weights = quantized(ckpt)
    if not weights:
        return {}
    config = quantization_read(ckpt.path, ckpt.config, ckpt.metadata) or {}
    changes, _ = config_updates(config, ckpt, inputs)  # its notes are config.json's, which this file is not
    change = changes.get("quantization_config", quant.quantization_config(config))  # REMOVED is no dict
    if not (isinstance(change, dict) and change):
        return {}
    numels: dict[str, int] = {}
    for tensor in weights:
        numels[tensor.dtype.name] = numels.get(tensor.dtype.name, 0) + tensor.numel
    return {METADATA_KEY: change, DTYPE_KEY: max(numels, key=numels.__getitem__)}


def with_quantization(ckpt: Checkpoint, recorded: dict) -> Checkpoint:
    """``ckpt`` with the ``recorded`` config keys (recorded_config) in its metadata, in place of those it held."""
    metadata = {k: v for k, v in ckpt.metadata.items() if k not in (METADATA_KEY, DTYPE_KEY)}
    metadata.update((k, v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), sort_keys=True))
                    for k, v in recorded.items())
    return ckpt if metadata == ckpt.metadata else dataclasses.replace(ckpt, metadata=metadata)


def with_config(ckpt: Checkpoint, target: Target, recorded: dict) -> tuple[Checkpoint, list[str]]:
    """``ckpt`` with the config.json its directory output needs (``Checkpoint.made``) to read its quantized
    weights back: the ``recorded`` config keys (recorded_config) in the config.json the directory holds
    (a new one when it has none), and a note. Unchanged when the input's config.json is carried there,
    updated (sidefiles.carry, which a DCP output does not do), or the config.json there already holds them."""
    folder = model_directory(ckpt)
    if not registry.get(target.family).directory and folder is not None and config_path(folder) is not None:
        return ckpt, []
    held = (read_config(target.path) if os.path.isdir(target.path) else None) or {}
    changes = {k: v for k, v in recorded.items() if held.get(k) != v}
    if not changes:
        return ckpt, []
    text = json.dumps({**held, **changes}, indent=2, sort_keys=True) + "\n"
    shown = ", ".join(shown_change(held, k, v) for k, v in changes.items())
    return dataclasses.replace(ckpt, made={**ckpt.made, CONFIG: text.encode()}), [f"note: {CONFIG}: {shown}"]


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
