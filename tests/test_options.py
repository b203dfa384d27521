"""Every declared bound holds on the command line, whichever group declares it: a value under an
option's minimum is one line on stderr and exit 2 for every command that takes the option."""

import pytest
from helpers import SAMPLES, run

from paramsurgeon import declare
from paramsurgeon.cli.build import groups_of
from paramsurgeon.cli.commands import EXAMPLES
from paramsurgeon.ops import OPERATIONS
from paramsurgeon.selection import Selection


def bounded() -> list[tuple[str, str, str]]:
    """(command, flag, a value under its bound) for every option declared with a minimum."""
    commands = {f.__name__: groups_of(f) for f in EXAMPLES} | {name: [op] for name, op in OPERATIONS.items()}
    found = []
    for command, groups in commands.items():
        for group in groups:
            for d in declare.declared(group):
                if d.flag.flags and d.flag.minimum is not None:
                    found.append((command, d.flag.flags[-1], str(d.flag.minimum - 1)))
    return found


@pytest.mark.parametrize("command, flag, value", bounded(), ids=str)
def test_a_value_under_the_bound_is_refused(tmp_path, command, flag, value):
    checkpoint = f"{SAMPLES}/resnet.pt"
    if command in OPERATIONS:
        selection = ["-p", "fc.*"] if issubclass(OPERATIONS[command], Selection) else []  # layers, experts: none
        result = run(command, checkpoint, *selection, flag, value, "-o", tmp_path / "out.pt")
    else:
        result = run(command, *[checkpoint] * (2 if command == "diff" else 1), flag, value)
    assert result.exit_code == 2, result.stderr
    assert not (tmp_path / "out.pt").exists()
    assert result.stderr.count("\n") == 1 and f"{flag} must be at least" in result.stderr


def commands() -> list[str]:
    """Every command the top-level --help lists."""
    listing = run("--help").stdout.split("Commands:")[1]
    return [line.split()[0] for line in listing.splitlines() if line.startswith("  ") and not line.startswith("   ")]


def test_every_option_shows_what_it_takes_never_str():
    helps = {command: run(command, "--help").stdout for command in commands()}
    assert len(helps) > 20
    for command, text in helps.items():
        assert not [line for line in text.splitlines() if line.lstrip().startswith("-") and "<str>" in line], command
    for command in ("init", "merge", "resize", "apply"):
        assert "--seed INTEGER" in helps[command], command
    assert "--depth INTEGER" in helps["inspect"] and "--atol NUMBER" in helps["diff"]
