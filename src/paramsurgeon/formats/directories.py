"""The refusal of a directory output that holds anything but what the command writes and the
files of a model directory (sidefiles.SIDE_FILES, which are kept): such a directory is
replaced whole, so nothing else in it may be lost."""

from __future__ import annotations

import os
from typing import Callable

from ..errors import OutputError
from .sidefiles import is_side_file

_SHOWN = 5


def refuse_foreign(where: str, folder: str, owns: Callable[[str], bool], what: str) -> None:
    """Refuse to replace ``folder`` (the user's ``-o where``) if it holds anything that is neither
    part of ``what`` it will hold (``owns(name)``) nor a model directory's side file.

    Raises:
        OutputError: listing some of what is there.
    """
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    foreign = [n + (os.sep if os.path.isdir(os.path.join(folder, n)) else "") for n in names
               if not owns(n) and not (is_side_file(n) and os.path.isfile(os.path.join(folder, n)))]
    if not foreign:
        return
    shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
    raise OutputError(f"-o {where} holds {shown}, which {'is' if len(foreign) == 1 else 'are'} not part of {what};"
                      " nothing was written; pass a new or empty directory")
