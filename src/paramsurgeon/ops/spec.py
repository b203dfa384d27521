"""What every operation is: a dataclass of its options (declared once, see declare.py)
with a ``plan`` method, plus the option groups operations share.

The command line builds a command from each operation's fields, a recipe step names the
operation and gives the same fields as keys, and a library call passes them as keyword
arguments; all three are checked by the same declaration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol

from .. import declare
from ..checkpoint import Checkpoint
from ..checkpoint.kinds import ROLES, role
from ..declare import option
from ..errors import UsageError
from ..selection import Selection
from .plan import Plan


class Sources(Protocol):
    """What a plan reads besides its checkpoint, opened by the command's one loader (formats/loader.py)."""

    def checkpoint(self, path: str, key: str | None = None) -> Checkpoint:
        """Another checkpoint ('--source', a merge input), ``key`` picking its tensors."""

    def adapter(self, path: str) -> tuple[str, dict, Checkpoint]:
        """The PEFT adapter directory ``path`` names: the directory, its config, its weights."""


@dataclass(kw_only=True)
class Operation:
    """One operation's options; ``plan`` checks them against a checkpoint and says what changes.

    Subclasses set ``name`` (the command) and ``example`` (a command line for --help); one that
    takes an argument of its own after the checkpoint sets ``named_input`` (the checkpoint must then
    be named, '-' for standard input).
    """

    name: ClassVar[str]
    example: ClassVar[str]
    named_input: ClassVar[bool] = False

    def __post_init__(self) -> None:
        declare.check(self, self.name)

    @property
    def random(self) -> bool:
        """Whether the operation draws random values (and so needs a seed)."""
        return False

    def seeded(self, seed: int) -> "Operation":
        """The same operation with ``seed`` for its random values."""
        return dataclasses.replace(self, seed=seed)

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        raise NotImplementedError


@dataclass(kw_only=True)
class Targets(Selection):
    """A selection for commands that change tensors: it must narrow, or say --all."""

    all: bool = option(False, "--all", help="Every tensor (commands that change tensors need a selection or --all).")

    def targets(self, ckpt: Checkpoint, command: str, warnings: list[str]) -> list[str]:
        """The chosen names; selection warnings (with --allow-empty) go to ``warnings``."""
        if not (self.selector.narrows or self.all):
            raise UsageError(f"{command}: choose tensors with -p/--pattern, --regex or -k/--kind, or pass --all"
                             " for every tensor")
        names, problems = self.choose(ckpt.tensors, ckpt.key)
        warnings += problems
        return names

    def buffer_note(self, ckpt: Checkpoint, plan: Plan) -> Plan:
        """``plan`` with a note saying how many changed tensors are buffers (running statistics, step
        counters), unless -k chose by role."""
        if any(k in ROLES for k in self.kind):
            return plan
        changed = [n for change in plan.changes for n in change.names]
        buffers = [n for n in changed if role(n.rpartition(".")[2], ckpt[n]) == "buffer"]  # no sibling needed
        if buffers:
            leaves = ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in buffers))
            plan.notes.append(f"{len(buffers)} of the {len(changed)} changed tensors are buffers ({leaves}), not"
                              " parameters; add -k parameter to leave them out")
        return plan


@dataclass(kw_only=True)
class TiePolicy:
    """What to do with tensors tied to a selected one."""

    follow_ties: bool = option(False, "--follow-ties",
                               help="Change every tensor tied to a selected one, as the model would see it.")
    untie: bool = option(False, "--untie", help="Give the selected tensors storage of their own before changing them.")


@dataclass(kw_only=True)
class Overflow:
    """Whether values that become Inf or NaN may be written (for operations that compute values)."""

    allow_overflow: bool = option(False, "--allow-overflow", help="Write values that became Inf or NaN (out of"
                                  " the dtype's range, e.g. float16 above 65504) instead of failing.")


def with_warnings(plan: Plan, warnings: list[str]) -> Plan:
    """``plan`` with the selection's warnings first among its notes."""
    plan.notes[:0] = [f"warning: {w}" for w in warnings]
    return plan
