"""Fixtures: small real checkpoints written into tmp_path, and a way to run the CLI."""

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "samples")
sys.path.insert(0, SAMPLES)

from models import ResNet, TinyGPT  # noqa: E402

from paramsurgeon.cli import app  # noqa: E402


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


INPUTS = pytest.StashKey[list]()


def digest(path) -> str:
    """sha256 of a file, or of every file under a directory."""
    sha = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for item in paths:
        sha.update(os.fsencode(os.path.relpath(item, path)))
        with open(item, "rb") as f:
            sha.update(f.read())
    return sha.hexdigest()


def pytest_configure(config):
    config.addinivalue_line("markers", "rewrites_input: the test rewrites an input on purpose (--in-place)")


@pytest.fixture(autouse=True)
def inputs_unchanged(request):
    """Every test leaves its inputs byte-identical: the samples, and each checkpoint a fixture wrote."""
    registered: list = []
    request.node.stash[INPUTS] = registered
    samples = digest(SAMPLES)
    yield
    assert digest(SAMPLES) == samples, "a sample file changed"
    if request.node.get_closest_marker("rewrites_input") is None:
        for path, before in registered:
            assert digest(path) == before, f"input {path} changed"


def register_input(request, path):
    """Record ``path`` as an input of the running test: it must not change."""
    request.node.stash[INPUTS].append((path, digest(path)))
    return path


@pytest.fixture
def resnet():
    """A ResNet after two training-mode forward passes (real BatchNorm statistics)."""
    torch.manual_seed(0)
    model = ResNet()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    return model


@pytest.fixture
def gpt():
    torch.manual_seed(1)
    return TinyGPT()


@pytest.fixture
def resnet_pt(request, tmp_path, resnet):
    path = tmp_path / "resnet.pt"
    torch.save(resnet.state_dict(), path)
    return register_input(request, path)


@pytest.fixture
def gpt_pt(request, tmp_path, gpt):
    path = tmp_path / "gpt.pt"
    torch.save(gpt.state_dict(), path)
    return register_input(request, path)


@pytest.fixture
def training_pt(request, tmp_path, resnet):
    optimizer = torch.optim.Adam(resnet.parameters(), lr=1e-3)
    loss = resnet(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    optimizer.step()
    path = tmp_path / "training.pt"
    torch.save({"state_dict": resnet.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7,
                "hyper_parameters": {"lr": 1e-3, "widths": [8, 16, 24, 32], "name": "narrow"}}, path)
    return register_input(request, path)
