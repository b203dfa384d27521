"""Checkpoint formats: detection and lazy reading, streaming atomic writing."""

from .reading import load, sharded_index, verify_shards
from .writing import Target, resolve_target, save

__all__ = ["load", "save", "resolve_target", "Target", "sharded_index", "verify_shards"]
