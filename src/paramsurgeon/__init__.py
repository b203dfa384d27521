"""paramsurgeon: model surgery on PyTorch checkpoints.

    ckpt = paramsurgeon.load("model.pt")           # lazy: tensors stay on disk
    names = paramsurgeon.select(ckpt, ["fc.*"])
    paramsurgeon.save(ckpt, "model.safetensors")
"""

from .checkpoint import Checkpoint, Tensor
from .errors import ParamSurgeonError
from .formats import load
from .formats import resolve_target as _resolve_target
from .formats import save as _save
from .select import Selector
from .select import select as _select

__all__ = ["Checkpoint", "Tensor", "ParamSurgeonError", "Selector", "load", "save", "select", "__version__"]


def save(ckpt: Checkpoint, path: str | None = None, *, format: str | None = None, in_place: bool = False) -> None:
    """Write ``ckpt`` to ``path`` (None: standard output); the format follows the extension."""
    _save(ckpt, _resolve_target(ckpt, path, format, in_place))


def select(ckpt: Checkpoint, patterns=(), *, regex=(), exclude=(), kinds=()) -> list[str]:
    """Names of ``ckpt`` matching the globs/regexes/kinds and no exclusion, in file order."""
    return _select(ckpt.tensors, Selector(list(patterns), list(regex), list(exclude), list(kinds)))[0]


def __getattr__(name: str):
    if name == "__version__":  # read lazily: importlib.metadata costs 50 ms at start-up
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("paramsurgeon")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    raise AttributeError(name)
