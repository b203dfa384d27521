"""resize and transpose against torch: the expected tensors come from torch indexing, torch.cat and
t().contiguous(); every output is reloaded with torch.load or safetensors and loaded with
load_state_dict(strict=True) into the module built with the new size; new values are checked against
the distributions of torch.nn.init with KS tests; ties, errors (exit 2, nothing written), recipes."""

import json
import math

import pytest
import torch
from helpers import bits, load_torch, register_input, run, safetensors_metadata, same_storage
from models import TinyGPT
from safetensors.torch import load_file, save_file
from scipy import stats
from torch import nn

import paramsurgeon as ps

P_MIN = 1e-4


def untouched(before: dict, after: dict, changed: set):
    """Same names in the same order; every tensor but ``changed`` bit-identical."""
    assert list(after) == list(before)
    assert all(bits(after[n]) == bits(t) and after[n].dtype == t.dtype for n, t in before.items() if n not in changed)


def ks(values, cdf) -> float:
    return stats.kstest(values.double().flatten().numpy(), cdf).pvalue


@pytest.fixture
def head(request, tmp_path):
    """A 1000-class classifier behind a small backbone layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1000))
    path = tmp_path / "head.pt"
    torch.save(model.state_dict(), path)
    return register_input(request, path), model.state_dict()


def test_keep_chosen_classes_loads_into_the_smaller_head(head, tmp_path):
    path, before = head
    out = tmp_path / "ten.pt"
    result = run("resize", path, "-p", "2.*", "--keep", "3,7,0:5,999", "-o", out)
    assert result.exit_code == 0, result.stderr
    after = load_torch(out)
    index = torch.tensor([3, 7, 0, 1, 2, 3, 4, 999])
    assert torch.equal(after["2.weight"], before["2.weight"][index])
    assert torch.equal(after["2.bias"], before["2.bias"][index])
    untouched(before, after, {"2.weight", "2.bias"})
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model.load_state_dict(after, strict=True)
    x = torch.randn(5, 16)
    reference = nn.functional.linear(torch.relu(nn.functional.linear(x, before["0.weight"], before["0.bias"])),
                                     before["2.weight"], before["2.bias"])[:, index]
    torch.testing.assert_close(model(x), reference)


def test_shrink_keeps_the_first_slices_and_keep_plus_size_fills_the_rest(head, tmp_path):
    path, before = head
    run("resize", path, "-p", "2.*", "--size", "10", "-o", tmp_path / "a.pt")
    after = load_torch(tmp_path / "a.pt")
    assert torch.equal(after["2.weight"], before["2.weight"][:10])
    run("resize", path, "-p", "2.*", "--keep", "5,6", "--size", "4", "--fill", "zeros", "-o", tmp_path / "b.pt")
    after = load_torch(tmp_path / "b.pt")
    assert torch.equal(after["2.weight"], torch.cat([before["2.weight"][[5, 6]], torch.zeros(2, 32)]))
    assert torch.equal(after["2.bias"], torch.cat([before["2.bias"][[5, 6]], torch.zeros(2)]))


def test_grow_with_mean_number_and_scheme(head, tmp_path):
    path, before = head
    w, b = before["2.weight"], before["2.bias"]
    run("resize", path, "-p", "2.*", "--size", "1003", "-o", tmp_path / "mean.pt")
    after = load_torch(tmp_path / "mean.pt")
    torch.testing.assert_close(after["2.weight"], torch.cat([w, w.mean(0, keepdim=True).expand(3, -1)]))
    torch.testing.assert_close(after["2.bias"], torch.cat([b, b.mean().expand(3)]))
    assert bits(after["2.weight"][:1000]) == bits(w)
    run("resize", path, "-p", "2.bias", "--size", "1002", "--fill", "-0.5", "-o", tmp_path / "n.pt")
    assert torch.equal(load_torch(tmp_path / "n.pt")["2.bias"][1000:], torch.full((2,), -0.5))
    outs = []
    for name in ("s1.pt", "s2.pt"):
        result = run("resize", path, "-p", "2.weight", "--size", "3000", "--fill", "normal(std=0.02)", "--seed", "4",
                     "-o", tmp_path / name)
        assert result.exit_code == 0, result.stderr
        outs.append(load_torch(tmp_path / name)["2.weight"])
    assert bits(outs[0]) == bits(outs[1])
    assert ks(outs[0][1000:], stats.norm(0, 0.02).cdf) > P_MIN


def test_pad_to_multiple(head, tmp_path):
    path, _ = head
    run("resize", path, "-p", "2.*", "--size", "1001", "--pad-to-multiple", "64", "-o", tmp_path / "p.pt")
    after = load_torch(tmp_path / "p.pt")
    assert after["2.weight"].shape == (1024, 32) and after["2.bias"].shape == (1024,)
    run("resize", path, "-p", "2.*", "--pad-to-multiple", "48", "-o", tmp_path / "q.pt")
    assert load_torch(tmp_path / "q.pt")["2.bias"].shape == (1008,)


def test_default_fill_is_what_the_layer_of_the_new_size_gives(tmp_path, request):
    """Linear rows: kaiming_uniform(a=sqrt(5)) with fan_in = in_features, so U(+-1/sqrt(in)); bias
    U(+-1/sqrt(in)); grown along dim 1 the fan-in is the new in_features, not the number of new columns;
    Embedding rows N(0, 1)."""
    torch.manual_seed(3)
    state = {"fc.weight": torch.randn(100, 64), "fc.bias": torch.randn(100), "emb.weight": torch.randn(5, 16) * 7,
             "emb2.weight": torch.zeros(3, 8)}
    path = tmp_path / "m.pt"
    torch.save(state, path)
    register_input(request, path)
    out = tmp_path / "o.pt"
    result = run("resize", path, "-p", "fc.*", "--size", "410", "--fill", "default", "--seed", "1", "-o", out)
    assert result.exit_code == 0, result.stderr
    after = load_torch(out)
    bound = 1 / math.sqrt(64)
    assert ks(after["fc.weight"][100:], stats.uniform(-bound, 2 * bound).cdf) > P_MIN
    assert ks(after["fc.bias"][100:], stats.uniform(-bound, 2 * bound).cdf) > P_MIN
    assert bits(after["fc.weight"][:100]) == bits(state["fc.weight"])
    nn.Linear(64, 410).load_state_dict({"weight": after["fc.weight"], "bias": after["fc.bias"]}, strict=True)

    run("resize", path, "-p", "fc.weight", "--dim", "1", "--size", "128", "--fill", "default", "-o", out)
    new = load_torch(out)["fc.weight"][:, 64:]
    bound = 1 / math.sqrt(128)  # the layer's fan-in: 128 inputs, not the 64 new columns
    assert ks(new, stats.uniform(-bound, 2 * bound).cdf) > P_MIN
    assert ks(new, stats.uniform(-1 / 8, 2 / 8).cdf) < P_MIN

    run("resize", path, "-p", "emb.weight", "--size", "3005", "--fill", "default", "-o", out)
    assert ks(load_torch(out)["emb.weight"][5:], stats.norm(0, 1).cdf) > P_MIN


def gpt_state(vocab=256):
    torch.manual_seed(1)
    return TinyGPT(vocab=vocab).state_dict()


@pytest.fixture
def gpt_file(request, tmp_path):
    path = tmp_path / "gpt.pt"
    torch.save(gpt_state(), path)
    return register_input(request, path)


def test_tied_embedding_grows_with_its_head_and_stays_tied(gpt_file, tmp_path):
    before = load_torch(gpt_file)
    out = tmp_path / "grown.pt"
    result = run("resize", gpt_file, "-p", "wte.weight", "--size", "264", "--follow-ties", "-o", out)
    assert result.exit_code == 0, result.stderr
    after = torch.load(out, weights_only=True)
    wte = before["wte.weight"]
    torch.testing.assert_close(after["wte.weight"], torch.cat([wte, wte.mean(0, keepdim=True).expand(8, -1)]))
    assert after["wte.weight"].untyped_storage().data_ptr() == after["lm_head.weight"].untyped_storage().data_ptr()
    untouched(before, after, {"wte.weight", "lm_head.weight"})
    model = TinyGPT(vocab=264)
    model.load_state_dict(after, strict=True)

    st = tmp_path / "grown.safetensors"
    assert run("resize", gpt_file, "-p", "lm_head.weight", "--size", "264", "--follow-ties", "-o", st).exit_code == 0
    ties = json.loads(safetensors_metadata(st)["paramsurgeon.ties"])
    assert ["wte.weight", "lm_head.weight"] in ties
    loaded = load_file(st)
    assert torch.equal(loaded["wte.weight"], loaded["lm_head.weight"]) and loaded["wte.weight"].shape == (264, 64)


def test_untie_resizes_only_the_selected_tensor_and_the_tie_rule_holds(gpt_file, tmp_path):
    before = load_torch(gpt_file)
    out = tmp_path / "untied.pt"
    result = run("resize", gpt_file, "-p", "lm_head.weight", "--size", "260", "--untie", "-o", out)
    assert result.exit_code == 0, result.stderr
    after = load_torch(out)
    assert bits(after["wte.weight"]) == bits(before["wte.weight"])
    assert after["lm_head.weight"].shape == (260, 64) and not same_storage(after, "wte.weight", "lm_head.weight")
    refused = tmp_path / "refused.pt"
    result = run("resize", gpt_file, "-p", "lm_head.weight", "--size", "260", "-o", refused)
    assert result.exit_code == 2 and not refused.exists()
    assert "'lm_head.weight' shares its storage with 'wte.weight'" in result.stderr
    assert "--follow-ties" in result.stderr and "--untie" in result.stderr


def test_every_offender_at_once_and_nothing_written(request, tmp_path):
    state = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "steps": torch.tensor(3),
             "ids": torch.arange(4)}
    path = tmp_path / "m.pt"
    torch.save(state, path)
    register_input(request, path)
    out = tmp_path / "out.pt"
    result = run("resize", path, "-p", "*", "--keep", "1,5,9", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    assert "'a.weight' has 4 slices along dim 0, so --keep 5, 9 is out of range" in result.stderr
    assert "'a.bias' has 4 slices" in result.stderr and "'ids' has 4 slices" in result.stderr
    assert "'steps' has 0 dimensions [], so --dim 0 does not exist" in result.stderr
    result = run("resize", path, "-p", "a.*", "-p", "ids", "--size", "6", "--dim", "1", "-o", out)
    assert result.exit_code == 2 and "'a.bias' has 1 dimension [4], so --dim 1" in result.stderr
    assert "'ids' has 1 dimension" in result.stderr
    result = run("resize", path, "-p", "ids", "--size", "6", "-o", out)
    assert result.exit_code == 2 and "'ids' is int64, which has no mean to fill with" in result.stderr
    assert run("resize", path, "-p", "ids", "--size", "6", "--fill", "0", "-o", out).exit_code == 0
    assert torch.equal(load_torch(out)["ids"], torch.tensor([0, 1, 2, 3, 0, 0]))
    for args, message in [(["--size", "2", "--keep", "0,1,2"], "--keep lists 3 slices but --size is 2"),
                          (["--keep", "3:1"], "the range 3:1 is empty"), (["--keep", "a"], "'a' is not an index"),
                          (["--fill", "bogus"], "--fill 'bogus': unknown scheme"), ([], "pass --size N")]:
        result = run("resize", path, "-p", "a.*", *args, "-o", tmp_path / "x.pt")
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)


def test_dry_run_recipe_and_library(head, tmp_path):
    path, before = head
    result = run("resize", path, "-p", "2.*", "--keep", "3,7", "--dry-run")
    assert result.exit_code == 0
    assert "2.weight  1000x32 -> 2x32" in result.stdout and "resize 1000 -> 2 along dim 0 (keep 3,7)" in result.stdout
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\nop = "resize"\npattern = "2.*"\nkeep = "3,7"\n'
                      '[[step]]\nop = "transpose"\npattern = "2.weight"\n')
    out = tmp_path / "r.pt"
    assert run("apply", path, recipe, "-o", out).exit_code == 0
    assert torch.equal(load_torch(out)["2.weight"], before["2.weight"][[3, 7]].t())
    ckpt = ps.load(str(path))
    ps.resize(ckpt, pattern=["2.*"], size=4, fill="zeros")
    ps.save(ckpt, str(tmp_path / "lib.safetensors"))
    assert torch.equal(load_file(tmp_path / "lib.safetensors")["2.bias"], before["2.bias"][:4])


def test_transpose_twice_is_the_input_and_conv1d_becomes_linear(request, tmp_path):
    torch.manual_seed(5)
    conv1d_weight, bias = torch.randn(64, 256), torch.randn(256)  # GPT-2 Conv1D: (in, out), y = x @ W + b
    path = tmp_path / "c.safetensors"
    save_file({"mlp.c_fc.weight": conv1d_weight, "mlp.c_fc.bias": bias, "x": torch.randn(2, 3, 4)}, path)
    register_input(request, path)
    once, twice = tmp_path / "once.safetensors", tmp_path / "twice.safetensors"
    assert run("transpose", path, "-p", "mlp.c_fc.weight", "-o", once).exit_code == 0
    assert run("transpose", once, "-p", "mlp.c_fc.weight", "-o", twice).exit_code == 0
    linear = load_file(once)
    assert linear["mlp.c_fc.weight"].is_contiguous() and bits(linear["mlp.c_fc.weight"]) == \
        bits(conv1d_weight.t().contiguous())
    layer = nn.Linear(64, 256)
    layer.load_state_dict({"weight": linear["mlp.c_fc.weight"], "bias": linear["mlp.c_fc.bias"]}, strict=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ conv1d_weight + bias)
    back = load_file(twice)
    assert all(bits(back[n]) == bits(t) for n, t in load_file(path).items())
    out = tmp_path / "t.pt"
    assert run("transpose", path, "-p", "x", "--dims", "0,-1", "-o", out).exit_code == 0
    moved = torch.load(out, weights_only=True)["x"]
    assert moved.is_contiguous() and moved.untyped_storage().nbytes() == moved.numel() * 4
    assert bits(moved) == bits(load_file(path)["x"].transpose(0, 2).contiguous())
    result = run("transpose", path, "-p", "*", "--dims", "1,2", "-o", out)
    assert result.exit_code == 2 and "'mlp.c_fc.bias' has 1 dimension [256], so --dims 1 does not exist" in \
        result.stderr and "'mlp.c_fc.weight' has 2 dimensions [64, 256], so --dims 2" in result.stderr


def test_resize_and_transpose_stream_lazily(head):
    """The resized values are computed when they are read, not when the plan is applied."""
    path, _ = head
    ckpt = ps.load(str(path))
    ps.resize(ckpt, pattern=["2.*"], size=3)
    assert ckpt["2.weight"].storage.loader is not None and ckpt["2.weight"].storage.values is None


def test_a_fill_out_of_the_dtype_range_is_refused_by_the_dry_run_too(request, tmp_path):
    path = tmp_path / "h.pt"
    torch.save({"e.weight": torch.randn(4, 3).half()}, path)
    register_input(request, path)
    out = tmp_path / "o.pt"
    for extra in (["--dry-run"], ["-o", out]):
        result = run("resize", path, "-p", "e.weight", "--size", "100", "--fill", "normal(std=1e5)", "--seed", "0",
                     *extra)
        assert result.exit_code == 2 and "of 'e.weight' would become Inf or NaN" in result.stderr
    result = run("resize", path, "-p", "e.weight", "--size", "9", "--fill", "1e6", "-o", out)
    assert result.exit_code == 2 and "so --fill 1e+06 would be Inf" in result.stderr and not out.exists()
    result = run("resize", path, "-p", "e.weight", "--size", "9", "--fill", "1e6", "--allow-overflow", "-o", out)
    assert result.exit_code == 0
    assert torch.isinf(load_torch(out)["e.weight"][4:]).all()


def test_a_layer_resized_in_part_is_noted(head):
    path, _ = head
    result = run("resize", path, "-p", "2.weight", "--size", "5", "--dry-run")
    assert result.exit_code == 0
    assert "'2.bias' keeps 1000 along dim 0 though '2.weight' beside it becomes 5; select it too" in result.stderr


def test_sizes_that_cannot_be_meant(request, tmp_path):
    path = tmp_path / "e.pt"
    torch.save({"e.weight": torch.empty(0, 3), "f.weight": torch.ones(2, 3)}, path)
    register_input(request, path)
    result = run("resize", path, "-p", "e.weight", "--size", "2", "--dry-run")
    assert result.exit_code == 2 and "'e.weight' has no slices along dim 0 to take the mean of" in result.stderr
    result = run("resize", path, "-p", "f.weight", "--size", str(10**14), "--dry-run")
    assert result.exit_code == 2 and "'f.weight' would become [100000000000000, 3], more than 1 TiB" in result.stderr
    out = tmp_path / "o.pt"
    assert run("resize", path, "-p", "e.weight", "--size", "2", "--fill", "zeros", "-o", out).exit_code == 0
    assert torch.equal(load_torch(out)["e.weight"], torch.zeros(2, 3))
