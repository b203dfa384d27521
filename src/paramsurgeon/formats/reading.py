"""Open any checkpoint: the format is told by the bytes (or, for a directory, by what it
holds), never by the file name."""

from __future__ import annotations

import os

from ..checkpoint import Checkpoint, find_container
from ..checkpoint.hfties import restore_omitted
from .. import quant
from ..errors import NotACheckpointError, SelectionError
from . import registry, sharded
from .atomic import recover
from .files import InputFile, is_url
from .places import basename, is_dir, is_file, list_dir, open_input
from .hfconfig import METADATA_KEY, quantization_read, read_config, recorded_quantization

_SIGNATURES = [
    (b"version https://git-lfs", "a Git LFS pointer, not the checkpoint itself; run 'git lfs pull' to fetch it"),
    (b"\x89HDF", "an HDF5 file (Keras or TensorFlow weights), not a PyTorch checkpoint"),
    (b"\x93NUMPY", "a NumPy .npy array, not a PyTorch checkpoint"),
    (b"\x1f\x8b", "gzip-compressed; decompress it first (gunzip)"),
    (b"PYTORCH1", "an archive from a PyTorch preview release, which no current torch reads"),
]


def load(path: str | None = None, *, key: str | None = None, allow_globals: tuple[str, ...] = (),
         unsafe_pickle: bool = False, raw: bool = False) -> Checkpoint:
    """Open the checkpoint at ``path`` (a file, a sharded directory or index, or None/'-' for stdin).

    Tensors stay on disk; ``key`` ('a.b') picks the tensors inside a nested torch file. Names a
    Hugging Face directory left out because its config.json ties them are read as aliases. The
    parts of each quantized tensor are read as one logical tensor (quant.group), unless ``raw``, as
    the quantization_config of the config.json beside it describes them, else the one its metadata records.
    """
    options = {"allow": frozenset(allow_globals), "unsafe": unsafe_pickle}
    if path not in (None, "-") and not is_url(path) and not os.path.lexists(path):
        recover(path)  # a replacement that died between its two renames left it aside
    if path not in (None, "-") and is_dir(path):
        ckpt = _read_directory(path, options)
    else:
        file = open_input(path)
        ckpt = _read_file(file, options, path)
    if registry.get(ckpt.format).nested:
        ckpt.key, ckpt.notes = find_container(ckpt.root, key, ckpt.source)
    elif key:
        raise SelectionError(f"{ckpt.source}: --key applies to torch files; a {ckpt.format} checkpoint"
                             " is already a flat mapping of names to tensors")
    ckpt.path = None if path in (None, "-") else path
    ckpt.config = config = read_config(ckpt.path)
    restore_omitted(ckpt, config)  # tied names save_pretrained left out
    if not raw:
        if METADATA_KEY in ckpt.metadata and recorded_quantization(ckpt.metadata) is None:
            ckpt.notes.append(f"{ckpt.source}: metadata {METADATA_KEY} is not a JSON object; its quantized weights"
                              " are read without it")
        ckpt = quant.group(ckpt, quantization_read(ckpt.path, config, ckpt.metadata))
    return ckpt


def sharded_index(path: str | None) -> str | None:
    """The index file of ``path`` if it names a sharded checkpoint (a directory or an index)."""
    if path in (None, "-"):
        return None
    if is_dir(path):
        indexes = sorted(e for e in list_dir(path) if e.endswith(".index.json"))
        if len(indexes) > 1:
            raise NotACheckpointError(f"{path}: a directory with several shard indexes ({', '.join(indexes)});"
                                      f" pass the one you mean ({os.path.join(path, indexes[0])})")
        return os.path.join(path, indexes[0]) if indexes else None
    return path if basename(path).endswith(".index.json") and is_file(path) else None


def verify_shards(path: str, allow_globals: tuple[str, ...] = (), unsafe_pickle: bool = False) -> list[dict]:
    """Disagreements between a sharded checkpoint's index and its shards (see sharded.verify)."""
    options = {"allow": frozenset(allow_globals), "unsafe": unsafe_pickle}
    return sharded.verify(sharded_index(path), lambda shard: _read_file(open_input(shard), options, shard))


def _read_file(file: InputFile, options: dict, path: str | None) -> Checkpoint:
    kind = sniff(file)
    if kind == "index":
        if path in (None, "-"):
            raise NotACheckpointError("<stdin>: a sharded checkpoint index; pass its directory or path instead")
        return sharded.read(path, lambda f: _read_file(f, options, f.path), open_input)
    return registry.get(kind).reader(file, options)


def sniff(file: InputFile) -> str:
    """The registry name of ``file``'s format ('torch', 'safetensors', ...) or 'index', from its first bytes."""
    if file.size == 0:
        raise NotACheckpointError(f"{file.name}: the file is empty (0 bytes)")
    head = file.read(0, min(file.size, 64))
    for fmt in registry.sniffers(directory=False):
        if fmt.sniff(file, head):
            return fmt.name
    for signature, what in _SIGNATURES:  # formats we know but do not read (once read, their entry wins)
        if head.startswith(signature):
            raise NotACheckpointError(f"{file.name}: {what}")
    if head.lstrip()[:1] == b"{" and b"weight_map" in file.read(0, min(file.size, 1 << 20)):
        return "index"
    if head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] in (b"{", b"["):
        raise NotACheckpointError(_json_file(file))
    if file.size > 262 and file.read(257, 5) == b"ustar":
        raise NotACheckpointError(f"{file.name}: a tar archive (torch < 0.4 used these); load it with an old"
                                  " torch and re-save it")
    if len(head) >= 8 and head[8:9] == b"{":
        raise NotACheckpointError(f"{file.name}: looks like safetensors but its header length is impossible;"
                                  " the file is damaged")
    read = [f.display for f in registry.sniffers(directory=False)]
    raise NotACheckpointError(f"{file.name}: not a checkpoint format paramsurgeon reads (first bytes"
                              f" {head[:8].hex(' ')}); expected a {', '.join(read[:-1])} or {read[-1]} file, or a"
                              " shard index")


def _json_file(file: InputFile) -> str:
    """The message for a JSON file (a config.json, tokenizer.json, adapter_config.json) given as a checkpoint."""
    instead = "a weights file (.safetensors, .bin, .pt)"
    if file.path not in (None, "-"):
        instead = f"the directory that holds it ({os.path.dirname(file.path) or '.'}) or {instead}"
    return f"{file.name}: a JSON file (a config or tokenizer), not a checkpoint; pass {instead}"


def _read_directory(path: str, options: dict) -> Checkpoint:
    entries = sorted(list_dir(path))
    for fmt in registry.sniffers(directory=True):
        if fmt.sniff(path):
            return fmt.reader(path, options)
    index = sharded_index(path)
    if index:
        return sharded.read(index, lambda f: _read_file(f, options, f.path), open_input)
    suffixes = registry.weight_extensions()
    weights = [e for e in entries if e.endswith(suffixes) and is_file(os.path.join(path, e))]
    preferred = [n for n in registry.hub_names() if n in weights]
    if len(weights) == 1 or preferred:
        chosen = (preferred or weights)[0]
        return _read_file(open_input(os.path.join(path, chosen)), options, os.path.join(path, chosen))
    if not weights:
        raise NotACheckpointError(f"{path}: a directory without a checkpoint (no *.index.json, "
                                  + ", ".join(f"*{e}" for e in suffixes) + ")")
    raise NotACheckpointError(f"{path}: a directory with several checkpoints ({', '.join(weights[:4])});"
                              " pass one of them")
