"""-k's two families (layer kinds OR'ed, roles OR'ed, the families AND'ed), and name-taking
options that match nothing (an exclusion, a groups override) failing like a pattern does.
Expected names come from the torch.nn modules themselves, not from the tool."""

import json

import pytest
import torch
from torch import nn

from helpers import assert_only_changed, run


def names_of(resnet: nn.Module, classes, members=("parameters", "buffers")) -> list[str]:
    """Names of the tensors of every module of ``classes``, in state-dict order."""
    wanted = set()
    for prefix, module in resnet.named_modules():
        if isinstance(module, classes):
            for member in members:
                wanted |= {f"{prefix}.{n}" for n, _ in getattr(module, f"named_{member}")(recurse=False)}
    return [n for n in resnet.state_dict() if n in wanted]


def selected(path, *args) -> list[str]:
    result = run("inspect", path, "--json", "--no-stats", *args)
    assert result.exit_code == 0, result.stderr
    return [t["name"] for t in json.loads(result.stdout)["tensors"]]


def test_kind_families_combine_layer_or_layer_and_role(resnet_pt, resnet):
    bn_weights = [n for n in names_of(resnet, nn.BatchNorm2d, ("parameters",)) if n.endswith(".weight")]
    assert len(bn_weights) == 20
    assert selected(resnet_pt, "-k", "batchnorm", "-k", "weight") == bn_weights
    assert selected(resnet_pt, "-k", "conv", "-k", "linear") == names_of(resnet, (nn.Conv2d, nn.Linear))
    assert selected(resnet_pt, "-k", "conv", "-k", "linear", "-k", "bias") == ["fc.bias"]
    bn_and_fc_biases = [n for n in resnet.state_dict() if n.endswith(".bias")]
    assert selected(resnet_pt, "-k", "bias") == bn_and_fc_biases
    assert selected(resnet_pt, "-k", "batchnorm", "-k", "buffer") == names_of(resnet, nn.BatchNorm2d, ("buffers",))
    assert selected(resnet_pt, "-k", "buffer") == [n for n, _ in resnet.named_buffers()]
    assert selected(resnet_pt, "-k", "parameter") == [n for n, _ in resnet.named_parameters()]
    assert selected(resnet_pt, "-k", "norm", "-k", "weight", "-k", "bias") == names_of(
        resnet, nn.BatchNorm2d, ("parameters",))


def test_zero_of_batchnorm_weights_touches_nothing_else(resnet_pt, resnet, tmp_path):
    out = tmp_path / "out.pt"
    result = run("zero", resnet_pt, "-k", "batchnorm", "-k", "weight", "-o", out)
    assert result.exit_code == 0, result.stderr
    written, state = torch.load(out, weights_only=True), resnet.state_dict()
    bn = set(names_of(resnet, nn.BatchNorm2d, ("parameters",)))
    assert_only_changed(state, written, {n: torch.zeros_like(state[n]) for n in bn if n.endswith(".weight")})


def test_kind_unknown_is_accepted(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    assert selected(path, "-k", "unknown") == ["0.weight"]  # a lone 2-D weight: Linear or Embedding?
    assert selected(path, "-k", "unknown", "-k", "bias", "--allow-empty") == []


def test_unknown_kinds_are_listed_together(resnet_pt):
    result = run("inspect", resnet_pt, "-k", "bogus", "-k", "conv", "-k", "weights")
    assert result.exit_code == 2
    assert "--kind bogus, weights: unknown kinds" in result.stderr
    regexes = run("inspect", resnet_pt, "--regex", "(", "--regex", "fc.*", "--regex", "[")
    assert regexes.exit_code == 2 and "'('" in regexes.stderr and "'['" in regexes.stderr


def test_a_typo_in_an_exclusion_is_an_error(resnet_pt, tmp_path):
    out = tmp_path / "out.pt"
    result = run("zero", resnet_pt, "-p", "fc.*", "-x", "fc.bais", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    assert "--exclude 'fc.bais' matches no tensor; no name has a part 'bais': did you mean 'bias'?" in result.stderr


def test_an_exclusion_outside_the_selection_is_an_error(resnet_pt, resnet, tmp_path):
    result = run("inspect", resnet_pt, "-p", "fc.*", "-x", "conv1.weight", "-x", "fc.bias", "-x", "layer9.*")
    assert result.exit_code == 2
    assert "--exclude 'conv1.weight' excludes nothing: it matches 1 tensor (conv1.weight) but none of the" \
           " selected ones" in result.stderr
    assert "--exclude 'layer9.*' matches no tensor" in result.stderr  # every offender, in one message
    assert "fc.bias" not in result.stderr.split("error:")[1].replace("'fc.bias'", "")
    relaxed = run("zero", resnet_pt, "-p", "fc.*", "-x", "fc.bais", "--allow-empty", "-o", tmp_path / "out.pt")
    assert relaxed.exit_code == 0 and "warning: --exclude 'fc.bais' matches no tensor" in relaxed.stderr
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(written["fc.bias"], torch.zeros(10))  # what the user asked for, warned
    assert torch.equal(written["conv1.weight"], resnet.state_dict()["conv1.weight"])


def test_every_unmatched_pattern_is_listed(resnet_pt):
    result = run("inspect", resnet_pt, "-p", "fcc.*", "-p", "fc.*", "-p", "layer1.0.bn3.weight")
    assert result.exit_code == 2
    assert "--pattern 'fcc.*' matches no tensor" in result.stderr
    assert "--pattern 'layer1.0.bn3.weight' matches no tensor" in result.stderr


def test_groups_override_that_matches_nothing_is_an_error(resnet_pt, resnet):
    result = run("groups", resnet_pt, "--no-decay", "fc.wieght", "--decay", "bn9.*", "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert "--no-decay 'fc.wieght' matches no tensor; no name has a part 'wieght': did you mean 'weight'?" \
           in result.stderr
    assert "--decay 'bn9.*' matches no tensor" in result.stderr
    good = run("groups", resnet_pt, "--no-decay", "fc.weight", "--json")
    assert good.exit_code == 0 and "fc.weight" in json.loads(good.stdout)["no_decay"]


def test_groups_library_reports_unmatched_overrides_under_allow_empty(resnet_pt):
    import paramsurgeon
    from paramsurgeon.errors import SelectionError
    from paramsurgeon.analysis.groups import decay_groups

    ckpt = paramsurgeon.load(str(resnet_pt))
    with pytest.raises(SelectionError, match="--decay 'fc.bais' matches no tensor"):
        decay_groups(ckpt, ckpt.names, decay=("fc.bais",))
    warnings: list[str] = []
    groups = decay_groups(ckpt, ckpt.names, decay=("fc.bais",), warnings=warnings)
    assert "fc.bias" in groups["no_decay"] and warnings and "'fc.bais'" in warnings[0]


def test_tie_target_and_copy_from_that_match_nothing_are_errors(gpt_pt, resnet_pt, tmp_path):
    tie = run("tie", gpt_pt, "--source", "wte.weight", "--target", "lm_haed.weight", "-o", tmp_path / "t.pt")
    assert tie.exit_code == 2 and "'lm_haed.weight' matches no tensor" in tie.stderr
    assert "did you mean 'lm_head'?" in tie.stderr
    copy = run("copy", resnet_pt, "--from", "layer1.0.conv9.*", "--to", "layer1.1.conv9.*", "-o", tmp_path / "c.pt")
    assert copy.exit_code == 2 and "--from 'layer1.0.conv9.*' matches no tensor" in copy.stderr
    assert "did you mean 'conv2'?" in copy.stderr
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "c.pt").exists()
