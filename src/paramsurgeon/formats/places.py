"""Where inputs live, local or remote: the file and directory questions the readers ask,
answered by the operating system for a path and by formats/remote.py for a URL."""

from __future__ import annotations

import os
import urllib.parse

from . import files, remote
from .files import InputFile, is_url


def open_input(path: str | None) -> InputFile:
    """The input at ``path``: a local file, standard input (None or '-') or a remote file."""
    return remote.open_remote(path) if is_url(path) else files.open_input(path)


def open_many(paths: list[str]) -> None:
    """Ready the files at ``paths`` for reading: remote ones are opened side by side (their first
    blocks fetched at once); local ones need nothing."""
    remote.open_many([path for path in paths if is_url(path)])


def is_file(path: str) -> bool:
    """Whether ``path`` is a file."""
    return remote.is_file(path) if is_url(path) else os.path.isfile(path)


def is_dir(path: str) -> bool:
    """Whether ``path`` is a directory."""
    return remote.is_dir(path) if is_url(path) else os.path.isdir(path)


def list_dir(path: str) -> list[str]:
    """The names in the directory ``path``."""
    return remote.list_dir(path) if is_url(path) else os.listdir(path)


def dirname(path: str) -> str:
    """The directory of the file ``path``. A URL's query (a presigned address's signature or
    token) stays on it, so that the files named in that directory are asked with it."""
    if not is_url(path):
        return os.path.dirname(path)
    parts = urllib.parse.urlsplit(path)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rpartition("/")[0]))


def join(folder: str, name: str) -> str:
    """The file ``name`` in the directory ``folder`` (a URL's query kept after the name)."""
    if not is_url(folder):
        return os.path.join(folder, name)
    parts = urllib.parse.urlsplit(folder)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


def basename(path: str) -> str:
    """The file name of ``path`` (of a URL: its path's last part, without the query)."""
    return urllib.parse.urlsplit(path).path.rpartition("/")[2] if is_url(path) else os.path.basename(path)


def read_all(path: str) -> bytes:
    """The whole of a small file (an index, a config)."""
    if is_url(path):
        file = remote.open_remote(path)
        return file.read(0, file.size)
    with open(path, "rb") as handle:
        return handle.read()
