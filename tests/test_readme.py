"""Every console example in the README runs and prints what the README shows.

Run ``python tests/test_readme.py --update`` to rewrite the outputs in place after a change.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"```console\n(.*?)```", re.S)


def examples(text: str) -> list[tuple[str, str]]:
    """(command, expected output) for each '$ ' line of each console block."""
    return [split(part) for block in BLOCK.findall(text) for part in re.split(r"^\$ ", block, flags=re.M)[1:]]


def split(part: str) -> tuple[str, str]:
    """A transcript entry: the command (with its '> ' continuation lines, as a shell shows them) and its output."""
    lines = part.split("\n")
    command = [lines[0]]
    while len(lines) > len(command) and (lines[len(command)] == ">" or lines[len(command)].startswith("> ")):
        command.append(lines[len(command)][2:])
    return "\n".join(command), "\n".join(lines[len(command):])


def execute(command: str, cwd: str) -> str:
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "NO_COLOR": "1", "COLUMNS": "200"}
    result = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return result.stdout + result.stderr


def workspace(tmp: str) -> str:
    os.symlink(os.path.join(ROOT, "samples"), os.path.join(tmp, "samples"))
    return tmp


def test_readme_examples(tmp_path):
    with open(README) as f:
        text = f.read()
    cases = examples(text)
    assert len(cases) >= 8
    cwd = workspace(str(tmp_path))
    for command, expected in cases:
        assert execute(command, cwd) == expected, command


def test_ci_runs_the_readme_test_command():
    with open(README) as f:
        text = f.read()
    command = re.search(r"^(python3 -m venv .*pytest.*)$", text, re.M).group(1)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert command in f.read()


def update() -> None:
    import tempfile

    with open(README) as f:
        text = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = workspace(tmp)

        def render(match):
            parts = re.split(r"^\$ ", match.group(1), flags=re.M)[1:]
            out = []
            for part in parts:
                command = split(part)[0]
                shown = "\n".join(line if i == 0 else (f"> {line}" if line else ">")
                                  for i, line in enumerate(command.split("\n")))
                out.append(f"$ {shown}\n{execute(command, cwd)}")
            return "```console\n" + "".join(out) + "```"

        text = BLOCK.sub(render, text)
    with open(README, "w") as f:
        f.write(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update()
    else:
        sys.exit(pytest.main([__file__]))
