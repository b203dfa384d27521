"""How torch pickles tensors: the rebuild calls read from a checkpoint's pickle, and the
same calls written back. Shared by the zip and the legacy torch formats.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from .. import dtypes
from ..checkpoint import Storage, Tensor, check_view
from ..checkpoint.opaque import GlobalMeta, Opaque, placeholder
from ..dtypes import DType
from ..errors import CorruptCheckpointError, NotACheckpointError
from .pickles import GlobalName


class StorageClass:
    """What a storage class global (torch.FloatStorage, torch.storage.UntypedStorage) stands for."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: DType | None):
        self.name, self.dtype = name, dtype


class TypedRef:
    """A storage as a pickle refers to it: with the dtype its elements are counted in."""

    __slots__ = ("storage", "dtype")

    def __init__(self, storage: Storage, dtype: DType | None):
        self.storage, self.dtype = storage, dtype

    @property
    def numel(self) -> int:
        return self.storage.nbytes // (self.dtype.itemsize if self.dtype else 1)


def storage_classes() -> dict[str, StorageClass]:
    """Every storage class global a checkpoint may name."""
    classes = {"torch.storage.UntypedStorage": StorageClass("UntypedStorage", None),
               "torch.storage.TypedStorage": StorageClass("TypedStorage", None)}
    for dtype in dtypes.BY_STORAGE_CLASS.values():
        for module in ("torch", "torch.cuda"):
            classes[f"{module}.{dtype.storage_class}"] = StorageClass(dtype.storage_class, dtype)
    return classes


def interpreter(source: str, resolve: Callable[..., Storage]) -> tuple[dict[str, Any], Callable]:
    """The objects standing for torch's globals while unpickling, and persistent_load.

    ``resolve(key, nbytes, location)`` returns the Storage for a storage key.
    """

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CorruptCheckpointError(f"{source}: unexpected persistent id in the pickle: {pid!r:.80}")
        _, cls, key, location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise NotACheckpointError(f"{source}: uses storage views from torch < 0.4; load it with that"
                                      " torch and re-save it")
        if not isinstance(cls, StorageClass) or not isinstance(numel, int) or numel < 0 \
                or not isinstance(location, str):
            raise CorruptCheckpointError(f"{source}: malformed storage reference {pid!r:.80}")
        itemsize = cls.dtype.itemsize if cls.dtype else 1
        return TypedRef(resolve(str(key), numel * itemsize, location), cls.dtype)

    def rebuild(ref, offset, size, stride, requires_grad=False, metadata=None, dtype=None):
        if not isinstance(ref, TypedRef):
            raise CorruptCheckpointError(f"{source}: a tensor without a storage")
        dtype = dtype or ref.dtype
        if dtype is None:
            raise CorruptCheckpointError(f"{source}: a tensor without a dtype")
        shape, stride_ = _ints(size, source), _ints(stride, source)
        if not isinstance(offset, int) or len(shape) != len(stride_):
            raise CorruptCheckpointError(f"{source}: malformed tensor view")
        tensor = Tensor(ref.storage, dtype, shape, stride_, offset)
        check_view(tensor, ref.storage.nbytes // dtype.itemsize, source)
        tensor.requires_grad = bool(requires_grad)
        tensor.metadata = metadata or None
        return tensor

    def rebuild_v1(ref, offset, size, stride):
        return rebuild(ref, offset, size, stride)

    def rebuild_v2(ref, offset, size, stride, requires_grad, hooks, metadata=None):
        return rebuild(ref, offset, size, stride, requires_grad, metadata)

    def rebuild_v3(ref, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
        name = dtype.full_name.removeprefix("torch.") if isinstance(dtype, GlobalMeta) else None
        if name not in dtypes.BY_NAME:
            raise CorruptCheckpointError(f"{source}: tensor of unsupported dtype {dtype!r:.40}")
        return rebuild(ref, offset, size, stride, requires_grad, metadata, dtypes.BY_NAME[name])

    def rebuild_parameter(data, requires_grad, hooks, state=None):
        if isinstance(data, Tensor) and not state:
            data.parameter, data.requires_grad = True, bool(requires_grad)
            return data
        name = "_rebuild_parameter_with_state" if state is not None else "_rebuild_parameter"
        args = (data, requires_grad, hooks) + ((state,) if state is not None else ())
        return placeholder("torch._utils", name)(*args)

    def rebuild_from_type(func, new_type, args, state):
        result = func(*args)
        plain = isinstance(new_type, GlobalMeta) and new_type.full_name in (
            "torch.Tensor", "torch.nn.parameter.Parameter")
        if isinstance(result, Tensor) and plain and not state:
            if new_type.full_name == "torch.nn.parameter.Parameter":
                result.parameter = True
            return result
        return placeholder("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)

    interpret = {
        "torch._utils._rebuild_tensor": rebuild_v1,
        "torch._utils._rebuild_tensor_v2": rebuild_v2,
        "torch._utils._rebuild_tensor_v3": rebuild_v3,
        "torch._utils._rebuild_parameter": rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": rebuild_from_type,
        "collections.OrderedDict": OrderedDict,
        **storage_classes(),
    }
    return interpret, persistent_load


def _ints(value, source: str) -> tuple[int, ...]:
    if isinstance(value, Opaque) and type(value).full_name == "torch.Size" and value.args:
        value = value.args[0]
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise CorruptCheckpointError(f"{source}: malformed tensor shape or stride {value!r:.60}")
    return tuple(value)


class TensorPickling:
    """Writes Tensors back as torch's rebuild calls; numbers storages in order of first use."""

    def __init__(self):
        self.storages: list[tuple[str, Storage]] = []
        self._keys: dict[int, str] = {}
        self._names: dict[tuple[str, str], GlobalName] = {}

    def _name(self, module: str, name: str) -> GlobalName:
        return self._names.setdefault((module, name), GlobalName(module, name))

    def persistent_id(self, obj):
        if not isinstance(obj, TypedRef):
            return None
        storage = obj.storage
        key = self._keys.get(id(storage))
        if key is None:
            key = self._keys[id(storage)] = str(len(self._keys))
            self.storages.append((key, storage))
        if obj.dtype is None or obj.dtype.storage_class is None:
            return ("storage", self._name("torch.storage", "UntypedStorage"), key, storage.location,
                    storage.nbytes)
        return ("storage", self._name("torch", obj.dtype.storage_class), key, storage.location,
                storage.nbytes // obj.dtype.itemsize)

    def reduce(self, obj):
        if isinstance(obj, _Unwrapped):
            return self._tensor_call(obj.tensor)
        if isinstance(obj, Tensor):
            if obj.parameter:
                return (self._name("torch._utils", "_rebuild_parameter"),
                        (_Unwrapped(obj), obj.requires_grad, OrderedDict()))
            return self._tensor_call(obj)
        return NotImplemented

    def _tensor_call(self, tensor: Tensor):
        extra = (tensor.metadata,) if tensor.metadata else ()
        common = (tensor.offset, tensor.shape, tensor.stride, tensor.requires_grad, OrderedDict())
        typed = tensor.dtype.storage_class is not None \
            and tensor.storage.nbytes % tensor.dtype.itemsize == 0
        if typed:
            return (self._name("torch._utils", "_rebuild_tensor_v2"),
                    (TypedRef(tensor.storage, tensor.dtype), *common, *extra))
        return (self._name("torch._utils", "_rebuild_tensor_v3"),
                (TypedRef(tensor.storage, None), *common, self._name("torch", tensor.dtype.name), *extra))


class _Unwrapped:
    """The plain-tensor call inside a parameter's rebuild."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
