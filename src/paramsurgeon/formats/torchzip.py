"""torch.save's zip format: read lazily (records located, never loaded), written by streaming.

The writer lays records out exactly as torch's own (miniz) writer does: stored, each
payload aligned to 64 bytes by an 'FB' padding field, a data descriptor after each
payload, zip64 end records; so ``torch.load`` (mmap or not) reads it as its own.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
import zlib

from ..checkpoint import Checkpoint, Storage
from ..errors import CorruptCheckpointError, NotACheckpointError
from . import pickles
from ..checkpoint.tensor import blocks
from .files import ALIGN as FOLIO_ALIGN, InputFile, Sink
from .torchpickle import TensorPickling, interpreter

ALIGNMENT = 64
_U32 = 0xFFFFFFFF
ZIP64_LIMIT = _U32  # sizes and offsets from here on need zip64 fields (tests lower it)
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_FLAGS = 0x0808  # data descriptor follows the payload; names are UTF-8


class ZipRecords:
    """The records of a zip archive: name (without the archive folder) -> ZipInfo."""

    def __init__(self, file: InputFile):
        self.file = file
        try:
            with file.stream() as handle:
                infos = zipfile.ZipFile(handle).infolist()
        except Exception as e:  # zipfile parsing untrusted bytes can fail in many ways; all mean "damaged"
            raise CorruptCheckpointError(f"{file.name}: not a readable zip archive ({type(e).__name__}: {e});"
                                         " the file is probably truncated or damaged") from e
        if not infos:
            raise NotACheckpointError(f"{file.name}: an empty zip archive, not a torch checkpoint")
        self.prefix = infos[0].filename.split("/", 1)[0] + "/" if "/" in infos[0].filename else ""
        self.infos = {i.filename[len(self.prefix):] if i.filename.startswith(self.prefix) else i.filename: i
                      for i in infos}

    def has(self, name: str) -> bool:
        return name in self.infos

    def offset(self, name: str) -> tuple[int, int]:
        """(offset of the payload in the file, its size) for a stored record."""
        info = self.infos[name]
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise NotACheckpointError(f"{self.file.name}: record '{name}' is compressed; torch never"
                                      " writes compressed records; re-save the file with torch.save")
        header = self.file.read(info.header_offset, _LOCAL.size)
        fields = _LOCAL.unpack(header)
        if fields[0] != 0x04034B50:
            raise CorruptCheckpointError(f"{self.file.name}: record '{name}' has a damaged local header")
        start = info.header_offset + _LOCAL.size + fields[9] + fields[10]
        if start + info.file_size > self.file.size:
            raise CorruptCheckpointError(f"{self.file.name}: truncated: record '{name}' ends past the end of the file")
        return start, info.file_size

    def read(self, name: str) -> bytes:
        start, size = self.offset(name)
        data = self.file.read(start, size)
        if zlib.crc32(data) != self.infos[name].CRC:
            raise CorruptCheckpointError(f"{self.file.name}: record '{name}' fails its CRC check; the file is damaged")
        return data


def describe_zip(records: ZipRecords) -> str | None:
    """Why a zip archive is not a checkpoint we can read, or None if it is one."""
    names = set(records.infos)
    if "constants.pkl" in names or any(n.startswith("code/") for n in names):
        return ("a TorchScript archive (torch.jit.save), not a checkpoint; load it with torch.jit.load"
                " and save model.state_dict() with torch.save")
    if "data.pkl" not in names:
        if names and all(n.endswith(".npy") for n in names):
            return "a NumPy .npz archive, not a PyTorch checkpoint"
        return "a zip archive without data.pkl, not a torch checkpoint"
    return None


def read(file: InputFile, *, allow: frozenset[str], unsafe: bool) -> Checkpoint:
    """Read the structure of a torch zip checkpoint; tensor data stays in the file."""
    records = ZipRecords(file)
    problem = describe_zip(records)
    if problem:
        raise NotACheckpointError(f"{file.name}: {problem}")
    if records.has("byteorder") and records.read("byteorder") not in (b"little", b""):
        raise NotACheckpointError(f"{file.name}: a big-endian checkpoint; load and re-save it with torch on this machine")
    storages: dict[str, Storage] = {}

    def storage_for(key_: str, nbytes: int, location: str) -> Storage:
        if key_ in storages:
            return storages[key_]
        name = f"data/{key_}"
        if not records.has(name):
            raise CorruptCheckpointError(f"{file.name}: storage '{key_}' is missing (no record {name})")
        start, size = records.offset(name)
        if size != nbytes:
            raise CorruptCheckpointError(
                f"{file.name}: storage '{key_}' holds {size} bytes but the pickle says {nbytes}")
        storages[key_] = Storage(nbytes, file=file, offset=start, crc32=records.infos[name].CRC,
                                 location=location)
        return storages[key_]

    interpret, persistent_load = interpreter(file.name, storage_for)
    root = pickles.unpickle(records.read("data.pkl"), file.name, persistent_load=persistent_load,
                            interpret=interpret, allow=allow, unsafe=unsafe)
    return Checkpoint(source=file.name, format="torch", root=root, key=())


def archive_name(path: str | None) -> str:
    """The folder name inside a torch zip: the file's stem, as torch.save names it."""
    if path is None:
        return "archive"
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem if re.fullmatch(r"[A-Za-z0-9_.\-]+", stem or "") else "archive"


