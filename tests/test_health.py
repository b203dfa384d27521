"""check --health: checkpoints damaged on purpose (a zeroed layer, a spiked weight, an exploded
variance, a constant, NaN), each finding and its value computed again with torch; the thresholds at
their boundaries; buffers left alone; and the untrained rule on real modules, fresh and trained."""

import json
import math
import statistics

import pytest
import torch
import torch.nn as nn
from helpers import json_of, register_input, run, validate

from paramsurgeon.analysis import health
from paramsurgeon.analysis.stats import tensor_stats
from paramsurgeon.checkpoint.kinds import fans
from paramsurgeon.checkpoint.values import from_torch


class Net(nn.Module):
    """Three convs, a BatchNorm, a LayerNorm, two Linears: enough of each kind to have a median."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(32)
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 10)


def looks_trained(seed=0) -> dict:
    """Net's tensors with values no init gives: normal with std 0.05 (beyond the uniform bound, not 0.02)."""
    torch.manual_seed(seed)
    state = Net().state_dict()
    for name, value in state.items():
        if value.is_floating_point() and "running" not in name:
            state[name] = torch.randn(value.shape) * 0.05 + (1.0 if name.startswith("norm.weight") else 0.0)
    state["bn.running_mean"] = torch.zeros(8)  # a buffer: zeros here are not a dead layer
    return state


def saved(request, path, state):
    torch.save(state, path)
    return register_input(request, path)


def findings_of(path, code):
    document = json_of("check", path, "--health", schema="check", code=code)
    return document, {(f["rule"], f["name"]): f for f in document["findings"]}


def test_a_healthy_checkpoint_passes(tmp_path, request):
    path = saved(request, tmp_path / "ok.pt", looks_trained())
    document, findings = findings_of(path, 0)
    assert findings == {} and document["ok"]


def test_damaged_checkpoint(tmp_path, request):
    state = looks_trained()
    state["conv2.weight"] = torch.zeros_like(state["conv2.weight"])  # dead
    spiked = state["fc1.weight"].clone()
    spiked[3, 4] = 50.0  # spike
    state["fc1.weight"] = spiked
    state["conv3.weight"] = state["conv3.weight"] * 5  # exploding: 25x the variance
    state["norm.weight"] = torch.full((32,), 0.5)  # constant
    broken = state["fc2.bias"].clone()
    broken[1] = float("nan")
    state["fc2.bias"] = broken  # nonfinite
    path = saved(request, tmp_path / "damaged.pt", state)
    document, findings = findings_of(path, 1)
    assert set(findings) == {("dead", "conv2.weight"), ("spike", "fc1.weight"), ("exploding", "conv3.weight"),
                             ("constant", "norm.weight"), ("nonfinite", "fc2.bias")}
    assert findings[("dead", "conv2.weight")]["value"] == 1.0
    p99 = torch.quantile(spiked.abs().flatten().double(), 0.99, interpolation="lower")
    assert findings[("spike", "fc1.weight")]["value"] == pytest.approx(50.0 / float(p99), rel=1e-9)
    # variances times fan-in, as torch.nn.init computes the fan-in
    scaled = [float(state[f"conv{i}.weight"].double().var()) * nn.init._calculate_fan_in_and_fan_out(
        state[f"conv{i}.weight"])[0] for i in (1, 2, 3)]
    ratio = scaled[2] / sorted(scaled)[1]
    assert findings[("exploding", "conv3.weight")]["value"] == pytest.approx(ratio, rel=1e-6)
    assert {f["severity"] for f in document["findings"] if f["rule"] in ("constant", "exploding", "spike")} \
        == {"warning"}  # a spike of a few hundred times the p99 warns
    failed = {r["rule"]: [v["name"] for v in r["violations"]] for r in document["rules"] if not r["ok"]}
    assert failed == {"health nonfinite": ["fc2.bias"], "health dead": ["conv2.weight"]}
    text = run("check", path, "--health")
    assert text.exit_code == 1
    assert "FAIL health dead: 1 violation" in text.stdout
    assert "exploding: conv3.weight variance" in text.stdout and "constant: norm.weight every value is 0.5" in text.stdout


