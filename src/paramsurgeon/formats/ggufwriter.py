"""Write a GGUF file from a checkpoint read from one: the key-value metadata copied bit for bit
(no key added), every untouched tensor's bytes copied, a changed tensor requantized to the type it
had where the gguf package can quantize that type; tensor data aligned to general.alignment.
Streams: one tensor's values in memory at a time."""

from __future__ import annotations

import struct

from ..checkpoint import Checkpoint, Storage, Tensor
from ..checkpoint.quantized import Quantized
from ..errors import OutputError, PlanError
from .files import Sink
from .gguf import BY_DTYPE, MAGIC, PLAIN, Field, Layout
from .safetensors import write_tensor_bytes


class Writer:
    """One GGUF file on ``sink``."""

    def __init__(self, sink: Sink, progress=None):
        self.sink, self.progress = sink, progress

    def write(self, ckpt: Checkpoint) -> None:
        layout = ckpt.layout
        if not isinstance(layout, Layout):
            raise OutputError(f"GGUF is written from a GGUF input (its metadata tells llama.cpp how to run the"
                              f" model); {ckpt.source} is {ckpt.format}: write it as .safetensors or .pt")
        entries = plan(ckpt.tensors, layout, ckpt.plain)
        fields = [v for v in ckpt.metadata.values() if isinstance(v, Field)]
        sink, alignment = self.sink, layout.alignment
        sink.write(MAGIC + struct.pack("<IQQ", layout.version, len(entries), len(fields)))
        for field in fields:
            sink.copy(field.file, field.offset, field.size)
        offset, infos = 0, bytearray()
        for name, kind, tensor, nbytes in entries:
            encoded = name.encode("utf-8")
            dims = tuple(reversed(tensor.shape))
            infos += struct.pack(f"<Q{len(encoded)}sI{len(dims)}QIQ", len(encoded), encoded, len(dims), *dims,
                                 kind.code, offset)
            offset += nbytes + (-nbytes) % alignment
        sink.write(bytes(infos))
        sink.write(bytes((-sink.position) % alignment))
        for name, kind, tensor, nbytes in entries:
            _write_data(sink, name, kind, tensor)
            sink.write(bytes((-nbytes) % alignment))
            if self.progress is not None:
                self.progress(nbytes)
        sink.flush()


def stored_sizes(ckpt: Checkpoint) -> list[int] | None:
    """The bytes each tensor takes in a GGUF output (None when ``ckpt`` is no GGUF checkpoint)."""
    if not isinstance(ckpt.layout, Layout):
        return None
    return [entry[3] for entry in plan(ckpt.tensors, ckpt.layout, ckpt.plain)]


def plan(tensors: dict[str, Tensor], layout: Layout, plain: set[str]) -> list[tuple]:
    """(name, GGML type, tensor, bytes) of each tensor as it is stored (those in ``plain``, dequantized
    on purpose, in their dtype); refuses, all at once, the changed tensors that cannot be stored in the
    type they had."""
    from ..quant.gguf_types import BY_NAME as by_name, can_quantize

    entries, problems = [], []
    for name, tensor in tensors.items():
        if isinstance(tensor, Quantized) and not tensor.scheme.native:
            raise PlanError(f"writing GGUF: '{name}' is {tensor.scheme.name}, which GGUF has no type for; nothing"
                            " was written; write .safetensors")
        if isinstance(tensor, Quantized):
            kind = by_name[tensor.params["gguf_type"]]
            entries.append((name, kind, tensor, tensor.parts["blocks"].nbytes))
            continue
        was = layout.types.get(name)
        kept = tensor.storage.file is not None or was is None or was in PLAIN or tensor.dtype.name != "float32" \
            or name in plain
        if kept:  # an untouched span, a new tensor, a plain type, values cast or dequantized on purpose: as they are
            if tensor.dtype.name not in BY_DTYPE:
                problems.append(f"'{name}' is {tensor.dtype}, which GGUF cannot store")
                continue
            entries.append((name, by_name[BY_DTYPE[tensor.dtype.name]], tensor, tensor.nbytes))
        elif not can_quantize(was) or (tensor.shape[-1] if tensor.shape else 1) % by_name[was].block:
            if layout.unquantized is not None:
                stored = _cast(tensor, layout.unquantized)
                entries.append((name, by_name[BY_DTYPE[stored.dtype.name]], stored, stored.nbytes))
            elif not can_quantize(was):
                problems.append(f"'{name}' was {was}, which the gguf package cannot quantize")
            else:
                problems.append(f"'{name}' of shape {list(tensor.shape)} does not fill whole {was} blocks")
        else:
            kind = by_name[was]
            entries.append((name, kind, tensor, tensor.numel // kind.block * kind.size))
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PlanError(f"writing GGUF: {shown}; nothing was written; pass --dtype float16 (or bfloat16, float32)"
                        " to store such a tensor unquantized, or write .safetensors")
    return entries


def _cast(tensor: Tensor, dtype) -> Tensor:
    """``tensor``'s values as ``dtype``, computed when written."""

    def values():
        from ..checkpoint.values import to_torch
        from ..dtypes import torch_dtype

        return to_torch(tensor).to(torch_dtype(dtype))

    return Tensor(Storage(tensor.numel * dtype.itemsize, loader=values), dtype, tensor.shape)


def _write_data(sink: Sink, name: str, kind, tensor: Tensor) -> None:
    if isinstance(tensor, Quantized):
        write_tensor_bytes(tensor.parts["blocks"], sink)
    elif kind.name in PLAIN:
        write_tensor_bytes(tensor, sink)
    else:  # float32 values (plan): read as numpy, so that zeros need no torch
        import numpy as np

        from ..checkpoint.contents import row_major
        from ..quant.gguf_types import quantized_rows

        for piece in quantized_rows(np.frombuffer(row_major(tensor), np.float32).reshape(tensor.shape), kind.name):
            sink.write_large(memoryview(piece))
