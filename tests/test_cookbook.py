"""Each cookbook recipe in the README, run as written, prints what the README shows and does what its
Python does.

Who owns what: this file runs the README's cookbook blocks (each console block under a
``<!-- recipe: name -->`` marker), once each; tests/test_readme.py runs every other console block.
"""

import math
import os

import pytest
import torch
from helpers import SAMPLES, assert_only_changed, assert_same_state, bits, execute, load_torch, readme_examples, \
    same_storage, workspace
from scipy import stats

P_MIN = 1e-4


def recipes() -> dict[str, list]:
    """recipe name -> the examples of its console block, in order."""
    found: dict[str, list] = {}
    for example in readme_examples():
        if example.recipe is not None:
            found.setdefault(example.recipe, []).append(example)
    return found


def sample(name: str) -> dict:
    return torch.load(os.path.join(SAMPLES, name), weights_only=True)


def ks(values, cdf) -> float:
    return stats.kstest(values.double().flatten().numpy(), cdf).pvalue


VGG_CONVS = ["features.0.weight", "features.4.weight"]
VGG_BN = ["features.1", "features.5"]
VGG_LINEAR = ["classifier.1", "classifier.3"]


def check_copy_conv(out):
    before, after = sample("resnet.pt"), out("copied.pt")
    assert_only_changed(before, after, {"layer1.0.conv2.weight"})
    assert bits(after["layer1.0.conv2.weight"]) == bits(before["layer1.0.conv1.weight"])


def check_conv_ones(out):
    before, after = sample("vgg.pt"), out("ones.pt")
    assert_only_changed(before, after, {"features.0.weight", "features.0.bias"})
    assert torch.equal(after["features.0.weight"], torch.ones(16, 3, 3, 3))
    assert torch.equal(after["features.0.bias"], torch.zeros(16))


def check_dcgan(out):
    before, after = sample("vgg.pt"), out("dcgan.pt")
    assert_only_changed(before, after, set(VGG_CONVS) | {f"{b}.weight" for b in VGG_BN} | {f"{b}.bias" for b in VGG_BN})
    assert ks(torch.cat([after[n].flatten() for n in VGG_CONVS]), stats.norm(0, 0.02).cdf) > P_MIN
    assert ks(torch.cat([after[f"{b}.weight"] for b in VGG_BN]), stats.norm(1, 0.02).cdf) > P_MIN
    assert all(torch.equal(after[f"{b}.bias"], torch.zeros_like(before[f"{b}.bias"])) for b in VGG_BN)


def check_xavier_bn(out):
    before, after = sample("vgg.pt"), out("xavier.pt")
    assert_only_changed(before, after, set(VGG_CONVS) | {f"{b}.weight" for b in VGG_BN} | {f"{b}.bias" for b in VGG_BN})
    for name in VGG_CONVS:
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(before[name])
        assert ks(after[name], stats.norm(0, math.sqrt(2 / (fan_in + fan_out))).cdf) > P_MIN
    for block in VGG_BN:
        assert torch.equal(after[f"{block}.weight"], torch.ones_like(before[f"{block}.weight"]))
        assert torch.equal(after[f"{block}.bias"], torch.zeros_like(before[f"{block}.bias"]))


def check_he(out):
    before, after = sample("vgg.pt"), out("he.pt")
    linear = {f"{m}.{leaf}" for m in VGG_LINEAR for leaf in ("weight", "bias")}
    assert_only_changed(before, after, set(VGG_CONVS) | linear)
    for name in VGG_CONVS:
        out_channels, _, kh, kw = before[name].shape
        assert ks(after[name], stats.norm(0, math.sqrt(2.0 / (kh * kw * out_channels))).cdf) > P_MIN
    assert ks(torch.cat([after[f"{m}.weight"].flatten() for m in VGG_LINEAR]), stats.norm(0, 0.01).cdf) > P_MIN
    assert all(torch.equal(after[f"{m}.bias"], torch.ones_like(before[f"{m}.bias"])) for m in VGG_LINEAR)