def test_warnings_alone_pass(tmp_path, request):
    state = looks_trained()
    state["norm.weight"] = torch.ones(32)
    path = saved(request, tmp_path / "warn.pt", state)
    document, findings = findings_of(path, 0)
    assert set(findings) == {("constant", "norm.weight")}


@pytest.mark.parametrize("nonzero, dead", [(1, True), (2, False)])
def test_dead_threshold(nonzero, dead):
    """>= 99.99% exact zeros: 1 value in 10,000 is dead, 2 are not."""
    values = torch.zeros(100, 100)
    values.view(-1)[:nonzero] = 0.3
    assert (_rules({"fc.weight": values}) == {"dead"}) is dead


@pytest.mark.parametrize("peak, spike", [(101.0, True), (99.0, False)])
def test_spike_threshold(peak, spike):
    """max |x| / p99 of |x| >= 100: 999 values of magnitude 1 and one peak."""
    values = torch.ones(1000) * torch.tensor([1.0, -1.0]).repeat(500)
    values[17] = peak
    assert ("spike" in _rules({"fc.weight": values.reshape(10, 100)})) is spike


def _rules(state: dict) -> set[str]:
    from paramsurgeon.checkpoint import Checkpoint

    ckpt = Checkpoint(source="test", format="torch", root={n: from_torch(v) for n, v in state.items()})
    measured = health.measure(ckpt, health.checked_names(ckpt, list(state)))
    return {f.rule for f in health.diagnose(ckpt, measured)}


# ---- untrained, on real modules -------------------------------------------------------------


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 12, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x):
        return self.head(self.features(x))


def trained(seed: int, steps: int = 300) -> Small:
    """A few hundred SGD steps on a small synthetic task: which quadrant of an 8x8 image is brightest."""
    torch.manual_seed(seed)
    model = Small()
    images = torch.randn(512, 1, 8, 8)
    quadrants = torch.stack([images[:, 0, :4, :4], images[:, 0, :4, 4:], images[:, 0, 4:, :4], images[:, 0, 4:, 4:]], 1)
    labels = quadrants.mean((2, 3)).argmax(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        batch = torch.randint(0, 512, (64,))
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean()
    assert accuracy > 0.6, "the task was learnt"
    return model


def untrained_names(model: nn.Module, tmp_path, request) -> list[str]:
    path = saved(request, tmp_path / "model.pt", model.state_dict())
    result = run("check", path, "--health", "--json")
    document = validate(json.loads(result.stdout), "check")
    assert result.exit_code == (1 if any(f["severity"] == "fail" for f in document["findings"]) else 0)
    return sorted(f["name"] for f in document["findings"] if f["rule"] == "untrained")


WEIGHTS = ["features.0.weight", "features.2.weight", "head.0.weight", "head.2.weight"]
# 54, 648 and 256 values: after a few hundred SGD steps these still look Gaussian, at a fan-in init's
# scale (kaiming_normal's sqrt(2/fan_in), which training ReLU layers drifts towards): as likely fresh as
# trained, they may be reported (README: small layers). The layer of 12,288 values never is.
SMALL = {"features.0.weight", "features.2.weight", "head.2.weight"}


@pytest.mark.parametrize("seed", range(3))
def test_fresh_layers_are_untrained(seed, tmp_path, request):
    torch.manual_seed(seed)
    assert untrained_names(Small(), tmp_path, request) == sorted(WEIGHTS)


@pytest.mark.parametrize("seed", range(3))
def test_trained_layers_are_not(seed, tmp_path, request):
    assert set(untrained_names(trained(seed), tmp_path, request)) <= SMALL


def test_a_layer_left_fresh_in_a_trained_model(tmp_path, request):
    """The failure this rule is for: a partial load left one layer at its init."""
    model = trained(0)
    torch.manual_seed(9)
    model.head[0].reset_parameters()
    assert set(untrained_names(model, tmp_path, request)) - SMALL == {"head.0.weight"}


def test_normal_002_init_is_untrained(tmp_path, request):
    torch.manual_seed(0)
    model = trained(1, steps=200)
    nn.init.normal_(model.head[0].weight, std=0.02)
    assert set(untrained_names(model, tmp_path, request)) - SMALL == {"head.0.weight"}


@pytest.mark.parametrize("shape", [(3, 2), (4, 1, 1, 1), (256, 512), (64, 32, 3, 3)])
def test_untrained_statistic_on_fresh_layers_of_any_size(shape):
    """Small layers have little KS power, but a fresh layer is always flagged: its statistic stays small."""
    for seed in range(20):
        torch.manual_seed(seed)
        layer = (nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2:]))
        stats = tensor_stats(from_torch(layer.weight.detach()), buckets=True)
        assert health._untrained(health.inits_for(shape), stats) is not None, (shape, seed)
        assert fans(shape) == nn.init._calculate_fan_in_and_fan_out(layer.weight)


