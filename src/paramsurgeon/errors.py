"""Every error paramsurgeon raises on purpose, and the exit code each one means.

    ParamSurgeonError                 exit 2; the message is one line: what, where, what to do
    ├── UsageError                    options that contradict each other or cannot be parsed
    ├── InputError                    a checkpoint that cannot be read as one
    │   ├── NotACheckpointError       the bytes are something else (TorchScript, LFS pointer, ...)
    │   ├── CorruptCheckpointError    truncated, inconsistent or lying about its own layout
    │   └── UnsafePickleError         the pickle wants a global that weights-only loading refuses
    ├── SelectionError                a pattern, name or key that matches nothing, or too much
    ├── PlanError                     an operation that cannot apply (shapes, dtypes, ties)
    │   └── UnfitTensorError          why one tensor cannot take it; the plan names the tensor
    │                                 and lists every one in a single PlanError
    ├── OutputError                   the output cannot be written where it was asked
    └── WorkError                     work spread over processes that could not finish (a worker
                                      died, a cluster unreachable or unable to see the paths)

Core code raises these and never prints or exits; the CLI turns one into a line on
stderr and the exit code.
"""

from __future__ import annotations

from .redaction import redacted


class ParamSurgeonError(Exception):
    """Base class: a user-facing error with a one-line message."""

    exit_code = 2
    where: tuple[str, ...] = ()  # what the error happened in, outermost first ('r.toml: step 2 (init)')

    def within(self, where: str) -> ParamSurgeonError:
        """This error (class, exit code and attributes kept), said to have happened in ``where``,
        which its message then starts with (once: a message that names it already is kept)."""
        if not str(self).startswith(f"{where}:"):
            self.where = (where, *self.where)
        return self

    def __str__(self) -> str:
        return redacted(": ".join((*self.where, super().__str__())))  # a URL's query is a secret


class UsageError(ParamSurgeonError):
    """Options that contradict each other or cannot be parsed."""


class InputError(ParamSurgeonError):
    """A checkpoint that cannot be read."""


class NotACheckpointError(InputError):
    """The file is readable but is not a checkpoint we can operate on."""


class CorruptCheckpointError(InputError):
    """The file claims to be a checkpoint but its structure is broken."""


class UnsafePickleError(InputError):
    """The pickle needs globals that weights-only loading does not allow."""

    def __init__(self, message: str, globals_wanted: list[str]):
        super().__init__(message)
        self.globals_wanted = globals_wanted


class SelectionError(ParamSurgeonError):
    """A selector or key that matches nothing, or matches ambiguously."""


class PlanError(ParamSurgeonError):
    """An operation that cannot be applied to the selected tensors."""


class UnfitTensorError(PlanError):
    """Why one tensor cannot take an operation, said of the tensor ('is boolean and cannot be
    scaled'); the plan that meets it names the tensor and reports every one at once, with the
    ``advice`` they share said once, at the end."""

    def __init__(self, reason: str, advice: str | None = None):
        super().__init__(reason)
        self.advice = advice


class OutputError(ParamSurgeonError):
    """The result cannot be written to the requested place."""


class WorkError(ParamSurgeonError):
    """Work spread over processes or a cluster could not finish; nothing was written."""
