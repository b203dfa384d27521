"""What a pickle's globals and calls become when nothing is imported or run: placeholder
classes (``GlobalMeta``) and ``Opaque`` records of the calls, kept in a checkpoint's tree as
they came (formats/pickles.py makes them; writing a torch file pickles them back unchanged).
"""

from __future__ import annotations

import copyreg
from typing import Any

from ..errors import CorruptCheckpointError


class GlobalMeta(type):
    """Metaclass of the placeholders that stand for globals named in a pickle."""

    def __call__(cls, *args):
        # REDUCE: the pickle calls the global; record the call instead of making it.
        return cls._record(args, newobj=False)

    def __setattr__(cls, name, value):
        raise TypeError("placeholder globals are immutable")

    def __repr__(cls):
        return cls.full_name


class Opaque:
    """A call or construction recorded from a pickle and never performed."""

    __slots__ = ("args", "newobj", "state", "items", "dictitems")
    full_name = "?"
    raw_name: tuple[str, str] = ("?", "?")

    def __new__(cls, *args, **kwargs):
        # NEWOBJ / NEWOBJ_EX: cls.__new__(cls, *args) builds an instance.
        if kwargs:
            raise CorruptCheckpointError(f"keyword construction of {cls.full_name} is not supported")
        return cls._record(args, newobj=True)

    @classmethod
    def _record(cls, args, newobj: bool) -> "Opaque":
        obj = object.__new__(cls)
        obj.args, obj.newobj, obj.state, obj.items, obj.dictitems = tuple(args), newobj, None, [], []
        return obj

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)

    def __setitem__(self, key, value):
        self.dictitems.append((key, value))

    def __reduce_ex__(self, protocol):
        state = self.state
        items = iter(self.items) if self.items else None
        dictitems = iter(self.dictitems) if self.dictitems else None
        if self.newobj:
            return (copyreg.__newobj__, (type(self), *self.args), state, items, dictitems)
        return (type(self), self.args, state, items, dictitems)

    def __repr__(self):
        return describe(self)


def placeholder(module: str, name: str, raw: tuple[str, str] | None = None) -> GlobalMeta:
    """The placeholder class standing for the global ``module.name``."""
    ns = {"__slots__": (), "full_name": f"{module}.{name}", "raw_name": raw or (module, name)}
    return GlobalMeta(name.rpartition(".")[2] or "global", (Opaque,), ns)


def describe(obj: Any, limit: int = 80, depth: int = 0) -> str:
    """A short, safe description of a value read from a pickle (nested at most two levels)."""
    if isinstance(obj, Opaque) and depth >= 2:
        text = f"{type(obj).full_name}(...)"
    elif isinstance(obj, GlobalMeta):
        text = obj.full_name
    elif isinstance(obj, Opaque):
        name = type(obj).full_name
        if name == "torch.Size" and obj.args:
            text = f"torch.Size({list(obj.args[0]) if isinstance(obj.args[0], (list, tuple)) else obj.args[0]})"
        elif name == "torch.device" and obj.args:
            text = f"device({obj.args[0]!r})"
        elif isinstance(obj.state, dict) and obj.state:
            fields = ", ".join(f"{k}={describe(v, 20, depth + 1)}" for k, v in list(obj.state.items())[:6])
            text = f"{name}({fields})"
        else:
            text = f"{name}(...)"
    else:
        text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."
