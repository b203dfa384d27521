"""The files of a Hugging Face model directory besides its weights: its configuration,
tokenizer, generation settings, custom code and model card. A directory output of a command
whose input is such a directory carries them, with ``config.json`` updated where the surgery
changed what it describes (``vocab_size``, ``tie_word_embeddings``, ``quantization_config``, and what
the operations changed in ``Checkpoint.config``: the layer count, the expert count).

    carry(...)      copy the input's side files (directories.SIDE_FILES) into the directory being written
    config_beside(...)  the config.json beside a file rewritten in place, updated the same way

Subdirectories and files of other kinds (other checkpoints such as ``optimizer.pt``,
``train.py``) are not carried; a note names them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable

from .. import quant
from ..checkpoint import Checkpoint
from ..checkpoint.hfties import ties_word_embeddings
from ..checkpoint.moves import Moves, followed
from ..checkpoint.quantized import Quantized
from ..errors import ParamSurgeonError
from ..parsing import parse_document
from . import registry
from .atomic import atomic_file
from .directories import is_side_file
from .files import is_url
from .hfconfig import CONFIG, QUANT_CONFIG, config_path, read_config
from .inputs import Inputs
from .places import dirname, is_dir, is_file, join, read_all
from .quantconfig import REMOVED, quantization_changes, quantized
from .reading import load
from .sharded import checkpoint_files
from .skiplists import moved_list

MODEL_DTYPES = ("float32", "float16", "bfloat16", "float64")  # what a config's torch_dtype names

# (input embedding, output embedding) of the architectures whose configs name vocab_size and
# tie_word_embeddings: the tensors those keys describe
EMBEDDINGS = (
    ("model.embed_tokens.weight", "lm_head.weight"),  # Llama, Mistral, Qwen, Gemma, Phi-3, ...
    ("transformer.wte.weight", "lm_head.weight"),  # GPT-2, GPT-J, CodeGen
    ("model.decoder.embed_tokens.weight", "lm_head.weight"),  # OPT, BART decoders
    ("transformer.word_embeddings.weight", "lm_head.weight"),  # BLOOM, Falcon
    ("gpt_neox.embed_in.weight", "embed_out.weight"),  # GPT-NeoX, Pythia
    ("shared.weight", "lm_head.weight"),  # T5
    ("model.shared.weight", "lm_head.weight"),  # BART, mBART
    ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),  # BERT
    ("model.language_model.embed_tokens.weight", "lm_head.weight"),  # vision-language models
)


def model_directory(ckpt: Checkpoint) -> str | None:
    """The directory ``ckpt`` was read from, when it was given as a directory or a shard index."""
    if ckpt.path is None:
        return None
    if is_dir(ckpt.path):
        return ckpt.path
    return dirname(ckpt.source) if registry.get(ckpt.format).sharded else None


def carry(ckpt: Checkpoint, staging: str, target: str, inputs: Inputs) -> list[str]:
    """Write the files the command made (``ckpt.made``) into ``staging`` (the new ``target``
    directory), and copy there the side files of ``ckpt``'s input directory, ``config.json``
    updated (compared with the input as the command's ``inputs`` record it); returns notes on
    what changed or stayed behind.

    Where ``target`` is the input directory, its files are carried by the directory's
    replacement; only an updated ``config.json`` is written here.
    """
    for name, content in ckpt.made.items():
        with open(os.path.join(staging, name), "wb") as handle:
            handle.write(content)
    folder = model_directory(ckpt)
    if folder is None:
        return []
    if is_url(folder):
        return _carry_remote(folder, staging, ckpt, inputs)
    same, owned = _same(folder, target), checkpoint_files(folder)
    notes, left = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in ckpt.made:
            continue
        if name == CONFIG and os.path.isfile(path):
            notes += _write_config(path, os.path.join(staging, name), ckpt, inputs, same)
        elif name == QUANT_CONFIG and ((plain := _written_plain(ckpt, inputs)) or ckpt.moves):
            if same and plain:
                notes.append(f"note: {QUANT_CONFIG} in {folder} left as it was: it does not know that"
                             f" {', '.join(plain[:4])}{' ...' if len(plain) > 4 else ''} are now plain")
            elif quantized(ckpt):
                text, more = _exclusions_update(path, plain, ckpt.moves)
                notes += more
                if text is None:
                    shutil.copy2(path, os.path.join(staging, name))
                else:
                    with open(os.path.join(staging, name), "wb") as handle:
                        handle.write(text.encode("utf-8"))
            else:
                notes.append(f"note: {QUANT_CONFIG} left out: nothing is quantized any more")
        elif same or os.path.lexists(os.path.join(staging, name)):
            continue
        elif is_side_file(name) and os.path.isfile(path):
            shutil.copy2(path, os.path.join(staging, name))  # the content, also of a link into a hub cache
        elif name not in owned and ".paramsurgeon-" not in name:  # not the checkpoint, nor a write of ours
            left.append(name + ("/" if os.path.isdir(path) else ""))
    if left:
        notes.append(f"note: not carried from {folder} (not model files): {', '.join(left[:6])}"
                     + (f" and {len(left) - 6} more" if len(left) > 6 else ""))
    return notes


def _written_plain(ckpt: Checkpoint, inputs: Inputs) -> list[str]:
    """The quantized weights of the input that ``ckpt`` holds as plain tensors (a ModelOpt
    hf_quant_config.json would make its loaders read them as quantized)."""
    before = inputs.as_read(ckpt.path)
    if before is None:
        return []
    kept = {*ckpt.laid_out, *(n for n, t in ckpt.tensors.items() if type(t) is Quantized)}
    return [m for n, t in before.tensors.items() if type(t) is Quantized
            for m in followed(n, ckpt.moves) if m in ckpt.tensors and m not in kept]


def _exclusions_update(source: str, plain: list[str], moves: list[Moves]) -> tuple[str | None, list[str]]:
    """The text of ModelOpt's ``hf_quant_config.json`` at ``source`` with its ``exclude_modules`` (which its
    loaders leave unquantized) following the modules ``moves`` renumbered (skiplists), and the modules of
    the weights now ``plain`` added (None: it has no such list); notes."""
    with open(source, "rb") as handle:
        text = handle.read().decode("utf-8", "replace")
    try:
        data = parse_document(json.loads, text)
    except ValueError:
        data = None
    quantization = data.get("quantization") if isinstance(data, dict) else None
    held = quantization.get("exclude_modules") or [] if isinstance(quantization, dict) else None
    if not isinstance(held, list):
        return None, [f"note: {QUANT_CONFIG} copied as it was (no exclude_modules list to add"
                      f" {', '.join(plain[:4])} to)"] if plain else []
    moved, notes = moved_list(held, moves, _their_exclusions, f"{QUANT_CONFIG}: exclude_modules")
    added = [m for m in dict.fromkeys(n.removesuffix(".weight") for n in plain) if m not in moved]
    quantization["exclude_modules"] = moved + added
    if moved != held:
        how = "renumbered" if any(step.numbered for step in moves) else "renamed"
        notes.append(f"note: {QUANT_CONFIG}: exclude_modules {how} with the modules they name")
    return _dumps(data, text), notes + ([f"note: {QUANT_CONFIG}: exclude_modules added {', '.join(added)}"]
                                        if added else [])


def _their_exclusions(path: str) -> list | None:
    """The ``exclude_modules`` of the hf_quant_config.json beside another checkpoint (a stack's source)."""
    quantization = (read_config(path, QUANT_CONFIG) or {}).get("quantization")
    listed = quantization.get("exclude_modules") if isinstance(quantization, dict) else None
    return listed if isinstance(listed, list) else None


def _carry_remote(folder: str, staging: str, ckpt: Checkpoint, inputs: Inputs) -> list[str]:
    """A remote input's ``config.json`` (updated for ``ckpt``), the one side file read from there."""
    source = join(folder, CONFIG)
    if not is_file(source):
        return []
    with open(os.path.join(staging, CONFIG), "wb") as handle:
        handle.write(read_all(source))
    notes = _write_config(os.path.join(staging, CONFIG), os.path.join(staging, CONFIG), ckpt, inputs, True)
    return notes + [f"note: only {CONFIG} is carried from {folder} (a remote input); fetch its tokenizer and"
                    " other files separately"]


def config_beside(ckpt: Checkpoint, place: str, inputs: Inputs) -> Callable[[], list[str]]:
    """--in-place of one file: the ``config.json`` beside it, updated for ``ckpt`` (as ``carry`` updates a
    directory's), and after a renumbering, ModelOpt's ``hf_quant_config.json``. The update is worked out now, before the file is replaced; the function returned
    writes it (atomically) once the file is replaced, and returns the notes."""
    source = config_path(place)
    text, notes = _config_update(source, ckpt, inputs) if source is not None else (None, [])
    updates = {source: text}  # path -> its new text (None: unchanged)
    modelopt = config_path(place, QUANT_CONFIG)
    if modelopt is not None and ckpt.moves and quantized(ckpt):  # renumbered: its exclude_modules follow
        updates[modelopt], more = _exclusions_update(modelopt, _written_plain(ckpt, inputs), ckpt.moves)
        notes += more

    def write() -> list[str]:
        for path, text in updates.items():
            if text is not None:
                with atomic_file(path) as sink:
                    sink.write(text.encode("utf-8"))
        return notes
    return write


def _write_config(source: str, destination: str, ckpt: Checkpoint, inputs: Inputs, same: bool) -> list[str]:
    """``config.json`` at ``destination``, updated for ``ckpt`` (else copied byte for byte)."""
    text, notes = _config_update(source, ckpt, inputs)
    if text is not None:
        with open(destination, "wb") as handle:
            handle.write(text.encode("utf-8"))
    elif not same:
        shutil.copy2(source, destination)
    return notes


def _config_update(source: str, ckpt: Checkpoint, inputs: Inputs) -> tuple[str | None, list[str]]:
    """The text of the ``config.json`` at ``source`` updated for ``ckpt`` (None: nothing changes), and notes."""
    with open(source, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
        config = parse_document(json.loads, text)
    except ValueError:
        return None, []
    if not isinstance(config, dict):
        return None, []
    changes, notes = config_updates(config, ckpt, inputs)
    # what the operations changed (the layer count, per-layer lists)
    changes = {**{k: v for k, v in (ckpt.config or {}).items() if config.get(k) != v}, **changes}
    if not changes:
        return None, notes
    shown = ", ".join(shown_change(config, k, v) for k, v in changes.items())
    return _dumps(_updated(config, changes), text), notes + [f"note: {CONFIG}: {shown}"]


def shown_change(config: dict, key: str, value, inner: bool = False) -> str:
    """A change of ``config``'s ``key`` to ``value`` as a note shows it: 'vocab_size 50257 -> 50304',
    'quantization_config removed', 'quantization_config added (...)',
    'quantization_config.ignore added model.layers.0.mlp.down_proj' (a dict by its keys, a list by what it gained)."""
    old = config.get(key)
    if value is REMOVED:
        return f"{key} removed"
    if isinstance(value, dict) and isinstance(old, dict):
        return ", ".join(f"{key}.{shown_change(old, k, v, True)}" for k, v in value.items()
                         if k not in old or old[k] != v)
    if inner and isinstance(value, list) and value[:len(old or [])] == (old or []):
        added = [a if isinstance(a, str) else json.dumps(a) for a in value[len(old or []):]]
        return f"{key} added {', '.join(added[:4])}" + (f" and {len(added) - 4} more" if len(added) > 4 else "")
    if key not in config:
        return f"{key} added ({json.dumps(value)})"
    return f"{key} {json.dumps(old)} -> {json.dumps(value)}"


def config_updates(config: dict, after: Checkpoint, inputs: Inputs) -> tuple[dict, list[str]]:
    """The keys of ``config`` that ``after`` no longer matches, with their new values, and notes.

    ``vocab_size`` follows the input embedding's rows when it equalled them before; the
    ``tie_word_embeddings`` follows the tie of the output embedding to the input embedding
    when the surgery tied or untied them (a dropped side leaves it: transformers ties the missing
    name to the one left, as it did before); ``torch_dtype`` (or ``dtype``) follows the dtype of
    most weights when it named theirs before (cast); ``quantization_config`` goes when no quantized weight is
    left (dequantize), is written for weights quantized anew (quantize), and names the modules of
    quantized weights written plain as unquantized (quantconfig). The shapes and ties before the
    surgery are the input's as the command's loader read it (``inputs.as_read``); a library save,
    which has no loader, reads the input's headers again.
    """
    pair = _embeddings(after)
    dtype_key = _dtype_key(config, after)
    heads = any(p[1] in after.tensors for p in EMBEDDINGS)
    if pair is None and not heads and dtype_key is None and not (quant.quantization_config(config)
                                                                  or quantized(after)):
        return {}, []
    before = inputs.as_read(after.path)
    try:
        before = load(after.path) if before is None else before
    except ParamSurgeonError as e:
        return {}, [f"note: {CONFIG} copied as it was: the input could not be read again to compare ({e})"]
    changes, notes = quantization_changes(config, before, after, read_config)
    if dtype_key is not None and _main_dtype(before) == config[dtype_key]:
        changes[dtype_key] = _main_dtype(after)
    pair = pair or _embeddings(before)
    if pair is None:
        return changes, notes
    embedding, head = pair
    vocab = config.get("vocab_size")
    if embedding in before.tensors and embedding in after.tensors and isinstance(vocab, int) \
            and not isinstance(vocab, bool):
        rows, new = before[embedding].shape[0], after[embedding].shape[0]
        if new != rows and vocab == rows:
            changes["vocab_size"] = new
        elif new != rows:
            notes.append(f"note: {CONFIG}: vocab_size {vocab} left as it was: it did not match the {rows} rows of"
                         f" {embedding} before (now {new})")
    tied = [_tied(c, embedding, head) for c in (before, after)]
    kept = [n for n in pair if n in after.tensors]
    if len(kept) == 2 and tied[0] != tied[1] and config.get("tie_word_embeddings") is not tied[1]:
        changes["tie_word_embeddings"] = tied[1]
    elif len(kept) == 1 and tied[0] and ties_word_embeddings(config):
        gone = head if kept[0] == embedding else embedding
        notes.append(f"note: {CONFIG}: tie_word_embeddings left true: transformers ties {gone} to {kept[0]}"
                     " again when it loads the model")
    return changes, notes


def _embeddings(ckpt: Checkpoint) -> tuple[str, str] | None:
    """The (input embedding, output embedding) names of ``ckpt``'s architecture, when it holds the first."""
    return next((p for p in EMBEDDINGS if p[0] in ckpt.tensors), None)


def _dtype_key(config: dict, after: Checkpoint) -> str | None:
    """The key of ``config`` naming the model's dtype (``torch_dtype``, transformers 5's ``dtype``)
    when it no longer names the dtype most of ``after``'s weights have (a cast changed them)."""
    key = next((k for k in ("torch_dtype", "dtype") if isinstance(config.get(k), str)), None)
    if key is None or quantized(after):
        return None
    main = _main_dtype(after)
    return key if main is not None and main != config[key] else None


def _main_dtype(ckpt: Checkpoint) -> str | None:
    """The dtype holding most of ``ckpt``'s floating-point weights (float16, bfloat16, float32, float64)."""
    numels: dict[str, int] = {}
    for tensor in ckpt.tensors.values():
        if tensor.dtype.name in MODEL_DTYPES:
            numels[tensor.dtype.name] = numels.get(tensor.dtype.name, 0) + tensor.numel
    return max(numels, key=numels.__getitem__) if numels else None


def _tied(ckpt: Checkpoint, embedding: str, head: str) -> bool:
    return any(embedding in group and head in group for group in ckpt.ties())


def _updated(config: dict, changes: dict) -> dict:
    """``config`` with ``changes``: a key it has keeps its place; a new one goes where sorted keys
    (transformers writes them sorted) put it, else last."""
    result = {k: v for k, v in {**config, **changes}.items() if v is not REMOVED}
    return dict(sorted(result.items())) if list(config) == sorted(config) else result


def _dumps(config: dict, like: str) -> str:
    """``config`` as JSON laid out like the text it came from (transformers: indent 2, ASCII, a final newline)."""
    indent = re.search(r"^([ \t]+)\S", like, re.M)
    text = json.dumps(config, indent=indent.group(1) if indent else 2, ensure_ascii=like.isascii())
    return text + ("\n" if like.endswith("\n") else "")


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
