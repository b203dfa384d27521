"""inspect --hist: histograms against numpy.histogram on the same values, exact for tensors of up to
65,536 values and for values bfloat16 holds, within the stated bound for longer float32 ones; counts sum to numel minus NaN; the sparkline; the
|x| quantiles and KS distances the health rules use, against torch.quantile and scipy."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from helpers import json_of, register_input, run, run_on_terminal
from safetensors.torch import save_file

from paramsurgeon.analysis import buckets as spread
from paramsurgeon.analysis.stats import tensor_stats
from paramsurgeon.checkpoint import values as chunking
from paramsurgeon.checkpoint.values import from_torch


@pytest.fixture
def odd_pt(request, tmp_path):
    """Tensors whose histograms have something to get wrong: skew, NaN, Inf, a constant, low precision."""
    torch.manual_seed(0)
    skewed = torch.distributions.Gamma(2.0, 3.0).sample((300, 70)) - 0.4
    holes = torch.randn(1000)
    holes[::97] = float("nan")
    holes[5], holes[6] = float("inf"), float("-inf")
    state = {"skewed": skewed, "holes": holes, "constant": torch.full((10,), 0.25),
             "half": torch.randn(64, 64).half(), "brain": torch.randn(64, 64).bfloat16(),
             "steps": torch.randint(0, 50, (500,)), "zeros": torch.zeros(3, 3)}
    path = tmp_path / "odd.safetensors"
    save_file(state, path)
    return register_input(request, path), state


def reference(values: torch.Tensor, edges: list[float]) -> list[int]:
    """numpy.histogram of the finite values over the same edges, infinities added at the ends."""
    x = values.double().numpy().ravel()
    counts, _ = np.histogram(x[np.isfinite(x)], bins=np.array(edges))
    counts[0] += int(np.isneginf(x).sum())
    counts[-1] += int(np.isposinf(x).sum())
    return counts.tolist()


@pytest.mark.parametrize("bins", [32, 7, 1])
def test_histograms_match_numpy_exactly(odd_pt, bins):
    path, state = odd_pt
    document = json_of("inspect", path, "--hist", "--bins", bins, schema="inspect")
    for entry in document["tensors"]:
        values, histogram = state[entry["name"]], entry["histogram"]
        finite = values.double()[torch.isfinite(values.double())]
        low, high = float(finite.min()), float(finite.max())
        if low == high:
            low, high = low - 0.5, high + 0.5  # numpy's rule for an empty range
        assert histogram["exact"] is True
        assert len(histogram["counts"]) == bins and len(histogram["edges"]) == bins + 1
        assert histogram["edges"][0] == pytest.approx(low, rel=1e-7) and histogram["edges"][-1] == pytest.approx(high,
                                                                                                           rel=1e-7)
        np.testing.assert_allclose(histogram["edges"], np.linspace(low, high, bins + 1), rtol=1e-6, atol=1e-7)
        assert histogram["counts"] == reference(values, histogram["edges"]), entry["name"]
        assert sum(histogram["counts"]) == values.numel() - int(torch.isnan(values.double()).sum())


def test_histogram_agrees_with_torch_histc():
    torch.manual_seed(3)
    values = torch.randn(50_000) * 3 + 1
    stats = tensor_stats(from_torch(values), bins=20)
    expected = torch.histc(values, bins=20, min=float(values.min()), max=float(values.max()))
    # histc computes bins by arithmetic: a value on an edge may fall either side of it
    assert (torch.tensor(stats.histogram.counts) - expected.long()).abs().sum() <= 4
    assert sum(stats.histogram.counts) == values.numel()


def test_long_tensors_are_counted_from_buckets_within_the_bound(monkeypatch, tmp_path, request):
    """Over one chunk (CHUNK shrunk to 1000 values here) counts come from bfloat16-wide buckets: a count is off
    at most by the values within 1/128 of an edge's magnitude."""
    monkeypatch.setattr(chunking, "CHUNK", 1000)
    torch.manual_seed(4)
    values = torch.cat([torch.randn(20_000) * 0.02, torch.tensor([float("nan")] * 3), torch.rand(5000) * 0.3])
    path = tmp_path / "long.safetensors"
    save_file({"w": values}, path)
    register_input(request, path)
    histogram = json_of("inspect", path, "--hist", schema="inspect")["tensors"][0]["histogram"]
    assert histogram["exact"] is False
    edges = np.array(histogram["edges"])
    x = values.double().numpy()
    x = x[np.isfinite(x)]
    assert edges[0] == x.min() and edges[-1] == x.max()
    exact, _ = np.histogram(x, bins=edges)
    assert sum(histogram["counts"]) == values.numel() - 3
    for i, (got, want) in enumerate(zip(histogram["counts"], exact)):
        near = sum(int((np.abs(x - e) <= abs(e) / 64).sum()) for e in edges[i:i + 2])
        assert abs(got - want) <= near, (i, got, want, near)
    assert np.abs(np.array(histogram["counts"]) - exact).sum() <= 0.02 * len(x)


