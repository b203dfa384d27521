"""A checkpoint: the tensors to operate on (lazy, by name), everything else in the file,
ties and metadata; and how the mapping of tensors is found inside a nested file."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Iterator

from ..errors import SelectionError
from .moves import Moves
from .opaque import Opaque
from .tensor import Tensor, tie_groups


PREFERRED_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network",
                  "params", "weights", "model_state")


@dataclass
class Checkpoint:
    """A checkpoint: the tensors to operate on, and everything else in the file.

    ``root`` is the whole object the file holds; ``key`` the path to ``container``, the
    mapping of names to tensors inside it (``()`` when the root itself holds them).
    ``omitted`` names aliases the file left out because its config ties them (hfties): a
    safetensors output leaves them out again while they are still tied. ``partial`` names stored
    tensors that belong to a quantized group but do not make one (quant.group), each with why.
    ``config`` is the model config read beside it, changed by operations that change what it
    describes (the layer count); never changed in place.
    ``layout`` is what the format's own writer needs beside the tensors (None for most formats);
    its ``keys`` name the metadata that is that format's own (GGUF's key-values), which a write in
    another format leaves out with the layout.
    ``made`` holds files a directory output gets beside the weights that the command made, by name
    (convert --names hf of a GGUF: config.json).
    ``moves`` says where the numbered modules went in each step that renumbered them (layers, stack,
    experts), for the module names in the files a directory output carries (sidefiles).
    """

    source: str
    format: str
    root: Any
    key: tuple = ()
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    shards: dict[str, str] | None = None
    path: str | None = None
    omitted: set[str] = field(default_factory=set)  # aliases the file left out (tied in config.json)
    partial: list[tuple[str, list[str], str]] = field(default_factory=list)  # (scheme, names, why)
    config: dict | None = None  # the model config beside it (config.json), as an output carries it
    layout: Any = None  # what a writer of the input's own format carries over (GGUF: formats.gguf.Layout)
    plain: set[str] = field(default_factory=set)  # quantized weights dequantized on purpose: a GGUF output stores
    # them as they are, not requantized to the type they had
    laid_out: dict = field(default_factory=dict)  # name -> quantized tensor a writer laid out as its parts
    made: dict[str, bytes] = field(default_factory=dict)  # file name -> content, written beside a directory's weights
    moves: list[Moves] = field(default_factory=list)  # of each step that renumbered modules, in order

    @property
    def container(self) -> dict:
        return self.at(self.key)

    def at(self, path: tuple) -> Any:
        """The entry of the file at ``path`` (a tuple of keys from the root)."""
        return _at(self.root, path)

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Name -> tensor, in file order (do not change it: change the checkpoint, ``ckpt[name] = t``).

        Kept between calls while the container is the same object of the same size; setting or
        deleting through the checkpoint, or ``forget``, makes it afresh."""
        container = self.container
        cached = self.__dict__.get("_tensors")
        if cached is None or cached[0] is not container or cached[1] != len(container):
            cached = (container, len(container), dict(container) if _all_tensors(container.values()) else
                      {k: v for k, v in container.items() if isinstance(v, Tensor)})
            self.__dict__["_tensors"] = cached
        return cached[2]

    def with_container(self, container: dict) -> Checkpoint:
        """A copy whose mapping of tensors is ``container``; the rest of the file is shared, the
        entries on the way to the mapping copied, so this checkpoint stays as it was."""
        return dataclasses.replace(self, root=_replaced(self.root, self.key, container))

    def forget(self) -> None:
        """Drop what ``tensors`` and ``ties`` kept, after the container was changed in place (renamed entries)."""
        self.__dict__.pop("_tensors", None)
        self.__dict__.pop("_ties", None)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __getitem__(self, name: str) -> Tensor:
        value = self.container.get(name)
        if not isinstance(value, Tensor):
            raise SelectionError(f"{self.source}: no tensor named '{name}'")
        return value

    def __setitem__(self, name: str, tensor: Tensor) -> None:
        self.container[name] = tensor
        self.forget()

    def __delitem__(self, name: str) -> None:
        del self.container[name]
        self.forget()

    def ties(self) -> list[list[str]]:
        """Groups of names whose tensors share storage bytes, in file order (worked out once for
        what ``tensors`` keeps: a command asks several times, at 100,000 tensors a pass each)."""
        tensors = self.tensors
        cached = self.__dict__.get("_ties")
        if cached is None or cached[0] is not tensors:
            cached = (tensors, tie_groups(tensors))
            self.__dict__["_ties"] = cached
        return [list(group) for group in cached[1]]

    def extra_items(self) -> Iterator[tuple[str, Any]]:
        """(dotted path, value) of everything in the file besides the named tensors."""
        node = self.root
        for depth, part in enumerate(self.key):
            for k, v in node.items() if isinstance(node, dict) else enumerate(node):  # --key may pass a list
                if k != part:
                    yield ".".join(map(str, (*self.key[:depth], k))), v
            node = node[part]
        container = self.container
        if _all_tensors(container.values()):  # the common case, told in one pass in C
            return
        for k, v in container.items():
            if not isinstance(v, Tensor):
                yield str(k), v

    def has_extras(self) -> bool:
        """Whether the file holds anything besides the named tensors."""
        return next(self.extra_items(), None) is not None


