"""Element types as the file formats spell them, without importing torch.

One row per dtype: the torch name, bytes per element, the legacy storage class torch
pickles for it (``None`` for dtypes torch saves through ``_rebuild_tensor_v3``), the
safetensors code, and whether it is a floating-point type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    storage_class: str | None
    safetensors: str | None
    floating: bool = False
    complex: bool = False

    @property
    def short(self) -> str:
        return _SHORT.get(self.name, self.name)

    @property
    def largest(self) -> float:
        """The largest finite value (float8_e8m0fnu, complex: of each part)."""
        return _LARGEST[self.name]

    @property
    def lowest(self) -> float:
        """The most negative value (0 for unsigned integers and bool)."""
        unsigned = self.name.startswith("uint") or self.name in ("bool", "float8_e8m0fnu")
        return 0 if unsigned else (-self.largest - 1 if self.name.startswith("int") else -self.largest)

    @property
    def has_inf(self) -> bool:
        """Whether it has an Inf (float8_e4m3fn and the fnuz dtypes have none: what leaves their
        range is clamped to the largest value or made NaN)."""
        return self.name not in _NO_INF

    @property
    def halfway(self) -> tuple[float, bool]:
        """Where rounding to this floating-point dtype leaves its range: the magnitude halfway
        between its largest value and the next one its exponent would allow, and whether that
        magnitude itself rounds away (round half to even: when the largest value's last mantissa
        bit is odd; float8_e4m3fn's 448 is even, so 464 rounds to 448 and only beyond overflows)."""
        step = 2.0 ** (math.frexp(self.largest)[1] - 1 - _MANTISSA_BITS[self.name])
        return self.largest + step / 2, self.largest / step % 2 == 1

    def __str__(self) -> str:
        return self.name


_TABLE = [
    DType("float32", 4, "FloatStorage", "F32", floating=True),
    DType("float64", 8, "DoubleStorage", "F64", floating=True),
    DType("float16", 2, "HalfStorage", "F16", floating=True),
    DType("bfloat16", 2, "BFloat16Storage", "BF16", floating=True),
    DType("float8_e4m3fn", 1, None, "F8_E4M3", floating=True),
    DType("float8_e5m2", 1, None, "F8_E5M2", floating=True),
    DType("float8_e4m3fnuz", 1, None, "F8_E4M3FNUZ", floating=True),
    DType("float8_e5m2fnuz", 1, None, "F8_E5M2FNUZ", floating=True),
    DType("float8_e8m0fnu", 1, None, "F8_E8M0", floating=True),
    DType("int64", 8, "LongStorage", "I64"),
    DType("int32", 4, "IntStorage", "I32"),
    DType("int16", 2, "ShortStorage", "I16"),
    DType("int8", 1, "CharStorage", "I8"),
    DType("uint8", 1, "ByteStorage", "U8"),
    DType("uint16", 2, None, "U16"),
    DType("uint32", 4, None, "U32"),
    DType("uint64", 8, None, "U64"),
    DType("bool", 1, "BoolStorage", "BOOL"),
    DType("complex64", 8, "ComplexFloatStorage", "C64", complex=True),
    DType("complex128", 16, "ComplexDoubleStorage", None, complex=True),
]

_SHORT = {
    "float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
    "uint16": "u16", "uint32": "u32", "uint64": "u64", "complex64": "c64",
    "complex128": "c128", "float8_e4m3fn": "f8e4m3", "float8_e5m2": "f8e5m2",
}

_F32, _F64 = 3.4028234663852886e38, 1.7976931348623157e308
_LARGEST = {
    "float32": _F32, "float64": _F64, "float16": 65504.0, "bfloat16": 3.3895313892515355e38,
    "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "float8_e4m3fnuz": 240.0, "float8_e5m2fnuz": 57344.0,
    "float8_e8m0fnu": 1.7014118346046923e38, "complex64": _F32, "complex128": _F64, "bool": 1,
    **{f"int{b}": 2 ** (b - 1) - 1 for b in (8, 16, 32, 64)}, **{f"uint{b}": 2**b - 1 for b in (8, 16, 32, 64)},
}

_MANTISSA_BITS = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7, "float8_e4m3fn": 3,
                  "float8_e4m3fnuz": 3, "float8_e5m2": 2, "float8_e5m2fnuz": 2, "float8_e8m0fnu": 0,
                  "complex64": 23, "complex128": 52}
_NO_INF = {"float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}

BY_NAME = {d.name: d for d in _TABLE}
BY_STORAGE_CLASS = {d.storage_class: d for d in _TABLE if d.storage_class}
BY_SAFETENSORS = {d.safetensors: d for d in _TABLE if d.safetensors}

# Aliases users type on the command line.
_ALIASES = {
    "float": "float32", "fp32": "float32", "f32": "float32",
    "double": "float64", "fp64": "float64", "f64": "float64",
    "half": "float16", "fp16": "float16", "f16": "float16",
    "bf16": "bfloat16",
    "long": "int64", "int": "int32",
}


def by_name(name: str) -> DType:
    """The dtype called ``name`` ('float32', 'torch.float16', 'bf16'); KeyError if unknown."""
    key = name.removeprefix("torch.")
    return BY_NAME[_ALIASES.get(key, key)]


def torch_dtype(dtype: DType):
    """The torch.dtype for ``dtype`` (imports torch)."""
    import torch

    return getattr(torch, dtype.name)


def from_torch(dtype) -> DType:
    """Our DType for a torch.dtype."""
    return BY_NAME[str(dtype).removeprefix("torch.")]
