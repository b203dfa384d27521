"""The ``config.json`` of a Hugging Face model directory: found beside a checkpoint (a directory
input, its index, or a single file inside the directory) and read as a JSON object."""

from __future__ import annotations

import json
import os

from ..parsing import parse_document
from .files import is_url
from .places import dirname, is_dir, is_file, join, read_all

CONFIG = "config.json"


def config_path(path: str | None) -> str | None:
    """The config.json that describes the checkpoint at ``path``, if there is one."""
    if path in (None, "-"):
        return None
    folder = path if is_dir(path) else dirname(path if is_url(path) else os.path.abspath(path))
    candidate = join(folder, CONFIG)
    return candidate if is_file(candidate) else None


def read_config(path: str | None) -> dict | None:
    """The model config beside the checkpoint at ``path``: a dict, or None when there is none or
    it is not a JSON object (the weights are read all the same)."""
    found = config_path(path)
    if found is None:
        return None
    try:
        config = parse_document(json.loads, read_all(found).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None
