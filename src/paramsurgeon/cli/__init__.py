"""The command-line interface: a thin layer that parses options, calls the library, and
turns its errors into one line on stderr and an exit code."""

import os
import sys
import warnings
from typing import Annotated, Callable

import typer
from typer.core import TyperGroup

from .. import bulk
from ..errors import ParamSurgeonError
from . import commands
from .build import command, described, groups_of
from .console import COMMAND_LINE, notes_held


# The usage error of the click that typer runs on (typer >= 0.20 vendors its own): the base
# class of the public typer.BadParameter, found without importing a private module.
_CLICK_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _PipeClosed(Exception):
    """The reader of standard output (or of a FIFO output) went away: not an OSError, which click
    would turn into exit 1, the code diff and check keep for findings."""


class _Group(TyperGroup):
    """Runs a command and maps every failure to one stderr line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            raise _PipeClosed from e

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        COMMAND_LINE.set((args, rerun))  # what a cluster's workers run again, and how
        debug = "--debug" in args or os.environ.get("PARAMSURGEON_DEBUG") == "1"
        with notes_held(hold=not debug) as show_notes:
            code = self._run(args, prog_name, complete_var, debug, show_notes, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args, prog_name, complete_var, debug, show_notes, **extra) -> int:
        """The command's exit code; its notes shown unless it failed."""
        try:
            with warnings.catch_warnings():
                # torch warns on import when numpy is missing (torch lists it as optional, and so do
                # we: no tensor here goes to numpy); stderr carries paramsurgeon's lines only.
                warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
                code = super().main(args, prog_name or "paramsurgeon", complete_var, standalone_mode=False, **extra)
            code = code if isinstance(code, int) else 0
            show_notes()
        except ParamSurgeonError as e:
            code = _fail(str(e), e.exit_code, debug)
        except _CLICK_USAGE_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()  # no command: the help, on stderr, and exit 2 as for any incomplete command line
                code = 2
            else:
                where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
                code = _fail(f"{e.format_message()}{where}", 2, debug)
        except typer.Abort:
            code = 130
        except KeyboardInterrupt:
            code = _fail("interrupted; nothing was written", 130, debug)
        except (BrokenPipeError, _PipeClosed):
            _quiet_stdout()
            show_notes()
            code = 141  # as the shell reports a command ended by SIGPIPE
        except Exception as e:  # a bug in paramsurgeon, not a user error
            code = _fail(f"internal error (a bug in paramsurgeon): {type(e).__name__}: {e}; please report it, with the"
                         " traceback --debug shows", 3, debug)
        return code


def _quiet_stdout() -> None:
    """Standard output's reader is gone: point it at nothing, so that the flush at exit raises no
    second BrokenPipeError (Python's documented way)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    from ..redaction import redacted
    from ..report.escape import printable

    sys.stderr.write(f"paramsurgeon: error: {printable(redacted(message))}\n")
    return code


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"paramsurgeon {__version__}")
        raise typer.Exit(0)


def _main(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Model surgery on PyTorch checkpoints: inspect, re-initialise, copy, tie and convert tensors
    without writing a script. Every command's --help has an example."""


def _reading_commands() -> dict[str, Callable[[typer.Typer], None]]:
    """The commands that write no checkpoint (inspect, diff, ...): name -> how to add it to an app."""

    def reading(function: Callable, example: str) -> Callable[[typer.Typer], None]:
        return lambda app: command(app, function.__name__, groups_of(function), function,
                                   described(function.__doc__, example))

    return {function.__name__: reading(function, example) for function, example in commands.EXAMPLES.items()}


def _writing_commands() -> dict[str, Callable[[typer.Typer], None]]:
    """One command per operation (merge-lora and layers among them), apply, merge, stack and extract-lora (their
    modules are imported only for them)."""
    from ..ops import OPERATIONS
    from ..ops.merge import Merge
    from ..ops.lora import ExtractLora
    from ..ops.layers import Stack
    from .layers import run_stack
    from .lora import ExtractRun, run_extract_lora
    from .merging import EXAMPLE, run_merge
    from .operations import Recipe, apply_recipe, run_operation
    from .. import declare
    from .options import Input, NamedInput, Read, Surgery, Unquantized, Write

    def operation(name: str, op: type) -> Callable[[typer.Typer], None]:
        given = NamedInput if op.named_input else Input
        own_dtype = any(d.name == "dtype" for d in declare.declared(op))  # cast, merge-lora
        groups = [given, op, Read, Write, Surgery] + ([] if own_dtype else [Unquantized])
        return lambda app: command(app, name, groups, run_operation, described(op.__doc__, op.example))

    return {
        **{name: operation(name, op) for name, op in OPERATIONS.items()},
        "apply": lambda app: command(app, "apply", [Recipe, Read, Write, Surgery, Unquantized], apply_recipe, described(
            apply_recipe.__doc__, "paramsurgeon apply model.pt recipe.toml -o out.pt")),
        "merge": lambda app: command(app, "merge", [Merge, Read, Write, Surgery, Unquantized], run_merge,
                                     described(run_merge.__doc__, EXAMPLE)),
        "stack": lambda app: command(app, "stack", [Stack, Read, Write, Surgery], run_stack,
                                     described(run_stack.__doc__, Stack.example)),
        "extract-lora": lambda app: command(app, "extract-lora", [ExtractLora, Read, ExtractRun], run_extract_lora,
                                            described(run_extract_lora.__doc__, ExtractLora.example)),
    }


def build_app(only: str | None = None) -> typer.Typer:
    """The typer app with every command, or with the command ``only`` alone when there is one of
    that name: a run needs the one it names, and building all 25 (their options, typer's click
    commands) costs a tenth of a second."""
    built = typer.Typer(
        cls=_Group,
        name="paramsurgeon",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    built.callback()(_main)
    table = _reading_commands()
    if only not in table:
        table.update(_writing_commands())
    for add in [table[only]] if only in table else table.values():
        add(built)
    return built


def __getattr__(name: str):
    if name == "app":  # the whole app, for CliRunner and library callers
        return build_app()
    raise AttributeError(name)


def rerun(argv: list[str]) -> int:
    """Run one command in this process, as a cluster's worker runs the client's again; its exit code."""
    named = next((arg for arg in argv if not arg.startswith("-")), None)
    return build_app(named)(args=argv, standalone_mode=False)


def main() -> None:
    """Entry point of the ``paramsurgeon`` console script: one command, in a process of its own."""
    with bulk.whole_process():
        # The group's own options take no value: the first word that is not an option names the command.
        named = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
        build_app(named)()
