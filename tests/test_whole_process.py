"""The command line paces the garbage collector for the 100,000s of small objects a command
builds and freezes them (a process that ends with its command), for the command's length only;
a library caller's process is left as it was."""

import subprocess
import sys

import pytest
from safetensors.torch import save_file

RUN = """
import gc, sys
import paramsurgeon
from paramsurgeon import cli

before = gc.get_threshold()
seen = []
build = cli.build_app


def watched(named):
    seen.append(gc.get_threshold())  # as the command runs
    return build(named)


cli.build_app = watched
if sys.argv[1] == "command":
    sys.argv[1:] = ["inspect", sys.argv[2]]
    try:
        cli.main()
    except SystemExit as e:
        assert e.code == 0, e.code
else:
    ckpt = paramsurgeon.load(sys.argv[2])
    seen.append(gc.get_threshold())
print(before, seen[-1], gc.get_threshold(), gc.get_freeze_count() > 0, file=sys.stderr)
"""


def states(how: str, path) -> str:
    """The collector's threshold before, during and after, and whether anything was frozen."""
    result = subprocess.run([sys.executable, "-c", RUN, how, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def resnet_safetensors(tmp_path, resnet):
    path = tmp_path / "resnet.safetensors"
    save_file(resnet.state_dict(), path)
    return path


def test_a_command_line_run_paces_and_freezes_for_its_length(resnet_safetensors):
    assert states("command", resnet_safetensors) == "(700, 10, 10) (100000, 50, 100) (700, 10, 10) True"


def test_a_library_caller_keeps_its_collector_as_it_was(resnet_safetensors):
    assert states("library", resnet_safetensors) == "(700, 10, 10) (700, 10, 10) (700, 10, 10) False"
