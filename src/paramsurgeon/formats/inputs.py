"""The inputs a command has opened, so that no output of the command lands on one of them.

A command (the CLI) runs inside ``recording()``; every checkpoint ``load`` opens, and every
other input a command reads (a recipe, an adapter directory), is recorded with the role the
user gave it. ``refuse_overwrite`` then refuses an output that is an input (the same file by
any path or hard link), lies inside an input directory, or is a directory holding an input.
Outside ``recording()`` (the library) nothing is recorded.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from ..errors import OutputError

_opened: dict[str, str | None] | None = None  # path as given -> role ('--against'), in the order opened
_permitted: set[str] = set()  # real paths an --in-place run rewrites on purpose


@contextmanager
def recording() -> Iterator[None]:
    """Record the inputs opened inside this block (one command) and forget them after."""
    global _opened, _permitted
    saved = _opened, _permitted
    _opened, _permitted = {}, set()
    try:
        yield
    finally:
        _opened, _permitted = saved


def record(path: str | None, role: str | None = None) -> None:
    """``path`` is an input of the running command; ``role`` names it ('--source', 'merge input 2').
    The first role given for a path is kept."""
    if _opened is None or path in (None, "-"):
        return
    if _opened.get(path) is None:
        _opened[path] = role


def role(path: str) -> str | None:
    """The role ``path`` was recorded with."""
    return (_opened or {}).get(path)


def permit(place: str) -> None:
    """--in-place: the output ``place`` is the input the user asked to rewrite."""
    _permitted.add(os.path.realpath(place))


def permitted(place: str) -> bool:
    """Whether ``place`` is rewritten in place (what else its directory holds is carried over)."""
    return os.path.realpath(place) in _permitted


def refuse_overwrite(output: str) -> None:
    """Refuse ``output`` if writing it could change an input of the running command.

    Raises:
        OutputError: naming the output, the input and its role.
    """
    if not _opened or permitted(output):
        return
    out = os.path.realpath(output)
    for path, given in sorted(_opened.items(), key=lambda item: item[1] is None):
        relation = _relation(out, os.path.realpath(path))
        if relation:
            named = f"{path} ({given})" if given else path
            raise OutputError(f"-o {output} {relation} the input {named}; nothing was written; write elsewhere")


def _relation(out: str, place: str) -> str | None:
    """How the output at real path ``out`` meets the input at real path ``place``, if it does."""
    if out == place or _same_file(out, place):
        return "is"
    if os.path.isdir(place):
        if out.startswith(place.rstrip(os.sep) + os.sep):
            return "is inside"
        if os.path.isfile(out) and any(_same_file(out, os.path.join(place, name)) for name in _names(place)):
            return "is a hard link to a file of"
    if os.path.isdir(out) and place.startswith(out.rstrip(os.sep) + os.sep):
        return "holds"
    return None


def _names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
