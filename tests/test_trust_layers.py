"""LSTM, GRU and RNN tensors (and their cells') are kind rnn, with the roles weight and bias,
checked against the parameters of real torch.nn modules."""

import json
import pytest
import torch
from torch import nn

import paramsurgeon
from helpers import run
from paramsurgeon.checkpoint.kinds import infer_kinds


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=5)
        self.gru = nn.GRU(4, 7, bidirectional=True)
        self.rnn = nn.RNN(3, 5, num_layers=2, nonlinearity="relu")
        self.lstm_cell = nn.LSTMCell(4, 6)
        self.gru_cell = nn.GRUCell(3, 5)
        self.rnn_cell = nn.RNNCell(3, 4)
        self.head = nn.Linear(8, 2)


RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def recurrent_names(model: nn.Module) -> dict[str, str]:
    """name -> 'weight' or 'bias' for every tensor of a recurrent module, from torch itself."""
    roles = {}
    for prefix, module in model.named_modules():
        if isinstance(module, RECURRENT):
            for name, _ in module.named_parameters(recurse=False):
                roles[f"{prefix}.{name}"] = name.split("_")[0]
    return roles


@pytest.fixture
def recurrent_pt(tmp_path):
    torch.manual_seed(0)
    model = Recurrent()
    path = tmp_path / "rnn.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_recurrent_tensors_are_kind_rnn_with_their_roles(recurrent_pt):
    path, model = recurrent_pt
    expected = recurrent_names(model)
    assert "lstm.weight_hr_l1_reverse" in expected and "gru_cell.bias_hh" in expected
    kinds = infer_kinds(paramsurgeon.load(str(path)).tensors)
    assert {n: (k.layer, k.role) for n, k in kinds.items() if n in expected} == \
        {n: ("rnn", role) for n, role in expected.items()}
    assert kinds["head.weight"].layer == "linear"
    document = json.loads(run("inspect", path, "--json", "--no-stats", "-k", "rnn", "-k", "bias").stdout)
    assert [t["name"] for t in document["tensors"]] == [n for n, r in expected.items() if r == "bias"]
    biases = json.loads(run("inspect", path, "--json", "--no-stats", "-k", "bias").stdout)
    assert [t["name"] for t in biases["tensors"]] == [n for n in model.state_dict() if n.split(".")[-1].startswith("bias")]


def test_recurrent_biases_go_without_weight_decay(recurrent_pt):
    path, model = recurrent_pt
    groups = json.loads(run("groups", path, "--json").stdout)
    expected = recurrent_names(model)
    assert groups["no_decay"] == [n for n in model.state_dict() if n in expected and expected[n] == "bias"] + ["head.bias"]
    assert groups["decay"] == [n for n in model.state_dict() if n in expected and expected[n] == "weight"] + ["head.weight"]
