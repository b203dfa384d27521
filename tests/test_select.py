"""Selection by glob, regex, exclusion and layer kind; kinds inferred where names say nothing."""

import json
import re

import pytest
import torch
from torch import nn

import paramsurgeon
from helpers import run
from paramsurgeon.checkpoint.kinds import infer_kinds


def kinds_of(module: nn.Module, tmp_path) -> dict[str, tuple[str, str]]:
    path = tmp_path / "m.pt"
    torch.save(module.state_dict(), path)
    ckpt = paramsurgeon.load(str(path))
    return {name: (k.layer, k.role) for name, k in infer_kinds(ckpt.tensors).items()}


def test_kinds_inside_sequential_without_name_hints(tmp_path):
    body = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv1d(8, 8, 3, bias=False), nn.BatchNorm1d(8, affine=False)),
        nn.ConvTranspose2d(8, 4, 2), nn.Flatten(), nn.Linear(16, 10), nn.LayerNorm(10), nn.GroupNorm(2, 10),
        nn.Linear(10, 10, bias=False), nn.Embedding(7, 3), nn.PReLU(), nn.Conv3d(2, 2, 1))
    kinds = kinds_of(nn.Sequential(nn.Sequential(body)), tmp_path)
    p = "0.0."
    assert kinds[p + "0.weight"] == ("conv", "weight") and kinds[p + "0.bias"] == ("conv", "bias")
    assert kinds[p + "1.weight"] == ("batchnorm", "weight")
    assert kinds[p + "1.running_var"] == ("batchnorm", "buffer")
    assert kinds[p + "1.num_batches_tracked"] == ("batchnorm", "buffer")
    assert kinds[p + "3.0.weight"] == ("conv", "weight")
    assert kinds[p + "3.1.running_mean"] == ("batchnorm", "buffer")  # BatchNorm without affine
    assert kinds[p + "4.weight"] == ("conv", "weight") and kinds[p + "4.bias"] == ("conv", "bias")
    assert kinds[p + "6.weight"] == ("linear", "weight") and kinds[p + "6.bias"] == ("linear", "bias")
    # LayerNorm and GroupNorm look the same by shape: a normalisation, no finer guess.
    assert kinds[p + "7.weight"] == ("norm", "weight") and kinds[p + "8.bias"] == ("norm", "bias")
    # A 2-D weight alone may be a bias-free Linear or an Embedding: unknown, not a guess.
    assert kinds[p + "9.weight"] == ("unknown", "weight")
    assert kinds[p + "10.weight"] == ("unknown", "weight")
    assert kinds[p + "11.weight"] == ("unknown", "weight")  # PReLU's (1,) weight says nothing by itself
    assert kinds[p + "12.weight"] == ("conv", "weight")


def test_kinds_from_names_when_shapes_are_ambiguous(tmp_path, gpt):
    kinds = kinds_of(gpt, tmp_path)
    assert kinds["wte.weight"] == ("embedding", "weight") and kinds["wpe.weight"] == ("embedding", "weight")
    assert kinds["lm_head.weight"] == ("linear", "weight")
    assert kinds["h.0.ln_1.weight"] == ("layernorm", "weight")
    assert kinds["h.0.mlp.0.weight"] == ("linear", "weight")
    assert kinds["h.0.attn.out_proj.bias"] == ("linear", "bias")
    assert kinds["h.0.attn.in_proj_weight"] == ("linear", "weight")  # MultiheadAttention's fused q, k, v
    assert kinds["h.0.attn.in_proj_bias"] == ("linear", "bias")

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.act_prelu = nn.PReLU(4)
            self.final_norm = nn.LayerNorm(4, bias=False)
            self.rms_norm = nn.RMSNorm(4)
            self.gn1 = nn.GroupNorm(2, 4)

    named = kinds_of(Named(), tmp_path)
    assert named["act_prelu.weight"][0] == "prelu"
    assert named["final_norm.weight"][0] == "rmsnorm"  # a norm's weight alone reads as RMSNorm (Llama's, T5's)
    assert named["rms_norm.weight"][0] == "rmsnorm"
    assert named["gn1.weight"][0] == "groupnorm"


