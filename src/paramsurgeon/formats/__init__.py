"""Checkpoint formats: detection and lazy reading, streaming atomic writing; the Loader through
which a command opens every input.

Submodules load on first use (zipfile alone costs 20 ms), so a safetensors header is read
without importing the torch readers.
"""

_EXPORTS = {"load": "reading", "Loader": "loader", "save": "writing", "resolve_target": "target",
            "Target": "target"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