@pytest.fixture
def long_st(request, tmp_path):
    """Tensors of more than 65,536 values (one chunk each), whose histograms come from the buckets."""
    torch.manual_seed(7)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-45, -1e-45, 2.0 ** -140])
    state = {"bf16": torch.cat([torch.randn(150_000), specials, torch.linspace(-3, 3, 33)]).bfloat16(),
             "int8": torch.randint(-128, 128, (70_000,), dtype=torch.int8),
             "f8": torch.randn(80_000).to(torch.float8_e4m3fn),
             "f32": torch.cat([torch.randn(300_000) * 0.02, specials, torch.zeros(1000)]),
             "gamma": torch.distributions.Gamma(2.0, 3.0).sample((400_000,)) - 0.4,
             "constant": torch.full((100_000,), -1.5)}
    path = tmp_path / "long.safetensors"
    save_file(state, path)
    return register_input(request, path), state


@pytest.mark.parametrize("bins", [32, 5, 1])
def test_long_tensors_of_bfloat16_values_are_exact(long_st, bins):
    """Values that bfloat16 holds exactly sit at their bucket's end: numpy's counts, edges and all."""
    path, state = long_st
    document = json_of("inspect", path, "--hist", "--bins", bins, "-p", "{bf16,int8,f8,constant}", schema="inspect")
    assert len(document["tensors"]) == 4
    for entry in document["tensors"]:
        values, histogram = state[entry["name"]], entry["histogram"]
        assert histogram["exact"] is (entry["name"] != "constant"), entry["name"]
        assert histogram["counts"] == reference(values, histogram["edges"]), entry["name"]
        x = values.double()
        assert entry["stats"]["zeros"] == int((x == 0).sum())


def test_long_float32_tensors_are_within_the_bound(long_st):
    """float32 values in a bucket across an edge are shared out by width: counts sum to numel minus NaN,
    a bin is off at most by the values near its edges, and in all a few in ten thousand."""
    path, state = long_st
    document = json_of("inspect", path, "--hist", "-p", "{f32,gamma}", schema="inspect")
    for entry in document["tensors"]:
        values, histogram = state[entry["name"]], entry["histogram"]
        x = values.double().numpy()
        finite = x[np.isfinite(x)]
        assert histogram["exact"] is False
        assert histogram["edges"][0] == finite.min() and histogram["edges"][-1] == finite.max()
        exact = reference(values, histogram["edges"])
        assert sum(histogram["counts"]) == sum(exact) == len(x) - int(np.isnan(x).sum())
        for i, (got, want) in enumerate(zip(histogram["counts"], exact)):
            near = sum(int((np.abs(finite - e) <= abs(e) / 64).sum()) for e in histogram["edges"][i:i + 2])
            assert abs(got - want) <= near, (entry["name"], i, got, want, near)
        assert np.abs(np.array(histogram["counts"]) - exact).sum() <= 1e-3 * len(x)
        assert entry["stats"]["zeros"] == int((values.double() == 0).sum())


