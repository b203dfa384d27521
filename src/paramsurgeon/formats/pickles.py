"""Weights-only unpickling that never runs code from the file, and pickling back.

Reading: every global named in the pickle becomes a placeholder class created here
(never an import), and every call or object construction in the pickle becomes an
``Opaque`` record of that call (checkpoint/opaque.py). Only a handful of known torch rebuild functions are
interpreted, to find tensors. So a hostile pickle cannot execute anything; globals
outside torch's weights-only allowlist are collected and refused all at once, unless
the user admits them by name or passes --unsafe-pickle (which keeps them as opaque
records: still nothing runs).

Writing: the same tree goes back out as protocol 2 (what ``torch.save`` writes), the
opaque records exactly as they came in.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import pickle
import sys
from typing import Any, BinaryIO, Callable

from ..checkpoint.opaque import GlobalMeta, placeholder
from ..errors import CorruptCheckpointError, OutputError, UnsafePickleError

# torch's weights-only allowlist (torch._weights_only_unpickler._get_allowed_globals).
_TORCH_STORAGES = [
    "BFloat16", "Bool", "Byte", "Char", "ComplexDouble", "ComplexFloat", "Double",
    "Float", "Half", "Int", "Long", "Short",
]
_TORCH_QSTORAGES = ["QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8"]
_TORCH_TENSORS = ["BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short"]
_TORCH_DTYPES = [
    "bfloat16", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool", "complex128",
    "complex32", "complex64", "float16", "float32", "float4_e2m1fn_x2", "float64",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "int16", "int32", "int64", "int8", "qint32", "qint8", "quint2x4", "quint4x2", "quint8",
    "uint16", "uint32", "uint64", "uint8",
    *[f"int{i}" for i in range(1, 8)], *[f"uint{i}" for i in range(1, 8)],
]
_REBUILD_FUNCTIONS = [
    "_rebuild_device_tensor_from_cpu_tensor", "_rebuild_device_tensor_from_numpy",
    "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_parameter",
    "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_wrapper_subclass",
]
ALLOWED_GLOBALS = frozenset(
    [
        "_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set",
        "collections.Counter", "collections.OrderedDict", "torch.Size", "torch.Tensor",
        "torch.device", "torch.nn.parameter.Parameter", "torch.serialization._get_layout",
        "torch._tensor._rebuild_from_type_v2", "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch.per_channel_affine", "torch.per_channel_affine_float_qparams",
        "torch.per_channel_symmetric", "torch.per_tensor_affine", "torch.per_tensor_symmetric",
        *[f"torch.{s}Storage" for s in _TORCH_STORAGES + _TORCH_QSTORAGES],
        *[f"torch.cuda.{s}Storage" for s in _TORCH_STORAGES],
        *[f"torch.{t}Tensor" for t in _TORCH_TENSORS],
        *[f"torch.cuda.{t}Tensor" for t in _TORCH_TENSORS],
        *[f"torch.sparse.{t}Tensor" for t in _TORCH_TENSORS if t != "Bool"],
        *[f"torch.cuda.sparse.{t}Tensor" for t in _TORCH_TENSORS if t != "Bool"],
        *[f"torch.{d}" for d in _TORCH_DTYPES],
        *[f"torch._utils.{f}" for f in _REBUILD_FUNCTIONS],
    ]
)
# Modules torch never admits, even when asked to.
_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt", "subprocess"})


class GlobalName:
    """A global to write into a pickle by name (e.g. torch._utils._rebuild_tensor_v2)."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise TypeError(f"{self.module}.{self.name} is only a name")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickle without importing: globals become placeholders, calls become records.

    ``interpret`` maps allowed global names to the Python objects that stand for them
    (torch's tensor rebuild functions, OrderedDict, storage classes); ``persistent_load``
    resolves storage ids.
    """

    def __init__(
        self,
        stream: BinaryIO,
        *,
        persistent_load: Callable[[Any], Any],
        interpret: dict[str, Any],
        allow: frozenset[str] = frozenset(),
        unsafe: bool = False,
    ):
        super().__init__(stream, encoding="utf-8")
        self._persistent_load = persistent_load
        self._interpret = interpret
        self._allow = allow
        self._unsafe = unsafe
        self.refused: list[str] = []
        self._placeholders: dict[tuple[str, str], GlobalMeta] = {}

    def find_class(self, module: str, name: str):
        raw = (module, name)
        # Python 2 names (torch.save's protocol 2 writes '__builtin__.set'); none clash with Python 3's.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self._interpret:
            return self._interpret[full]
        if not self._admitted(module, full) and full not in self.refused:
            self.refused.append(full)
        key = (module, name)
        if key not in self._placeholders:
            self._placeholders[key] = placeholder(module, name, raw)
        return self._placeholders[key]

    def _admitted(self, module: str, full: str) -> bool:
        if self._unsafe or full in ALLOWED_GLOBALS:
            return True
        blocked = module.split(".")[0] in _BLOCKED_MODULES
        return full in self._allow and not blocked

    def persistent_load(self, pid):
        return self._persistent_load(pid)


def unpickle(data: bytes | BinaryIO, source: str, **options) -> Any:
    """Unpickle ``data`` (bytes, or a stream left just after the pickle) restricted as above.

    Raises UnsafePickleError naming every refused global at once.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    unpickler = RestrictedUnpickler(stream, **options)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):  # see MemoryError below
            obj = unpickler.load()
        sys.stderr.write(printed.getvalue())
    except (CorruptCheckpointError, UnsafePickleError):
        raise
    except RecursionError as e:
        raise CorruptCheckpointError(f"{source}: the pickle nests too deeply to read") from e
    except MemoryError as e:  # a stored length no file of this size can hold (a bytearray8 of 4 EiB; CPython
        # 3.11 then prints "SystemError: deallocated bytearray object has exported buffers", dropped here)
        raise CorruptCheckpointError(f"{source}: the pickle is corrupt (a length in it is larger than the file)") from e
    except Exception as e:  # any malformed opcode stream ends up here
        raise CorruptCheckpointError(f"{source}: the pickle is corrupt ({type(e).__name__}: {e})") from e
    if unpickler.refused:
        raise _refusal(source, unpickler.refused)
    return obj


