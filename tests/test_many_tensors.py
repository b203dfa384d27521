"""A checkpoint of 100,000 small tensors (the per-tensor cost of every stage shows at this count):
every name listed, one tensor zeroed, a round trip through a torch zip; checked with the safetensors
library itself. Counted, not timed (speed is the benchmark's job)."""

import zipfile

import numpy as np
import pytest
from helpers import register_input, run
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

COUNT = 100_000


@pytest.fixture(scope="module")
def many_dir(tmp_path_factory):
    """100,000 tensors: a float32 weight of 3 values and an int64 counter per module, in blocks."""
    folder = tmp_path_factory.mktemp("many")
    values = np.arange(COUNT * 3, dtype=np.float32).reshape(COUNT, 3) - COUNT
    state = {}
    for i in range(COUNT // 2):
        state[f"blocks.{i // 100}.layers.{i % 100}.weight"] = values[i]
        state[f"blocks.{i // 100}.layers.{i % 100}.steps"] = np.array([i], dtype=np.int64)
    save_file(state, str(folder / "many.safetensors"))
    return folder


@pytest.fixture
def many(request, many_dir):
    return register_input(request, many_dir / "many.safetensors")


def test_every_name_is_listed_once_with_its_shape(many):
    with safe_open(str(many), "np") as f:
        expected = {name: f.get_slice(name).get_shape() for name in f.keys()}
    result = run("inspect", "--no-stats", many)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(f"{COUNT:,} tensors, 150,000 parameters + 50,000 in buffers, 1.0 MB")
    rows = [line.split() for line in lines[3:3 + COUNT]]
    assert len(rows) == COUNT and {r[0] for r in rows} == set(expected)
    assert all(r[2] == "x".join(map(str, expected[r[0]])) for r in rows)
    assert all(r[1] == "unknown" for r in rows)  # a lone 1-D weight under 'layers.N' is no known layer


def same_arrays(a: dict, b: dict) -> bool:
    """Same names in the same order, dtypes, shapes and bytes (one comparison over all of them)."""
    return list(a) == list(b) and all(x.dtype == y.dtype and x.shape == y.shape for x, y in zip(a.values(), b.values())) \
        and b"".join(x.tobytes() for x in a.values()) == b"".join(y.tobytes() for y in b.values())


def test_zero_one_tensor_keeps_the_other_99999_bit_identical(tmp_path, many):
    out = tmp_path / "zeroed.safetensors"
    result = run("zero", many, "-p", "blocks.321.layers.7.weight", "-o", out)
    assert result.exit_code == 0, result.stderr
    before, after = load_file(str(many)), load_file(str(out))
    assert np.array_equal(after.pop("blocks.321.layers.7.weight"), np.zeros(3, dtype=np.float32))
    assert before.pop("blocks.321.layers.7.weight").any()
    assert same_arrays(after, before)


def test_round_trip_through_torch_is_bit_identical(tmp_path, many):
    """safetensors -> torch zip -> safetensors, read back by safetensors (torch.load of 100,000
    records alone takes many seconds; small torch files are loaded by torch elsewhere)."""
    pt, back = tmp_path / "many.pt", tmp_path / "back.safetensors"
    assert run("convert", many, "-o", pt).exit_code == 0
    with zipfile.ZipFile(pt) as archive:
        records = [n for n in archive.namelist() if "/data/" in n]
    assert len(records) == COUNT  # one storage record per tensor, as torch.save writes them
    assert run("convert", pt, "-o", back).exit_code == 0
    assert same_arrays(load_file(str(back)), load_file(str(many)))


def test_kinds_of_many_numbered_blocks_follow_their_torch_modules(tmp_path):
    """Kinds are worked out once per module shape: 300 numbered blocks, each of a conv, a layer norm, a
    Linear with and without bias, an embedding, an LSTM and an MHA, get the kind of the torch
    module that holds each tensor, in every block (the first block's answer is not reused for a
    block that differs: every third has a bias-free head, every fifth a 'proj' that is a convolution)."""
    import torch
    from torch import nn

    from paramsurgeon.checkpoint.kinds import infer_kinds
    import paramsurgeon

    def block(i: int) -> nn.Module:
        return nn.ModuleDict({"conv": nn.Conv2d(2, 3, 3), "ln": nn.LayerNorm(3), "embed": nn.Embedding(5, 3),
                              "head": nn.Linear(3, 4, bias=i % 3 != 0), "proj": nn.Conv1d(3, 2, 1, bias=False) if i % 5 == 0 else nn.Linear(3, 2, bias=False),
                              "lstm": nn.LSTM(3, 2), "attn": nn.MultiheadAttention(4, 2),
                              "seq": nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))})

    expected_layer = [(nn.Conv2d, "conv"), (nn.Conv1d, "conv"), (nn.LayerNorm, "layernorm"), (nn.Embedding, "embedding"),
                      (nn.Linear, "linear"), (nn.LSTM, "rnn"), (nn.BatchNorm1d, "batchnorm"),
                      (nn.MultiheadAttention, "linear")]
    model = nn.ModuleDict({str(i): block(i) for i in range(300)})
    truth, roles = {}, {}
    for prefix, module in model.named_modules():
        layer = next((kind for cls, kind in expected_layer if isinstance(module, cls)), None)
        if layer is None:
            continue
        for name, _ in module.named_parameters(recurse=False):
            truth[f"{prefix}.{name}"] = layer
            roles[f"{prefix}.{name}"] = "weight" if "weight" in name else "bias"  # weight_ih_l0, in_proj_bias
        for name, _ in module.named_buffers(recurse=False):
            truth[f"{prefix}.{name}"], roles[f"{prefix}.{name}"] = layer, "buffer"
    path = tmp_path / "blocks.pt"
    torch.save(model.state_dict(), path)
    kinds = infer_kinds(paramsurgeon.load(str(path)).tensors)
    assert len(truth) == len(kinds) and {n: kinds[n].layer for n in truth} == truth
    assert {n: kinds[n].role for n in truth} == roles
