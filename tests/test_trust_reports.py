"""Issue "Trust at first use": what a user sees on first runs of inspect, check and diff,
checked against torch's own view of the files."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ResNet, TinyGPT, run, run_on_terminal

from test_pipelines import json_of

COLOR = {"TERM": "xterm-256color"}


# 1. Escape codes and progress bars


def test_table_headers_are_styled_on_a_colour_terminal_not_escaped_as_text(resnet_pt):
    code, shown, _ = run_on_terminal("inspect", resnet_pt, "-p", "fc.*", terminal=("stdout",), env=COLOR)
    assert code == 0
    assert b"\\x1b" not in shown  # no escape code printed as text
    assert b"\x1b[1mname" in shown  # the header is bold
    assert b"fc.weight" in shown and b"fc.bias" in shown


def test_control_characters_in_names_are_escaped_on_a_colour_terminal(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"evil\x1b[31m.weight": torch.ones(3)}, path)
    assert list(torch.load(path, weights_only=True)) == ["evil\x1b[31m.weight"]
    shown = run_on_terminal("inspect", path, terminal=("stdout",), env=COLOR)[1]
    assert b"evil\\x1b[31m.weight" in shown and b"\x1b[31m" not in shown
    piped = run("inspect", path).stdout
    assert "evil\\x1b[31m.weight" in piped and "\x1b" not in piped


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bar_shown(monkeypatch, steps: list[tuple[float, int]], total: int) -> bool:
    """Whether a bar appears for work advancing by ``nbytes`` at each (time, nbytes) of ``steps``."""
    from paramsurgeon.cli import common

    clock = iter([0.0] + [t for t, _ in steps])
    monkeypatch.setattr(common, "monotonic", lambda: next(clock))
    monkeypatch.setattr(sys, "stderr", _Terminal())
    monkeypatch.delenv("NO_COLOR", raising=False)
    with common.progress(total, "reading") as advance:
        for _, nbytes in steps:
            advance(nbytes)
    return "reading" in sys.stderr.getvalue()


def test_no_progress_bar_for_a_tiny_file_after_a_slow_start(monkeypatch):
    """torch took 1.5 s to import, then 1.3 kB were read in a millisecond: no bar."""
    assert not _bar_shown(monkeypatch, [(1.5, 1280), (1.501, 40)], 1320)


def test_progress_bar_for_work_that_takes_seconds(monkeypatch):
    assert _bar_shown(monkeypatch, [(0.3 * i, 10) for i in range(1, 11)], 100)