def _refusal(source: str, refused: list[str]) -> UnsafePickleError:
    names = ", ".join(refused)
    noun = "global" if len(refused) == 1 else "globals"
    admissible = [name for name in refused if name.split(".")[0] not in _BLOCKED_MODULES]
    if admissible:
        remedy = " ".join(f"--allow-global {name}" for name in admissible) + " or --unsafe-pickle"
    else:
        remedy = "--unsafe-pickle (which keeps them without running them)"
    return UnsafePickleError(
        f"{source}: refusing to unpickle {noun} {names}, which weights-only loading does not allow"
        f" (nothing was executed); if you trust this file, pass {remedy}",
        refused,
    )


class TreePickler(pickle._Pickler):
    """Protocol-2 pickler for trees read by RestrictedUnpickler.

    ``reduce_object`` gives the reduce tuple for objects the caller owns (tensors);
    ``persistent_id`` gives storage ids. Placeholders and GlobalNames are written as
    GLOBAL opcodes by name, never imported.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, *, reduce_object: Callable, persistent_id: Callable):
        super().__init__(file, protocol=2)
        self._reduce_object = reduce_object
        self._persistent_id = persistent_id

    def persistent_id(self, obj):
        return self._persistent_id(obj)

    def reducer_override(self, obj):
        return self._reduce_object(obj)

    def _save_name(self, module: str, name: str, obj) -> None:
        self.write(pickle.GLOBAL + module.encode("utf-8") + b"\n" + name.encode("utf-8") + b"\n")
        self.memoize(obj)

    def save_placeholder(self, obj):
        self._save_name(*obj.raw_name, obj)

    def save_global_name(self, obj):
        self._save_name(obj.module, obj.name, obj)

    dispatch[GlobalMeta] = save_placeholder
    dispatch[GlobalName] = save_global_name


def to_pickle(root: Any, *, reduce_object: Callable, persistent_id: Callable) -> bytes:
    """Pickle ``root`` at protocol 2."""
    buffer = io.BytesIO()
    try:
        TreePickler(buffer, reduce_object=reduce_object, persistent_id=persistent_id).dump(root)
    except RecursionError as e:
        raise OutputError("the checkpoint's objects nest too deeply to be pickled again; pass --tensors-only"
                          " to write just its tensors") from e
    return buffer.getvalue()