def test_rules_on_tensors_counted_into_buckets():
    """Over 65,536 values the spread comes from buckets, counted only when the statistics allow a finding."""
    torch.manual_seed(2)
    spiked = torch.randn(400, 300)
    spiked[7, 7] = 1000.0
    fresh = nn.Linear(400, 300).weight.detach()
    normal = torch.randn(300, 400) * 0.02
    found = _findings({"a.fc.weight": spiked, "b.fc.weight": fresh, "c.fc.weight": normal,
                       "d.fc.weight": torch.randn(300, 400) * 0.035})  # no init's std
    p99 = float(torch.quantile(spiked.abs().flatten().double(), 0.99, interpolation="lower"))
    assert found["spike"][0] == "a.fc.weight"
    assert found["spike"][1] == pytest.approx(1000.0 / p99, rel=1 / 200)
    assert sorted(name for name, _ in found["untrained"]) == ["b.fc.weight", "c.fc.weight"]


def _findings(state: dict) -> dict:
    from paramsurgeon.checkpoint import Checkpoint

    ckpt = Checkpoint(source="test", format="torch", root={n: from_torch(v) for n, v in state.items()})
    found: dict = {}
    for f in health.diagnose(ckpt, health.measure(ckpt, list(state))):
        found.setdefault(f.rule, [])
        found[f.rule] += [f.name, f.value] if f.rule == "spike" else [(f.name, f.value)]
    return found


# ---- the amended rules: exploding by fan-in, spike levels, --strict ---------------------------


