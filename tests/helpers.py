"""What the tests share: running the CLI (in process, in a subprocess, on a pseudo-terminal), reading
outputs back with torch and safetensors, comparing tensors bit for bit, JSON documents checked against
their schemas, the inputs a test must leave unchanged, and the README's console examples.

Tests import from here; ``conftest.py`` holds fixtures only.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources

import pytest
import torch
from typer.testing import CliRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "samples")
README = os.path.join(ROOT, "README.md")
if SAMPLES not in sys.path:
    sys.path.insert(0, SAMPLES)  # the sample modules: ``from models import ResNet, TinyGPT``

from paramsurgeon.cli import app  # noqa: E402

# Running the CLI


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes


def run(*args, input: bytes | None = None) -> Result:
    """Run the CLI in-process, as a user would from a shell."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr, result.stdout_bytes)


def run_process(*args, stdin=None, env=None) -> subprocess.CompletedProcess:
    """Run ``python -m paramsurgeon`` in a real subprocess (pipes, imports, signals)."""
    return subprocess.run([sys.executable, "-m", "paramsurgeon", *map(str, args)], stdin=stdin,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=300)


def run_on_terminal(*args, terminal=("stdout", "stderr"), env=None) -> tuple[int, bytes, bytes]:
    """Run ``python -m paramsurgeon ARGS`` with the named streams on a pseudo-terminal.

    Returns (exit code, what the terminal showed, what the piped streams carried).
    """
    import pty

    leader, follower = pty.openpty()
    streams = {name: follower if name in terminal else subprocess.PIPE for name in ("stdout", "stderr")}
    try:
        result = subprocess.run([sys.executable, "-m", "paramsurgeon", *map(str, args)], **streams,
                                env={**os.environ, "TERM": "xterm", **(env or {})}, timeout=300)
    finally:
        os.close(follower)
    shown = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal is closed once everything is read
            break
        if not chunk:
            break
        shown.append(chunk)
    os.close(leader)
    piped = (result.stdout or b"") + (result.stderr or b"")
    return result.returncode, b"".join(shown), piped


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# JSON documents


def validate(document: dict, schema: str) -> dict:
    """``document``, after checking it against the package's schema ``schema``."""
    import jsonschema

    with resources.files("paramsurgeon").joinpath(f"schemas/{schema}.json").open() as f:
        jsonschema.validate(document, json.load(f))
    return document


def json_of(*args, schema: str, code: int = 0) -> dict:
    """The ``--json`` document of a command that exits with ``code``, validated against ``schema``."""
    result = run(*args, "--json")
    assert result.exit_code == code, result.stderr
    return validate(json.loads(result.stdout), schema)


# Outputs read back by torch and safetensors, never by paramsurgeon alone


def load_torch(path) -> dict:
    return torch.load(path, weights_only=True)


def safetensors_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, as the safetensors library reads it."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def config_json(folder) -> dict:
    """The config.json of a model directory."""
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def same_storage(state: dict, *names: str) -> bool:
    """Whether the named tensors of a loaded state dict share one storage (a tie)."""
    return len({state[name].untyped_storage().data_ptr() for name in names}) == 1


