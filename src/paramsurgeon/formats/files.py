"""Bytes in and out: input files read by offset and memory-mapped on demand, and output
sinks that stream and copy unchanged spans in the kernel (atomic replacement: atomic.py).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
import tempfile
from typing import BinaryIO, Callable

from ..errors import CorruptCheckpointError, InputError, OutputError

_COPY_CHUNK = 64 << 20
_COPY_CALL = 1 << 30
_BUFFER = 1 << 20
_WRITEBACK = 256 << 20  # start writing dirty pages to disk every this many bytes
ALIGN = 64 << 10  # an output laid out at its input's offsets modulo this is copied in whole folios


def _sync_file_range():
    """Linux's sync_file_range(2), to start writeback early so the final fsync has little left."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return function
    except (OSError, AttributeError):
        return None


_START_WRITEBACK = _sync_file_range()


class InputFile:
    """An input opened read-only: ``read`` by offset, ``view`` through a private memory map."""

    def __init__(self, fd: int, name: str, path: str | None = None):
        self.fd, self.name, self.path = fd, name, path
        self.size = os.fstat(fd).st_size
        self._map: mmap.mmap | None = None

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset``; a file that ends early is truncated."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise CorruptCheckpointError(
                f"{self.name}: truncated: needs bytes {offset}..{offset + n} but the file has {self.size}")
        chunks, done = [], 0
        while done < n:
            chunk = os.pread(self.fd, n - done, offset + done)
            if not chunk:
                raise CorruptCheckpointError(f"{self.name}: truncated while reading at byte {offset + done}")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def stream(self) -> BinaryIO:
        """The file as a file object of its own (its position starts at 0), for zipfile and pickle."""
        return os.fdopen(os.dup(self.fd), "rb")

    def view(self, offset: int, n: int) -> memoryview:
        """``n`` bytes at ``offset`` without copying (copy-on-write map: the file never changes)."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise CorruptCheckpointError(
                f"{self.name}: truncated: needs bytes {offset}..{offset + n} but the file has {self.size}")
        if n == 0:
            return memoryview(b"")
        if self._map is None:
            self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
        return memoryview(self._map)[offset:offset + n]


def open_input(path: str | None) -> InputFile:
    """Open ``path``, or standard input for None or '-'."""
    if path in (None, "-"):
        return _open_stdin()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise InputError(f"cannot read '{path}': {e.strerror}") from e
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        os.close(fd)
        raise InputError(f"'{path}' is a directory")
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):  # a process substitution (<(...)) too: read once, as stdin is
        try:
            return InputFile(_spooled(lambda: os.read(fd, _COPY_CHUNK)), path, path)
        finally:
            os.close(fd)
    if not stat.S_ISREG(mode):  # /dev/zero would be read for ever
        os.close(fd)
        raise InputError(f"'{path}' is a device, not a checkpoint file; pass a file, a directory or a pipe")
    return InputFile(fd, path, path)


def is_url(path: str | None) -> bool:
    """Whether ``path`` names a remote place (formats/remote.py) rather than a local one."""
    return isinstance(path, str) and path.startswith(("https://", "http://", "hf://", "s3://"))


def _open_stdin() -> InputFile:
    stream = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is not None and os.isatty(fd):
        raise InputError("no checkpoint given: pass a path, or pipe one in (paramsurgeon inspect < model.pt)")
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode) and os.lseek(fd, 0, os.SEEK_CUR) == 0:
        return InputFile(os.dup(fd), "<stdin>")
    return InputFile(_spooled(lambda: stream.read(_COPY_CHUNK) if fd is None else os.read(fd, _COPY_CHUNK)), "<stdin>")


def _spooled(read: Callable[[], bytes]) -> int:
    """A stream (a pipe, a FIFO) copied to an unlinked temporary file, so that it can be
    memory-mapped: a descriptor of that file."""
    with tempfile.TemporaryFile(prefix="paramsurgeon-stdin-") as spool:
        while chunk := read():
            spool.write(chunk)
        spool.flush()
        return os.dup(spool.fileno())


class Sink:
    """A sequential output: small writes are buffered, spans of input files are copied
    by the kernel when both ends are regular files, adjacent spans in one call. ``path``: the
    file's own path, for a new regular file that other processes may open too (placed.py)."""

    def __init__(self, stream: BinaryIO | None = None, fd: int | None = None, name: str = "<stdout>",
                 path: str | None = None):
        self.stream, self.fd, self.name, self.path = stream, fd, name, path
        self.position = 0
        self._buffer = bytearray()
        self._pending: tuple[InputFile, int, int] | None = None  # a copy not yet made: source, offset, n
        self._regular = fd is not None and stat.S_ISREG(os.fstat(fd).st_mode)
        self._start = os.lseek(fd, 0, os.SEEK_CUR) if self._regular else 0  # where position 0 is in the file
        self._out = 0  # bytes handed to the kernel
        self._synced = 0

    @property
    def offset(self) -> int:
        """Where the next byte goes in the file (``position`` counts from where the sink began)."""
        return self._start + self.position

    def write(self, data) -> None:
        self._copy_pending()
        self._buffer += data
        self.position += len(data)
        if len(self._buffer) >= _BUFFER:
            self.flush()

    def write_large(self, data: memoryview) -> None:
        """Write a large buffer without copying it into the small-write buffer."""
        self.flush()
        self._write_out(data)
        self.position += len(data)

    def copy(self, source: InputFile, offset: int, n: int) -> None:
        """Append ``n`` bytes of ``source`` starting at ``offset`` (made by ``flush`` at the latest)."""
        pending = self._pending
        if pending is not None and pending[0] is source and pending[1] + pending[2] == offset:
            self._pending = (source, pending[1], pending[2] + n)
        else:
            self.flush()
            self._pending = (source, offset, n)
        self.position += n
        if self._pending[2] >= _WRITEBACK:
            self._copy_pending()

    def skip(self, n: int) -> None:
        """Leave ``n`` bytes of a regular file for another writer (placed.py) and go on after them."""
        self.flush()
        os.lseek(self.fd, n, os.SEEK_CUR)
        self.position += n
        self._out += n  # the ranges handed to writeback count the holes too

    def start_writeback(self) -> None:
        """Start writing to disk what is written and not yet on its way."""
        if self._regular and _START_WRITEBACK is not None and self._out > self._synced:
            _START_WRITEBACK(self.fd, self._start + self._synced, self._out - self._synced, 2)  # SYNC_FILE_RANGE_WRITE
            self._synced = self._out

    def flush(self) -> None:
        if self._buffer:
            self._write_out(memoryview(self._buffer))
            self._buffer = bytearray()
        self._copy_pending()

    def _copy_pending(self) -> None:
        if self._pending is None:
            return
        source, offset, n = self._pending
        self._pending = None
        done = self._copy_file_range(source, offset, n) if self._regular and source.fd is not None else 0
        self._wrote(done)
        if done < n:
            self._write_out(source.view(offset + done, n - done))

    def _copy_file_range(self, source: InputFile, offset: int, n: int) -> int:
        """Copy in the kernel; each call but the first starts at a multiple of ALIGN in ``source``
        (with the output at the same offset modulo ALIGN, whole folios are copied)."""
        done = 0
        step = min(n, -offset % ALIGN) or min(n, _COPY_CALL)
        try:
            while done < n:
                copied = os.copy_file_range(source.fd, self.fd, step, offset + done)
                if copied == 0:
                    raise CorruptCheckpointError(f"{source.name}: truncated while copying byte {offset + done}")
                done += copied
                step = min(n - done, _COPY_CALL)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
        return done

    def _write_out(self, data: memoryview) -> None:
        if self.fd is None:
            self.stream.write(data)
            return
        view = memoryview(data).cast("B")
        while len(view):
            written = os.write(self.fd, view[:_COPY_CHUNK])
            view = view[written:]
            self._wrote(written)

    def _wrote(self, n: int) -> None:
        """Ask the kernel to start writing what is done, so that the closing fsync has little left."""
        self._out += n
        if self._out - self._synced >= _WRITEBACK:
            self.start_writeback()


