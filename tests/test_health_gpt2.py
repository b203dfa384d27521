"""check --health on real GPT-2 models built by transformers: fresh ones fail `untrained` on every Conv1D
weight (normal(0, 0.02), the residual projections at 0.02/sqrt(2 x layers)), one trained for real passes,
and the same with three blocks reset to a fresh init fails naming exactly their weights; `exploding`
takes Conv1D's fan-in from transformers (nx, dim 0); --ignore and --strict tune the rules."""

import json
import statistics

import pytest
import torch
from helpers import register_input, run, validate


def config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                      eos_token_id=0)


def fresh(seed=0):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(config())


def conv1d_weights(model) -> list[str]:
    """The names of every transformers Conv1D weight of ``model``, as its state dict names them."""
    from transformers.pytorch_utils import Conv1D

    return sorted(f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D))


@pytest.fixture(scope="module")
def trained():
    """300 Adam steps at lr 3e-3 on a bigram task (the next token is a fixed function of this one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend
    try:
        model = fresh(0)
        table = torch.randint(0, 64, (64,))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(300):
            ids = [torch.randint(0, 64, (16, 1))]
            for _ in range(31):
                ids.append(table[ids[-1]])
            ids = torch.cat(ids, 1)
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert loss.item() < 0.1, "the task was learnt"
    finally:
        torch.set_num_threads(threads)
    return model


def saved(model, folder, request):
    model.save_pretrained(folder)
    return register_input(request, folder / "model.safetensors")


def health(path, *options):
    result = run("check", path, "--health", "--json", *options)
    document = validate(json.loads(result.stdout), "check")
    assert result.exit_code == (0 if document["ok"] else 1)
    return result.exit_code, document["findings"]


def named(findings, rule) -> list[str]:
    return sorted(f["name"] for f in findings if f["rule"] == rule)


def test_a_fresh_gpt2_is_untrained_on_every_conv1d_weight(tmp_path, request):
    model = fresh()
    code, findings = health(saved(model, tmp_path, request))
    weights = conv1d_weights(model)
    assert len(weights) == 16 and code == 1
    assert named(findings, "untrained") == weights
    messages = {f["name"]: f["message"] for f in findings if f["rule"] == "untrained"}
    std = {name: float(value.std()) for name, value in model.state_dict().items()}
    for name in weights:  # the sigma named is the one transformers drew from (GPT-2's _init_weights)
        sigma = "0.02/sqrt(2x4 layers)" if std[name] < 0.01 else "normal(0, 0.02),"
        assert sigma in messages[name], (name, messages[name])
    assert sum("attn.c_proj" in name and "sqrt(2x4 layers)" in message for name, message in messages.items()) == 4


def test_a_trained_gpt2_passes_and_three_reset_blocks_are_named(trained, tmp_path, request):
    code, findings = health(saved(trained, tmp_path / "trained", request))
    assert code == 0 and named(findings, "untrained") == []
    reset = fresh(seed=1)
    model = fresh(seed=2)
    model.load_state_dict(trained.state_dict())
    for i in (0, 2, 3):
        model.transformer.h[i].load_state_dict(reset.transformer.h[i].state_dict())
    code, findings = health(saved(model, tmp_path / "reset", request))
    expected = [n for n in conv1d_weights(model) if n.startswith(("transformer.h.0.", "transformer.h.2.",
                                                                  "transformer.h.3."))]
    assert code == 1 and len(expected) == 12
    assert named(findings, "untrained") == expected
    failing = {f["name"] for f in findings if f["severity"] == "fail"}  # their zero biases are dead too
    assert all(n.startswith(("transformer.h.0.", "transformer.h.2.", "transformer.h.3.")) for n in failing)


def test_exploding_takes_conv1d_fan_in_from_dim_0(trained, tmp_path, request):
    """Variance x fan-in, the fan-in as transformers' Conv1D has it (nx: its weight is (nx, nf))."""
    from transformers.pytorch_utils import Conv1D

    model = fresh(seed=2)
    model.load_state_dict(trained.state_dict())
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.mul_(10)
    code, findings = health(saved(model, tmp_path, request))  # lm_head is wte's alias: diagnosed as wte
    scaled = {f"{name}.weight": float(m.weight.detach().double().var()) * m.nx
              for name, m in model.named_modules() if isinstance(m, Conv1D)}
    exploding = {f["name"]: f["value"] for f in findings if f["rule"] == "exploding"}
    assert exploding["transformer.h.1.mlp.c_fc.weight"] == pytest.approx(
        scaled["transformer.h.1.mlp.c_fc.weight"] / statistics.median(scaled.values()), rel=1e-6)
    assert not [n for n in exploding if n.endswith("c_proj.weight") or n.endswith("c_attn.weight")]


def test_ignore_drops_exactly_those_findings(tmp_path, request):
    path = saved(fresh(), tmp_path, request)
    _, every = health(path)
    _, kept = health(path, "--ignore", "untrained:transformer.h.0.*", "--ignore", "constant")
    dropped = [f for f in every if (f["rule"] == "untrained" and f["name"].startswith("transformer.h.0."))
               or f["rule"] == "constant"]
    assert len(dropped) == 4 + 9 and kept == [f for f in every if f not in dropped]
    code, none = health(path, "--ignore", "untrained", "--ignore", "dead", "--ignore", "constant")
    assert (code, none) == (0, [])


