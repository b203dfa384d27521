"""Option groups the commands share, declared once (see declare.py); a command lists the
groups it takes and receives one instance of each."""

from __future__ import annotations

from dataclasses import dataclass

from ..declare import REQUIRED, argument, option
from ..errors import UsageError
from ..formats import registry


@dataclass(kw_only=True)
class Input:
    """The checkpoint a command reads."""

    ckpt: str | None = argument(None, metavar="CKPT", help="Checkpoint file, sharded directory or index; '-' or"
                                " omitted: standard input.")


@dataclass(kw_only=True)
class NamedInput:
    """The checkpoint a command reads, named before the command's own arguments."""

    ckpt: str = argument(REQUIRED, metavar="CKPT", help="Checkpoint file, sharded directory or index; '-':"
                         " standard input.")


@dataclass(kw_only=True)
class Pair:
    """The two checkpoints diff compares."""

    a: str = argument(REQUIRED, metavar="A", help="The first checkpoint.")
    b: str = argument(REQUIRED, metavar="B", help="The second checkpoint.")


@dataclass(kw_only=True)
class Read:
    """How checkpoints are opened."""

    key: str | None = option(None, "--key", metavar="KEY",
                             help="Path to the tensors inside a nested checkpoint, e.g. state_dict or model.ema;"
                             " '.' for the top level.")
    unsafe_pickle: bool = option(False, "--unsafe-pickle",
                                 help="Accept any pickled global in a file you trust (nothing is executed).")
    allow_global: list[str] = option([], "--allow-global", metavar="MODULE.NAME",
                                     help="Admit one pickled global by name (repeatable).")
    download: bool = option(False, "--download", help="Read remote files from a server that ignores Range requests"
                            " by downloading them whole (refused otherwise).")
    # Declared so that every command accepts it; the error handler (cli/__init__.py) reads it from
    # the command line itself, since an error may come before or while options are parsed.
    debug: bool = option(False, "--debug", help="Show the Python traceback of an error.")


@dataclass(kw_only=True)
class Raw:
    """Whether quantized tensors are read as what they mean or as they are stored."""

    raw: bool = option(False, "--raw", help="List the stored tensors as they are (codes, scales, zero points)"
                                            " instead of one dequantized tensor per quantized weight.")


@dataclass(kw_only=True)
class Workers:
    """Where per-tensor and per-shard work runs."""

    workers: str | None = option(None, "--workers", metavar="N", help="Processes for per-tensor and per-shard work"
                                 " (default: PARAMSURGEON_WORKERS, else every core; 1: this process only).")
    scheduler: str | None = option(None, "--scheduler", metavar="tcp://HOST:PORT", help="Run the work on a Dask"
                                   " cluster whose workers see the same paths (pip install 'paramsurgeon[cluster]').")

    def __post_init__(self) -> None:
        self.work()  # a bad count is refused before anything is read

    def work(self, job=None):
        """The parallel.Work these options ask for."""
        from ..parallel import work

        return work(self.workers, self.scheduler, job)


@dataclass(kw_only=True)
class Write(Workers):
    """Where and how a result is written."""

    output: str | None = option(None, "-o", "--output", metavar="PATH",
                                help="Where to write ('-' or omitted: standard output).")
    format: str | None = option(None, "--format", metavar=registry.format_choices(),
                                help="Output format (default: from the output's extension, else the input's).")
    in_place: bool = option(False, "--in-place", help="Rewrite the input checkpoint (atomically).")
    dry_run: bool = option(False, "--dry-run", help="Print what would be written; write nothing.")
    dedupe: bool = option(False, "--dedupe", help="safetensors: write tied tensors once, as safetensors' save_model"
                                                  " does and its load_model expects; the ties are recorded.")
    tensors_only: bool = option(False, "--tensors-only", help="Write only the tensors of a nested checkpoint (all"
                                                              " that safetensors can hold).")
    device: str | None = option(None, "--device", metavar="cpu", help="Record every tensor's storage as on the cpu"
                                " (a file saved on a GPU then loads without one).")
    resume: bool = option(False, "--resume", help="Sharded output: keep a journal of the shards written, and finish"
                          " a write that was interrupted, keeping its verified shards.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.device not in (None, "cpu"):
            raise UsageError(f"--device {self.device}: only --device cpu is supported (it makes a file saved on a"
                             " GPU load on any machine)")


@dataclass(kw_only=True)
class Surgery:
    """What a command that changes tensors reports and does beside the change."""

    reset_optimizer: bool = option(False, "--reset-optimizer", help="Clear the optimizer's per-parameter state"
                                   " (moments), which no longer matches.")
    json: bool = option(False, "--json", help="Print the plan as JSON on standard output (with --dry-run, or with -o).")


@dataclass(kw_only=True)
class Unquantized:
    """How a GGUF output stores a changed tensor whose type the gguf package cannot quantize
    (taken by the commands that change tensors and have no --dtype of their own)."""

    dtype: str | None = option(None, "--dtype", metavar="D", help="GGUF output: store a changed tensor whose type"
                               " gguf cannot quantize (K-quants, IQ types) as D (float16, bfloat16 or float32)"
                               " instead of refusing it.")


@dataclass(kw_only=True)
class Json:
    """A machine-readable result."""

    json: bool = option(False, "--json", help="Print one JSON document (schema in the README).")
