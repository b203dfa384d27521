"""Fixtures: small real checkpoints written into tmp_path, and a way to run the CLI."""

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


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


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
def resnet_pt(tmp_path, resnet):
    path = tmp_path / "resnet.pt"
    torch.save(resnet.state_dict(), path)
    return path


@pytest.fixture
def gpt_pt(tmp_path, gpt):
    path = tmp_path / "gpt.pt"
    torch.save(gpt.state_dict(), path)
    return path


@pytest.fixture
def training_pt(tmp_path, resnet):
    optimizer = torch.optim.Adam(resnet.parameters(), lr=1e-3)
    loss = resnet(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    optimizer.step()
    path = tmp_path / "training.pt"
    torch.save({"state_dict": resnet.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7,
                "hyper_parameters": {"lr": 1e-3, "widths": [8, 16, 24, 32], "name": "narrow"}}, path)
    return path
