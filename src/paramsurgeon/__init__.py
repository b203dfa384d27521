"""paramsurgeon: model surgery on PyTorch checkpoints, as a library.

    import paramsurgeon as ps
    ckpt = ps.load("model.pt")                     # lazy: tensors stay on disk
    ps.zero(ckpt, pattern=["fc.*"], below=1e-3)    # every command is a function with its options
    ps.save(ckpt, "model.safetensors")

The data flows formats -> checkpoint (quantized parts grouped by quant) -> selection -> ops -> formats (write)
/ analysis -> report.
Modules are imported on first use, so that the command line starts fast.
"""

from .errors import ParamSurgeonError

_OPERATIONS = ("init", "zero", "scale", "cast", "copy", "tie", "untie", "rename", "drop", "resize", "split", "concat",
               "transpose", "apply", "Init", "Zero", "Scale", "Cast", "Copy", "Tie", "Untie", "Rename", "Drop",
               "Resize", "Split", "Concat", "Transpose", "Plan", "layers", "experts", "Layers", "Experts",
               "dequantize", "quantize", "Dequantize", "Quantize")
_LAZY = {"Checkpoint": "checkpoint", "Tensor": "checkpoint", "Selector": "selection", "load": "formats",
         "to_torch": "checkpoint.values", "Merge": "ops.merge", "MergeLora": "ops.lora", "ExtractLora": "ops.lora",
         **{name: "library" for name in ("merge", "merge_lora", "extract_lora")},
         **{name: "ops" if name[0].isupper() else "library" for name in _OPERATIONS}}

__all__ = ["ParamSurgeonError", "save", "select", "__version__", *_LAZY]


def save(ckpt, path: str | None = None, *, format: str | None = None, in_place: bool = False) -> None:
    """Write ``ckpt`` to ``path`` (None: standard output); the format follows the extension."""
    from .formats import resolve_target
    from .formats import save as write

    write(ckpt, resolve_target(ckpt, path, format, in_place))  # never onto the checkpoint's own file or directory


def select(ckpt, patterns=(), *, regex=(), exclude=(), kinds=()) -> list[str]:
    """Names of ``ckpt`` matching the globs/regexes/kinds and no exclusion, in file order."""
    from .selection import Selector
    from .selection import select as choose

    return choose(ckpt.tensors, Selector(list(patterns), list(regex), list(exclude), list(kinds)))[0]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("paramsurgeon")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    raise AttributeError(name)
