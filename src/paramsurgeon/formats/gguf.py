"""GGUF (llama.cpp's format), read lazily: the header is parsed and checked here in pure Python
(every count, length and offset against the file's size), tensor data stays in the file.

A tensor of a plain type (F32, F16, BF16, F64, I8..I64) is a Tensor over its span; one of a
quantized type (Q8_0, Q4_K, ...) is a Quantized tensor of one stored part, its raw blocks, which
the ``gguf`` package dequantizes (quant/gguf_types.py). Shapes are in PyTorch order (GGUF lists
dimensions fastest first). The key-value metadata is the checkpoint's metadata, each value a
``Field``: the text ``inspect`` shows (long arrays summarised by length) that also knows where
its bytes are, so that a GGUF writer copies them bit for bit.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..checkpoint import Checkpoint, Storage, Tensor
from ..errors import CorruptCheckpointError, NotACheckpointError
from .files import InputFile

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
SHOWN_ITEMS = 8  # arrays longer than this are summarised by their length

# GGUF value types: struct code of each scalar (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
STRING, ARRAY = 8, 9
# GGML types stored as plain tensors -> their dtype
PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8", "I16": "int16",
         "I32": "int32", "I64": "int64"}
BY_DTYPE = {dtype: name for name, dtype in PLAIN.items()}


def looks_like(head: bytes) -> bool:
    """Whether a file starts with GGUF's magic."""
    return head.startswith(MAGIC)


class Field(str):
    """A metadata value as ``inspect`` shows it, with where its key-value entry lies in ``file``
    (``offset``, ``size``: the key, the type and the value) and, for scalars and strings, the value."""

    file: InputFile
    offset: int
    size: int
    value: object

    def __new__(cls, text: str, file: InputFile, offset: int, size: int, value: object):
        made = super().__new__(cls, text)
        made.file, made.offset, made.size, made.value = file, offset, size, value
        return made


@dataclass
class Layout:
    """What a GGUF writer carries over that the tensors do not say: the version, the alignment,
    and the GGML type each tensor had in the input (a changed tensor is requantized to it);
    ``unquantized``, the dtype a changed tensor of a type gguf cannot quantize is stored as
    (surgery's --dtype; None: refused); ``keys``, the metadata that is the file's key-value
    entries (Checkpoint.layout: written again only in GGUF)."""

    version: int
    alignment: int
    types: dict[str, str] = field(default_factory=dict)
    unquantized: Any = None
    keys: tuple[str, ...] = ()


def read(file: InputFile) -> Checkpoint:
    """Read a GGUF file's header; tensors stay in the file until needed."""
    cursor = _Cursor(file)
    version, tensor_count, kv_count = _preamble(cursor)
    metadata = {}
    for _ in range(kv_count):
        key, value = _field(cursor)
        if key in metadata:
            raise CorruptCheckpointError(f"{file.name}: metadata key '{key}' appears twice")
        metadata[key] = value
    alignment = _alignment(file, metadata)
    infos = [_tensor_info(cursor) for _ in range(tensor_count)]
    start = cursor.position + (-cursor.position) % alignment
    tensors, layout = {}, Layout(version, alignment, keys=tuple(metadata))
    for name, shape, kind, offset in infos:
        if name in tensors:
            raise CorruptCheckpointError(f"{file.name}: tensor '{name}' appears twice")
        tensors[name] = _tensor(file, name, shape, kind, start, offset, alignment)
        layout.types[name] = kind.name
    _check_overlaps(file, tensors)
    return Checkpoint(source=file.name, format="gguf", root=tensors, key=(), metadata=metadata, layout=layout)


