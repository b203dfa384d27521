"""What a checkpoint directory may hold beside the checkpoint, and the refusal of a directory
output that holds anything else: such a directory is replaced whole, so it may hold only
what the command writes (and the model files that go with it, which are carried over)."""

from __future__ import annotations

import os
import re
from typing import Callable

from ..errors import OutputError

# Files of a Hugging Face model directory beside its weights: configuration, tokenizer, the
# hub's own files. A directory output may hold them; they are kept. Extend here.
MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
    "merges.txt", "preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json",
    "README.md", ".gitattributes", "LICENSE",
    ".cache",  # huggingface_hub's record of a download into a local directory
})
_MODEL_PATTERNS = re.compile(r"tokenizer[\w.-]*|vocab\.\w+|.*\.spm|.*\.tiktoken")  # tokenizer.model.v3, vocab.bpe
_SHOWN = 5


def is_model_file(name: str) -> bool:
    """Whether a directory output may hold ``name`` beside the checkpoint (config, tokenizer, ...)."""
    return name in MODEL_FILES or bool(_MODEL_PATTERNS.fullmatch(name))


def refuse_foreign(where: str, folder: str, owns: Callable[[str], bool], what: str) -> None:
    """Refuse to replace ``folder`` (the user's ``-o where``) if it holds anything that is neither
    part of ``what`` it will hold (``owns(name)``) nor a model file.

    Raises:
        OutputError: listing some of what is there.
    """
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    foreign = [n + (os.sep if os.path.isdir(os.path.join(folder, n)) else "") for n in names
               if not owns(n) and not is_model_file(n)]
    if not foreign:
        return
    shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
    raise OutputError(f"-o {where} holds {shown}, which {'is' if len(foreign) == 1 else 'are'} not part of {what};"
                      " nothing was written; pass a new or empty directory")
