"""Quantization schemes: one module per scheme, one entry each in SCHEMES. A quantized weight is
ONE logical tensor made of stored parts (checkpoint/quantized.py); ``group`` finds the groups of
every scheme among a checkpoint's tensors when it is read. A new scheme: a module here, an entry below.

    base.py       Scheme (what a scheme declares), Group and Partial (what its ``find`` yields)
    tiles.py      scales per tile of a 2-D weight (tensor, row, group of columns, block), band by band
    fp8_block.py  fp8-block: DeepSeek-V3/R1's float8 codes with a scale per 128x128 tile
    compressed.py compressed-tensors' config (config_groups matched to a module) and arithmetic
    compressed_packed.py  pack-quantized: 1-8-bit integer codes packed in int32, weight_shape
    compressed_naive.py   float-quantized (float8 codes) and int-quantized (int8) with weight_scale
    compressed_fp4.py     nvfp4-pack-quantized and mxfp4-pack-quantized: e2m1 codes two a byte, group scales
    bnb4.py       bitsandbytes nf4 and fp4: 4-bit codes, absmax per block (nested or not), JSON state
    bnb8.py       bitsandbytes LLM.int8: int8 codes with SCB per row (bnb-int8)
    gptq.py       gptq: 2/3/4/8-bit codes packed in int32 with zero points, scales and g_idx (act-order)
    awq.py        awq: AutoAWQ's gemm layout, 4-bit codes packed along the outputs in order 0,2,4,6,1,3,5,7
    mxfp4.py      mxfp4: gpt-oss's e2m1 expert blocks of 32 with an E8M0 exponent each
    nvfp4.py      nvfp4: ModelOpt's e2m1 codes with a float8 scale per 16 values and a global scale
"""

from __future__ import annotations

import json
import math

from ..checkpoint import Checkpoint, Storage, Tensor
from ..checkpoint.quantized import Quantized
from ..dtypes import BY_NAME, DType
from .base import Group, Partial, Scheme
from .bnb4 import Bnb4
from .bnb8 import Bnb8
from .compressed_fp4 import Fp4Packed
from .compressed_naive import Naive
from .compressed_packed import Packed
from .fp8_block import Fp8Block
from .gptq import Gptq
from .awq import Awq
from .mxfp4 import Mxfp4
from .nvfp4 import Nvfp4

SCHEMES: tuple[Scheme, ...] = (
    Fp8Block(),
    Packed(),  # before the naive formats: it names a weight_scale that has no weight at all
    Fp4Packed("nvfp4-pack-quantized", "float8_e4m3fn", 16),
    Fp4Packed("mxfp4-pack-quantized", "uint8", 32),
    Naive("float-quantized", ("float8_e4m3fn", "float8_e5m2"), ("compressed-tensors", "modelopt")),
    Naive("int-quantized", ("int8",)),
    Bnb4("nf4", orphans=True),  # names the 4-bit tables that have no quant_state blob of either type
    Bnb4("fp4"),
    Bnb8(),
    Gptq(),
    Awq(),
    Mxfp4(),
    Nvfp4(),
)
NAMES = tuple(s.name for s in SCHEMES)
METHODS = tuple(dict.fromkeys(method for s in SCHEMES for method in s.methods))
MARKERS = tuple(dict.fromkeys(marker for s in SCHEMES for marker in s.markers or ()))
LAST = frozenset(marker[-1] for marker in MARKERS)  # most names end otherwise ('weight', 'bias'): skipped at once
DEFAULT_DTYPE = "bfloat16"  # what a quantized tensor reads as when the config names no dtype


def find(name: object) -> Scheme | None:
    """The scheme called ``name``, or None."""
    return next((s for s in SCHEMES if s.name == name), None)


def quantization_config(config: dict | None) -> dict:
    """The ``quantization_config`` of a model config ({} when there is none)."""
    found = config.get("quantization_config") if isinstance(config, dict) else None
    return found if isinstance(found, dict) else {}


def unread_method(config: dict | None) -> str | None:
    """The ``quant_method`` of ``config``'s quantization_config when no scheme here reads it (hqq,
    torchao, ...): its stored tensors may be codes, not values. None otherwise."""
    method = quantization_config(config).get("quant_method")
    return None if method is None or method in METHODS else str(method)


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
    method = unread_method(config)
    if method is not None:
        ckpt.notes.append(f"config.json: quantization_config's quant_method {json.dumps(method)} is not read (only"
                          f" {', '.join(METHODS)}): its tensors are listed as stored")
    found: list[tuple[Scheme, Group]] = []
    claimed: set[str] = set()
    marked = None if quant else [n for n in ckpt.tensors if n[-1:] in LAST and n.endswith(MARKERS)]  # one quick pass
    for scheme in SCHEMES:
        if marked is not None and scheme.markers is not None and not any(n.endswith(scheme.markers) for n in marked):
            continue  # no stored name can be one of its parts: a plain checkpoint stays cheap
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
    tied: dict[tuple, Quantized] = {}  # groups whose every part shares its bytes with another's: one tensor, tied
    for scheme, item in found:
        parts = {role: container[name] for role, name in item.parts.items()}
        tensor = Quantized(scheme, parts, tuple(item.shape), dtype, item.params)
        key = (scheme.name, tensor.shape, tuple((r, id(p.storage), p.byte_span()) for r, p in sorted(parts.items())))
        first[min(item.parts.values(), key=order.__getitem__)] = (item.name, tied.setdefault(key, tensor))
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


__all__ = ["NAMES", "SCHEMES", "Group", "Partial", "Scheme", "config_dtype", "find", "group", "quantized", "quantization_config",
           "unread_method"]
