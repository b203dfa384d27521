"""The command-line interface: a thin layer that parses options, calls the library, and
turns its errors into one line on stderr and an exit code."""

import os
import sys
import warnings
from typing import Annotated

import typer
from typer.core import TyperGroup

from ..errors import ParamSurgeonError
from .commands import (apply_recipe, cast, check, convert, copy, diff, drop, groups, init, inspect, rename, scale, tie,
                       untie, zero)


class _Group(TyperGroup):
    """Runs a command and maps every failure to one stderr line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args or os.environ.get("PARAMSURGEON_DEBUG") == "1"
        try:
            with warnings.catch_warnings():
                # torch warns on import when numpy is missing (torch lists it as optional, and so do
                # we: no tensor here goes to numpy); stderr carries paramsurgeon's lines only.
                warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
                code = super().main(args, prog_name or "paramsurgeon", complete_var, standalone_mode=False, **extra)
            code = code if isinstance(code, int) else 0
        except ParamSurgeonError as e:
            code = _fail(str(e), e.exit_code, debug)
        except typer._click.exceptions.NoArgsIsHelpError:
            code = 2  # the help has been printed
        except typer._click.exceptions.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            code = _fail(f"{e.format_message()}{where}", 2, debug)
        except typer.Abort:
            code = 130
        except KeyboardInterrupt:
            code = _fail("interrupted; nothing was written", 130, debug)
        except BrokenPipeError:
            sys.stderr.close()
            code = 141
        except Exception as e:  # a bug in paramsurgeon, not a user error
            code = _fail(f"internal error: {type(e).__name__}: {e}; rerun with --debug and report it", 3, debug)
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    from ..units import printable

    sys.stderr.write(f"paramsurgeon: error: {printable(message)}\n")
    return code


app = typer.Typer(
    cls=_Group,
    name="paramsurgeon",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"paramsurgeon {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Model surgery on PyTorch checkpoints: inspect, re-initialise, copy, tie and convert tensors
    without writing a script. Every command's --help has an example."""


for command in (inspect, diff, check, groups, init, zero, scale, cast, copy, tie, untie, rename, drop, convert,
                apply_recipe):
    app.command(command.__name__.removesuffix("_recipe"), short_help=command.__doc__.split("\n")[0])(command)


def main() -> None:
    """Entry point of the ``paramsurgeon`` console script."""
    app()
