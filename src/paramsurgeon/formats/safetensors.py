"""The safetensors format: the header is read and checked in pure Python (no torch),
tensor bytes stay in the file; writing streams each tensor's bytes after the header.

Ties, which safetensors cannot express, are recorded in ``__metadata__`` under
``paramsurgeon.ties`` (a JSON list of name groups) and restored on reading.
"""

from __future__ import annotations

import json
import math
import struct
from itertools import chain, repeat
from operator import add, attrgetter, gt, itemgetter, mul, sub

import orjson

from .. import dtypes
from ..bulk import paused_gc
from ..checkpoint import Checkpoint, Storage, Tensor
from ..checkpoint.contents import row_major
from ..checkpoint.hfties import written
from ..checkpoint.tensor import file_spans, memory_of
from ..errors import CorruptCheckpointError, NotACheckpointError
from ..parallel import Work
from ..parsing import parse_document
from . import placed
from .files import ALIGN, InputFile, Sink

MAX_HEADER = 100_000_000  # the safetensors library's own limit
TIES_KEY = "paramsurgeon.ties"


def looks_like(head: bytes, size: int) -> bool:
    """Whether the first bytes of a file of ``size`` bytes start a safetensors header."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return 2 <= n <= MAX_HEADER


def _header_text(file: InputFile) -> tuple[int, str]:
    """(start of the data buffer, the header's text)."""
    if file.size < 8:
        raise CorruptCheckpointError(f"{file.name}: truncated: {file.size} bytes is too short for safetensors")
    n = struct.unpack("<Q", file.read(0, 8))[0]
    if n > MAX_HEADER:
        raise CorruptCheckpointError(f"{file.name}: safetensors header claims {n} bytes (limit {MAX_HEADER})")
    if 8 + n > file.size:
        raise CorruptCheckpointError(f"{file.name}: truncated: the safetensors header claims {n} bytes"
                                     f" but the file has {file.size - 8} after the length")
    try:
        return 8 + n, file.read(8, n).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{file.name}: the safetensors header is not valid JSON ({e})") from e


def _parsed(file: InputFile, text: str, hook=None) -> dict:
    """The header's JSON object (``hook``: json's object_pairs_hook)."""
    try:
        with paused_gc():
            header = parse_document(json.loads, text, object_pairs_hook=hook)
    except ValueError as e:
        raise CorruptCheckpointError(f"{file.name}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{file.name}: the safetensors header is not a JSON object")
    return header


def _no_duplicates(pairs: list) -> dict:
    """A JSON object as a dict; a key given twice is an error (which value counts would be a guess)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key '{twice}'")
    return obj


def read(file: InputFile) -> Checkpoint:
    """Read a safetensors file's header; tensors stay in the file until needed. They are a plain
    dict, as safetensors' ``load_file`` gives them (a torch file written from them holds a dict)."""
    start, text = _header_text(file)
    with paused_gc():
        found = _at_once(file, start, text)
        if found is None:  # a key given twice, or an entry to name: parsed again, refusing duplicate keys
            header = _parsed(file, text, _no_duplicates)
            metadata = _metadata(file, header)
            tensors = _in_bulk(file, start, header)
            if tensors is None:  # some entry is wrong: found and named one by one
                tensors = _one_by_one(file, start, header)
        else:
            metadata, tensors = found
    restore_ties(file.name, tensors, metadata)
    metadata = {k: v for k, v in metadata.items() if k != TIES_KEY}  # now in the structure itself
    return Checkpoint(source=file.name, format="safetensors", root=tensors, key=(), metadata=metadata)


def _metadata(file: InputFile, header: dict) -> dict[str, str]:
    """``__metadata__``, taken out of ``header``."""
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{file.name}: __metadata__ must map strings to strings")
    return metadata


def _at_once(file: InputFile, start: int, text: str) -> tuple[dict, dict] | None:
    """(metadata, tensors) when the header holds, from a parse that keeps no pair per JSON object
    (orjson's, twice as fast as json's with a hook), or None.

    A key given twice would keep only its last value there: it is ruled out by counting. Each
    pair of the text has one colon outside strings, so its colons are the pairs written plus the
    colons inside its strings; without \\u escapes (which can spell a colon the text does not show)
    they equal the pairs kept plus the colons in the strings kept only when nothing was dropped.
    When the entries hold (three keys each, no strings but the dtype codes), the strings kept are
    the names and the metadata."""
    if "\\u" in text:
        return None
    try:
        with paused_gc():
            header = orjson.loads(text)
    except orjson.JSONDecodeError:  # also what json would take (NaN, integers over 64 bits): parsed strictly
        return None
    if type(header) is not dict:
        return None
    try:
        pairs = len(header) + 3 * (len(header) - ("__metadata__" in header))
        metadata = _metadata(file, header)
        if set(map(len, header.values())) != {3}:
            return None
    except (CorruptCheckpointError, TypeError):  # the strict parse says what is wrong
        return None
    pairs += len(metadata) + "".join(header).count(":")
    if metadata:
        pairs += "".join(metadata).count(":") + "".join(metadata.values()).count(":")
    if text.count(":") != pairs:
        return None
    tensors = _in_bulk(file, start, header)  # when it holds, so does the count (it ends with the coverage)
    return None if tensors is None else (metadata, tensors)


def _in_bulk(file: InputFile, start: int, header: dict) -> dict[str, Tensor] | None:
    """The tensors, when every entry holds (what ``_entry`` and ``_check_coverage`` check, each
    check one pass in C over all entries: a 100,000-entry header costs a few dozen passes, not
    100,000 calls); None when any check fails, so that the entries are checked one by one."""
    entries = list(header.values())
    try:  # dict.get refuses an entry that is no object, a set a code that is a list: TypeError
        codes = list(map(dict.get, entries, repeat("dtype")))
        shapes = list(map(dict.get, entries, repeat("shape")))
        offsets = list(map(dict.get, entries, repeat("data_offsets")))
        if not entries or set(map(type, shapes)) != {list} or set(map(type, offsets)) != {list} \
                or not set(codes) <= dtypes.BY_SAFETENSORS.keys():
            return None
    except TypeError:
        return None
    kinds = list(map(dtypes.BY_SAFETENSORS.__getitem__, codes))
    dims = list(chain.from_iterable(shapes))
    if (dims and (set(map(type, dims)) != _INT or min(dims) < 0)) or set(map(len, offsets)) != {2}:
        return None
    begins, ends = list(map(itemgetter(0), offsets)), list(map(itemgetter(1), offsets))
    if set(map(type, begins)) | set(map(type, ends)) != _INT or min(begins) < 0 or any(map(gt, begins, ends)):
        return None
    sizes, numels = list(map(sub, ends, begins)), list(map(math.prod, shapes))
    if sizes != list(map(mul, numels, map(attrgetter("itemsize"), kinds))):
        return None
    # the data buffer covered exactly: in file order (as writers lay it out), else sorted
    if not (begins[0] == 0 and begins[1:] == ends[:-1] and start + ends[-1] == file.size):
        _check_coverage(file, start, list(zip(begins, ends, header)))
    tensors = file_spans(file, list(map(add, begins, repeat(start))), sizes, kinds, list(map(tuple, shapes)), numels)
    return dict(zip(header, tensors))


def _one_by_one(file: InputFile, start: int, header: dict) -> dict[str, Tensor]:
    """The tensors, each entry checked in turn: the first wrong one is named."""
    tensors: dict[str, Tensor] = {}
    spans = []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _entry(file.name, name, entry)
        tensor = Tensor(Storage(end - begin, file=file, offset=start + begin), dtype, shape)
        if tensor.nbytes != end - begin:
            raise CorruptCheckpointError(
                f"{file.name}: tensor '{name}' of shape {list(shape)} and dtype {dtype} needs"
                f" {tensor.nbytes} bytes but its data_offsets span {end - begin}")
        tensors[name] = tensor
        spans.append((begin, end, name))
    _check_coverage(file, start, spans)
    return tensors


_INT = {int}


def _entry(source: str, name: str, entry) -> tuple:
    if type(entry) is not dict:
        raise CorruptCheckpointError(f"{source}: header entry '{name}' is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    dtype = dtypes.BY_SAFETENSORS.get(code) if type(code) is str else None
    if dtype is None:
        raise CorruptCheckpointError(f"{source}: tensor '{name}' has unknown dtype {code!r}")
    # type() is int excludes bool; the sets of types are built in C, one per list
    if type(shape) is not list or (shape and (set(map(type, shape)) != _INT or min(shape) < 0)):
        raise CorruptCheckpointError(f"{source}: tensor '{name}' has a malformed shape {shape!r:.60}")
    if not (type(offsets) is list and len(offsets) == 2 and set(map(type, offsets)) == _INT
            and 0 <= offsets[0] <= offsets[1]):
        raise CorruptCheckpointError(f"{source}: tensor '{name}' has malformed data_offsets {offsets!r:.60}")
    return dtype, tuple(shape), offsets


def _check_coverage(file: InputFile, start: int, spans: list) -> None:
    """The data buffer must be covered exactly, without gaps or overlaps (as safetensors requires)."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise CorruptCheckpointError(f"{file.name}: tensor '{name}' {what} in the data buffer")
        position = end
    if start + position != file.size:
        if start + position > file.size:
            raise CorruptCheckpointError(f"{file.name}: truncated: the header describes {position} bytes of"
                                         f" tensor data but the file holds {file.size - start}")
        raise CorruptCheckpointError(f"{file.name}: {file.size - start - position} unexpected bytes after the"
                                     " last tensor")


def restore_ties(source: str, tensors: dict[str, Tensor], metadata: dict) -> None:
    """Make tensors recorded as tied share one storage again, if their bytes agree."""
    try:
        groups = parse_document(json.loads, metadata.get(TIES_KEY, "[]"))
    except ValueError as e:
        raise CorruptCheckpointError(f"{source}: metadata {TIES_KEY} is not valid JSON") from e
    groups = groups if isinstance(groups, list) else []
    # safetensors' save_model drops a tied name and records metadata[dropped] = kept.
    groups += [[kept, dropped] for dropped, kept in metadata.items() if kept in tensors and dropped not in tensors]
    for group in groups:
        if not isinstance(group, list):
            continue
        present = [n for n in group if isinstance(n, str) and n in tensors]
        if not present:
            continue
        first = tensors[present[0]]
        for name in present[1:]:
            other = tensors[name]
            same = (other.shape, other.dtype) == (first.shape, first.dtype) \
                and other.contiguous_bytes() == first.contiguous_bytes()
            if same:
                tensors[name] = Tensor(first.storage, first.dtype, first.shape)
        for name in group:
            if isinstance(name, str) and name not in tensors:  # written once, with --dedupe
                tensors[name] = Tensor(first.storage, first.dtype, first.shape)


def header_bytes(entries: list[tuple[str, Tensor]], metadata: dict[str, str]) -> tuple[bytes, int]:
    """The length-prefixed header for ``entries`` and the size of their data: the text json.dumps
    writes for it, each entry formatted as a string (a 100,000-entry header is 100,000 short
    strings, not 100,000 dicts to encode)."""
    parts, shapes = [], {}
    position = 0
    for name, tensor in entries:
        code = tensor.dtype.safetensors
        if code is None:
            raise NotACheckpointError(f"safetensors cannot store dtype {tensor.dtype} (tensor '{name}')")
        if name == "__metadata__":
            raise NotACheckpointError("safetensors cannot store a tensor named '__metadata__' (the key of the"
                                      " file's metadata); rename it first")
        shape = shapes.get(tensor.shape)
        if shape is None:
            shapes[tensor.shape] = shape = "[" + ",".join(map(int.__repr__, tensor.shape)) + "]"
        end = position + tensor.nbytes
        parts.append(f'{_quoted(name)}:{{"dtype":"{code}","shape":{shape},"data_offsets":[{position},{end}]}}')
        position = end
    head = "{"
    if metadata:
        head = json.dumps({"__metadata__": {k: metadata[k] for k in sorted(metadata)}}, separators=(",", ":"),
                          ensure_ascii=False)[:-1] + ("," if parts else "")
    text = (head + ",".join(parts) + "}").encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text, position


_quoted = json.encoder.encode_basestring  # a string as json.dumps(ensure_ascii=False) writes it


def plan(ckpt: Checkpoint, metadata: dict[str, str], dedupe: bool = False):
    """Which of ``ckpt``'s names to write and the metadata to write with them (ties recorded).

    Every name of a tie group is written, or with ``dedupe`` the one Hugging Face writes (the
    input embedding of a tied head: other loaders, vLLM's among them, read only that one); a name
    the input file left out because its config ties it stays out while it is still tied."""
    tensors = ckpt.tensors
    metadata = {k: v for k, v in metadata.items() if k != TIES_KEY}
    groups = [g for g in ckpt.ties() if _aliases(tensors, g)]
    if dedupe:
        dropped = {name for g in groups for name in g if name != written(g)}
    else:
        dropped = {name for g in groups for name in g if name in ckpt.omitted}
    if groups:
        metadata[TIES_KEY] = json.dumps(groups, separators=(",", ":"))
    entries = [(n, t) for n, t in tensors.items() if n not in dropped] if dropped else list(tensors.items())
    return entries, metadata


def _aliases(tensors: dict[str, Tensor], group: list[str]) -> bool:
    first = tensors[group[0]]
    return all((t.offset, t.shape, t.stride, t.dtype) == (first.offset, first.shape, first.stride, first.dtype)
               for t in (tensors[n] for n in group))


class Writer:
    """One safetensors file on ``sink``: the checkpoint's tensors, its metadata, its ties
    (written once with ``dedupe``); each tensor's bytes streamed after the header, or, where
    ``work`` has several processes for the values to compute, those computed by them at their
    offsets (placed.py)."""

    def __init__(self, sink: Sink, *, dedupe: bool = False, progress=None, work: Work = Work()):
        self.sink, self.dedupe, self.progress, self.work = sink, dedupe, progress, work

    def write(self, ckpt: Checkpoint) -> None:
        entries, metadata = plan(ckpt, {"format": "pt", **ckpt.metadata}, self.dedupe)
        header, _ = header_bytes(entries, metadata)
        pieces, weights = _layout([tensor for _, tensor in entries])
        self.sink.write(_aligned(header, weights, self.sink.offset))
        spread = placed.worth(self.sink, [p for p in pieces if type(p) is not tuple], self.work)
        holes = []
        for piece in pieces:
            if type(piece) is tuple:
                self.sink.copy(*piece)
                nbytes = piece[2]
            elif spread:
                holes.append((self.sink.offset, piece))
                self.sink.skip(piece.nbytes)
                continue  # its progress when a worker has written it
            else:
                write_tensor_bytes(piece, self.sink)
                nbytes = piece.nbytes
            if self.progress is not None:
                self.progress(nbytes)
        self.sink.flush()
        if holes:
            placed.fill(self.sink, holes, self.work, write_tensor_bytes, self.progress)


SPAN_LIMIT = 64 << 20  # bytes per copied span, so that progress advances on large files


def _layout(tensors: list[Tensor]) -> tuple[list, dict[int, int]]:
    """What to append for ``tensors``, in order: (file, offset, length) spans of bytes copied from a
    file, tensors that lie one after the other there copied as one span (100,000 small tensors are
    a few copies, not 100,000), or a tensor whose values are written from memory; and how many of
    the copied bytes sit at each offset modulo files.ALIGN from where they go (for ``_aligned``:
    within a span, the same offset). One pass over the tensors."""
    pieces: list = []
    weights: dict[int, int] = {}

    def close(file, begin: int, length: int, position: int) -> None:  # the span ending at ``position``
        pieces.append((file, begin, length))
        residue = (begin - (position - length)) % ALIGN
        weights[residue] = weights.get(residue, 0) + length

    file, begin, length, position = None, 0, 0, 0
    for tensor in tensors:
        nbytes = tensor.nbytes
        source = _source_offset(tensor)
        if source is None:
            if file is not None:
                close(file, begin, length, position)
                file = None
            pieces.append(tensor)
        elif tensor.storage.file is file and source == begin + length and length < SPAN_LIMIT:
            length += nbytes
        else:
            if file is not None:
                close(file, begin, length, position)
            file, begin, length = tensor.storage.file, source, nbytes
        position += nbytes
    if file is not None:
        close(file, begin, length, position)
    return pieces, weights


def _aligned(header: bytes, weights: dict[int, int], start: int) -> bytes:
    """``header``, to be written at ``start``, padded with spaces so that most of the bytes copied
    from files (``weights``: how many sit at each offset modulo files.ALIGN from where they go)
    land at their offsets there modulo files.ALIGN (the kernel then copies whole page-cache
    folios), when that costs at most 1/64 of those bytes."""
    if not weights:
        return header
    residue = max(weights, key=weights.get)
    extra = (residue - start - len(header)) % ALIGN
    if (residue - start) % 8 or weights[residue] < 64 * extra:  # the data buffer stays 8-aligned
        return header
    text = header[8:] + b" " * extra
    return struct.pack("<Q", len(text)) + text


def _source_offset(tensor: Tensor) -> int | None:
    """Where the tensor's bytes are in its file, if they are copied from there as they are."""
    storage = tensor.storage
    if storage.file is not None and tensor.is_contiguous:
        return storage.offset + tensor.offset * tensor.dtype.itemsize
    return None


def write_tensor_bytes(tensor: Tensor, sink: Sink) -> None:
    """Append the tensor's values in row-major order: copied from the file when possible."""
    source = _source_offset(tensor)
    if source is not None:
        sink.copy(tensor.storage.file, source, tensor.nbytes)
        return
    pieces = getattr(tensor.storage, "pieces", None)  # values computed a few MiB at a time (quantized.Streamed)
    whole = tensor.offset == 0 and tensor.is_contiguous and tensor.nbytes == tensor.storage.nbytes
    streamed = pieces() if pieces is not None and whole else None
    if streamed is not None:
        for piece in streamed:
            sink.write_large(memory_of(piece))
        return
    sink.write_large(row_major(tensor))
