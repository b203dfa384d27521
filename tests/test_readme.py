"""Every console example in the README runs and prints what the README shows: one test per example.

Who owns what: this file runs every console block except the cookbook's (the blocks under a
``<!-- recipe: name -->`` marker); tests/test_cookbook.py runs those, checks their output against the
README the same way and then checks the files they write against torch. Each example runs once.

Each console block runs in a directory of its own, its commands in order (a later command may read what
an earlier one wrote); a test selected alone first runs the commands before it in its block.

Run ``python tests/test_readme.py --update`` to rewrite the outputs in place after a change (and the JSON
field lists, from the schemas: tests/schema_doc.py).
"""

import os
import re
import sys
import tempfile

import pytest
import schema_doc
from helpers import (CONSOLE, README, ROOT, Example, execute, readme_examples, readme_text, split_example,
                     transcript_parts, workspace)

EXAMPLES = readme_examples()
OWNED = [e for e in EXAMPLES if e.recipe is None]  # the cookbook's blocks belong to test_cookbook.py


class Session:
    """The README's shell session: one directory per console block, its commands run in order."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.blocks: dict[int, tuple[str, int]] = {}  # block -> (directory, commands run there)

    def run(self, example: Example) -> str:
        cwd, done = self.blocks.get(example.block, (None, 0))
        if cwd is None or done > example.position:  # a fresh directory, if this block ran past the example
            cwd, done = workspace(self.tmp_path_factory.mktemp(f"block{example.block}")), 0
        for earlier in EXAMPLES:  # what the commands before it in its block write, when it runs alone
            if earlier.block == example.block and done <= earlier.position < example.position:
                execute(earlier.command, cwd)
        self.blocks[example.block] = (cwd, example.position + 1)
        return execute(example.command, cwd)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return Session(tmp_path_factory)


def test_the_readme_has_examples_and_recipes():
    assert len(OWNED) >= 8 and len(EXAMPLES) > len(OWNED)


@pytest.mark.parametrize("example", OWNED, ids=[e.title for e in OWNED])
def test_readme_example(session, example):
    assert session.run(example) == example.expected


def test_ci_runs_the_readme_test_command():
    command = re.search(r"^(python3 -m venv .*pytest.*)$", readme_text(), re.M).group(1)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert command in f.read()


def update() -> None:
    """Rewrite every console block's outputs (the cookbook's too) with what its commands print now, and the
    JSON field lists with what the schemas say."""
    text = schema_doc.render_readme(readme_text())
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))

        def render(match):
            cwd = tempfile.mkdtemp(prefix=f"block{next(counter)}-", dir=tmp)
            workspace(cwd)
            out = []
            for part in transcript_parts(match.group(1)):
                command = split_example(part)[0]
                shown = "\n".join(line if i == 0 else (f"> {line}" if line else ">")
                                  for i, line in enumerate(command.split("\n")))
                out.append(f"$ {shown}\n{execute(command, cwd)}")
            return "```console\n" + "".join(out) + "```"

        text = CONSOLE.sub(render, text)
    with open(README, "w") as f:
        f.write(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update()
    else:
        sys.exit(pytest.main([__file__]))