def check_uniform_prune(out):
    before, after = sample("vgg.pt"), out("pruned.pt")
    assert_only_changed(before, after, {"classifier.1.weight"})
    values = after["classifier.1.weight"]
    kept = values[values != 0]
    assert kept.abs().min() >= 5 and kept.abs().max() <= 10
    assert 0.4 < (values == 0).float().mean() < 0.6  # half of uniform(-10, 10) lies within (-5, 5)
    assert ks(kept.abs(), stats.uniform(5, 5).cdf) > P_MIN


def check_xavier_linear(out):
    before, after = sample("vgg.pt"), out("linear.pt")
    assert_only_changed(before, after, {f"{m}.{leaf}" for m in VGG_LINEAR for leaf in ("weight", "bias")})
    for module in VGG_LINEAR:
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(before[f"{module}.weight"])
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert ks(after[f"{module}.weight"], stats.uniform(-bound, 2 * bound).cdf) > P_MIN
        assert torch.equal(after[f"{module}.bias"], torch.full_like(before[f"{module}.bias"], 0.1))


def check_trunc_normal(out):
    before, after = sample("gpt.pt"), out("gpt-init.pt")
    linear = [n for n in before if n.endswith("weight") and (".mlp." in n or "proj" in n)]
    assert len(linear) == 8  # in_proj, out_proj and two MLP layers in each of two blocks
    assert_only_changed(before, after, set(linear))
    assert ks(torch.cat([after[n].flatten() for n in linear]), stats.truncnorm(-100, 100, 0, 0.02).cdf) > P_MIN
    assert same_storage(after, "lm_head.weight", "wte.weight")


def check_pretrained(out):
    pretrained, fresh, after = sample("resnet.pt"), sample("resnet-5class.pt"), out("finetune.pt")
    assert_same_state(after, {n: v if n.startswith("fc.") else pretrained[n] for n, v in fresh.items()})


def check_share_linear(out):
    before, after = sample("gpt.pt"), out("shared.pt")
    assert_only_changed(before, after, {"h.1.mlp.0.weight", "h.1.mlp.0.bias"})
    for leaf in ("weight", "bias"):
        assert bits(after[f"h.1.mlp.0.{leaf}"]) == bits(before[f"h.0.mlp.0.{leaf}"])
        assert same_storage(after, f"h.1.mlp.0.{leaf}", f"h.0.mlp.0.{leaf}")


def check_zero_gamma(out):
    before, after = sample("resnet.pt"), out("zero-gamma.pt")
    gammas = {f"layer{i}.{j}.bn2.weight" for i in range(1, 5) for j in range(2)}
    assert_only_changed(before, after, gammas)
    assert all(torch.equal(after[n], torch.zeros_like(before[n])) for n in gammas)


def check_head_subset(out):
    from models import ResNet

    before, after = out("resnet-1000.pt"), out("resnet-10.pt")
    keep = torch.tensor([1, 9, 96, 207, 281, 285, 291, 340, 388, 949])
    expected = {**before, "fc.weight": before["fc.weight"][keep], "fc.bias": before["fc.bias"][keep]}
    assert_same_state(after, expected)
    model = ResNet(num_classes=10).eval()
    model.load_state_dict(after, strict=True)
    big = ResNet(num_classes=1000).eval()
    big.load_state_dict(before, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), big(x)[:, keep])


def check_new_tokens(out):
    from models import TinyGPT

    before, after = sample("gpt.pt"), out("gpt-264.pt")
    wte = before["wte.weight"]
    grown = torch.cat([wte, wte.mean(0, keepdim=True).expand(8, -1)])
    torch.testing.assert_close(after["wte.weight"], grown, rtol=0, atol=1e-7)
    assert bits(after["wte.weight"][:256]) == bits(wte)
    assert after["wte.weight"].untyped_storage().data_ptr() == after["lm_head.weight"].untyped_storage().data_ptr()
    assert_same_state({n: v for n, v in after.items() if n not in ("wte.weight", "lm_head.weight")},
                      {n: v for n, v in before.items() if n not in ("wte.weight", "lm_head.weight")})
    TinyGPT(vocab=264).load_state_dict(after, strict=True)