def test_kind_selects_batchnorm_buried_in_sequential(tmp_path):
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Identity(), nn.BatchNorm2d(4))))
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    document = json.loads(run("inspect", path, "--json", "-k", "batchnorm", "-k", "weight").stdout)
    # a layer kind and a role combine with AND: the BatchNorm's weight, not every weight
    assert [t["name"] for t in document["tensors"]] == ["0.1.1.weight"]
    norm = json.loads(run("inspect", path, "--json", "-k", "norm", "-x", "*.num_batches_tracked").stdout)
    assert len(norm["tensors"]) == 4


def test_glob_crosses_dots_and_matches_whole_names(resnet_pt, resnet):
    names = list(resnet.state_dict())
    ckpt = paramsurgeon.load(str(resnet_pt))
    chosen = paramsurgeon.select(ckpt, ["layer1.*.bn*"])
    assert "layer1.0.bn1.weight" in chosen and "layer1.1.bn2.running_var" in chosen
    assert chosen == [n for n in names if n.startswith("layer1.") and ".bn" in n]
    assert paramsurgeon.select(ckpt, ["fc.weigh?"]) == ["fc.weight"]
    assert paramsurgeon.select(ckpt, ["layer[12].0.conv1.weight"]) == ["layer1.0.conv1.weight", "layer2.0.conv1.weight"]
    assert paramsurgeon.select(ckpt, regex=[r"layer\d\.1\.conv2\.weight"]) == \
        [f"layer{i}.1.conv2.weight" for i in range(1, 5)]
    # a regex must match the whole name, not a part of it
    with pytest.raises(paramsurgeon.ParamSurgeonError):
        paramsurgeon.select(ckpt, regex=["conv2"])
    assert paramsurgeon.select(ckpt, ["*conv1.weight"], exclude=["layer*"]) == ["conv1.weight"]


def test_a_regex_matching_part_of_names_suggests_the_whole_name_regex(resnet_pt):
    """A --regex that matches the start or a middle of names (re.match / re.search would take it)
    says that it must match the whole name and offers a regex that does; the offer selects what
    the user meant. It is not read as a glob ('layer1\\' is no part of any name)."""
    names = list(torch.load(resnet_pt))
    for typed, meant in [(r"layer1\.0", lambda n: n.startswith("layer1.0")),
                         (r"bn2\.weight", lambda n: n.endswith(".bn2.weight"))]:
        result = run("inspect", resnet_pt, "--regex", typed, "--no-stats")
        assert result.exit_code == 2 and "must match the whole name" in result.stderr and "part" not in result.stderr
        offered = re.search(r"did you mean '([^']+)'", result.stderr).group(1)
        shown = json.loads(run("inspect", resnet_pt, "--regex", offered, "--no-stats", "--json").stdout)
        assert [t["name"] for t in shown["tensors"]] == [n for n in names if meant(n)]


def test_union_of_patterns_in_checkpoint_order(resnet_pt):
    ckpt = paramsurgeon.load(str(resnet_pt))
    assert paramsurgeon.select(ckpt, ["fc.*", "conv1.*"]) == ["conv1.weight", "fc.weight", "fc.bias"]


def test_no_match_is_an_error_with_suggestions(resnet_pt):
    result = run("inspect", resnet_pt, "-p", "layer1.0.bn3.weight")
    assert result.exit_code == 2
    assert "closest names: layer1.0.bn1.weight" in result.stderr or "layer1.0.bn2.weight" in result.stderr
    prefix = run("inspect", resnet_pt, "-p", "layer1")
    assert "did you mean 'layer1.*'" in prefix.stderr


def test_nested_prefix_hint(training_pt):
    result = run("inspect", training_pt, "-p", "state_dict.fc.weight")
    assert result.exit_code == 2 and "drop that prefix: 'fc.weight'" in result.stderr


def test_allow_empty_warns_instead(resnet_pt):
    result = run("inspect", resnet_pt, "-p", "nothing.*", "-p", "fc.*", "--allow-empty", "--json")
    assert result.exit_code == 0 and "warning: --pattern 'nothing.*' matches no tensor" in result.stderr
    assert [t["name"] for t in json.loads(result.stdout)["tensors"]] == ["fc.weight", "fc.bias"]


def test_every_selector_must_match(resnet_pt):
    result = run("inspect", resnet_pt, "-p", "fc.*", "--regex", "nope.*")
    assert result.exit_code == 2 and "--regex 'nope.*' matches no tensor" in result.stderr
    kind = run("inspect", resnet_pt, "-k", "embedding")
    assert kind.exit_code == 2 and "--kind embedding matches no tensor" in kind.stderr
