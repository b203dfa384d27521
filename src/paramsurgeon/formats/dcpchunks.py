"""The pieces of a DCP checkpoint: where each lies in the ``.distcp`` files, checked, and read
without loading any values.

DCP's FileSystemWriter (torch 2.x, its default ``torch_save`` serialization) writes every
chunk of a tensor, and every non-tensor entry, as a whole ``torch.save`` archive at
(offset, length) of a ``.distcp`` file (``filesystem._write_item``), and its reader
``torch.load``s that span. We read the span's zip records and pickle with the restricted
unpickler, and point each storage at the ``.distcp`` file itself: a chunk's values are a
span of the file, memory-mapped, copied by the kernel when written out unchanged.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

from ..checkpoint import Storage, Tensor
from ..errors import CorruptCheckpointError, InputError, NotACheckpointError
from . import pickles
from .files import InputFile, open_input
from .torchpickle import interpreter
from .torchzip import ZipRecords


class Folder:
    """The ``.distcp`` files of one DCP directory, each opened once."""

    def __init__(self, path: str):
        self.path = path
        self._files: dict[str, InputFile] = {}

    def file(self, relative: Any, what: str) -> InputFile:
        """The file at ``relative`` inside the directory; refuses paths that leave it."""
        parts = relative.split("/") if isinstance(relative, str) else None
        if not parts or os.path.isabs(relative) or any(p in ("", ".", "..") for p in parts) or "\0" in relative:
            raise CorruptCheckpointError(f"{self.path}/.metadata: {what} is stored at {relative!r:.80}, a path"
                                         " outside the checkpoint directory; the metadata is damaged")
        if relative not in self._files:
            try:
                self._files[relative] = open_input(os.path.join(self.path, relative))
            except InputError as e:
                raise CorruptCheckpointError(f"{self.path}: {what} is stored in {relative}, which cannot be read"
                                             f" ({e}); the checkpoint is incomplete") from e
        return self._files[relative]


def read_span(folder: Folder, info: dict, what: str, *, allow: frozenset[str], unsafe: bool) -> Any:
    """The object ``torch.save``d at the location ``info`` (a ``_StorageInfo``'s fields) names."""
    relative, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
    file = folder.file(relative, what)
    if not (type(offset) is int and type(length) is int and 0 <= offset and 0 <= length <= file.size - offset):
        raise CorruptCheckpointError(f"{file.name}: {what} is stored at bytes {offset!r:.20}+{length!r:.20},"
                                     f" outside the file's {file.size} bytes; the checkpoint is damaged")
    if info.get("transform_descriptors"):
        raise NotACheckpointError(f"{file.name}: {what} is stored transformed ({info['transform_descriptors']!r:.60},"
                                  " e.g. compressed), which paramsurgeon cannot read; re-save it without extensions")
    window = _Window(file, offset, length, f"{file.name}[{what}]")
    if window.read(0, min(length, 4)) != b"PK\x03\x04":
        raise NotACheckpointError(f"{window.name}: not a torch.save archive (a DCP saved with"
                                  " serialization_format=SAFETENSORS?); paramsurgeon reads torch_save DCP only")
    records = _SpanRecords(window)
    storages: dict[str, Storage] = {}

    def storage_for(key: str, nbytes: int, location: str) -> Storage:
        if key not in storages:
            name = f"data/{key}"
            if not records.has(name):
                raise CorruptCheckpointError(f"{window.name}: storage '{key}' is missing (no record {name})")
            start, size = records.offset(name)
            if size != nbytes:
                raise CorruptCheckpointError(f"{window.name}: storage '{key}' holds {size} bytes but the pickle"
                                             f" says {nbytes}")
            storages[key] = Storage(nbytes, file=file, offset=offset + start, crc32=records.infos[name].CRC,
                                    location=location)
        return storages[key]

    interpret, persistent_load = interpreter(window.name, storage_for)
    return pickles.unpickle(records.read("data.pkl"), window.name, persistent_load=persistent_load,
                            interpret=interpret, allow=allow, unsafe=unsafe)


def check_chunks(fqn: str, shape: tuple[int, ...], chunks: list[tuple[tuple, tuple]], where: str) -> None:
    """Refuse chunks (offsets, sizes) that leave ``shape``, overlap, or leave part of it uncovered."""
    problems = []
    for offsets, sizes in chunks:
        if not (len(offsets) == len(sizes) == len(shape)) or any(
                type(o) is not int or type(s) is not int or o < 0 or s < 0 or o + s > n
                for o, s, n in zip(offsets, sizes, shape)):
            problems.append(f"chunk at {list(offsets)} of size {list(sizes)} is outside the shape {list(shape)}")
    if not problems:
        boxes = sorted((c for c in chunks if math.prod(c[1])), key=lambda c: c[0][:1])
        for i, (offsets, sizes) in enumerate(boxes):
            for other, other_sizes in boxes[i + 1:]:
                if other[:1] >= tuple(o + s for o, s in zip(offsets[:1], sizes[:1])):
                    break
                if all(a < b + m and b < a + n for a, n, b, m in zip(offsets, sizes, other, other_sizes)):
                    problems.append(f"chunks at {list(offsets)} and {list(other)} overlap")
        covered = sum(math.prod(s) for _, s in boxes)
        if not problems and covered != math.prod(shape):
            problems.append(f"its chunks cover {covered} of its {math.prod(shape)} elements")
    if problems:
        raise CorruptCheckpointError(f"{where}: tensor '{fqn}': {'; '.join(problems[:4])}; the metadata is damaged")


def assemble(shape: tuple[int, ...], dtype, pieces: list[tuple[tuple, Tensor]]):
    """The whole tensor from its chunks (offsets, lazy tensor), as a new torch tensor."""
    import torch

    from ..checkpoint.values import to_torch
    from .. import dtypes

    whole = torch.empty(shape, dtype=dtypes.torch_dtype(dtype))
    for offsets, piece in pieces:
        whole[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))] = to_torch(piece)
    return whole