def test_long_tensors_of_infinities_count_them_at_the_ends():
    """No finite value: the range is numpy's [-0.5, 0.5], -inf in the first bin and +inf in the last."""
    values = torch.tensor([float("inf")] * 40_000 + [float("-inf")] * 30_000 + [float("nan")] * 5)
    for dtype in (torch.float32, torch.bfloat16):
        histogram = tensor_stats(from_torch(values.to(dtype)), bins=8).histogram
        assert histogram.edges[0] == -0.5 and histogram.edges[-1] == 0.5
        assert histogram.counts == [30_000, 0, 0, 0, 0, 0, 0, 40_000]


def test_abs_quantile_against_torch_quantile():
    torch.manual_seed(5)
    for values in (torch.randn(200_000), torch.distributions.StudentT(2.0).sample((100_000,)), torch.rand(70_000)):
        truth = float(torch.quantile(values.abs().double(), 0.99, interpolation="lower"))
        counted = spread.Buckets()
        for piece in values.split(30_000):
            counted.add(piece)
        assert counted.count == values.numel()
        assert abs(counted.abs_quantile(0.99) - truth) <= truth / 256 * 1.0001
        kept = spread.Sorted()
        kept.add(values[:5000])
        assert kept.abs_quantile(0.99) == float(torch.quantile(values[:5000].abs().double(), 0.99,
                                                               interpolation="lower"))


def test_ks_distance_against_scipy():
    torch.manual_seed(6)
    bound = 1 / math.sqrt(300)
    values = torch.empty(100_000).uniform_(-bound, bound) * 1.01

    def uniform(t):
        return ((t + bound) / (2 * bound)).clamp(0, 1)

    truth = scipy.stats.kstest(values.double().numpy(), scipy.stats.uniform(-bound, 2 * bound).cdf).statistic
    counted = spread.Buckets()
    counted.add(values)
    assert counted.ks_distance(uniform) <= truth + 1e-12  # measured at bucket boundaries: never above
    assert counted.ks_distance(uniform) >= truth - 1 / 128
    kept = spread.Sorted()
    kept.add(values[:20_000])
    small = scipy.stats.kstest(values[:20_000].double().numpy(), scipy.stats.uniform(-bound, 2 * bound).cdf).statistic
    assert kept.ks_distance(uniform) == pytest.approx(small, abs=1e-12)


def test_sparkline_column(tmp_path, request):
    path = tmp_path / "two.safetensors"
    save_file({"lumps": torch.tensor([0.0] * 10 + [1.0] * 80), "flat": torch.arange(32.0)}, path)
    register_input(request, path)
    result = run("inspect", path, "--hist")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "histogram" in lines[1]
    start = lines[1].index("histogram")
    assert lines[3][start:start + 16] == "█" * 16  # flat (safetensors keeps names sorted)
    assert lines[4][start:start + 16] == "▁" + " " * 14 + "█"  # 10 at 0, 80 at 1: 8 levels up to the fullest


@pytest.mark.parametrize("columns", [80, 100, 139])
def test_the_sparkline_asked_for_outlasts_the_statistics_on_a_narrow_terminal(resnet_pt, columns):
    code, shown, _ = run_on_terminal("inspect", resnet_pt, "-p", "layer1.0.*", "--hist", terminal=("stdout",),
                                     env={"COLUMNS": str(columns), "NO_COLOR": "1"})
    lines = shown.decode().splitlines()
    assert code == 0 and "histogram" in lines[1], lines[1]
    start = lines[1].index("histogram")
    assert all(set(line[start:start + 16]) <= set("▁▂▃▄▅▆▇█ ") for line in lines[3:13])
    assert all(len(line) <= columns for line in lines[1:13])
    hidden = " ".join(line for line in lines if line.startswith("(not shown at this width:"))
    assert "histogram" not in hidden and ("numel" in hidden or columns > 130)  # the statistics gave way instead


@pytest.mark.parametrize("args, message", [
    (["--bins", "8"], "--bins 8 sets the bins of --hist; pass --hist --bins 8"),
    (["--hist", "--no-stats"], "--hist reads the values; it does not go with --no-stats or --tree"),
    (["--hist", "--bins", "0"], "--bins"),
])
def test_option_errors(args, message):
    result = run("inspect", "samples/resnet.pt", *args)
    assert result.exit_code == 2
    assert message in result.stderr
