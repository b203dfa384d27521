"""The ``config.json`` of a Hugging Face model directory: found beside a checkpoint (a directory
input, its index, or a single file inside the directory) and read as a JSON object; NVIDIA
ModelOpt's ``hf_quant_config.json``, which holds the quantization its exports leave out of config.json;
and the ``quantization_config`` (with the ``torch_dtype`` its weights read as) a safetensors file records in
its metadata (quantmeta.py), read when neither file beside it gives one."""

from __future__ import annotations

import json
import os

from ..parsing import parse_document
from .files import is_url
from .places import dirname, is_dir, is_file, join, read_all

CONFIG = "config.json"
QUANT_CONFIG = "hf_quant_config.json"  # {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": ...}}
METADATA_KEY = "quantization_config"  # in a safetensors file's __metadata__: the JSON text, as config.json names it
DTYPE_KEY = "torch_dtype"  # beside it: the dtype its quantized weights dequantize to, as config.json names it


def config_path(path: str | None, name: str = CONFIG) -> str | None:
    """The config.json (or other file ``name``) that describes the checkpoint at ``path``, if there is one."""
    if path in (None, "-"):
        return None
    folder = path if is_dir(path) else dirname(path if is_url(path) else os.path.abspath(path))
    candidate = join(folder, name)
    return candidate if is_file(candidate) else None


def read_config(path: str | None, name: str = CONFIG) -> dict | None:
    """The model config (or other JSON file ``name``) beside the checkpoint at ``path``: a dict, or
    None when there is none or it is not a JSON object (the weights are read all the same)."""
    found = config_path(path, name)
    if found is None:
        return None
    try:
        config = parse_document(json.loads, read_all(found).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def quantization_read(path: str | None, config: dict | None, metadata: dict | None = None) -> dict | None:
    """``config`` as the quantization schemes read it: where it has no ``quantization_config``, the
    ``quantization`` of an ``hf_quant_config.json`` beside the checkpoint stands in for one
    (``quant_method: modelopt``), as ModelOpt's loaders in vLLM and TensorRT-LLM read it; else the one
    the checkpoint's ``metadata`` records (a single file written without a config.json), with the dtype
    recorded beside it."""
    if isinstance(config, dict) and "quantization_config" in config:
        return config
    modelopt = read_config(path, QUANT_CONFIG)
    quantization = modelopt.get("quantization") if modelopt is not None else None
    if isinstance(quantization, dict):
        return {**(config or {}), "quantization_config": {**quantization, "quant_method": "modelopt"}}
    recorded = recorded_quantization(metadata)
    if recorded is None:
        return config
    dtype = metadata.get(DTYPE_KEY)
    return {**(config or {}), "quantization_config": recorded, **({DTYPE_KEY: dtype} if isinstance(dtype, str) else {})}


def recorded_quantization(metadata: dict | None) -> dict | None:
    """The ``quantization_config`` recorded in a checkpoint's ``metadata``, or None (none, or not a JSON object)."""
    text = (metadata or {}).get(METADATA_KEY)
    if not isinstance(text, str):
        return None
    try:
        recorded = parse_document(json.loads, text)
    except ValueError:
        return None
    return recorded if isinstance(recorded, dict) else None
