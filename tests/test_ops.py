"""zero, scale, cast, copy, tie, untie, rename and drop: exactly the selected tensors change as
specified, everything else stays bit-identical, ties and the rest of the file survive, and the
real module still loads the result with strict=True."""

import json
import math

import pytest
import torch
from helpers import (SAMPLES, assert_only_changed, assert_same_state, bits, load_torch, register_input, run,
                     safetensors_metadata, same_storage)
from models import ResNet, TinyGPT
from safetensors.torch import load_file


def out_of(tmp_path, *args, name="out.pt"):
    result = run(*args, "-o", tmp_path / name)
    assert result.exit_code == 0, result.stderr
    return tmp_path / name, result


def test_zero_and_prune(tmp_path, resnet_pt, resnet):
    before = resnet.state_dict()
    path, result = out_of(tmp_path, "zero", resnet_pt, "-p", "layer*.1.bn2.weight")
    names = [f"layer{i}.1.bn2.weight" for i in range(1, 5)]
    assert_only_changed(before, load_torch(path), {n: torch.zeros_like(before[n]) for n in names})
    assert "zero: 4 x zero; wrote" in result.stderr
    ResNet().load_state_dict(load_torch(path), strict=True)
    pruned, _ = out_of(tmp_path, "zero", resnet_pt, "-p", "conv1.weight", "--below", "0.05", name="pruned.pt")
    w = before["conv1.weight"]
    assert_only_changed(before, load_torch(pruned), {"conv1.weight": torch.where(w.abs() < 0.05, torch.zeros(()), w)})


def test_scale(tmp_path, resnet_pt, resnet):
    before = resnet.state_dict()
    path, _ = out_of(tmp_path, "scale", resnet_pt, "-p", "fc.*", "--by", "0.5")
    assert_only_changed(before, load_torch(path), {"fc.weight": before["fc.weight"] * 0.5, "fc.bias": before["fc.bias"] * 0.5})
    bad = run("scale", resnet_pt, "-o", tmp_path / "x.pt", "-p", "*num_batches_tracked", "--by", "0.5")
    assert bad.exit_code == 2 and "is int64, and scaling it by 0.5 would truncate" in bad.stderr


@pytest.mark.parametrize("dtype, values, factor, out", [
    (torch.int8, [100, -100, 5, -128, 42], 3, 3), (torch.int8, [100, -100, 5, -128, 42], -1, 1),
    (torch.uint16, [1, 40000, 32767, 32768], 2, 2), (torch.int64, [2**62, -2**62, 5], 2, 1),
    (torch.uint64, [1, 2**63, 2**63 - 1], 2, 1), (torch.int32, [2**30, -2**30], -2, 1)])
def test_integer_scale_that_would_wrap_is_refused(tmp_path, dtype, values, factor, out):
    """torch wraps integers around silently (int8 100 * 3 is 44): scale refuses, naming how many
    values, and writes torch's wrapped product only with --allow-overflow."""
    source = tmp_path / "ints.pt"
    original = torch.tensor(values, dtype=dtype)
    torch.save({"q": original, "w": torch.ones(2)}, source)
    target = tmp_path / "scaled.pt"
    refused = run("scale", source, "-p", "q", "--by", factor, "-o", target)
    assert refused.exit_code == 2 and not target.exists()
    exact = [v * factor for v in values]
    info = torch.iinfo(dtype)
    assert sum(not info.min <= v <= info.max for v in exact) == out
    assert f"{out} of its {len(values)} values would leave that range multiplied by {factor}" in refused.stderr
    assert run("scale", source, "-p", "q", "--by", factor, "-o", target, "--allow-overflow").exit_code == 0
    assert torch.equal(load_torch(target)["q"], original * factor)
    fits = run("scale", source, "-p", "q", "--by", 1, "-o", target)
    assert fits.exit_code == 0 and torch.equal(load_torch(target)["q"], original)