def _preamble(cursor: _Cursor) -> tuple[int, int, int]:
    """(version, tensor count, key-value count), checked."""
    name = cursor.file.name
    if cursor.file.size < 24:
        raise CorruptCheckpointError(f"{name}: truncated: {cursor.file.size} bytes is too short for a GGUF header")
    cursor.take(4)
    version = cursor.unpack("I")
    if version not in VERSIONS:
        if version & 0xFFFF == 0:
            raise NotACheckpointError(f"{name}: a big-endian GGUF file; paramsurgeon reads little-endian GGUF"
                                      " (what llama.cpp writes by default)")
        hint = "; convert it with a current llama.cpp" if version == 1 else ""
        raise NotACheckpointError(f"{name}: GGUF version {version}; paramsurgeon reads versions 2 and 3{hint}")
    tensor_count, kv_count = cursor.unpack("Q"), cursor.unpack("Q")
    room = cursor.file.size - cursor.position
    if kv_count > room // 13:  # a key-value entry takes at least 13 bytes, a tensor's entry 24
        raise CorruptCheckpointError(f"{name}: truncated or damaged: the GGUF header claims {kv_count:,} metadata entries, more than"
                                     f" its {room:,} bytes can hold")
    if tensor_count > room // 24:
        raise CorruptCheckpointError(f"{name}: truncated or damaged: the GGUF header claims {tensor_count:,} tensors, more than its"
                                     f" {room:,} bytes can hold")
    return version, tensor_count, kv_count


def _field(cursor: _Cursor) -> tuple[str, Field]:
    start = cursor.position
    key = cursor.string("a metadata key")
    kind = cursor.unpack("I")
    if kind == ARRAY:
        item, count = cursor.unpack("I"), cursor.unpack("Q")
        text, value = _array(cursor, key, item, count)
    else:
        value = _value(cursor, key, kind)
        text = _text(value, kind)
    return key, Field(text, cursor.file, start, cursor.position - start, value)


def _value(cursor: _Cursor, key: str, kind: int):
    if kind == STRING:
        return cursor.string(f"the value of '{key}'")
    code = _SCALARS.get(kind)
    if code is None:
        raise CorruptCheckpointError(f"{cursor.file.name}: metadata '{key}' has unknown value type {kind}")
    return cursor.unpack(code)


def _array(cursor: _Cursor, key: str, item: int, count: int) -> tuple[str, object]:
    """(the text shown, the value when short) of an array of ``count`` values of type ``item``."""
    name = cursor.file.name
    if item not in _TYPE_NAMES or item == ARRAY:
        raise CorruptCheckpointError(f"{name}: metadata '{key}' is an array of unknown or nested type {item}")
    size = 8 if item == STRING else struct.calcsize("<" + _SCALARS[item])
    if count * size > cursor.file.size - cursor.position:
        raise CorruptCheckpointError(f"{name}: metadata '{key}' claims {count:,} items, more than the file holds")
    if count <= SHOWN_ITEMS:
        values = [_value(cursor, key, item) for _ in range(count)]
        return "[" + ", ".join(_text(v, item) for v in values) + "]", values
    if item == STRING:
        cursor.skip_strings(count, key)
    else:
        cursor.take(count * size)
    return f"[{count:,} {_TYPE_NAMES[item]}s]", None


def _text(value, kind: int) -> str:
    """A value as ``inspect`` shows it: a float32 with the fewest digits that give it back."""
    if kind == STRING:
        return value
    if kind == 7:
        return str(value).lower()
    if kind == 6:
        packed = struct.pack("<f", value)
        return next(repr(float(text)) for text in (f"{value:.{p}g}" for p in range(1, 10))
                    if struct.pack("<f", float(text)) == packed)
    return repr(value)


def _alignment(file: InputFile, metadata: dict[str, Field]) -> int:
    found = metadata.get("general.alignment")
    if found is None:
        return DEFAULT_ALIGNMENT
    value = found.value
    if type(value) is not int or value <= 0 or value & (value - 1) or file.read(found.offset + 8 + len(
            "general.alignment"), 4) != struct.pack("<I", 4):
        raise CorruptCheckpointError(f"{file.name}: general.alignment is {found}, not a power of two stored as uint32")
    return value


