"""The legacy (non-zip) torch format, ``torch.save(..., _use_new_zipfile_serialization=False)``.

Layout: five pickles (magic number, protocol version, sys info, the object, the sorted
storage keys), then each storage as an 8-byte element count and its raw bytes. It is
read lazily like the zip format; a torch output of it is always written as zip.
"""

from __future__ import annotations

import struct

from ..checkpoint import Checkpoint, Storage
from ..errors import CorruptCheckpointError, NotACheckpointError
from . import pickles
from .files import InputFile
from .torchpickle import interpreter

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def _plain(source: str):
    return {"persistent_load": lambda pid: _no_storage(source), "interpret": {}}


def _no_storage(source: str):
    raise CorruptCheckpointError(f"{source}: unexpected storage reference in a header pickle")


def is_legacy(file: InputFile) -> bool:
    """Whether the file starts with the legacy format's magic number pickle."""
    with file.stream() as stream:
        stream.seek(0)  # a duplicated descriptor shares its offset with the original
        try:
            return pickles.unpickle(stream, file.name, **_plain(file.name)) == MAGIC_NUMBER
        except Exception:  # noqa: BLE001 - anything unreadable is simply not this format
            return False


def read(file: InputFile, *, allow: frozenset[str], unsafe: bool) -> Checkpoint:
    """Read the structure of a legacy torch checkpoint; tensor data stays in the file."""
    storages: dict[str, Storage] = {}

    def storage_for(key_: str, nbytes: int, location: str) -> Storage:
        if key_ not in storages:
            storages[key_] = Storage(nbytes, file=file, offset=-1, location=location)
        elif storages[key_].nbytes != nbytes:
            raise CorruptCheckpointError(f"{file.name}: storage '{key_}' is referenced with two sizes")
        return storages[key_]

    interpret, persistent_load = interpreter(file.name, storage_for)
    with file.stream() as stream:
        stream.seek(0)
        header = [pickles.unpickle(stream, file.name, **_plain(file.name)) for _ in range(3)]
        if header[0] != MAGIC_NUMBER or header[1] != PROTOCOL_VERSION:
            raise NotACheckpointError(f"{file.name}: a legacy torch file of an unsupported version")
        if isinstance(header[2], dict) and header[2].get("little_endian") is False:
            raise NotACheckpointError(f"{file.name}: a big-endian checkpoint; re-save it with torch on this machine")
        root = pickles.unpickle(stream, file.name, persistent_load=persistent_load, interpret=interpret,
                                allow=allow, unsafe=unsafe)
        keys = pickles.unpickle(stream, file.name, **_plain(file.name))
        position = stream.tell()
    if not isinstance(keys, list):
        raise CorruptCheckpointError(f"{file.name}: the storage key list is damaged")
    for storage_key in keys:
        count = struct.unpack("<q", file.read(position, 8))[0]
        storage = storages.get(str(storage_key))
        if storage is None:
            raise CorruptCheckpointError(f"{file.name}: storage '{storage_key}' is stored but never used")
        whole = count > 0 and storage.nbytes % count == 0 and storage.nbytes // count in (1, 2, 4, 8, 16)
        if not (whole or count == storage.nbytes == 0):
            raise CorruptCheckpointError(f"{file.name}: storage '{storage_key}' has a damaged size")
        storage.offset = position + 8
        position += 8 + storage.nbytes
        if position > file.size:
            raise CorruptCheckpointError(f"{file.name}: truncated: storage '{storage_key}' ends past the end of the file")
    missing = [k for k, s in storages.items() if s.offset < 0]
    if missing:
        raise CorruptCheckpointError(f"{file.name}: truncated: storages {', '.join(missing[:5])} are missing")
    return Checkpoint(source=file.name, format="torch-legacy", root=root, key=())