class Writer:
    """One torch zip file on ``sink``: the checkpoint's whole object (the rest of the file
    too) pickled as torch.save pickles it, then each storage streamed into its record."""

    def __init__(self, sink: Sink, archive: str = "archive", progress=None):
        self.sink, self.archive, self.progress = sink, archive, progress

    def write(self, ckpt: Checkpoint) -> None:
        pickling = TensorPickling()
        data_pkl = pickles.to_pickle(ckpt.root, reduce_object=pickling.reduce, persistent_id=pickling.persistent_id)
        records = _Records(self.sink, self.archive)
        records.add_bytes("data.pkl", data_pkl)
        records.add_bytes(".format_version", b"1")
        records.add_bytes(".storage_alignment", str(ALIGNMENT).encode())
        records.add_bytes("byteorder", b"little")
        for key, storage in pickling.storages:
            records.add_storage(f"data/{key}", storage, self.progress)
        records.add_bytes("version", b"3\n")
        records.finish()


class _Records:
    """Stored zip records laid out as miniz lays them out for torch."""

    def __init__(self, sink: Sink, archive: str):
        self.sink, self.archive = sink, archive
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, crc, size, header offset

    def add_bytes(self, name: str, data: bytes) -> None:
        self._header(name, len(data))
        self.sink.write(data)
        self._footer(name, zlib.crc32(data), len(data))

    def add_storage(self, name: str, storage: Storage, progress=None) -> None:
        self._header(name, storage.nbytes, None if storage.in_memory else storage.offset)
        if storage.in_memory:
            view = storage.view()
            crc = zlib.crc32(view)
            self.sink.write_large(view)
        else:
            crc = storage.crc32 if storage.crc32 is not None else _crc_of(storage)
            self.sink.copy(storage.file, storage.offset, storage.nbytes)
        if progress is not None:
            progress(storage.nbytes)
        self._footer(name, crc, storage.nbytes)

    def _header(self, name: str, size: int, source: int | None = None) -> None:
        """The local header; the payload 64-aligned and, for a payload copied from ``source`` in
        a file, at the same offset modulo files.ALIGN where the padding is at most 1/64 of it."""
        full = f"{self.archive}/{name}".encode()
        offset = self.sink.position
        zip64 = b""
        if size >= ZIP64_LIMIT or offset >= ZIP64_LIMIT:
            values = ([size, size] if size >= ZIP64_LIMIT else []) + ([offset] if offset >= ZIP64_LIMIT else [])
            zip64 = struct.pack("<HH", 1, 8 * len(values)) + struct.pack(f"<{len(values)}Q", *values)
        start = offset + _LOCAL.size + len(full) + len(zip64) + 4
        padding = (-start) % ALIGNMENT
        base = self.sink.offset - self.sink.position  # where the archive begins in its file
        if source is not None and (source - base) % ALIGNMENT == 0:
            matched = (source - base - start) % FOLIO_ALIGN
            if 64 * matched <= size and len(zip64) + 4 + matched <= 0xFFFF:
                padding = matched
        extra = zip64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
        self.sink.write(_LOCAL.pack(0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(full), len(extra)))
        self.sink.write(full + extra)
        self.entries.append((full, 0, size, offset))

    def _footer(self, name: str, crc: int, size: int) -> None:
        full, _, _, offset = self.entries[-1]
        self.entries[-1] = (full, crc, size, offset)
        if size >= ZIP64_LIMIT or offset >= ZIP64_LIMIT:
            self.sink.write(struct.pack("<IIQQ", 0x08074B50, crc, size, size))
        else:
            self.sink.write(struct.pack("<IIII", 0x08074B50, crc, size, size))

    def finish(self) -> None:
        directory_start = self.sink.position
        for full, crc, size, offset in self.entries:
            big_size, big_offset = size >= ZIP64_LIMIT, offset >= ZIP64_LIMIT
            values = ([size, size] if big_size else []) + ([offset] if big_offset else [])
            extra = struct.pack("<HH", 1, 8 * len(values)) + struct.pack(f"<{len(values)}Q", *values) \
                if values else b""
            stored_size = _U32 if big_size else size
            self.sink.write(_CENTRAL.pack(
                0x02014B50, 0, 0, _FLAGS, 0, 0, 0, crc, stored_size, stored_size,
                len(full), len(extra), 0, 0, 0, 0, _U32 if big_offset else offset))
            self.sink.write(full + extra)
        directory_size = self.sink.position - directory_start
        count = len(self.entries)
        end64 = self.sink.position
        self.sink.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, count, count,
                                    directory_size, directory_start))
        self.sink.write(struct.pack("<IIQI", 0x07064B50, 0, end64, 1))
        big = directory_size >= ZIP64_LIMIT or directory_start >= ZIP64_LIMIT or count >= 0xFFFF
        self.sink.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF if big else count, 0xFFFF if big else count,
                                    _U32 if big else directory_size, _U32 if big else directory_start, 0))
        self.sink.flush()


def _crc_of(storage: Storage) -> int:
    crc = 0
    for block in blocks(storage.view()):
        crc = zlib.crc32(block, crc)
    return crc
