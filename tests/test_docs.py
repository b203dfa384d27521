"""Every command is documented: a README section and an example in its --help (as sqlite-utils'
tests/test_docs.py checks its commands), and the README is what a newcomer needs first and true to the
schemas and the benchmark it quotes."""

import importlib.util
import os
import re

import pytest
import schema_doc
from helpers import ROOT, readme_text, run


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


def test_every_command_in_the_listing_is_described_in_whole_sentences():
    """No description stops mid-sentence ('...; values are') where its docstring wraps a line."""
    listing = run("--help").stdout.split("Commands:")[1]
    described = re.split(r"^  ([\w-]+) +", listing, flags=re.M)[1:]
    for command, text in zip(described[::2], described[1::2]):
        assert " ".join(text.split()).endswith("."), (command, text)


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


# The README as a newcomer meets it: what the tool is, the set-up commands and every command in the first
# screen; links that lead somewhere; JSON fields and benchmark rows taken from where they are kept.

FIRST_SCREEN = 53  # lines (50, and the rows of layers, stack and experts)


def command_table() -> list[tuple[str, str, int]]:
    """The rows of the README's '## Commands' table: (command, its link's anchor, line number)."""
    lines = readme_text().splitlines()
    start = lines.index("## Commands")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    return [(m.group(1), m.group(2), i + 1) for i in range(start, end)
            for m in [re.match(r"^\| \[`([\w-]+)`\]\(#([\w-]+)\) \| \S", lines[i])] if m]


def headings(text: str) -> list[str]:
    """The markdown headings of ``text``, outside code blocks."""
    return re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), re.M)


def anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_the_first_screen_says_what_it_is_how_to_set_up_and_lists_every_command():
    lines = readme_text().splitlines()
    table = command_table()
    assert [name for name, _, _ in table] and sorted(name for name, _, _ in table) == sorted(COMMANDS)
    assert max(line for _, _, line in table) <= FIRST_SCREEN
    setup = [i for i, line in enumerate(lines) if line.startswith("python3 -m venv .venv")]
    assert len(setup) == 2 and max(setup) < FIRST_SCREEN
    assert lines[0] == "# paramsurgeon" and lines[2] and not lines[2].startswith("#")  # a description first


def test_each_command_in_the_table_links_to_its_section():
    sections = {anchor(h): h for h in headings(readme_text())}
    assert command_table()
    for name, target, _ in command_table():
        assert target in sections and name in [n.strip() for n in sections[target].split(",")], (name, target)


@pytest.mark.parametrize("page", ["README.md", "bench/README.md"])
def test_links_lead_somewhere(page):
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    folder = os.path.dirname(os.path.join(ROOT, page))
    links = re.findall(r"\]\(([^)\s]+)\)|href=\"([^\"]+)\"", text)
    assert links
    for link in (a or b for a, b in links):
        if link.startswith("http"):
            continue
        path, _, fragment = link.partition("#")
        target = os.path.normpath(os.path.join(folder, path)) if path else os.path.join(ROOT, page)
        assert os.path.exists(target), f"{page}: {link} leads to no file"
        if fragment:
            with open(target) as f:
                assert fragment in {anchor(h) for h in headings(f.read())}, f"{page}: {link} leads to no heading"


def test_every_schema_field_has_a_description():
    assert schema_doc.undocumented() == []


def test_the_readme_json_fields_are_the_schemas():
    text = readme_text()
    assert sorted(m.group(2) for m in schema_doc.BLOCK.finditer(text)) == schema_doc.names()
    assert text == schema_doc.render_readme(text), "run: python tests/test_readme.py --update"


def test_the_readme_benchmark_rows_are_bench_readme_headline():
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench", "run.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with open(os.path.join(ROOT, "bench", "README.md")) as f:
        full = bench.TABLE.search(f.read())
    shown = bench.TABLE.search(readme_text())
    rows = full.group(0)[len(full.group(1)):-len(full.group(2))]
    assert rows.count("\n| ") > 40  # every row lives in bench/README.md
    assert shown.group(0) == full.group(1) + bench.headline(rows) + full.group(2)
    assert len(re.findall(r"^\| ", shown.group(0), re.M)) >= 8
