"""Where inputs live, local or remote: the file and directory questions the readers ask,
answered by the operating system for a path and by formats/remote.py for a URL."""

from __future__ import annotations

import os

from . import files, remote
from .files import InputFile, is_url


def open_input(path: str | None) -> InputFile:
    """The input at ``path``: a local file, standard input (None or '-') or a remote file."""
    return remote.open_remote(path) if is_url(path) else files.open_input(path)


def is_file(path: str) -> bool:
    """Whether ``path`` is a file."""
    return remote.is_file(path) if is_url(path) else os.path.isfile(path)


def is_dir(path: str) -> bool:
    """Whether ``path`` is a directory."""
    return remote.is_dir(path) if is_url(path) else os.path.isdir(path)


def list_dir(path: str) -> list[str]:
    """The names in the directory ``path``."""
    return remote.list_dir(path) if is_url(path) else os.listdir(path)


def read_all(path: str) -> bytes:
    """The whole of a small file (an index, a config)."""
    if is_url(path):
        file = remote.open_remote(path)
        return file.read(0, file.size)
    with open(path, "rb") as handle:
        return handle.read()
