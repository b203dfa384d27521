"""Atomic replacement of files and directories, in one place.

A new file or directory is built under a hidden name beside its target, made durable, then
put in place in one step: a file by rename, a directory by an atomic exchange with the old
one (Linux ``renameat2(RENAME_EXCHANGE)``), after which the old one, now under the hidden
name, is removed. Where the exchange is unavailable, two renames are used and the old
directory waits under a ``.old`` name between them. After a crash at any step the target
is the old checkpoint or the new one; the next write or read of it (``recover``) removes
what the dead process left and, if it died between the two renames, restores the old one.

Freeing a replaced file of gigabytes (its blocks, its cached pages) takes the kernel a
good part of a second, in whichever process drops the file's last reference. A small
process (``release``) takes that reference over for a while, so that it is not this one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import subprocess
from contextlib import contextmanager
from typing import Callable, Iterator

from ..errors import OutputError
from .directories import refuse_foreign
from .files import Sink, output_kind
from .inputs import Inputs

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_RELEASE_SIZE = 64 << 20  # a replaced file this large is freed by another process
_HOLD_SECONDS = 2  # how long that process holds it: longer than this one takes to exit after a write


def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _renameat2()


def temporary_name(target: str) -> str:
    """A hidden name beside ``target`` that marks a write in progress by this process.

    What earlier writes of ``target`` left when their process died is cleared first.
    """
    folder, base = os.path.split(os.path.abspath(target))
    recover(target)
    return os.path.join(folder, f".{base}.paramsurgeon-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def recover(target: str) -> list[str]:
    """Clear the leftovers of dead processes' writes of ``target``; return the paths removed.

    A directory moved aside as ``.old`` while ``target`` is missing is a replacement that
    died between its two renames: it is the complete old checkpoint, and goes back in place.
    """
    folder, base = os.path.split(os.path.abspath(target))
    pattern = re.compile(rf"\.{re.escape(base)}\.paramsurgeon-(\d+)-[0-9a-f]{{8}}\.tmp(\.old)?")
    try:
        names = sorted(os.listdir(folder), key=lambda n: not n.endswith(".old"))  # restore first
    except OSError:
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if not match or _alive(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        if match.group(2) and not os.path.lexists(target):
            try:
                os.rename(path, target)
                fsync_directory(folder)
            except OSError:
                pass  # left as it is, for a run that may restore it
            continue
        remove(path)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def output_file(target: str, inputs: Inputs) -> Iterator[Sink]:
    """The output file ``-o target``: a FIFO or character device (through any link) is written
    through as a stream; a regular file, or a link to one, is replaced atomically (the link
    stays); a new name becomes a regular file. Never one of the command's ``inputs``."""
    if output_kind(target) != "stream":
        with atomic_file(target, inputs) as sink:
            yield sink
        return
    inputs.refuse_overwrite(target)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise OutputError(f"cannot write '{target}': {e.strerror}; nothing was written") from e
    try:
        if os.isatty(fd):
            raise OutputError(f"-o {target} is a terminal; refusing to write a binary checkpoint to it;"
                              " redirect it (> out.pt), pipe it, or pass a file")
        sink = Sink(fd=fd, name=target)
        yield sink
        sink.flush()
    except BrokenPipeError:
        raise  # the reader went away: the command ends quietly
    except OSError as e:
        raise OutputError(f"cannot write '{target}': {e.strerror or e}; what was written is incomplete") from e
    finally:
        os.close(fd)


