"""`--scheme default` gives what each layer's own reset_parameters gives, checked against
freshly constructed torch.nn modules: exact values where torch's are constant, a two-sample
KS test where they are random."""

import math

import torch
from scipy import stats
from torch import nn

import paramsurgeon
from helpers import run
from paramsurgeon.ops import schemes
from paramsurgeon.checkpoint.kinds import infer_kinds

P_MIN = 1e-4


class Zoo(nn.Module):
    """One of every layer that --scheme default claims, named so that its kind is clear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(300, 200)
        self.conv1d = nn.Conv1d(16, 32, 5)
        self.conv2d = nn.Conv2d(32, 64, 3, groups=2)
        self.conv3d = nn.Conv3d(4, 8, 3)
        self.deconv1d = nn.ConvTranspose1d(16, 24, 5)
        self.deconv2d = nn.ConvTranspose2d(16, 8, 4, groups=2)
        self.bn1d = nn.BatchNorm1d(64)
        self.bn2d = nn.BatchNorm2d(64)
        self.ln = nn.LayerNorm(200)
        self.gn = nn.GroupNorm(4, 64)
        self.rms_norm = nn.RMSNorm(64)
        self.emb = nn.Embedding(500, 64)
        self.act_prelu = nn.PReLU(8)
        self.attn = nn.MultiheadAttention(64, 4, bias=True)
        self.xattn = nn.MultiheadAttention(64, 4, kdim=32, vdim=48, add_bias_kv=True)
        self.lstm = nn.LSTM(32, 40, num_layers=2, bidirectional=True, proj_size=24)
        self.gru = nn.GRU(32, 48)
        self.rnn = nn.RNN(16, 64)
        self.lstm_cell = nn.LSTMCell(32, 40)
        self.gru_cell = nn.GRUCell(16, 30)


def same_distribution(got: torch.Tensor, fresh: torch.Tensor) -> bool:
    """Exactly equal when torch's own values are constant, else a two-sample KS test."""
    if torch.all(fresh == fresh.flatten()[0]):
        return torch.equal(got, fresh)
    return stats.ks_2samp(got.double().flatten().numpy(), fresh.double().flatten().numpy()).pvalue > P_MIN


def fresh_zoo(seed: int) -> dict:
    torch.manual_seed(seed)
    return Zoo().state_dict()


def trained(state: dict) -> dict:
    """Values no layer's default would give."""
    return {n: v + 3 if v.is_floating_point() else v + 2 for n, v in state.items()}


def test_default_for_matches_every_fresh_torch_layer(tmp_path):
    path = tmp_path / "zoo.pt"
    torch.save(trained(fresh_zoo(0)), path)
    tensors = paramsurgeon.load(str(path)).tensors
    kinds = infer_kinds(tensors)
    fresh = [fresh_zoo(seed) for seed in (1, 2, 3)]
    wrong = []
    for name, tensor in tensors.items():
        scheme = schemes.default_for(name, tensors, kinds[name].layer)
        dtype = fresh[0][name].dtype
        got = torch.cat([schemes.fill(scheme, tensor.shape, dtype, seed, name).flatten() for seed in (1, 2, 3)])
        if not same_distribution(got, torch.cat([f[name].flatten() for f in fresh])):
            wrong.append(f"{name}: {scheme}")
    assert wrong == []


def test_multihead_attention_out_proj_bias_is_zero(tmp_path):
    path = tmp_path / "encoder.pt"
    torch.save(nn.TransformerEncoderLayer(32, 4, dim_feedforward=64).state_dict(), path)
    tensors = paramsurgeon.load(str(path)).tensors
    kinds = infer_kinds(tensors)
    assert kinds["self_attn.out_proj.bias"].layer == "linear"
    assert str(schemes.default_for("self_attn.out_proj.bias", tensors, "linear")) == "zeros"
    assert str(schemes.default_for("self_attn.out_proj.weight", tensors, "linear")) == f"kaiming_uniform(a={math.sqrt(5):g})"
    assert str(schemes.default_for("self_attn.in_proj_weight", tensors, "linear")) == "xavier_uniform"
    assert str(schemes.default_for("self_attn.in_proj_bias", tensors, "linear")) == "zeros"
    bound = 1 / math.sqrt(64)
    assert str(schemes.default_for("linear2.bias", tensors, "linear")) == f"uniform(a={-bound:g}, b={bound:g})"


def test_init_default_through_the_cli(tmp_path):
    state = trained(fresh_zoo(0))
    path, out = tmp_path / "zoo.pt", tmp_path / "out.pt"
    torch.save(state, path)
    result = run("init", path, "--all", "--scheme", "default", "--seed", "5", "-o", out)
    assert result.exit_code == 0, result.stderr
    after, fresh = torch.load(out, weights_only=True), fresh_zoo(1)
    assert [n for n in state if not same_distribution(after[n], fresh[n])] == []


def test_a_tensor_without_a_default_is_an_error_of_the_tree_through_library_and_cli(tmp_path):
    """A library caller gets an exception of the error tree (not a string in place of a scheme),
    and the command line the same words for every such tensor at once, exit 2, nothing written."""
    from paramsurgeon.errors import PlanError, UnfitTensorError

    path, out = tmp_path / "odd.pt", tmp_path / "out.pt"
    torch.save({"rnn.weight_ih_l0": torch.ones(8, 4), "mystery.gamma": torch.ones(3), "other.beta": torch.ones(2)},
               path)
    tensors = paramsurgeon.load(str(path)).tensors
    for name, layer, reason in (
            ("rnn.weight_ih_l0", "rnn", "has no weight_hh_l0 beside it to take the hidden size from"),
            ("mystery.gamma", "unknown", "is of unknown layer kind")):
        try:
            schemes.default_for(name, tensors, layer)
        except UnfitTensorError as e:
            assert isinstance(e, PlanError) and e.exit_code == 2 and str(e) == reason
        else:
            raise AssertionError(f"{name}: no error")
    result = run("init", path, "-p", "*.*a", "--scheme", "default", "--seed", "1", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr == ("paramsurgeon: error: init: 'mystery.gamma' is of unknown layer kind; 'other.beta' is of"
                             " unknown layer kind; name the kind with --layer (conv, linear, batchnorm, ...)\n")
