"""The inputs a command has opened, so that no output of the command lands on one of them.

A command's loader (formats/loader.py) owns one ``Inputs``: every checkpoint it opens, and
every other input the command reads (a recipe, an adapter directory), is recorded with the
role the user gave it. The writers take the record with their target (``Target.inputs``):
``refuse_overwrite`` refuses an output that is an input (the same file by any path or hard
link), lies inside an input directory, or is a directory holding an input. A library save,
which has no loader, is checked against the checkpoint's own file (target.resolve_target).
The record also keeps each checkpoint as the loader read it (``as_read``), for a write that
compares its result with its input (sidefiles: config.json) without opening it again.
"""

from __future__ import annotations

import os

from typing import TYPE_CHECKING

from ..errors import OutputError

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint


class Inputs:
    """The record of one command's inputs: path as given -> role ('--against'), in the order
    opened, and the places an --in-place run rewrites on purpose."""

    def __init__(self) -> None:
        self.opened: dict[str, str | None] = {}
        self.permitted: set[str] = set()  # real paths
        self.standard_input = False  # whether one input is read from standard input
        self.read: dict[str, Checkpoint] = {}  # path -> the checkpoint first read there, as read

    def record(self, path: str | None, role: str | None = None) -> None:
        """``path`` is an input of the command; ``role`` names it ('--source', 'merge input 2').
        The first role given for a path is kept."""
        if path in (None, "-"):
            self.standard_input = True
        elif self.opened.get(path) is None:
            self.opened[path] = role

    def keep(self, path: str, ckpt: Checkpoint) -> None:
        """``ckpt`` is the checkpoint read at ``path``, before any operation (the first one kept;
        a copy of its mapping of tensors, which operations then change in the one they are given)."""
        if path not in self.read:
            self.read[path] = ckpt.with_container(dict(ckpt.container))

    def as_read(self, path: str | None) -> Checkpoint | None:
        """The checkpoint read at ``path`` as it was read, if this command's loader read it."""
        return self.read.get(path) if path is not None else None

    def role(self, path: str) -> str | None:
        """The role ``path`` was recorded with."""
        return self.opened.get(path)

    def permit(self, place: str) -> None:
        """--in-place: the output ``place`` is the input the user asked to rewrite."""
        self.permitted.add(os.path.realpath(place))

    def permits(self, place: str) -> bool:
        """Whether ``place`` is rewritten in place (what else its directory holds is carried over)."""
        return os.path.realpath(place) in self.permitted

    def refuse_overwrite(self, output: str) -> None:
        """Refuse ``output`` if writing it could change an input of the command.

        Raises:
            OutputError: naming the output, the input and its role.
        """
        if not self.opened or self.permits(output):
            return
        out = os.path.realpath(output)
        for path, given in sorted(self.opened.items(), key=lambda item: item[1] is None):
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
