"""Fixtures: small real checkpoints written into tmp_path, one large file shared by the session, and the
check that every test leaves its inputs unchanged. Helpers live in helpers.py."""

import pytest
import torch
from helpers import INPUTS, SAMPLES, digest, register_input
from safetensors.torch import save_file

from models import ResNet, TinyGPT


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


@pytest.fixture(scope="session")
def large(tmp_path_factory):
    """A folder with large.pt and large.safetensors: 384 MiB each (96 tensors of 4 MiB; blocks.i.weight is
    all i), larger than every memory budget and slow enough to write that a kill lands mid-write.
    Written once per session; a test registers the file it reads with ``register_input``."""
    folder = tmp_path_factory.mktemp("large")
    state = {f"blocks.{i}.weight": torch.full((1024, 1024), float(i)) for i in range(96)}
    torch.save(state, folder / "large.pt")
    save_file(state, folder / "large.safetensors")
    return folder


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A Dask scheduler and two workers on 127.0.0.1, processes shared by the session (dask_cluster.py)."""
    from dask_cluster import Cluster

    cluster = Cluster(tmp_path_factory.mktemp("dask"))
    try:
        cluster.add_workers(2)
        yield cluster
    finally:
        cluster.stop()