def cnn() -> nn.Sequential:
    """A small CNN at PyTorch's default init: a first conv of fan-in 27 and later ones of fan-in 576."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3),
                         nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Flatten(),
                         nn.Linear(64 * 2 * 2, 10))


def test_a_fresh_cnn_first_conv_is_not_exploding(tmp_path, request):
    """Its variance is 21x the later convs' (1/81 against 1/1728), as the default init makes it: the
    variance times fan-in is the same for all (1/3)."""
    model = cnn()
    variances = [float(m.weight.detach().double().var()) for m in model if isinstance(m, nn.Conv2d)]
    assert variances[0] / sorted(variances)[2] > 10  # the raw variances would warn
    path = saved(request, tmp_path / "cnn.pt", model.state_dict())
    _, findings = findings_of(path, 1)  # fresh: every weight is untrained
    assert [name for rule, name in findings if rule == "exploding"] == []
    assert sorted(name for rule, name in findings if rule == "untrained") == \
        sorted(f"{i}.weight" for i, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.Linear)))


def super_weight(ratio: float) -> tuple[dict, float]:
    """looks_trained() with one entry of fc1.weight set to ``ratio`` times the 99th percentile of |x|, and
    the ratio measured again with torch."""
    state = looks_trained()
    weight = state["fc1.weight"].clone()
    p99 = float(torch.quantile(weight.abs().flatten().double(), 0.99, interpolation="lower"))
    weight[5, 7] = ratio * p99
    state["fc1.weight"] = weight
    return state, float(weight[5, 7]) / float(torch.quantile(weight.abs().flatten().double(), 0.99, interpolation="lower"))


def test_a_super_weight_warns_and_an_extreme_one_fails(tmp_path, request):
    state, measured = super_weight(200)
    path = saved(request, tmp_path / "super.pt", state)
    document, findings = findings_of(path, 0)
    assert set(findings) == {("spike", "fc1.weight")}
    assert findings[("spike", "fc1.weight")]["severity"] == "warning"
    assert findings[("spike", "fc1.weight")]["value"] == pytest.approx(measured, rel=1e-9)
    text = run("check", path, "--health")
    assert text.exit_code == 0 and "ok   health spike" in text.stdout and "spike: fc1.weight max |x|" in text.stdout
    state, measured = super_weight(20_000)
    path = saved(request, tmp_path / "extreme.pt", state)
    document, findings = findings_of(path, 1)
    assert findings[("spike", "fc1.weight")]["severity"] == "fail"
    assert findings[("spike", "fc1.weight")]["value"] == pytest.approx(measured, rel=1e-9)
    assert [r["violations"][0]["name"] for r in document["rules"] if not r["ok"]] == ["fc1.weight"]


@pytest.mark.parametrize("peak, severity", [(10_001.0, "fail"), (9_999.0, "warning")])
def test_spike_fail_threshold(peak, severity):
    values = torch.ones(1000) * torch.tensor([1.0, -1.0]).repeat(500)
    values[17] = peak
    from paramsurgeon.checkpoint import Checkpoint

    ckpt = Checkpoint(source="test", format="torch", root={"fc.weight": from_torch(values.reshape(10, 100))})
    found = health.diagnose(ckpt, health.measure(ckpt, ["fc.weight"]))
    assert [(f.rule, f.severity) for f in found] == [("spike", severity)]


def test_strict_makes_a_warning_fail_and_ignore_drops_it(tmp_path, request):
    state, _ = super_weight(200)
    path = saved(request, tmp_path / "super.pt", state)
    document = json_of("check", path, "--health", "--strict", schema="check", code=1)
    assert [(f["rule"], f["severity"]) for f in document["findings"]] == [("spike", "fail")]
    failed = {r["rule"]: [v["name"] for v in r["violations"]] for r in document["rules"] if not r["ok"]}
    assert failed == {"health spike": ["fc1.weight"]}
    assert {r["rule"] for r in document["rules"]} >= {"health constant", "health exploding"}
    text = run("check", path, "--health", "--strict")
    assert text.exit_code == 1 and "FAIL health spike: 1 violation" in text.stdout
    document = json_of("check", path, "--health", "--strict", "--ignore", "spike", schema="check", code=0)
    assert document["findings"] == [] and document["ok"]
    document = json_of("check", path, "--health", "--ignore", "spike:fc1.*", schema="check", code=0)
    assert document["findings"] == []


def test_values_short_of_an_inits_reach_are_not_that_init():
    """A 1x1 conv of 128 values moved just past its default bound (+-1/sqrt(8)) by a few steps: the KS
    test alone cannot tell it from xavier_uniform (+-0.5) or LeCun's normal(0, 1/sqrt(8)), but 128
    fresh values of either reach beyond |x| = 0.36 with probability 1 - 1e-18."""
    torch.manual_seed(0)
    bound = 1 / math.sqrt(8)
    moved = (torch.rand(16, 8, 1, 1) * 2 - 1) * bound * 1.01
    stats = tensor_stats(from_torch(moved), buckets=True)
    inits = health.inits_for((16, 8, 1, 1))
    assert {i.label.split(",")[-1].strip() for i in inits} >= {"xavier_uniform", "LeCun"}
    assert health._untrained(inits, stats) is None
    fresh = tensor_stats(from_torch(nn.init.xavier_uniform_(torch.empty(16, 8, 1, 1))), buckets=True)
    assert "xavier_uniform" in health._untrained(inits, fresh)[2]


def test_a_diverged_tensor_is_reported_in_a_readable_line(tmp_path):
    """A weight of a diverged run (variance 1e60 among ordinary ones): the finding's value is the
    variance ratio torch computes, and its message says it in a few digits, not 57."""
    torch.manual_seed(0)
    state = {f"block{i}.weight": torch.randn(64) for i in range(4)}
    state["block4.weight"] = torch.randn(64) * 1e30
    torch.save(state, tmp_path / "diverged.pt")
    document = json_of("check", tmp_path / "diverged.pt", "--health", schema="check")
    finding = next(f for f in document["findings"] if f["rule"] == "exploding")
    variances = [t.double().var().item() for t in state.values()]
    ratio = variances[-1] / statistics.median(variances)
    assert finding["name"] == "block4.weight" and finding["value"] == pytest.approx(ratio, rel=1e-3)
    assert f"is {ratio:.2g}x the median" in finding["message"] and len(finding["message"]) < 120
