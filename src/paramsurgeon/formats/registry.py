"""Every checkpoint format paramsurgeon knows, in one list: what reading, target choice,
writing, rendering and the JSON schema read. A new format is one module plus one entry here.

Each format's module loads on first use (a safetensors header is read without importing the
torch readers, and the CLI starts without any of them).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import NotACheckpointError, UsageError


@dataclass(frozen=True)
class Format:
    """One format. ``name`` is what ``inspect --json`` says; ``family`` the format a write of it
    produces (itself, or the plain format a variant is rewritten as).

    ``sniff(file, head)`` tells a file of this format from its first bytes (it may raise
    NotACheckpointError for a near miss); for a ``directory`` format it is ``sniff(path)``.
    ``reader(source, options)`` reads it (an InputFile, or a directory's path); None for a
    layout reached another way (a shard index). ``writer`` makes the writer of a family:
    ``writer(sink, path, progress, dedupe)`` for a file, ``writer(path, inputs)`` for a directory;
    None: paramsurgeon reads the format but does not write it. ``nested``: the file holds a
    nested object in which --key picks the tensors (else only a flat mapping of names to tensors).
    ``ties``: how a write stores names that share one storage: "shared" (stored once, as torch's
    pickle does), "recorded" (every name written, the groups recorded in the metadata, one name
    per group with --dedupe: safetensors.plan) or "copied" (every name written on its own).
    ``hub_name``: the file's name in a Hugging Face model directory ('model.safetensors'); its
    shards are named after it, its shard index is it plus '.index.json'. ``owns(name)``: for a
    directory format, whether a file in it belongs to the checkpoint (a write replaces those and
    refuses a directory holding anything else); ``noun`` names such a checkpoint in messages
    when "a {display} checkpoint" would not do. ``in_place_note``: what --in-place says when it
    rewrites an input of this format in its family's.
    ``quantized``: the writer is handed quantized tensors whole, not laid out as their stored parts.
    ``metadata``: a file holds string metadata (safetensors' ``__metadata__``), where a write records the
    quantization_config of its quantized weights (quantmeta.py).
    ``own_input``: why the writer writes only a checkpoint read from this format, with the layout
    its reader recorded (``Checkpoint.layout``); '': it writes any checkpoint.
    """

    name: str
    family: str
    display: str
    extensions: tuple[str, ...] = ()
    sniff: Callable[..., bool] | None = None
    reader: Callable[[Any, dict], Any] | None = None
    writer: Callable[..., Any] | None = None
    directory: bool = False
    sharded: bool = False
    nested: bool = False
    aliases: tuple[str, ...] = ()
    ties: str = "copied"
    hub_name: str | None = None
    owns: Callable[[str], bool] | None = None
    noun: str = ""
    in_place_note: str = ""
    quantized: bool = False  # the writer stores quantized tensors whole (GGUF's types), not as their parts
    metadata: bool = False  # a file holds string metadata (safetensors' __metadata__)
    own_input: str = ""  # why only a checkpoint read from this format is written in it ('': any is)

    @property
    def a_checkpoint(self) -> str:
        """'a DCP checkpoint': one checkpoint of this format, as messages name it."""
        return self.noun or f"a {self.display} checkpoint"


def _module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def _reads(module: str, options: bool = True) -> Callable[[Any, dict], Any]:
    """The reader ``module.read``, imported when first called; ``options`` (allow, unsafe) passed on."""
    return lambda source, opts: _module(module).read(source, **(opts if options else {}))


def _zip(file, head: bytes) -> bool:
    return head.startswith((b"PK\x03\x04", b"PK\x05\x06"))


def _legacy(file, head: bytes) -> bool:
    if head[:1] != b"\x80":
        return False
    if _module("torchlegacy").is_legacy(file):
        return True
    raise NotACheckpointError(f"{file.name}: a plain Python pickle, not a torch checkpoint")


def _torch_writer(sink, path, progress, dedupe, work):  # torch zip files are written in one process
    torchzip = _module("torchzip")
    return torchzip.Writer(sink, torchzip.archive_name(path), progress)


def _gguf_writer(sink, path, progress, dedupe, work):  # so are GGUF files
    return _module("ggufwriter").Writer(sink, progress)


def _safetensors_writer(sink, path, progress, dedupe, work):
    return _module("safetensors").Writer(sink, dedupe=dedupe, progress=progress, work=work)


FORMATS: tuple[Format, ...] = (
    Format("torch", "torch", "torch zip", (".pt", ".pth", ".bin", ".ckpt", ".tar"), _zip, _reads("torchzip"),
           _torch_writer, nested=True, aliases=("pt",), ties="shared", hub_name="pytorch_model.bin"),
    Format("safetensors", "safetensors", "safetensors", (".safetensors",),
           lambda file, head: _module("safetensors").looks_like(head, file.size), _reads("safetensors", options=False),
           _safetensors_writer, ties="recorded", hub_name="model.safetensors", metadata=True),
    Format("torch-legacy", "torch", "torch legacy pickle", (), _legacy, _reads("torchlegacy"), nested=True,
           in_place_note="a legacy (non-zip) torch file; it is rewritten in the zip format torch.save has written"
                         " since PyTorch 1.6"),
    Format("safetensors-sharded", "safetensors", "sharded safetensors", directory=True, sharded=True),
    Format("torch-sharded", "torch", "sharded torch", directory=True, sharded=True),
    Format("dcp", "dcp", "dcp", (), lambda path: _module("dcp").is_dcp(path), _reads("dcp"),
           lambda path, inputs: _module("dcp").Writer(path, inputs), directory=True, nested=True,
           owns=lambda name: _module("dcp").is_own_file(name), noun="a DCP checkpoint"),
    Format("gguf", "gguf", "GGUF", (".gguf",), lambda file, head: _module("gguf").looks_like(head),
           _reads("gguf", options=False), _gguf_writer, quantized=True,
           own_input="its metadata tells llama.cpp how to run the model"),
)
_BY_NAME = {f.name: f for f in FORMATS}


def get(name: str) -> Format:
    """The format called ``name`` (as a checkpoint's ``format`` says)."""
    return _BY_NAME[name]


def names() -> list[str]:
    """Every format's name, as ``inspect --json`` may say it."""
    return [f.name for f in FORMATS]


def sniffers(directory: bool) -> list[Format]:
    """The formats told by their bytes (or, ``directory``, by what a directory holds), in order."""
    return [f for f in FORMATS if f.sniff and f.reader and f.directory == directory]


def writable(ckpt=None) -> dict[str, str]:
    """--format's values: each name (and alias) of a format that writes ``ckpt`` (None: of a format
    with a writer) -> that format's name."""
    return {alias: f.name for f in FORMATS if _writes(f, ckpt) for alias in (f.aliases + (f.name,))}


def format_choices(ckpt=None) -> str:
    """--format's values as the help shows them ('pt|safetensors|dcp'): the first name of each format
    that writes ``ckpt`` (None: of each writer)."""
    return "|".join((f.aliases + (f.name,))[0] for f in FORMATS if _writes(f, ckpt))


def _writes(fmt: Format, ckpt) -> bool:
    """Whether ``fmt`` writes ``ckpt`` (None: has a writer): a format with ``own_input`` writes only a
    checkpoint read from one, as its reader left it (with its layout)."""
    if fmt.writer is None or ckpt is None or not fmt.own_input:
        return fmt.writer is not None
    return ckpt.layout is not None and get(ckpt.format).family == fmt.family


def by_extension(name: str) -> str | None:
    """The family a file name's extension ('.pt') names, if any."""
    return next((f.family for f in FORMATS if name.lower() in f.extensions), None)


def weight_extensions() -> tuple[str, ...]:
    """The extensions of every file format read, for finding the checkpoint in a directory."""
    return tuple(e for f in FORMATS if f.reader and not f.directory for e in f.extensions)


def hub_names() -> list[str]:
    """The names a Hugging Face model directory gives its single file, in the order one is chosen
    when it holds several: a flat format first (model.safetensors, which runs no pickle, as
    transformers prefers it), then the nested ones (pytorch_model.bin)."""
    return [f.hub_name for f in sorted(FORMATS, key=lambda f: f.nested) if f.hub_name]


def owned_by_directory_format(name: str) -> bool:
    """Whether a file ``name`` in a directory belongs to a checkpoint of a directory format (DCP)."""
    return any(f.owns(name) for f in FORMATS if f.owns)


def file_family(family: str) -> str:
    """The file format ``family`` is written as on a stream: itself, or for a directory format the
    first file format with a writer that holds as much (a nested object: a DCP checkpoint piped on
    is one torch file)."""
    fmt = get(family)
    if not fmt.directory:
        return family
    return next(f.family for f in FORMATS if f.writer and not f.directory and f.nested >= fmt.nested)


def sharded_of(family: str) -> str | None:
    """The name of the sharded layout of ``family``'s files ('safetensors-sharded'), if it has one."""
    return next((f.name for f in FORMATS if f.sharded and f.family == family), None)


def writer_of(family: str, doing: str, ckpt=None) -> Callable[..., Any]:
    """The writer of ``family``; refuses a format paramsurgeon only reads, and one that does not
    write ``ckpt`` (``doing``: '-o PATH', '--in-place' or 'standard output'). The formats a refusal
    suggests are those that write ``ckpt``."""
    fmt = get(family)
    if _writes(fmt, ckpt):
        return fmt.writer
    named = " or ".join(f.extensions[0] for f in FORMATS if _writes(f, ckpt) and f.extensions)
    if fmt.writer is not None:
        had = f"{ckpt.source} is {ckpt.format}" if get(ckpt.format).family != family \
            else f"{ckpt.source} was converted to plain tensors"
        raise UsageError(f"{fmt.display} is written from a {fmt.display} input ({fmt.own_input}); {had}:"
                         f" write it as {named}")
    fix = f"pass --format {format_choices(ckpt)}, or an output named {named}"
    if doing == "--in-place":
        fix = f"write the result elsewhere: -o PATH with --format {format_choices(ckpt)}, or an output named {named}"
    raise UsageError(f"{doing}: paramsurgeon reads {fmt.display} checkpoints but does not write them; {fix}")
