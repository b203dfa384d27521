"""The journal of a resumable sharded write (``--resume``): beside the shards in the staging
directory, the plan of the output (a fingerprint) and each shard written, with its sha256.

A later ``--resume`` of the same output keeps the shards whose bytes still hash to what the
journal says and discards everything else; a journal of another output is refused, not trusted.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..errors import OutputError
from ..parsing import parse_document
from .atomic import remove

NAME = ".paramsurgeon-journal"
_BLOCK = 16 << 20


class Journal:
    """The journal in ``staging`` of the output whose plan hashes to ``fingerprint``."""

    def __init__(self, staging: str, fingerprint: str):
        self.path, self.fingerprint = os.path.join(staging, NAME), fingerprint

    def start(self) -> None:
        """A new journal: nothing written yet."""
        with open(self.path, "w", encoding="utf-8") as file:
            file.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            _durable(file)

    def kept(self, where: str) -> set[str]:
        """The shards an interrupted write of this output finished that still hash as recorded;
        every other file of the staging directory is removed. Raises OutputError for a journal of
        another output (or none that can be read), naming ``where``, the output."""
        staging = os.path.dirname(self.path)
        entries = self._entries(where)
        kept = {name for name, digest in entries.items() if name == os.path.basename(name)
                and os.path.isfile(os.path.join(staging, name)) and sha256_of(os.path.join(staging, name)) == digest}
        for name in os.listdir(staging):
            if name not in kept and name != NAME:
                remove(os.path.join(staging, name))
        return kept

    def record(self, shard: str, digest: str) -> None:
        """``shard`` is written, durably, and hashes to ``digest``."""
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"shard": shard, "sha256": digest}) + "\n")
            _durable(file)

    def _entries(self, where: str) -> dict[str, str]:
        refuse = (f"--resume: the interrupted write of '{where}' was of another output (its journal {self.path}"
                  " records a different plan: other tensors, options or inputs); nothing was written; run"
                  " without --resume to start over")
        try:
            with open(self.path, encoding="utf-8") as file:
                lines = [parse_document(json.loads, line) for line in file if line.strip()]
        except (OSError, ValueError) as e:
            raise OutputError(refuse) from e
        if not lines or not isinstance(lines[0], dict) or lines[0].get("fingerprint") != self.fingerprint:
            raise OutputError(refuse)
        return {line["shard"]: line["sha256"] for line in lines[1:] if isinstance(line, dict)
                and isinstance(line.get("shard"), str) and isinstance(line.get("sha256"), str)}


def fingerprint(plan: object) -> str:
    """The sha256 of a JSON-able description of an output's plan."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _durable(file) -> None:
    file.flush()
    os.fsync(file.fileno())
