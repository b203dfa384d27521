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
    found = []
    for block in BLOCK.findall(text):
        parts = re.split(r"^\$ ", block, flags=re.M)[1:]
        for part in parts:
            command, _, output = part.partition("\n")
            found.append((command, output))
    return found


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
                command = part.partition("\n")[0]
                out.append(f"$ {command}\n{execute(command, cwd)}")
            return "```console\n" + "".join(out) + "```"

        text = BLOCK.sub(render, text)
    with open(README, "w") as f:
        f.write(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update()
    else:
        sys.exit(pytest.main([__file__]))