def bits(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values, so that NaNs and -0.0 compare exactly."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def assert_same_tensor(got: torch.Tensor, expected: torch.Tensor, name: str):
    assert got.dtype == expected.dtype, f"{name}: {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{name}: {tuple(got.shape)} != {tuple(expected.shape)}"
    assert bits(got) == bits(expected), f"{name} changed"


def assert_same_state(got: dict, expected: dict, ordered: bool = True):
    """Same names (in the same order, unless the reader does not keep it), dtypes, shapes, bits."""
    assert list(got) == list(expected) if ordered else sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert_same_tensor(got[name], value, name)


def assert_only_changed(before: dict, after: dict, changed, ordered: bool = True):
    """``after`` has the names of ``before`` and only the ``changed`` tensors differ.

    ``changed`` is either a mapping of name -> expected new value (compared exactly, dtype and shape
    included) or a set of names whose new values the caller checks (their shape and dtype are kept).
    Every other tensor is bit-identical. ``ordered=False`` for readers that do not keep the order.
    """
    assert list(after) == list(before) if ordered else sorted(after) == sorted(before)
    assert set(changed) <= set(before), sorted(set(changed) - set(before))
    for name, value in before.items():
        if isinstance(changed, dict) and name in changed:
            torch.testing.assert_close(after[name], changed[name], rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, name=name: f"{name}: {m}")
        elif name in changed:
            assert (after[name].shape, after[name].dtype) == (value.shape, value.dtype), name
        else:
            assert_same_tensor(after[name], value, name)


# Inputs a test must leave unchanged (checked by the autouse fixture in conftest.py)

INPUTS = pytest.StashKey[list]()


def digest(path) -> str:
    """sha256 of a file, or of every file under a directory."""
    sha = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for item in paths:
        sha.update(os.fsencode(os.path.relpath(item, path)))
        with open(item, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                sha.update(block)
    return sha.hexdigest()


def register_input(request, path):
    """Record ``path`` as an input of the running test: it must not change."""
    request.node.stash[INPUTS].append((path, digest(path)))
    return path


def registered_model(request, saved, *key):
    """(model, directory) that a module's ``saved(*key)`` made once, the directory an input of the running test."""
    model, path = saved(*key)
    register_input(request, path)
    return model, path


# The README's console examples: '$ command' lines, with the output the README shows under each


@dataclass(frozen=True)
class Example:
    command: str  # with its '> ' continuation lines joined by newlines, as a shell reads them
    expected: str
    block: int  # which console block of the README, counted from 0
    position: int  # its place in that block: earlier commands there may make its files
    recipe: str | None  # the cookbook recipe the block shows (test_cookbook.py runs those)

    @property
    def title(self) -> str:
        return self.command.split("\n")[0]


CONSOLE = re.compile(r"```console\n(.*?)```", re.S)
RECIPE = re.compile(r"<!-- recipe: ([\w-]+) -->")


def readme_text() -> str:
    with open(README) as f:
        return f.read()


def readme_examples(text: str | None = None) -> list[Example]:
    """Every '$ ' example of every console block, in README order."""
    text = readme_text() if text is None else text
    blocks = list(CONSOLE.finditer(text))
    recipes = {}
    for marker in RECIPE.finditer(text):  # a recipe marker names the first console block after it
        recipes[next(i for i, b in enumerate(blocks) if b.start() > marker.end())] = marker.group(1)
    return [Example(*split_example(part), block=b, position=p, recipe=recipes.get(b))
            for b, match in enumerate(blocks) for p, part in enumerate(transcript_parts(match.group(1)))]


def transcript_parts(block: str) -> list[str]:
    return re.split(r"^\$ ", block, flags=re.M)[1:]


def split_example(part: str) -> tuple[str, str]:
    """A transcript entry: the command (with its '> ' continuation lines, as a shell shows them) and its output."""
    lines = part.split("\n")
    command = [lines[0]]
    while len(lines) > len(command) and (lines[len(command)] == ">" or lines[len(command)].startswith("> ")):
        command.append(lines[len(command)][2:])
    return "\n".join(command), "\n".join(lines[len(command):])


def execute(command: str, cwd) -> str:
    """Run a README command in a shell in ``cwd``: what a reader's terminal shows (no colour, wide).
    MKL takes one code path on every x86 CPU (MKL_CBWR): extract-lora's SVD errors, at float32's
    rounding level, otherwise differ in their digits between AVX2 and AVX-512 machines."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "NO_COLOR": "1", "COLUMNS": "200", "MKL_CBWR": "COMPATIBLE"}
    result = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return result.stdout + result.stderr


def workspace(folder) -> str:
    """``folder`` set up as the README's examples expect: ``samples/`` beside the files they write."""
    os.symlink(SAMPLES, os.path.join(folder, "samples"))
    return str(folder)


WORKER_DIED = ("paramsurgeon: error: a worker process died (killed, or out of memory); nothing was written; retry,"
               " with fewer --workers if memory is short\n")


def worker_killed(*args) -> tuple[int, str]:
    """(exit code, stderr) of ``python -m paramsurgeon ARGS`` (with --workers) whose first worker process
    is killed (SIGKILL) once it has started."""
    process = subprocess.Popen([sys.executable, "-m", "paramsurgeon", *map(str, args)], stderr=subprocess.PIPE)
    children, deadline = [], time.monotonic() + 120
    while not children and time.monotonic() < deadline and process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
                children = f.read().split()
        except OSError:
            break
        time.sleep(0.01)
    assert children, "no worker process was started"
    time.sleep(0.2)
    os.kill(int(children[0]), signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr.decode()
