"""A PEFT adapter directory as ``save_pretrained`` writes it: ``adapter_config.json`` beside
``adapter_model.safetensors`` (or ``adapter_model.bin``). Read: its config and its weights (opened
by the caller's loader, with the command's reading options); written: whole, atomically. What the
tensors mean (LoRA pairs, ranks) is ops/lora/adapter.py's business.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from ..checkpoint import Checkpoint, Tensor
from ..errors import InputError
from ..parsing import parse_document
from .atomic import atomic_directory, new_file
from .inputs import Inputs
from .places import basename, dirname, is_dir, is_file, join, read_all
from .safetensors import Writer

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter_file(name: str) -> bool:
    """Whether ``name`` in a directory is part of a PEFT adapter (what extract-lora replaces)."""
    return name == CONFIG or name in WEIGHTS


def adapter_directory(path: str) -> str:
    """The adapter directory ``path`` names (a file of the adapter names its directory).

    Raises:
        InputError: ``path`` is not a directory.
    """
    if basename(path) in (CONFIG, *WEIGHTS) and is_file(path):  # a URL names its adapter by a file
        return dirname(path) or "."
    if not is_dir(path):
        raise InputError(f"merge-lora: '{path}' is not a directory; an adapter is the directory save_pretrained"
                         f" writes, with {CONFIG} and {WEIGHTS[0]}")
    return path


def read_adapter(folder: str, load: Callable[[str], Checkpoint]) -> tuple[dict, Checkpoint]:
    """The LoRA config of the adapter directory ``folder`` and its weights, ``load(file)``.

    Raises:
        InputError: no config or weights, a config that is not PEFT LoRA's.
    """
    config_path = join(folder, CONFIG)
    if not is_file(config_path):
        raise InputError(f"merge-lora: '{folder}' has no {CONFIG}; an adapter is the directory save_pretrained"
                         " writes")
    try:
        config = parse_document(json.loads, read_all(config_path).decode("utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"merge-lora: cannot read '{config_path}': {e}") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise InputError(f"merge-lora: '{config_path}' is not a LoRA adapter's config (peft_type {kind!r},"
                         " expected 'LORA')")
    weights = [join(folder, name) for name in WEIGHTS if is_file(join(folder, name))]
    if not weights:
        raise InputError(f"merge-lora: '{folder}' has no {' or '.join(WEIGHTS)}")
    return config, load(weights[0])


def write_adapter(folder: str, tensors: dict[str, Tensor], config: dict, inputs: Inputs) -> None:
    """Write the adapter directory ``folder`` whole (replacing the adapter there, keeping model files);
    it may not be one of the command's ``inputs``."""
    adapter = Checkpoint(source=folder, format="safetensors", root=tensors)
    with atomic_directory(folder, carry=lambda name: not is_adapter_file(name), owns=is_adapter_file,
                          what="a PEFT adapter", inputs=inputs) as staging:
        with new_file(os.path.join(staging, WEIGHTS[0])) as sink:
            Writer(sink).write(adapter)
        with open(os.path.join(staging, CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