def _all_tensors(values) -> bool:
    return all(map(isinstance, values, repeat(Tensor)))


def find_container(root: Any, key: str | None, source: str) -> tuple[tuple, list[str]]:
    """The path to the mapping of tensors inside ``root``, and notes for the user.

    With ``key`` ('a.b', or '.' for the root itself), follow it. Otherwise, among the
    mappings that hold tensors (optimizer state aside), take the one with a well-known name,
    else the one holding most of the file's elements. Mappings of loose scalars ('best_acc1',
    'step') are not the model while a mapping with a larger tensor exists.
    """
    if key:
        return _follow_key(root, key, source), []
    candidates = [path for depth in range(4) for path in _mapping_paths(root, depth)
                  if _holds_tensors(_at(root, path))]
    if not candidates:
        module = next(filter(_pickled_module, [root, *(root.values() if isinstance(root, dict) else ())]), None)
        if module is not None:
            raise SelectionError(f"{source}: a whole pickled module ({type(module).full_name}, as torch.save(model)"
                                 " writes), not a state dict; load it where its class is defined and save"
                                 " model.state_dict() instead")
        raise SelectionError(f"{source}: found no mapping of names to tensors"
                             f" (top-level: {_describe_keys(root)}); pass --key to point at one")
    models = [p for p in candidates if not _loose_scalars(_at(root, p))] or candidates
    preferred = [p for p in models if p and str(p[-1]) in PREFERRED_KEYS]
    if preferred:
        models = [p for p in preferred if len(p) == len(preferred[0])]
    if len(models) > 1:
        sizes = sorted(((_elements(_at(root, p)), p) for p in models), key=lambda s: -s[0])
        if preferred or sizes[0][0] < 2 * sizes[1][0]:
            shown = ", ".join(_dotted(p) or "the top level" for p in models)
            raise SelectionError(f"{source}: several entries hold tensors ({shown}); pick one with --key,"
                                 f" e.g. --key {_dotted(models[0]) or '.'}")
        models = [sizes[0][1]]
    chosen = models[0]
    others = [p for p in candidates if p != chosen and len(p) <= max(len(chosen), 1)
              and not _loose_scalars(_at(root, p))]
    if not others:
        return chosen, []
    return chosen, [f"using '{_dotted(chosen) or '.'}'; the file also holds tensors in"
                    f" {', '.join(_dotted(p) or '. (the top level)' for p in others)} (pick with --key)"]


def _pickled_module(node: Any) -> bool:
    """Whether ``node`` is an nn.Module object recorded from a pickle (its state holds _parameters
    and _modules), which has no mapping of names to tensors that --key could name."""
    return isinstance(node, Opaque) and isinstance(node.state, dict) and {"_parameters", "_modules"} <= node.state.keys()


def _follow_key(root: Any, key: str, source: str) -> tuple:
    path, node = [], root
    for part in key.split(".") if key != "." else ():
        if isinstance(node, dict) and part in node:
            step = part
        elif isinstance(node, dict) and part.isdigit() and int(part) in node:
            step = int(part)
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            step = int(part)
        else:
            here = _dotted(tuple(path)) or "the top level"
            raise SelectionError(f"{source}: --key {key}: no entry '{part}' in {here}"
                                 f" (it has: {_describe_keys(node)})")
        path.append(step)
        node = node[step]
    if not _holds_tensors(node):
        raise SelectionError(f"{source}: --key {key} holds no tensors; pick a mapping of names to tensors")
    return tuple(path)


def _holds_tensors(node: Any) -> bool:
    return isinstance(node, dict) and any(isinstance(v, Tensor) for v in node.values()) \
        and all(isinstance(k, str) for k in node)


def _mapping_paths(root: Any, depth: int) -> Iterator[tuple]:
    """Paths ``depth`` deep to mappings inside ``root``, not into an optimizer's state."""
    if not isinstance(root, dict) or {"state", "param_groups"} <= root.keys():
        return
    if depth == 0:
        yield ()
        return
    for k, v in root.items():
        for rest in _mapping_paths(v, depth - 1):
            yield (k, *rest)


def _loose_scalars(node: dict) -> bool:
    """Whether every tensor of ``node`` holds at most one element (a step, an accuracy)."""
    return all(v.numel <= 1 for v in node.values() if isinstance(v, Tensor))


def _elements(node: dict) -> int:
    return sum(v.numel for v in node.values() if isinstance(v, Tensor))


def _replaced(node: Any, path: tuple, value: Any) -> Any:
    """A shallow copy of ``node`` with the entry at ``path`` replaced by ``value``."""
    if not path:
        return value
    if isinstance(node, tuple):
        return tuple(_replaced(v, path[1:], value) if i == path[0] else v for i, v in enumerate(node))
    node = copy.copy(node)
    node[path[0]] = _replaced(node[path[0]], path[1:], value)
    return node


def _at(root: Any, path: tuple) -> Any:
    for part in path:
        root = root[part]
    return root


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _describe_keys(node: Any) -> str:
    if isinstance(node, dict):
        keys = [str(k) for k in list(node)[:8]]
        more = f", ... ({len(node)} in all)" if len(node) > 8 else ""
        return ", ".join(keys) + more if keys else "nothing"
    return type(node).__name__
