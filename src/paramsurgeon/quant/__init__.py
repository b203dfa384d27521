"""Quantization schemes: one module per scheme, one entry each in SCHEMES. A quantized weight is
ONE logical tensor made of stored parts (checkpoint/quantized.py); ``group`` finds the groups of
every scheme among a checkpoint's tensors when it is read. A new scheme: a module here, an entry below.

    base.py       Scheme (what a scheme declares), Group and Partial (what its ``find`` yields)
    fp8_block.py  fp8-block: DeepSeek-V3/R1's float8 codes with a scale per 128x128 tile
"""

from __future__ import annotations

import math

from ..checkpoint import Checkpoint, Storage, Tensor
from ..checkpoint.quantized import Quantized
from ..dtypes import BY_NAME, DType
from .base import Group, Partial, Scheme
from .fp8_block import Fp8Block

SCHEMES: tuple[Scheme, ...] = (Fp8Block(),)
NAMES = tuple(s.name for s in SCHEMES)
DEFAULT_DTYPE = "bfloat16"  # what a quantized tensor reads as when the config names no dtype


def find(name: object) -> Scheme | None:
    """The scheme called ``name``, or None."""
    return next((s for s in SCHEMES if s.name == name), None)


def quantization_config(config: dict | None) -> dict:
    """The ``quantization_config`` of a model config ({} when there is none)."""
    found = config.get("quantization_config") if isinstance(config, dict) else None
    return found if isinstance(found, dict) else {}


def config_dtype(config: dict | None) -> DType:
    """The dtype the model computes in: ``torch_dtype`` (or transformers 5's ``dtype``), else bfloat16."""
    named = (config.get("torch_dtype") or config.get("dtype")) if isinstance(config, dict) else None
    found = BY_NAME.get(named) if isinstance(named, str) else None
    return found if found is not None and found.floating else BY_NAME[DEFAULT_DTYPE]


def group(ckpt: Checkpoint, config: dict | None) -> Checkpoint:
    """``ckpt`` with the parts of each quantized tensor held by one logical tensor, in place of the
    first part; stored tensors that belong to a group but do not make one stay as they are, each
    group named in ``ckpt.partial`` (and a note). Unchanged when no scheme finds anything."""
    container, quant = ckpt.container, quantization_config(config)
    found: list[tuple[Scheme, Group]] = []
    claimed: set[str] = set()
    for scheme in SCHEMES:
        free = {n: t for n, t in ckpt.tensors.items() if n not in claimed} if claimed else ckpt.tensors
        for item in scheme.find(free, quant):
            if isinstance(item, Partial):
                ckpt.partial.append((scheme.name, item.names, item.why))
                ckpt.notes.append(f"{', '.join(item.names)}: {item.why} ({scheme.name}); listed as stored")
            else:
                found.append((scheme, item))
                claimed.update(item.parts.values())
    if not found:
        return ckpt
    dtype, first, order = config_dtype(config), {}, {name: i for i, name in enumerate(container)}
    for scheme, item in found:
        parts = {role: container[name] for role, name in item.parts.items()}
        first[min(item.parts.values(), key=order.__getitem__)] = (item.name, Quantized(
            scheme, parts, tuple(item.shape), dtype, item.params))
    grouped = {}
    for name, value in container.items():
        if name in first:
            logical, tensor = first[name]
            grouped[logical] = tensor
        elif name not in claimed:
            grouped[name] = value
    return ckpt.with_container(grouped)


def quantized(scheme: Scheme, source: Tensor, params: dict) -> Quantized:
    """``source`` stored as ``scheme``'s parts, computed from its values when a part is first read:
    all parts at once, each kept until it is read (a writer reads them one after the other)."""
    from ..checkpoint.values import to_torch

    pending: dict = {}

    def loader(role: str):
        def load():
            if role not in pending:
                pending.update(scheme.quantize(to_torch(source), params))
            return pending.pop(role)
        return load

    parts = {role: Tensor(Storage(math.prod(shape) * BY_NAME[dtype].itemsize, loader=loader(role)), BY_NAME[dtype],
                          shape) for role, (shape, dtype) in scheme.layout(source.shape, params).items()}
    return Quantized(scheme, parts, source.shape, source.dtype, params)


__all__ = ["NAMES", "SCHEMES", "Group", "Partial", "Scheme", "config_dtype", "find", "group", "quantized", "quantization_config"]