@pytest.mark.parametrize("source, target, out", [
    (torch.tensor([1000.5, 5.0, -3.0, float("nan")]), torch.int8, 2),  # 1000.5 and NaN
    (torch.tensor([2.5, 1.0, 0.0, -1.0]), torch.uint8, 2),  # 2.5 and -1
    (torch.tensor([1000, 5, -128, 127]), torch.int8, 1), (torch.tensor([2**40, 5, -1, 0]), torch.int32, 1),
    (torch.tensor([1, 0, 2, 1]), torch.bool, 1), (torch.tensor([-1, 0, 255, 256], dtype=torch.int16), torch.uint8, 2)])
def test_copy_into_an_integer_tensor_that_cannot_hold_the_values_is_refused(tmp_path, source, target, out):
    """torch's copy_ wraps and truncates into integer dtypes (int8 of 1000 is -24): copy refuses, naming how
    many values do not fit, and writes torch's cast only with --allow-overflow."""
    path = tmp_path / "pair.pt"
    torch.save({"src": source, "dst": torch.zeros(4, dtype=target)}, path)
    low, high = (0, 1) if target == torch.bool else (torch.iinfo(target).min, torch.iinfo(target).max)
    fits = [math.isfinite(v) and v == int(v) and low <= v <= high for v in source.double().tolist()]
    assert fits.count(False) == out
    result = run("copy", path, "--from", "src", "--to", "dst", "-o", tmp_path / "out.pt")
    assert result.exit_code == 2 and not (tmp_path / "out.pt").exists()
    assert f"and {out} of the 4 {str(source.dtype).removeprefix('torch.')} values of 'src' do not fit it" in result.stderr
    forced = run("copy", path, "--from", "src", "--to", "dst", "-o", tmp_path / "out.pt", "--allow-overflow")
    assert forced.exit_code == 0, forced.stderr
    assert torch.equal(load_torch(tmp_path / "out.pt")["dst"][torch.tensor(fits)], source[torch.tensor(fits)].to(target))
    narrow = tmp_path / "narrow.pt"
    torch.save({"src": source[torch.tensor(fits)], "dst": torch.zeros(4 - out, dtype=target)}, narrow)
    assert run("copy", narrow, "--from", "src", "--to", "dst", "-o", tmp_path / "ok.pt").exit_code == 0
    assert torch.equal(load_torch(tmp_path / "ok.pt")["dst"], source[torch.tensor(fits)].to(target))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_plain_float8_tensors_are_computed_in_float32(tmp_path, dtype):
    """torch has no CPU arithmetic, comparison nor isfinite for float8: scale, zero --below, merge and a
    copy that casts compute in float32 and round once to the tensor's dtype (they stopped with exit 3)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g).to(dtype), torch.randn(6, 4, generator=g).to(dtype)
    other = torch.randn(6, 4, generator=g).to(torch.float8_e5m2 if dtype == torch.float8_e4m3fn else torch.float8_e4m3fn)
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": a, "o": other}, first)
    torch.save({"w": b, "o": other}, second)
    expected = {"scale": (a.float() * 2).to(dtype),
                "zero": torch.where(a.float().abs() < 0.5, torch.zeros((), dtype=dtype), a),
                "merge": ((a.float() + b.float()) / 2).to(dtype), "copy": other.to(dtype)}
    commands = {"scale": ("scale", first, "-p", "w", "--by", 2), "zero": ("zero", first, "-p", "w", "--below", 0.5),
                "merge": ("merge", first, second), "copy": ("copy", first, "--from", "o", "--to", "w")}
    for name, command in commands.items():
        out = tmp_path / f"{name}.pt"
        result = run(*command, "-o", out)
        assert result.exit_code == 0, result.stderr
        got = load_torch(out)["w"]
        assert got.dtype == dtype and bits(got) == bits(expected[name]), name


def test_cast_changes_floats_only(tmp_path, resnet_pt, resnet):
    before = resnet.state_dict()
    path, result = out_of(tmp_path, "cast", resnet_pt, "--all", "--dtype", "bf16", name="half.safetensors")
    cast = {n: v.to(torch.bfloat16) for n, v in before.items() if v.is_floating_point()}
    assert_only_changed(before, load_file(path), cast, ordered=False)
    assert "left 20 non-floating-point tensors as they are" in result.stderr
    bad = run("cast", resnet_pt, "--all", "--dtype", "int8")
    assert bad.exit_code == 2 and "choose from float32, float16, bfloat16, float64" in bad.stderr


def test_copy_between_layers_casts_to_the_target(tmp_path, resnet_pt, resnet):
    before = resnet.state_dict()
    path, _ = out_of(tmp_path, "copy", resnet_pt, "--from", "layer1.0.*", "--to", "layer1.1.*")
    expected = {n.replace("layer1.0.", "layer1.1."): v for n, v in before.items() if n.startswith("layer1.0.")}
    assert_only_changed(before, load_torch(path), expected)
    mismatch = run("copy", resnet_pt, "-o", tmp_path / "x.pt", "--from", "layer1.0.conv1.weight",
                   "--to", "layer2.0.conv1.weight")
    assert mismatch.exit_code == 2
    assert "shape mismatch for 'layer1.0.conv1.weight' [8, 8, 3, 3] -> 'layer2.0.conv1.weight' [16, 8, 3, 3];" \
           " pass --skip-mismatched" in mismatch.stderr
    missing = run("copy", resnet_pt, "-o", tmp_path / "x.pt", "--from", "fc.*", "--to", "head.*")
    assert missing.exit_code == 2 and "no target tensor named 'head.weight'" in missing.stderr


def test_copy_from_pretrained_keeps_the_new_head(tmp_path, resnet_pt, resnet):
    torch.manual_seed(5)
    fresh = ResNet(num_classes=5)
    target = tmp_path / "fresh.pt"
    torch.save(fresh.state_dict(), target)
    refused = run("copy", target, "-o", tmp_path / "x.pt", "--source", resnet_pt)
    assert refused.exit_code == 2 and "shape mismatch for 'fc.weight' [10, 32] -> 'fc.weight' [5, 32]" in refused.stderr
    path, result = out_of(tmp_path, "copy", target, "--source", resnet_pt, "--skip-mismatched")
    after = load_torch(path)
    pretrained = resnet.state_dict()
    assert_same_state(after, {n: v if n.startswith("fc.") else pretrained[n] for n, v in fresh.state_dict().items()})
    assert "skipped 2 with a shape mismatch: fc.weight [5, 32] vs [10, 32], fc.bias [5] vs [10]" in result.stderr
    ResNet(num_classes=5).load_state_dict(after, strict=True)


def test_copy_reports_names_on_one_side_only(tmp_path, resnet_pt):
    source = tmp_path / "partial.safetensors"
    assert run("drop", resnet_pt, "-p", "layer4.*", "-o", source).exit_code == 0
    extra = tmp_path / "extra.pt"
    state = torch.load(resnet_pt, weights_only=True)
    torch.save({**state, "aux.weight": torch.ones(2)}, extra)
    _, result = out_of(tmp_path, "copy", extra, "--source", source)
    assert "only in the target, kept (31): layer4.0.conv1.weight" in result.stderr  # 30 of layer4, and aux


def test_tie_and_untie(tmp_path, resnet_pt, resnet):
    before = resnet.state_dict()
    tied, result = out_of(tmp_path, "tie", resnet_pt, "--source", "layer1.0.conv1.weight",
                          "--target", "layer1.*.conv2.weight")
    after = load_torch(tied)
    assert same_storage(after, "layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight")
    targets = ("layer1.0.conv2.weight", "layer1.1.conv2.weight")
    assert_only_changed(before, after, {n: before["layer1.0.conv1.weight"] for n in targets})
    document = json.loads(run("inspect", tied, "--json", "--no-stats").stdout)
    assert document["totals"]["parameters"] == sum(p.numel() for p in resnet.parameters()) - 2 * 576
    untied, _ = out_of(tmp_path, "untie", tied, "-p", "layer1.1.conv2.weight", name="untied.pt")
    state = load_torch(untied)
    assert same_storage(state, "layer1.0.conv1.weight", "layer1.0.conv2.weight")
    assert not same_storage(state, "layer1.0.conv1.weight", "layer1.1.conv2.weight")
    assert_same_state(state, after)  # untying keeps every value
    mismatch = run("tie", resnet_pt, "-o", tmp_path / "x.pt", "--source", "fc.weight", "--target", "fc.bias")
    assert mismatch.exit_code == 2 and "cannot share the storage of 'fc.weight'" in mismatch.stderr


def test_tie_into_safetensors_records_the_tie(tmp_path, resnet_pt):
    path, _ = out_of(tmp_path, "tie", resnet_pt, "--source", "layer1.0.conv1.weight", "--target", "layer1.0.conv2.weight",
                     name="tied.safetensors")
    metadata = safetensors_metadata(path)
    assert json.loads(metadata["paramsurgeon.ties"]) == [["layer1.0.conv1.weight", "layer1.0.conv2.weight"]]
    assert "tie to layer1.0.conv1.weight" in metadata["paramsurgeon.operations"]
    back, _ = out_of(tmp_path, "convert", path, name="back.pt")
    assert same_storage(load_torch(back), "layer1.0.conv1.weight", "layer1.0.conv2.weight")


def test_rename_strips_data_parallel_prefix(tmp_path, resnet):
    wrapped = torch.nn.DataParallel(resnet)
    path = tmp_path / "dp.pt"
    torch.save(wrapped.state_dict(), path)
    renamed, _ = out_of(tmp_path, "rename", path, "--from", "module.*", "--to", "*")
    state = load_torch(renamed)
    assert list(state) == list(resnet.state_dict())
    assert "layer1.0.bn1" in state._metadata and "module.layer1.0.bn1" not in state._metadata
    ResNet().load_state_dict(state, strict=True)
    clash = run("rename", path, "-o", tmp_path / "x.pt", "--from", "module.*.weight", "--to", "module.*.bias")
    assert clash.exit_code == 2
    assert "'module.bn1.weight' and 'module.bn1.bias' would both be named 'module.bn1.bias'" in clash.stderr


def test_drop_needs_a_selection(tmp_path, resnet_pt, resnet):
    refused = run("drop", resnet_pt, "-o", tmp_path / "x.pt")
    assert refused.exit_code == 2 and "choose tensors with -p/--pattern" in refused.stderr
    path, _ = out_of(tmp_path, "drop", resnet_pt, "-p", "fc.*")
    assert list(load_torch(path)) == [n for n in resnet.state_dict() if not n.startswith("fc.")]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, resnet_pt):
    out = tmp_path / "never.pt"
    result = run("cast", resnet_pt, "-p", "fc.*", "--dtype", "float16", "-o", out, "--dry-run")
    assert result.exit_code == 0 and not out.exists()
    lines = result.stdout.splitlines()
    assert lines[0] == "cast: 2 tensors would change (dry run: nothing written)"
    assert lines[3].split() == ["fc.weight", "10x32", "f32", "->", "f16", "cast", "to", "float16"]
    document = json.loads(run("zero", resnet_pt, "-p", "fc.bias", "--dry-run", "--json").stdout)
    assert document["changes"] == [{"name": "fc.bias", "shape": [10], "dtype": "float32", "action": "zero",
                                    "new_shape": [10], "new_dtype": "float32"}]


def test_optimizer_state_is_flagged_and_can_be_reset(tmp_path, training_pt):
    path, result = out_of(tmp_path, "zero", training_pt, "-p", "fc.bias")
    assert "also holds optimizer state at 'optimizer' (Adam state for 62 params" in result.stderr
    assert "--reset-optimizer" in result.stderr
    original = load_torch(training_pt)
    assert load_torch(path)["optimizer"]["state"].keys() == original["optimizer"]["state"].keys()
    reset, result = out_of(tmp_path, "zero", training_pt, "-p", "fc.bias", "--reset-optimizer", name="reset.pt")
    state = load_torch(reset)
    assert state["optimizer"]["state"] == {} and state["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    assert state["epoch"] == 7 and torch.equal(state["state_dict"]["fc.bias"], torch.zeros(10))
    model = ResNet()
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.load_state_dict(state["optimizer"])  # a clean restart still loads


def test_pipeline_init_on_stdin_to_stdout(tmp_path):
    """paramsurgeon init --pattern 'layer1.*.bn*' --const 1 < a.pt > b.pt, on the ResNet sample."""
    import subprocess
    import sys

    with open(f"{SAMPLES}/resnet.pt", "rb") as stdin, open(tmp_path / "b.pt", "wb") as stdout:
        result = subprocess.run([sys.executable, "-m", "paramsurgeon", "init", "--pattern", "layer1.*.bn*", "--const", "1"],
                                stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, timeout=120)
    assert result.returncode == 0, result.stderr
    before = load_torch(f"{SAMPLES}/resnet.pt")
    expected = {n: torch.ones_like(v) for n, v in before.items() if n.startswith("layer1.") and ".bn" in n}
    assert_only_changed(before, load_torch(tmp_path / "b.pt"), expected)


def test_every_problem_is_reported_at_once(tmp_path, gpt_pt):
    result = run("init", gpt_pt, "-o", tmp_path / "x.pt", "-p", "ln_f.*", "-p", "lm_head.*", "-p", "wpe.weight",
                 "--scheme", "orthogonal", "--seed", "1")
    assert result.exit_code == 2
    assert "lm_head.weight' shares its storage" in result.stderr  # ties are checked first, for every tensor
    result = run("init", gpt_pt, "-o", tmp_path / "x.pt", "-p", "ln_f.*", "-p", "wpe.weight", "--scheme", "orthogonal",
                 "--seed", "1")
    assert "'ln_f.weight' has 1 dimension" in result.stderr and "'ln_f.bias' has 1 dimension" in result.stderr


def test_safetensors_output_records_the_operations(tmp_path):
    path, _ = out_of(tmp_path, "zero", f"{SAMPLES}/gpt.safetensors", "-p", "ln_f.bias", name="z.safetensors")
    again, _ = out_of(tmp_path, "scale", path, "-p", "wpe.weight", "--by", "2", name="s.safetensors")
    operations = safetensors_metadata(again)["paramsurgeon.operations"]
    assert json.loads(operations) == ["zero: ln_f.bias", "scale by 2: wpe.weight"]
    TinyGPT().load_state_dict(load_file(again), strict=True)


@pytest.mark.parametrize("args", [["zero", "-p", "h.0.*"], ["scale", "-p", "h.*.mlp.*", "--by", "3"],
                                  ["cast", "-p", "wpe.weight", "--dtype", "float64"]])
def test_gpt_still_loads_and_keeps_its_tie(tmp_path, gpt_pt, args):
    path, _ = out_of(tmp_path, args[0], gpt_pt, *args[1:])
    state = load_torch(path)
    assert state["wte.weight"].untyped_storage().data_ptr() == state["lm_head.weight"].untyped_storage().data_ptr()
    TinyGPT().load_state_dict(state, strict=True)


@pytest.fixture
def gpt_training(request, tmp_path, gpt):
    """A nested training checkpoint of the tied GPT: state_dict, AdamW state, epoch, hyper-parameters."""
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=3e-4)
    gpt(torch.randint(0, 256, (2, 8))).sum().backward()
    optimizer.step()
    path = tmp_path / "gpt-training.pt"
    torch.save({"state_dict": gpt.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
                "hyper_parameters": {"lr": 3e-4, "layers": 2}}, path)
    return register_input(request, path)


OPERATIONS = [
    ["init", "-p", "h.0.mlp.*", "--scheme", "default", "--seed", "1"],
    ["init", "-k", "layernorm", "--const", "1"],
    ["zero", "-p", "h.1.ln_2.bias"],
    ["zero", "-p", "h.*.mlp.0.weight", "--below", "0.01"],
    ["scale", "-p", "wpe.weight", "--by", "0.5"],
    ["cast", "-p", "h.0.*", "--dtype", "float64"],
    ["copy", "--from", "h.0.ln_1.*", "--to", "h.1.ln_1.*"],
    ["tie", "--source", "h.0.mlp.2.bias", "--target", "h.1.mlp.2.bias"],
    ["untie", "-p", "lm_head.weight"],
    ["rename", "--from", "h.*", "--to", "blocks.*"],
    ["drop", "-p", "wpe.weight"],
]


@pytest.mark.parametrize("args", OPERATIONS, ids=[" ".join(a[:2]) for a in OPERATIONS])
def test_every_operation_keeps_the_rest_of_the_file(tmp_path, gpt_training, args):
    out = tmp_path / "out.pt"
    result = run(args[0], gpt_training, *args[1:], "-o", out)
    assert result.exit_code == 0, result.stderr
    before, after = load_torch(gpt_training), load_torch(out)
    assert list(after) == list(before) and after["epoch"] == 3 and after["hyper_parameters"] == before["hyper_parameters"]
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
    for index, slots in before["optimizer"]["state"].items():
        for slot, value in slots.items():
            assert bits(after["optimizer"]["state"][index][slot]) == bits(value)
    state = after["state_dict"]
    if args[0] == "rename":
        state = {k.replace("blocks.", "h.", 1) if k.startswith("blocks.") else k: v for k, v in state.items()}
    if args[0] != "untie":
        assert state["wte.weight"].untyped_storage().data_ptr() == state["lm_head.weight"].untyped_storage().data_ptr()
    if args[0] == "drop":
        assert "wpe.weight" not in state
        return
    TinyGPT().load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    # Adam's moments no longer match new values; renaming and untying keep every value
    advised = "optimizer state at 'optimizer'" in result.stderr
    assert advised == (args[0] not in ("rename", "untie")), result.stderr


def test_tie_to_safetensors_with_dedupe(tmp_path, resnet_pt):
    path, _ = out_of(tmp_path, "tie", resnet_pt, "--source", "layer1.0.conv1.weight", "--target", "layer1.0.conv2.weight",
                     "--dedupe", name="tied.safetensors")
    assert "layer1.0.conv2.weight" not in load_file(path)
    assert json.loads(safetensors_metadata(path)["paramsurgeon.ties"]) == [["layer1.0.conv1.weight",
                                                                            "layer1.0.conv2.weight"]]
    back, _ = out_of(tmp_path, "convert", path, name="back.pt")  # the dropped name comes back, tied
    assert same_storage(load_torch(back), "layer1.0.conv1.weight", "layer1.0.conv2.weight")


def test_allow_empty_on_a_writing_command(tmp_path, resnet_pt, resnet):
    path, result = out_of(tmp_path, "zero", resnet_pt, "-p", "no.such.*", "-p", "fc.bias", "--allow-empty")
    assert "zero: warning: --pattern 'no.such.*' matches no tensor" in result.stderr
    assert_only_changed(resnet.state_dict(), load_torch(path), {"fc.bias": torch.zeros(10)})
    refused = run("zero", resnet_pt, "-p", "no.such.*", "-p", "fc.bias", "-o", tmp_path / "x.pt")
    assert refused.exit_code == 2 and not (tmp_path / "x.pt").exists()
