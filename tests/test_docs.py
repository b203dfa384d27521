"""Every command is documented: a README section and an example in its --help (as sqlite-utils'
tests/test_docs.py checks its commands)."""

import re

import pytest
from helpers import readme_text, run


def commands() -> list[str]:
    """The commands ``paramsurgeon --help`` lists."""
    listing = run("--help").stdout.split("Commands:")[1]
    return re.findall(r"^  ([\w-]+)  ", listing, re.M)


COMMANDS = commands()


def readme_sections() -> set[str]:
    """The command names of the README's '### name' and '### a, b, c' headings."""
    return {name.strip() for heading in re.findall(r"^### (.+)$", readme_text(), re.M) for name in heading.split(",")}


def test_help_lists_every_command():
    assert len(COMMANDS) >= 15 and len(set(COMMANDS)) == len(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_has_a_readme_section(command):
    assert command in readme_sections(), f"README.md has no '### {command}' section (nor '### ..., {command}')"


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and f"Example: paramsurgeon {command}" in result.stdout, result.stdout


def test_the_console_script_builds_the_command_it_runs():
    """``paramsurgeon`` (main) builds only the command it is given: its --help, the listing and a
    misspelt name still come out as from the whole app."""
    from helpers import run_process

    listing = run_process("--help")
    assert listing.returncode == 0 and re.findall(r"^  ([\w-]+)  ", listing.stdout.decode().split("Commands:")[1],
                                                  re.M) == COMMANDS
    for command in ("inspect", "zero", "merge", "extract-lora"):
        shown = run_process(command, "--help").stdout.decode()
        assert f"Usage: paramsurgeon {command} [OPTIONS]" in shown and f"Example: paramsurgeon {command}" in shown
    misspelt = run_process("inspectt", "x.pt")
    assert misspelt.returncode == 2 and b"No such command 'inspectt'. Did you mean 'inspect'?" in misspelt.stderr
    assert run_process("--version").stdout.decode().startswith("paramsurgeon ")
