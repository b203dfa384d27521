"""init follows torch.nn.init's distributions exactly, through the CLI, on torch and
safetensors files; seeds make outputs byte-identical and independent of the selection."""

import math

import pytest
import torch
from helpers import assert_only_changed, bits, file_bytes, load_torch, register_input, run
from safetensors.torch import load_file
from scipy import stats
from torch import nn

P_MIN = 1e-4  # as PyTorch's own tests of torch.nn.init


class Layers(nn.Module):
    """Real layers with enough elements for the statistical tests."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(32, 64, 3)  # fan_in 288, fan_out 576
        self.deconv = nn.ConvTranspose2d(16, 8, 4)  # fan_in 128, fan_out 256 (computed on the weight, as torch does)
        self.fc = nn.Linear(300, 200)
        self.wide = nn.Linear(400, 60)
        self.emb = nn.Embedding(500, 64)
        self.bn = nn.BatchNorm2d(64)
        self.ln = nn.LayerNorm(200)
        self.act_prelu = nn.PReLU(8)
        self.step = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.register_buffer("counts", torch.arange(10))


@pytest.fixture(params=[".pt", ".safetensors"])
def layers_file(request, tmp_path):  # registered as an input below
    torch.manual_seed(0)
    state = Layers().state_dict()
    path = tmp_path / f"layers{request.param}"
    if request.param == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, path)
    return register_input(request, path), state


def reload(path) -> dict:
    return load_file(path) if str(path).endswith(".safetensors") else load_torch(path)


def init(path, out, *args):
    result = run("init", path, "-o", out, "--seed", "7", *args)
    assert result.exit_code == 0, result.stderr
    return reload(out)


def fans(shape) -> tuple[int, int]:
    return nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))


def ks(values: torch.Tensor, cdf) -> float:
    return stats.kstest(values.double().flatten().numpy(), cdf).pvalue


RANDOM_CASES = [
    ("uniform(a=-0.3, b=0.7)", "fc.weight", lambda shape: stats.uniform(-0.3, 1.0).cdf),
    ("normal(mean=0.5, std=0.02)", "fc.weight", lambda shape: stats.norm(0.5, 0.02).cdf),
    ("trunc_normal(std=0.02)", "fc.weight", lambda shape: stats.truncnorm(-100, 100, 0, 0.02).cdf),
    ("trunc_normal(mean=0, std=1, a=-0.5, b=1.5)", "fc.weight", lambda shape: stats.truncnorm(-0.5, 1.5).cdf),
    ("xavier_uniform", "conv.weight",
     lambda shape: stats.uniform(-(b := math.sqrt(6 / sum(fans(shape)))), 2 * b).cdf),
    ("xavier_uniform(gain=relu)", "fc.weight",
     lambda shape: stats.uniform(-(b := math.sqrt(2) * math.sqrt(6 / sum(fans(shape)))), 2 * b).cdf),
    ("xavier_normal(gain=tanh)", "deconv.weight",
     lambda shape: stats.norm(0, 5 / 3 * math.sqrt(2 / sum(fans(shape)))).cdf),
    ("kaiming_uniform", "conv.weight",
     lambda shape: stats.uniform(-(b := math.sqrt(2) * math.sqrt(3 / fans(shape)[0])), 2 * b).cdf),  # a=0
    ("kaiming_uniform(a=2.23606797749979)", "fc.weight",
     lambda shape: stats.uniform(-(b := math.sqrt(2 / 6) * math.sqrt(3 / fans(shape)[0])), 2 * b).cdf),
    ("kaiming_normal(mode=fan_out, nonlinearity=relu)", "conv.weight",
     lambda shape: stats.norm(0, math.sqrt(2) / math.sqrt(fans(shape)[1])).cdf),
    ("kaiming_normal(a=0.2, nonlinearity=leaky_relu)", "wide.weight",
     lambda shape: stats.norm(0, math.sqrt(2 / 1.04) / math.sqrt(fans(shape)[0])).cdf),
    ("xavier_uniform(gain=leaky_relu(0.2))", "wide.weight",
     lambda shape: stats.uniform(-(b := math.sqrt(2 / 1.04) * math.sqrt(6 / sum(fans(shape)))), 2 * b).cdf),
    ("normal", "emb.weight", lambda shape: stats.norm(0, 1).cdf),
]


@pytest.mark.parametrize("spec,name,cdf", RANDOM_CASES, ids=[c[0] for c in RANDOM_CASES])
def test_random_schemes_follow_torch_distributions(tmp_path, layers_file, spec, name, cdf):
    path, before = layers_file
    after = init(path, tmp_path / f"out{path.suffix}", "-p", name, "--scheme", spec)
    assert ks(after[name], cdf(tuple(before[name].shape))) > P_MIN
    assert_only_changed(before, after, {name}, ordered=False)  # safetensors files are read in their own order


def test_trunc_normal_stays_in_bounds(tmp_path, layers_file):
    path, _ = layers_file
    after = init(path, tmp_path / f"out{path.suffix}", "-p", "fc.weight", "--scheme", "trunc_normal(std=1, a=-0.5, b=0.25)")
    assert after["fc.weight"].min() >= -0.5 and after["fc.weight"].max() <= 0.25


def test_constant_schemes_are_exact(tmp_path, layers_file):
    path, before = layers_file
    out = tmp_path / f"out{path.suffix}"
    after = init(path, out, "-p", "fc.*", "--const", "0.25")
    assert torch.equal(after["fc.weight"], torch.full((200, 300), 0.25))
    assert torch.equal(after["fc.bias"], torch.full((200,), 0.25))
    assert_only_changed(before, after, {"fc.weight", "fc.bias"}, ordered=False)
    for spec, expected in (("zeros", 0.0), ("ones", 1.0), ("constant(val=-3)", -3.0)):
        got = init(path, out, "-p", "bn.weight", "--scheme", spec)["bn.weight"]
        assert torch.equal(got, torch.full((64,), expected)), spec


def test_constant_on_integer_tensors(tmp_path, layers_file):
    path, before = layers_file
    after = init(path, tmp_path / f"out{path.suffix}", "-p", "counts", "-p", "bn.num_batches_tracked", "--const", "5")
    assert torch.equal(after["counts"], torch.full((10,), 5)) and after["counts"].dtype == torch.int64
    assert after["bn.num_batches_tracked"].item() == 5
    bad = run("init", path, "-o", tmp_path / "x.pt", "-p", "counts", "--const", "0.5")
    assert bad.exit_code == 2 and "'counts' is an integer tensor, and 0.5 is not a whole number" in bad.stderr


def test_eye_and_dirac_are_exact(tmp_path, layers_file):
    path, before = layers_file
    out = tmp_path / f"out{path.suffix}"
    assert torch.equal(init(path, out, "-p", "fc.weight", "--scheme", "eye")["fc.weight"], torch.eye(200, 300))
    expected = torch.empty(64, 32, 3, 3)
    nn.init.dirac_(expected, groups=2)
    got = init(path, out, "-p", "conv.weight", "--scheme", "dirac(groups=2)")["conv.weight"]
    assert torch.equal(got, expected)


def test_orthogonal_with_gain(tmp_path, layers_file):
    path, _ = layers_file
    out = tmp_path / f"out{path.suffix}"
    wide = init(path, out, "-p", "wide.weight", "--scheme", "orthogonal(gain=2)")["wide.weight"].double()
    assert torch.allclose(wide @ wide.T, 4 * torch.eye(60, dtype=torch.double), atol=1e-4)  # rows < cols
    tall = init(path, out, "-p", "conv.weight", "--scheme", "orthogonal")["conv.weight"].double().reshape(64, -1)
    assert torch.allclose(tall @ tall.T, torch.eye(64, dtype=torch.double), atol=1e-4)


def test_sparse_zeroes_a_fraction_of_every_column(tmp_path, layers_file):
    path, _ = layers_file
    got = init(path, tmp_path / f"out{path.suffix}", "-p", "fc.weight", "--scheme", "sparse(sparsity=0.3, std=0.5)")
    values = got["fc.weight"]
    zeros_per_column = (values == 0).sum(dim=0)
    assert torch.all(zeros_per_column == math.ceil(0.3 * 200))
    assert ks(values[values != 0], stats.norm(0, 0.5).cdf) > P_MIN


def test_default_is_what_reset_parameters_gives(tmp_path, layers_file):
    path, before = layers_file
    after = init(path, tmp_path / f"out{path.suffix}", "--all", "-x", "step", "-x", "counts", "--scheme", "default")
    fc_bound = 1 / math.sqrt(300)
    assert ks(after["fc.weight"], stats.uniform(-fc_bound, 2 * fc_bound).cdf) > P_MIN  # kaiming_uniform(a=sqrt 5)
    assert ks(after["fc.bias"], stats.uniform(-fc_bound, 2 * fc_bound).cdf) > P_MIN
    conv_bound = 1 / math.sqrt(288)
    assert ks(after["conv.weight"], stats.uniform(-conv_bound, 2 * conv_bound).cdf) > P_MIN
    deconv_bound = 1 / math.sqrt(fans((16, 8, 4, 4))[0])
    assert after["deconv.bias"].abs().max() <= deconv_bound
    assert ks(after["emb.weight"], stats.norm(0, 1).cdf) > P_MIN
    assert torch.equal(after["bn.weight"], torch.ones(64)) and torch.equal(after["bn.bias"], torch.zeros(64))
    assert torch.equal(after["bn.running_mean"], torch.zeros(64)) and torch.equal(after["bn.running_var"], torch.ones(64))
    assert after["bn.num_batches_tracked"].item() == 0
    assert torch.equal(after["ln.weight"], torch.ones(200)) and torch.equal(after["ln.bias"], torch.zeros(200))
    assert torch.equal(after["act_prelu.weight"], torch.full((8,), 0.25))
    assert bits(after["counts"]) == bits(before["counts"])


def test_default_needs_a_known_layer(tmp_path):
    state = nn.Sequential(nn.Linear(4, 4, bias=False)).state_dict()
    path = tmp_path / "seq.pt"
    torch.save(state, path)
    result = run("init", path, "-o", tmp_path / "x.pt", "--all", "--scheme", "default", "--seed", "1")
    assert result.exit_code == 2 and "'0.weight' is of unknown layer kind; name the kind with --layer" in result.stderr
    ok = run("init", path, "-o", tmp_path / "x.pt", "--all", "--scheme", "default", "--layer", "linear", "--seed", "1")
    assert ok.exit_code == 0
    assert load_torch(tmp_path / "x.pt")["0.weight"].abs().max() <= 0.5


def test_inapplicable_schemes_name_every_tensor(tmp_path, layers_file):
    path, _ = layers_file
    out = tmp_path / "never.pt"
    result = run("init", path, "-o", out, "-p", "fc.*", "-p", "counts", "--scheme", "xavier_uniform", "--seed", "1")
    assert result.exit_code == 2
    assert "'fc.bias' has 1 dimension, but xavier_uniform needs at least 2" in result.stderr
    assert "'counts' is not floating point" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("spec,message", [
    ("xavier", "unknown scheme 'xavier'; choose from uniform, normal"),
    ("normal(std=)", "cannot read the arguments"),
    ("normal(0.02)", "give arguments by name"),
    ("normal(sd=0.02)", "normal takes mean, std, not sd"),
    ("sparse", "sparse needs sparsity=..."),
    ("kaiming_normal(mode=fan_middle)", "mode must be fan_in or fan_out"),
    ("xavier_uniform(gain=swish)", "gain must be a number or one of"),
])
def test_bad_specs_show_the_accepted_form(tmp_path, resnet_pt, spec, message):
    result = run("init", resnet_pt, "-o", tmp_path / "x.pt", "-p", "fc.weight", "--scheme", spec)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_seed_gives_byte_identical_files(tmp_path, layers_file):
    path, _ = layers_file
    outputs = []
    for i in range(2):
        out = tmp_path / f"run{i}" / f"out{path.suffix}"
        out.parent.mkdir()
        assert run("init", path, "-o", out, "-k", "weight", "--scheme", "normal(std=0.02)",
                   "--seed", "11").exit_code == 0
        outputs.append(file_bytes(out))
    assert outputs[0] == outputs[1]


def test_values_do_not_depend_on_what_else_is_selected(tmp_path, layers_file):
    path, _ = layers_file
    alone = init(path, tmp_path / f"a{path.suffix}", "-p", "fc.weight", "--scheme", "normal")
    together = init(path, tmp_path / f"b{path.suffix}", "-p", "conv.weight", "-p", "fc.weight", "-p", "emb.weight",
                    "--scheme", "normal")
    assert torch.equal(alone["fc.weight"], together["fc.weight"])
    other_seed = run("init", path, "-o", tmp_path / f"c{path.suffix}", "-p", "fc.weight", "--scheme", "normal",
                     "--seed", "8")
    assert other_seed.exit_code == 0
    assert not torch.equal(reload(tmp_path / f"c{path.suffix}")["fc.weight"], alone["fc.weight"])


def test_a_drawn_seed_is_reported_and_repeats_the_run(tmp_path, resnet_pt):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run("init", resnet_pt, "-o", tmp_path / "a" / "out.pt", "-p", "fc.weight", "--scheme", "normal")
    seed = first.stderr.split("pass --seed ")[1].split()[0]
    assert run("init", resnet_pt, "-o", tmp_path / "b" / "out.pt", "-p", "fc.weight", "--scheme", "normal",
               "--seed", seed).exit_code == 0
    assert file_bytes(tmp_path / "a" / "out.pt") == file_bytes(tmp_path / "b" / "out.pt")


def test_half_precision_tensors_keep_their_dtype(tmp_path):
    state = {"w": torch.zeros(300, 200, dtype=torch.bfloat16), "h": torch.zeros(300, 200, dtype=torch.float16)}
    path = tmp_path / "half.pt"
    torch.save(state, path)
    after = init(path, tmp_path / "out.pt", "-p", "*", "--scheme", "normal(std=0.02)")
    for name in state:
        assert after[name].dtype == state[name].dtype
        assert ks(after[name].float(), stats.norm(0, 0.02).cdf) > P_MIN or name == "w"  # bf16 rounds coarsely
        assert abs(after[name].float().std().item() - 0.02) < 0.001


def test_ties_are_kept_or_refused(tmp_path, gpt_pt, gpt):
    out = tmp_path / "out.pt"
    refused = run("init", gpt_pt, "-o", out, "-p", "lm_head.weight", "--scheme", "normal(std=0.02)", "--seed", "1")
    assert refused.exit_code == 2 and "'lm_head.weight' shares its storage with 'wte.weight'" in refused.stderr
    assert "--follow-ties" in refused.stderr and not out.exists()
    followed = init(gpt_pt, out, "-p", "lm_head.weight", "--scheme", "normal(std=0.02)", "--follow-ties")
    assert torch.equal(followed["lm_head.weight"], followed["wte.weight"])
    assert followed["lm_head.weight"].untyped_storage().data_ptr() == followed["wte.weight"].untyped_storage().data_ptr()
    untied = init(gpt_pt, out, "-p", "lm_head.weight", "--scheme", "normal(std=0.02)", "--untie")
    assert bits(untied["wte.weight"]) == bits(gpt.state_dict()["wte.weight"])
    assert not torch.equal(untied["lm_head.weight"], untied["wte.weight"])