@pytest.mark.parametrize("options, message", [
    (["--health", "--ignore", "untrained:h.0.*"], "did you mean 'transformer.h.0.*'?"),
    (["--health", "--ignore", "untrainde"], "no rule 'untrainde' (did you mean 'untrained'?)"),
    (["--ignore", "spike"], "pass --health --ignore spike"),
    (["--strict"], "pass --health --strict"),
])
def test_bad_ignore_is_one_line(options, message, tmp_path, request):
    """An --ignore whose GLOB matches no checked tensor is an error with suggestions, as for any
    option that takes names; so is a rule that does not exist, or tuning without --health."""
    result = run("check", saved(fresh(), tmp_path, request), *options)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("note: ")]  # the tied lm_head
    assert result.exit_code == 2 and result.stdout == ""
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_init_default_on_conv1d_is_its_constructor(tmp_path, request):
    """GPT-2's Conv1D (now kind linear) has no reset_parameters: its constructor draws normal(0, 0.02) for
    the (nx, nf) weight and zeros the bias; init --scheme default gives that, square c_proj included."""
    from safetensors.torch import load_file
    from scipy.stats import ks_2samp
    from transformers.pytorch_utils import Conv1D

    path = saved(fresh(), tmp_path, request)
    result = run("init", path, "-p", "transformer.h.1.*", "--scheme", "default", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.stderr
    out = load_file(tmp_path / "out.safetensors")
    torch.manual_seed(0)
    for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        weight, bias = out[f"transformer.h.1.{leaf}.weight"], out[f"transformer.h.1.{leaf}.bias"]
        nx, nf = weight.shape
        reference = Conv1D(nf, nx)  # what transformers' own constructor draws for this module
        assert torch.equal(bias, reference.bias.detach()), leaf
        assert ks_2samp(weight.flatten().numpy(), reference.weight.detach().flatten().numpy()).pvalue > 1e-4, leaf


def test_kaiming_on_conv1d_takes_its_fan_in(tmp_path, request):
    """init and resize --fill kaiming_uniform draw within sqrt(6/fan_in), the fan-in nx of the (nx, nf)
    Conv1D weight (dim 0)."""
    from safetensors.torch import load_file

    model = fresh()
    path = saved(model, tmp_path, request)
    name = "transformer.h.0.mlp.c_fc.weight"
    result = run("init", path, "-p", name, "--scheme", "kaiming_uniform", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.stderr
    weight = load_file(tmp_path / "out.safetensors")[name]
    module = model.transformer.h[0].mlp.c_fc
    fan_in = torch.nn.init._calculate_fan_in_and_fan_out(module.weight.T)[0]  # as the nn.Linear it stands for
    assert fan_in == module.nx == 64 and tuple(weight.shape) == (64, 256)
    bound = (6 / fan_in) ** 0.5
    assert bound * 0.99 < float(weight.abs().max()) <= bound  # sqrt(6/256), half of it, is what shape[1] gives
    result = run("resize", path, "-p", name, "--dim", "1", "--size", "512", "--fill", "kaiming_uniform", "-o",
                 tmp_path / "wider.safetensors")  # 256 more outputs; the fan-in stays nx
    assert result.exit_code == 0, result.stderr
    new = load_file(tmp_path / "wider.safetensors")[name][:, 256:]
    assert tuple(new.shape) == (64, 256) and bound * 0.99 < float(new.abs().max()) <= bound


def test_conv1d_is_kind_linear(tmp_path, request):
    """-k linear selects every transformers Conv1D of GPT-2 (weight and bias), as it selects the nn.Linear
    LM head (left out of the file as tied to wte, read as its alias)."""
    from transformers.pytorch_utils import Conv1D

    model = fresh()
    result = run("inspect", saved(model, tmp_path, request), "-k", "linear", "--json", "--no-stats")
    assert result.exit_code == 0, result.stderr
    got = sorted(t["name"] for t in validate(json.loads(result.stdout), "inspect")["tensors"])
    expected = sorted(f"{name}.{leaf}" for name, module in model.named_modules()
                      if isinstance(module, (Conv1D, torch.nn.Linear)) for leaf in ("weight", "bias")
                      if getattr(module, leaf, None) is not None)
    assert got == expected and len(got) == 33


def test_adam_flattened_weights_are_not_a_fresh_normal(trained, tmp_path, request):
    """The trained embedding (4,096 values, std about 1/sqrt(64)): Adam's sign-like steps left it flatter
    than a normal sample ever is (excess kurtosis far below 0), so it is not normal(0, 1/sqrt(fan_in)),
    which a fresh draw of that std, as a Linear weight, is."""
    from scipy.stats import kurtosis

    weight = trained.transformer.wte.weight.detach().clone()
    assert kurtosis(weight.flatten().double().numpy()) / (24 / weight.numel()) ** 0.5 < -6
    torch.manual_seed(3)
    fresh_draw = torch.nn.init.normal_(torch.empty(64, 64), std=1 / 64 ** 0.5)
    path = tmp_path / "heads.pt"
    torch.save({"trained.head.weight": weight, "fresh.head.weight": fresh_draw}, path)
    code, findings = health(register_input(request, path))
    assert named(findings, "untrained") == ["fresh.head.weight"]
