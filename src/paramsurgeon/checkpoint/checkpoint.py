"""A checkpoint: the tensors to operate on (lazy, by name), everything else in the file,
ties and metadata; and how the mapping of tensors is found inside a nested file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import SelectionError
from .tensor import Tensor, tie_groups


PREFERRED_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network",
                  "params", "weights", "model_state")


@dataclass
class Checkpoint:
    """A checkpoint: the tensors to operate on, and everything else in the file.

    ``root`` is the whole object the file holds; ``key`` the path to ``container``, the
    mapping of names to tensors inside it (``()`` when the root itself holds them).
    """

    source: str
    format: str
    root: Any
    key: tuple = ()
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    shards: dict[str, str] | None = None
    path: str | None = None

    @property
    def container(self) -> dict:
        return self.at(self.key)

    def at(self, path: tuple) -> Any:
        """The entry of the file at ``path`` (a tuple of keys from the root)."""
        return _at(self.root, path)

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Name -> tensor, in file order."""
        return {k: v for k, v in self.container.items() if isinstance(v, Tensor)}

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

    def __delitem__(self, name: str) -> None:
        del self.container[name]

    def ties(self) -> list[list[str]]:
        """Groups of names whose tensors share storage bytes, in file order."""
        return tie_groups(self.tensors)

    def extra_items(self) -> Iterator[tuple[str, Any]]:
        """(dotted path, value) of everything in the file besides the named tensors."""
        node = self.root
        for depth, part in enumerate(self.key):
            for k, v in node.items():
                if k != part:
                    yield ".".join(map(str, (*self.key[:depth], k))), v
            node = node[part]
        for k, v in self.container.items():
            if not isinstance(v, Tensor):
                yield str(k), v

    def has_extras(self) -> bool:
        """Whether the file holds anything besides the named tensors."""
        return next(self.extra_items(), None) is not None


def find_container(root: Any, key: str | None, source: str) -> tuple[tuple, list[str]]:
    """The path to the mapping of tensors inside ``root``, and notes for the user.

    With ``key`` ('a.b'), follow it. Otherwise take the root when it holds tensors, else
    the nearest mapping that does; among several, the one with a well-known name.
    """
    if key:
        return _follow_key(root, key, source), []
    if _holds_tensors(root):
        return (), []
    for depth in (1, 2, 3):
        candidates = [path for path in _mapping_paths(root, depth) if _holds_tensors(_at(root, path))]
        if not candidates:
            continue
        if len(candidates) == 1:
            return candidates[0], []
        preferred = [p for p in candidates if str(p[-1]) in PREFERRED_KEYS]
        shown = ", ".join(_dotted(p) for p in candidates)
        if len(preferred) == 1:
            others = ", ".join(_dotted(p) for p in candidates if p != preferred[0])
            return preferred[0], [f"using '{_dotted(preferred[0])}'; the file also holds tensors in"
                                  f" {others} (pick with --key)"]
        raise SelectionError(f"{source}: several entries hold tensors ({shown}); pick one with --key,"
                             f" e.g. --key {_dotted(candidates[0])}")
    raise SelectionError(f"{source}: found no mapping of names to tensors"
                         f" (top-level: {_describe_keys(root)}); pass --key to point at one")


def _follow_key(root: Any, key: str, source: str) -> tuple:
    path, node = [], root
    for part in key.split("."):
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
    if not isinstance(root, dict):
        return
    for k, v in root.items():
        if not isinstance(v, dict):
            continue
        if depth == 1:
            yield (k,)
        else:
            for rest in _mapping_paths(v, depth - 1):
                yield (k, *rest)


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
