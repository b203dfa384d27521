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


@pytest.fixture
def llama_pt(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    path = tmp_path / "llama.pt"
    state = model.state_dict()
    torch.save({n: t * 0.5 if n.endswith("norm.weight") else t for n, t in state.items()}, path)  # as if trained
    return path, model


def test_llama_rmsnorm_weights_are_kind_rmsnorm_in_the_norm_family(llama_pt, tmp_path):
    path, model = llama_pt
    rms = [f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]  # transformers says
    assert len(rms) == 5
    chosen = lambda *args: [t["name"] for t in json.loads(run("inspect", path, "--json", "--no-stats", *args).stdout)["tensors"]]  # noqa: E731
    assert chosen("-k", "rmsnorm") == rms
    assert chosen("-k", "norm") == rms
    assert {t["kind"] for t in json.loads(run("inspect", path, "--json", "--no-stats", "-p", "*norm*").stdout)["tensors"]} \
        == {"rmsnorm"}
    assert set(rms) <= set(json.loads(run("groups", path, "--json").stdout)["no_decay"])
    out = tmp_path / "fresh.pt"
    assert run("init", path, "-o", out, "-k", "norm", "--scheme", "default", "--seed", "1").exit_code == 0
    fresh = torch.load(out)
    assert all(torch.equal(fresh[n], torch.ones_like(fresh[n])) for n in rms)


def test_t5_norms_without_bias_are_rmsnorm_a_layernorm_with_bias_is_not(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    norms = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "T5LayerNorm"}
    path = tmp_path / "t5.pt"
    torch.save({**model.state_dict(), "ln.weight": torch.ones(4), "ln.bias": torch.zeros(4)}, path)
    kinds = infer_kinds(paramsurgeon.load(str(path)).tensors)
    assert {n for n, k in kinds.items() if k.layer == "rmsnorm"} == norms and len(norms) == 7
    assert kinds["ln.weight"].layer == kinds["ln.bias"].layer == "layernorm"