def _tensor_info(cursor: _Cursor) -> tuple:
    from ..quant.gguf_types import kind_of

    name = cursor.string("a tensor name")
    n_dims = cursor.unpack("I")
    if n_dims > MAX_DIMS:
        raise CorruptCheckpointError(f"{cursor.file.name}: tensor '{name}' has {n_dims} dimensions (GGUF allows"
                                     f" at most {MAX_DIMS})")
    dims = [cursor.unpack("Q") for _ in range(n_dims)]
    code, offset = cursor.unpack("I"), cursor.unpack("Q")
    kind = kind_of(code)
    if kind is None:
        raise CorruptCheckpointError(f"{cursor.file.name}: tensor '{name}' has unknown GGML type {code}")
    return name, tuple(reversed(dims)), kind, offset


def _tensor(file: InputFile, name: str, shape: tuple[int, ...], kind, start: int, offset: int,
            alignment: int) -> Tensor:
    """The tensor ``name`` over its span; checked to lie in the file, aligned, with whole blocks."""
    from ..checkpoint.quantized import Quantized
    from ..quant.gguf_types import GGUF

    numel = math.prod(shape)
    row = shape[-1] if shape else 1
    if row % kind.block:
        raise CorruptCheckpointError(f"{file.name}: tensor '{name}' of shape {list(shape)} has rows of {row}"
                                     f" values, not whole {kind.name} blocks of {kind.block}")
    nbytes = numel // kind.block * kind.size
    where = start + offset
    if offset % alignment:
        raise CorruptCheckpointError(f"{file.name}: tensor '{name}' starts at data offset {offset:,}, not a"
                                     f" multiple of the alignment {alignment}")
    if where + nbytes > file.size:
        raise CorruptCheckpointError(f"{file.name}: truncated: tensor '{name}' ({kind.name} {list(shape)}) needs"
                                     f" bytes {where:,}..{where + nbytes:,} but the file has {file.size:,}")
    storage = Storage(nbytes, file=file, offset=where)
    if kind.name in PLAIN:
        return Tensor(storage, dtypes.BY_NAME[PLAIN[kind.name]], shape)
    blocks = Tensor(storage, dtypes.BY_NAME["uint8"], shape[:-1] + (row // kind.block * kind.size,))
    return Quantized(GGUF, {"blocks": blocks}, shape, dtypes.BY_NAME["float32"], {"gguf_type": kind.name})


def _check_overlaps(file: InputFile, tensors: dict[str, Tensor]) -> None:
    spans = sorted((_span(t), name) for name, t in tensors.items())
    for (previous, name_a), (current, name_b) in zip(spans, spans[1:]):
        if current[0] < previous[1]:
            raise CorruptCheckpointError(f"{file.name}: tensors '{name_a}' and '{name_b}' overlap in the file")


def _span(tensor: Tensor) -> tuple[int, int]:
    storage = tensor.parts["blocks"].storage if hasattr(tensor, "parts") else tensor.storage
    return storage.offset, storage.offset + storage.nbytes


class _Cursor:
    """Reads the header front to back through the file's memory map, every read checked."""

    def __init__(self, file: InputFile):
        self.file, self.position = file, 0
        self.view = file.view(0, file.size)

    def take(self, n: int) -> memoryview:
        if self.position + n > self.file.size:
            raise CorruptCheckpointError(f"{self.file.name}: truncated: the GGUF header runs past the end of the"
                                         f" file ({self.file.size:,} bytes)")
        start = self.position
        self.position += n
        return self.view[start:self.position]

    def unpack(self, code: str):
        return struct.unpack_from("<" + code, self.take(struct.calcsize("<" + code)))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError as e:
            raise CorruptCheckpointError(f"{self.file.name}: {what} at byte {self.position - n:,} is not UTF-8") from e

    def skip_strings(self, count: int, key: str) -> None:
        """Step over ``count`` length-prefixed strings (a tokenizer's vocabulary) without decoding them."""
        view, position, size, unpack = self.view, self.position, self.file.size, struct.unpack_from
        for _ in range(count):
            if position + 8 > size:
                position = size + 1
                break
            position += 8 + unpack("<Q", view, position)[0]
        if position > size:
            raise CorruptCheckpointError(f"{self.file.name}: truncated: the strings of metadata '{key}' run past"
                                         " the end of the file")
        self.position = position