@contextmanager
def atomic_file(target: str, inputs: Inputs | None = None) -> Iterator[Sink]:
    """Write ``target`` through a temporary file beside it: flushed, fsynced, renamed.

    A file it replaces keeps its mode (and owner, where permitted); a symbolic link is
    followed, and the file it names replaced. On any failure the temporary file is removed
    and ``target`` is untouched. It is never one of the command's ``inputs``.
    """
    if inputs is not None:
        inputs.refuse_overwrite(target)
    where, target = target, os.path.realpath(target) if os.path.islink(target) else target
    tmp = temporary_name(target)
    try:
        with new_file(tmp, like=target) as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fd)
        old = _hold(target)
        try:
            os.replace(tmp, target)
            fsync_directory(os.path.dirname(os.path.abspath(target)))
        finally:
            release([old] if old is not None else [])
    except BaseException as e:
        remove(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write '{where}': {e.strerror or e}; nothing was written") from e
        raise


@contextmanager
def new_file(path: str, like: str | None = None) -> Iterator[Sink]:
    """A new file at ``path`` (which must not exist), with the mode and owner of ``like`` if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OutputError(f"cannot write '{like or path}': {e.strerror}") from e
    try:
        _keep_attributes(path, like)
        sink = Sink(fd=fd, name=like or path, path=path)
        yield sink
        sink.flush()
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str, carry: Callable[[str], bool], owns: Callable[[str], bool],
                     what: str, inputs: Inputs, resume: str | None = None) -> Iterator[str]:
    """Build the new ``target`` directory in the staging directory yielded, then swap it in whole.

    The old directory may hold only ``what`` the new one replaces (``owns(name)``) and model
    files (directories.SIDE_FILES), else it is refused. Entries for which ``carry(name)`` is
    true (a config.json beside the shards) are carried over by hard link, unless the new
    directory holds that name. A symbolic link is followed. On failure before the swap the
    staging directory is removed and ``target`` is untouched. It is never one of the command's
    ``inputs``, but the one it rewrites in place. With ``resume`` (a file name), the staging
    directory of a write of ``target`` whose process died holding that file (the newest) is taken
    over as it is, if there is one; a failed write that holds that file leaves its staging
    directory for the next.
    """
    inputs.refuse_overwrite(target)
    where, target = target, os.path.realpath(target)  # "." cannot be renamed, its full path can
    if not inputs.permits(target):  # --in-place keeps what else the input's directory holds
        refuse_foreign(where, target, owns, what)
    staging = _taken_over(target, resume) if resume else None
    try:
        if staging is None:
            staging = temporary_name(target)
            os.mkdir(staging)
            _keep_attributes(staging, target)
        yield staging
        if os.path.isdir(target):
            for name in sorted(os.listdir(target)):
                if carry(name) and not os.path.lexists(os.path.join(staging, name)):
                    link_or_copy(os.path.join(target, name), os.path.join(staging, name))
        _fsync_tree(staging)
    except BaseException as e:
        if staging is not None and not (resume and os.path.exists(os.path.join(staging, resume))):
            remove(staging)  # a resumable write keeps what it wrote, for the next --resume
        if isinstance(e, OSError):
            raise OutputError(f"cannot write '{where}': {e.strerror or e}; nothing was written") from e
        raise
    try:
        old = _swap(staging, target)
    except OSError as e:
        remove(staging)
        raise OutputError(f"cannot replace '{where}': {e.strerror or e}; it is unchanged") from e
    fsync_directory(os.path.dirname(target))
    if old is not None:
        held = [fd for fd in (_hold(os.path.join(old, name)) for name in sorted(os.listdir(old))) if fd is not None]
        remove(old)  # a crash while removing it leaves the rest to recover()
        release(held)


def _taken_over(target: str, holding: str) -> str | None:
    """The newest staging directory of a dead process's write of ``target`` that holds the file
    ``holding``, renamed as this process's (so that no other run clears it); None if there is none."""
    folder, base = os.path.split(target)
    pattern = re.compile(rf"\.{re.escape(base)}\.paramsurgeon-(\d+)-[0-9a-f]{{8}}\.tmp")
    try:
        found = [os.path.join(folder, n) for n in os.listdir(folder) if (m := pattern.fullmatch(n))
                 and not _alive(int(m.group(1))) and os.path.isfile(os.path.join(folder, n, holding))]
    except OSError:
        return None
    if not found:
        return None
    newest = max(found, key=os.path.getmtime)
    staging = os.path.join(folder, f".{base}.paramsurgeon-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.rename(newest, staging)
    recover(target)  # what else dead runs left
    return staging


def _swap(staging: str, target: str) -> str | None:
    """Put ``staging`` at ``target`` in one step; return where the old ``target`` now is."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return None
    if _exchange(staging, target):
        return staging
    old = staging + ".old"
    os.rename(target, old)  # a crash from here to the next rename: recover() restores it
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old, target)
        raise
    return old


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step; False where the kernel or the file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def _hold(path: str) -> int | None:
    """A descriptor on the file at ``path``, about to be replaced, if it is large and has no other
    name (freeing it would cost time); else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    status = os.fstat(fd)
    if stat.S_ISREG(status.st_mode) and status.st_nlink == 1 and status.st_size >= _RELEASE_SIZE:
        return fd
    os.close(fd)
    return None


def release(fds: list[int]) -> None:
    """Close ``fds``, on files already replaced, without freeing them here: a process of its own
    holds them for _HOLD_SECONDS and frees them as it ends (a process that still has one open
    frees it when it closes it). Where that process cannot be started they are freed here.

    That process is no child of this one (a shell starts it in the background and ends at once),
    so nothing here keeps track of it, waits for it or leaves it a zombie."""
    if not fds:
        return
    try:
        subprocess.run(["sh", "-c", f"sleep {_HOLD_SECONDS} &"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, pass_fds=fds, start_new_session=True, check=False)
    except OSError:
        pass
    finally:
        for fd in fds:
            os.close(fd)


def link_or_copy(source: str, destination: str) -> None:
    """``source`` at ``destination`` too: a symlink as a symlink, a file by hard link (else copied),
    a directory entry by entry."""
    if os.path.islink(source):
        os.symlink(os.readlink(source), destination)
    elif os.path.isdir(source):
        shutil.copytree(source, destination, symlinks=True, copy_function=link_or_copy)
    else:
        try:
            os.link(source, destination)
        except OSError:  # a file system without hard links, or a file we may not link (protected_hardlinks)
            shutil.copy2(source, destination)


def _keep_attributes(path: str, like: str | None) -> None:
    """Give ``path`` the owner, group and mode of ``like``, the file it will replace."""
    if like is None or not os.path.exists(like):
        return
    old, new = os.stat(like), os.stat(path)
    if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.chown(path, old.st_uid, old.st_gid)
        except PermissionError:
            pass  # -o over another user's file makes a file of our own; --in-place refuses that first
    os.chmod(path, stat.S_IMODE(old.st_mode))


def fsync_directory(folder: str) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # file systems that cannot sync a directory
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    """Every file and directory under ``folder`` on disk (written, linked or copied into it)."""
    for parent, directories, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_directory(parent)


def remove(path: str) -> None:
    """Remove a file, link or directory tree (gone already is fine)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