class _Window:
    """``length`` bytes of ``file`` from ``start``, read as a file of their own (InputFile's read)."""

    def __init__(self, file: InputFile, start: int, length: int, name: str):
        self.file, self.start, self.size, self.name = file, start, length, name

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise CorruptCheckpointError(f"{self.name}: truncated: needs bytes {offset}..{offset + n} of its"
                                         f" {self.size}")
        return bytes(self.file.view(self.start + offset, n))

    def stream(self) -> io.BufferedReader:
        return io.BufferedReader(_WindowStream(self))


class _WindowStream(io.RawIOBase):
    def __init__(self, window: _Window):
        self.window, self.position = window, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = max(0, offset + (0, self.position, self.window.size)[whence])
        return self.position

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.window.size - self.position))
        buffer[:n] = self.window.file.view(self.window.start + self.position, n) if n else b""
        self.position += n
        return n


class _SpanRecords(ZipRecords):
    """The zip records of a torch.save archive inside a window of a larger file."""

    def __init__(self, window: _Window):
        import zipfile

        self.file = window
        try:
            infos = zipfile.ZipFile(window.stream()).infolist()
        except Exception as e:  # zipfile parsing untrusted bytes can fail in many ways; all mean "damaged"
            raise CorruptCheckpointError(f"{window.name}: not a readable torch.save archive ({type(e).__name__}:"
                                         f" {e}); the checkpoint is damaged") from e
        self.prefix = infos[0].filename.split("/", 1)[0] + "/" if infos and "/" in infos[0].filename else ""
        self.infos = {i.filename.removeprefix(self.prefix): i for i in infos}
        if "data.pkl" not in self.infos:
            raise CorruptCheckpointError(f"{window.name}: a zip archive without data.pkl; the checkpoint is damaged")
