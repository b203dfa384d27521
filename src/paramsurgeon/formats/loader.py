"""The one loader of a command's inputs: the checkpoint, --source, --against, merge inputs and
adapters are all opened here, with the command's reading options, each once however often a
plan asks, and recorded in the loader's ``inputs`` (formats/inputs.py), the record the command's
writes are checked against, so that no output of the command lands on one.

Operations receive a Loader (ops.spec.Sources) and never open files themselves. Any input may be
a URL (hf://, s3://, https://): the readers ask formats/places.py, which asks formats/remote.py,
whose lookups (files, hub repositories, connections, redirects) the loader's own ``remote`` keeps,
so that they last as long as its command and no other loader sees them.
"""

from __future__ import annotations

from ..checkpoint import Checkpoint
from ..errors import ParamSurgeonError, SelectionError
from . import peft, registry, remote
from .inputs import Inputs
from .places import dirname
from .reading import load, sharded_index, verify_shards


class Loader:
    """Opens inputs with ``key`` (--key), ``allow_globals`` (--allow-global) and ``unsafe_pickle``;
    ``raw``: each quantized tensor's stored parts as they are (--raw), not one logical tensor.

    ``shared_key``: the command's --key applies to every checkpoint it opens (merge), and a
    safetensors or sharded input, already a flat mapping of names to tensors, ignores it;
    otherwise each request names its own key (copy's --source-key).
    ``download`` (--download): a remote server that ignores Range requests is read by
    downloading whole files (otherwise that is refused; formats/remote.py).
    ``remote``: this loader's remote lookups, active while it opens and checks inputs.
    """

    def __init__(self, *, key: str | None = None, allow_globals: tuple[str, ...] = (), unsafe_pickle: bool = False,
                 shared_key: bool = False, raw: bool = False, download: bool = False):
        self.key, self.shared_key = key, shared_key
        self.options = {"allow_globals": tuple(allow_globals), "unsafe_pickle": unsafe_pickle, "raw": raw}
        self.opened: dict[tuple[str | None, str | None], Checkpoint] = {}
        self.inputs = Inputs()  # this command's: every path opened, with its role
        self.remote = remote.Remote(download)  # a remote file is looked up once per loader

    def checkpoint(self, path: str | None, key: str | None = None, role: str | None = "--source") -> Checkpoint:
        """The checkpoint at ``path`` (None or '-': standard input) in the ``role`` the user gave it
        (the first role given for a path is kept), opened once per path and key."""
        key = self.key if self.shared_key else key
        self.inputs.record(path, role)
        if (path, key) not in self.opened:
            ckpt = self.opened[path, key] = self._open(path, key)
            if path not in (None, "-"):
                self.inputs.keep(path, ckpt)  # what a write compares its result with (sidefiles)
            if registry.get(ckpt.format).sharded:  # an index names its directory: every shard is an input
                self.inputs.record(dirname(ckpt.source) or ".", self.inputs.role(path))
        return self.opened[path, key]

    def adapter(self, path: str) -> tuple[str, dict, Checkpoint]:
        """The PEFT adapter directory ``path`` names: the directory, its config and its weights."""
        with self.remote.active():
            folder = peft.adapter_directory(path)
            self.inputs.record(folder, "the adapter")
            config, weights = peft.read_adapter(folder, lambda file: self.checkpoint(file, role="the adapter"))
        return folder, config, weights

    def shard_problems(self, path: str | None) -> list[dict] | None:
        """Where the sharded checkpoint at ``path`` and its index disagree, every shard read with
        the command's options (check --complete's work); None when ``path`` is not sharded."""
        options = {k: v for k, v in self.options.items() if k != "raw"}
        with self.remote.active():
            return verify_shards(path, **options) if sharded_index(path) is not None else None

    def _open(self, path: str | None, key: str | None) -> Checkpoint:
        with self.remote.active():
            return self._load(path, key)

    def _load(self, path: str | None, key: str | None) -> Checkpoint:
        try:
            return load(path, key=key, **self.options)
        except SelectionError as e:
            if not self.shared_key or key is None or path in (None, "-"):
                raise
            try:
                flat = load(path, **self.options)
            except ParamSurgeonError:
                raise e from None
            if registry.get(flat.format).nested:
                raise
            return flat
