"""What of an input's address is never shown: the query of a URL (a presigned address's
signature and credential, ``?X-Amz-Signature=...``), a secret like a token. The address is
used whole to read; every place text leaves paramsurgeon (an error, a note, a result, the
operations history a file records, a report page) shows it as ``https://host/path?…``."""

from __future__ import annotations

import re

# a URL's query: from '?' to the next space or quote; punctuation that ends it is the sentence's
_QUERY = re.compile(r"((?:https?|s3|hf)://[^\s?'\"<>]*)\?[^\s'\"<>]*?(?=[:;,.)\]]*(?:[\s'\"<>]|$))")


def redacted(text: str) -> str:
    """``text`` with the query of every URL in it replaced by '?…'."""
    return _QUERY.sub(r"\1?…", text) if "://" in text else text