def reproduces(path: str, write: Callable[[Sink], None]) -> bool:
    """Whether ``write`` would write exactly the file at ``path``, copying every span it copies
    from that very file at the same offset. Costs a read of the bytes written from memory
    (headers, pickles), none of the copied ones."""
    try:
        file = open_input(path)
    except InputError:
        return False
    rehearsal = _Rehearsal(file)
    try:
        write(rehearsal)
    except _Differs:
        return False
    finally:
        os.close(file.fd)
    return rehearsal.position == file.size


class _Differs(Exception):
    """A rehearsed write departs from the file."""


class _Rehearsal:
    """A sink that writes nothing and raises _Differs where the output would depart from ``file``."""

    path = None  # no file of its own for other processes to write

    def __init__(self, file: InputFile):
        self.file, self.position = file, 0
        self._identity = _identity(file.fd)

    @property
    def offset(self) -> int:
        return self.position

    def write(self, data) -> None:
        n = len(data)
        if self.position + n > self.file.size or self.file.read(self.position, n) != bytes(data):
            raise _Differs
        self.position += n

    def write_large(self, data: memoryview) -> None:
        raise _Differs  # bytes computed in memory: a changed tensor

    def copy(self, source: InputFile, offset: int, n: int) -> None:
        if offset != self.position or _identity(source.fd) != self._identity:
            raise _Differs
        self.position += n

    def flush(self) -> None:
        """Nothing is buffered."""


def same_file(file: InputFile | None, path: str) -> bool:
    """Whether ``file`` is open on the file at ``path`` (not merely one of the same name)."""
    try:
        return file is not None and file.fd is not None and _identity(file.fd) == _identity(path)
    except OSError:
        return False


def _identity(fd_or_path: int | str) -> tuple[int, int]:
    status = os.stat(fd_or_path)
    return status.st_dev, status.st_ino


def refuse_terminal() -> None:
    """Standard output must not be a terminal when a checkpoint is going there."""
    if sys.stdout.isatty():
        raise OutputError("refusing to write a binary checkpoint to the terminal;"
                          " redirect it (> out.pt), pipe it, or pass -o PATH")


def output_kind(path: str) -> str:
    """What ``-o path`` names, through any link: 'missing', 'file', 'directory' or 'stream' (a
    FIFO or a character device, written through like standard output); refuses other kinds."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror}; nothing was written") from e
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return "stream"
    kind = "a socket" if stat.S_ISSOCK(mode) else "a block device" if stat.S_ISBLK(mode) else "a special file"
    raise OutputError(f"-o {path} is {kind}; an output is a regular file, a directory, a FIFO or a character"
                      " device; nothing was written")


def stdout_sink() -> Sink:
    """A sink on standard output; refuses a terminal."""
    stream = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else sys.stdout
    refuse_terminal()
    sys.stdout.flush()
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    return Sink(stream=stream, fd=fd)
