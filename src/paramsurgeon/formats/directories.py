"""The files of a model directory besides its weights (SIDE_FILES: configuration, tokenizer,
custom code, model card), and the refusal of a directory output that holds anything but what
the command writes and such files (which are kept): it is replaced whole, so nothing else in
it may be lost."""

from __future__ import annotations

import fnmatch
import os
from typing import Callable

from ..errors import OutputError

SIDE_FILES = (
    # configuration: config.json, generation_config.json, tokenizer_config.json, preprocessor_config.json, ...
    "config.json", "*_config.json", "params.json",
    # tokenizer
    "tokenizer.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
    "merges.txt", "spiece.model", "sentencepiece*.model", "*.tiktoken", "chat_template.jinja", "chat_template.json",
    # code that trust_remote_code loads, the model card, the licence
    "modeling_*.py", "configuration_*.py", "tokenization_*.py", "processing_*.py", "image_processing_*.py",
    "README.md", "LICENSE", "LICENSE.*", "NOTICE", "USE_POLICY.md", ".gitattributes",
)
_SHOWN = 5


def is_side_file(name: str) -> bool:
    """Whether a file called ``name`` is one of the kinds a model directory holds beside its weights."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SIDE_FILES)


def refuse_foreign(where: str, folder: str, owns: Callable[[str], bool], what: str) -> None:
    """Refuse to replace ``folder`` (the user's ``-o where``) if it holds anything that is neither
    part of ``what`` it will hold (``owns(name)``) nor a model directory's side file.

    Raises:
        OutputError: listing some of what is there, or saying that ``folder`` is no directory.
    """
    if os.path.lexists(folder) and not os.path.isdir(folder):  # a file, a FIFO, a device: never replaced by one
        raise OutputError(f"-o {where} exists and is not a directory, which {what} is; nothing was written; pass a"
                          " new or empty directory")
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    foreign = [n + (os.sep if os.path.isdir(os.path.join(folder, n)) else "") for n in names
               if not owns(n) and not (is_side_file(n) and os.path.isfile(os.path.join(folder, n)))]
    if not foreign:
        return
    shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
    raise OutputError(f"-o {where} holds {shown}, which {'is' if len(foreign) == 1 else 'are'} not part of {what};"
                      " nothing was written; pass a new or empty directory")