def check_gpt2_linear(out):
    before, after = out("gpt2.pt"), out("gpt2-linear.pt")
    x = torch.randn(3, 64)
    for i in range(2):
        fused = x @ before[f"h.{i}.attn.c_attn.weight"] + before[f"h.{i}.attn.c_attn.bias"]  # Conv1D: x W + b
        for part, leaf in enumerate("qkv"):
            layer = torch.nn.Linear(64, 64)
            layer.load_state_dict({"weight": after[f"h.{i}.attn.{leaf}_proj.weight"],
                                   "bias": after[f"h.{i}.attn.{leaf}_proj.bias"]}, strict=True)
            torch.testing.assert_close(layer(x), fused[:, 64 * part:64 * (part + 1)])
            assert bits(after[f"h.{i}.attn.{leaf}_proj.weight"]) == \
                bits(before[f"h.{i}.attn.c_attn.weight"][:, 64 * part:64 * (part + 1)].t().contiguous())
        fc = torch.nn.Linear(64, 256)
        fc.load_state_dict({"weight": after[f"h.{i}.mlp.c_fc.weight"], "bias": after[f"h.{i}.mlp.c_fc.bias"]})
        torch.testing.assert_close(fc(x), x @ before[f"h.{i}.mlp.c_fc.weight"] + before[f"h.{i}.mlp.c_fc.bias"])
    assert sorted(after) == sorted([f"h.{i}.attn.{p}_proj.{leaf}" for i in range(2) for p in "qkv"
                                    for leaf in ("weight", "bias")] + [f"h.{i}.mlp.c_fc.{leaf}" for i in range(2)
                                                                       for leaf in ("weight", "bias")])


def check_bert_top4(out):
    before, after = out("bert.pt"), out("bert-top4.pt")
    top = {n for n in before if int(n.split(".")[2]) >= 8}
    assert_only_changed(before, after, top)
    for fan_in in (64, 256):  # Linear weights and biases: U(+-1/sqrt(in_features)), pooled by fan-in
        bound = 1 / math.sqrt(fan_in)
        weights = [after[n] for n in top if n.endswith("dense.weight") or n.split(".")[-2] in ("query", "key", "value")
                   if n.endswith("weight") and after[n].shape[1] == fan_in]
        biases = [after[n] for n in top if n.endswith("bias") and "LayerNorm" not in n
                  and after[n[:-4] + "weight"].shape[1] == fan_in]
        for values in (weights, biases):
            assert ks(torch.cat([v.flatten() for v in values]), stats.uniform(-bound, 2 * bound).cdf) > P_MIN
    for name in top:
        if "LayerNorm" in name:
            expected = torch.ones(64) if name.endswith("weight") else torch.zeros(64)
            assert torch.equal(after[name], expected)


def check_merge_lora(out):
    before, after = sample("gpt.pt"), out("merged.pt")
    names = [f"h.{i}.mlp.2.weight" for i in range(2)]
    assert_only_changed(before, after, set(names))
    g = torch.Generator().manual_seed(1)  # the adapter the recipe writes, drawn again in its order
    for name in names:
        a, b = 0.1 * torch.randn((4, 256), generator=g), 0.1 * torch.randn((64, 4), generator=g)
        torch.testing.assert_close(after[name], before[name] + 8 / 4 * b @ a)


CHECKS = {"copy-conv": check_copy_conv, "conv-ones": check_conv_ones, "dcgan": check_dcgan,
          "xavier-bn": check_xavier_bn, "he": check_he, "uniform-prune": check_uniform_prune,
          "xavier-linear": check_xavier_linear, "trunc-normal": check_trunc_normal, "pretrained": check_pretrained,
          "share-linear": check_share_linear, "zero-gamma": check_zero_gamma, "head-subset": check_head_subset,
          "new-tokens": check_new_tokens, "gpt2-linear": check_gpt2_linear, "bert-top4": check_bert_top4,
          "merge-lora": check_merge_lora}


def test_every_recipe_has_a_check():
    assert sorted(recipes()) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_recipe(tmp_path, name):
    cwd = workspace(tmp_path)
    for example in recipes()[name]:
        assert execute(example.command, cwd) == example.expected, example.command
    CHECKS[name](lambda filename: load_torch(tmp_path / filename))
