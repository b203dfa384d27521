"""Trust at first use, for the commands that write: overflow is an error, user input never
reaches an internal error, files saved on GPUs load on CPUs, surprises are reported, and the
wording points at the fix. Ground truth comes from torch and safetensors themselves."""

import os

import pytest
import torch
from helpers import load_torch as load
from helpers import ROOT, run
from models import ResNet, TinyGPT


def cli(*args):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    result = run(*args)
    return result.exit_code, result.stdout, result.stderr


def one_line_error(code, stderr, *words):
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paramsurgeon: error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def big(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"w": torch.tensor([1e5, 1.0, -7e4]), "h": torch.tensor([1.0, 100.0, 2.0], dtype=torch.float16),
                "n": torch.tensor(3)}, path)
    return path


# 10. float16 overflow is an error, detected before anything is written


def test_cast_to_float16_out_of_range_is_refused(tmp_path, big):
    out = tmp_path / "o.pt"
    code, _, err = cli("cast", big, "-p", "w", "--dtype", "float16", "-o", out)
    line = one_line_error(code, err, "'w'", "2 of 3", "float16", "--allow-overflow")
    assert not out.exists()
    code, _, err = cli("cast", big, "-p", "w", "--dtype", "float16", "--dry-run")
    assert one_line_error(code, err) == line  # the dry run refuses with the same message
    code, _, err = cli("cast", big, "-p", "w", "--dtype", "float16", "--allow-overflow", "-o", out)
    assert code == 0, err
    assert torch.isinf(load(out)["w"]).sum() == 2


def test_scale_overflow_is_refused_in_fp16_and_fp32(tmp_path, big):
    out = tmp_path / "o.pt"
    code, _, err = cli("scale", big, "-p", "h", "--by", "1e6", "-o", out)
    one_line_error(code, err, "'h'", "3 of 3", "--allow-overflow")
    code, _, err = cli("scale", big, "-p", "w", "-p", "h", "--by", "1e40", "-o", out)
    one_line_error(code, err, "'w'", "'h'")  # every offender
    assert not out.exists()
    code, _, err = cli("scale", big, "-p", "h", "--by", "1e6", "--allow-overflow", "-o", out)
    assert code == 0, err
    assert torch.isinf(load(out)["h"]).all()


def test_values_that_were_already_infinite_are_not_new(tmp_path):
    path, out = tmp_path / "inf.pt", tmp_path / "o.pt"
    torch.save({"w": torch.tensor([float("inf"), 1.0, float("nan")])}, path)
    code, _, err = cli("scale", path, "-p", "w", "--by", "2", "-o", out)
    assert code == 0, err
    torch.testing.assert_close(load(out)["w"], torch.tensor([float("inf"), 2.0, float("nan")]), equal_nan=True)


def test_new_infinities_are_counted_over_pieces(tmp_path, monkeypatch):
    """The count in the refusal is the count torch gives, for a tensor spanning many pieces, some
    values already infinite or NaN (not new) in pieces of their own and beside new ones."""
    monkeypatch.setattr("paramsurgeon.checkpoint.values.CHUNK", 1000)
    values = (torch.linspace(-0.1, 0.1, 5000) * torch.arange(5000.0).cos()).to(torch.float16)
    values[[10, 2500, 4999]] = torch.tensor([float("inf"), float("nan"), -float("inf")], dtype=torch.float16)
    path = tmp_path / "h.pt"
    torch.save({"h": values}, path)
    scaled = values * 7e5
    expected = int((~torch.isfinite(scaled) & torch.isfinite(values)).sum())
    assert 0 < expected < 5000
    code, _, err = cli("scale", path, "-p", "h", "--by", "7e5", "-o", tmp_path / "o.pt")
    one_line_error(code, err, "'h'", f"{expected:,} of 5,000 values")
    assert not (tmp_path / "o.pt").exists()


def test_const_that_does_not_fit_the_dtype_is_refused(tmp_path, big):
    code, _, err = cli("init", big, "-p", "h", "--const", "1e5", "--dry-run")
    one_line_error(code, err, "'h'", "float16", "--allow-overflow")


def test_recipe_step_overflow_names_the_step(tmp_path, big):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\nop = "scale"\npattern = "h"\nby = 1e6\n')
    code, _, err = cli("apply", big, recipe, "-o", tmp_path / "o.pt")
    one_line_error(code, err, "step 1 (scale)", "'h'")
    recipe.write_text('[[step]]\nop = "scale"\npattern = "h"\nby = 1e6\nallow_overflow = true\n')
    code, _, err = cli("apply", big, recipe, "-o", tmp_path / "o.pt")
    assert code == 0, err


# 11. user input never reaches an internal error


@pytest.fixture
def resnet_pt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet.pt"
    torch.save(ResNet().state_dict(), path)
    return path


def test_apply_with_a_checkpoint_as_the_recipe(tmp_path, resnet_pt):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\nop = "zero"\npattern = "fc.*"\n')
    one_line_error(*cli("apply", resnet_pt, "-o", tmp_path / "ap.pt")[::2], "not a TOML recipe")
    one_line_error(*cli("apply", recipe, resnet_pt, "-o", tmp_path / "ap.pt")[::2], "checkpoint first")


@pytest.mark.parametrize("scheme, words", [
    ("uniform(a=1, b=-1)", ["a=1", "b=-1"]),
    ("trunc_normal(a=2, b=-2)", ["a=2"]),
    ("trunc_normal(std=0)", ["std"]),
    ("normal(std=-1)", ["std"]),
    ("sparse(sparsity=1.5)", ["sparsity"]),
    ("kaiming_uniform(mode=fan_x)", ["mode"]),
    ("kaiming_normal(nonlinearity=gelu)", ["gelu"]),
    ("xavier_uniform(gain=-1)", ["gain"]),
    ("xavier_normal(gain=leaky_relu(abc))", ["leaky_relu"]),
    ("normal(std=1e400)", ["std"]),
    ("normal(mean=1" + "0" * 400 + ")", ["mean"]),
])
def test_scheme_arguments_torch_rejects_are_refused_by_the_dry_run(tmp_path, resnet_pt, scheme, words):
    for extra in (["--dry-run"], ["-o", tmp_path / "o.pt"]):
        code, _, err = cli("init", resnet_pt, "-p", "fc.weight", "--scheme", scheme, "--seed", "1", *extra)
        one_line_error(code, err, "--scheme", *words)
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("by", ["1e40", "-1e40", "1" + "0" * 30, "1" + "0" * 400])
def test_scale_by_huge_factors_is_a_user_error(tmp_path, resnet_pt, by):
    code, _, err = cli("scale", resnet_pt, "--all", "--by", by, "-o", tmp_path / "o.pt")
    one_line_error(code, err)
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("by", ["inf", "nan", "-inf"])
def test_scale_by_non_finite_is_a_user_error(tmp_path, resnet_pt, by):
    one_line_error(*cli("scale", resnet_pt, "-p", "fc.*", "--by", by, "-o", tmp_path / "o.pt")[::2], "finite")


def test_readme_documents_exit_code_3():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Errors and exit codes")[1].split("\n## ")[0]
    assert "| 3 |" in section and "please report" in section


# 13. files saved on GPUs


@pytest.fixture
def gpu_pt(tmp_path):
    """A file whose storages record cuda:0, as torch.save writes it on a GPU (made without one)."""
    import torch.serialization as serialization

    path = tmp_path / "gpu.pt"
    original = serialization.location_tag
    serialization.location_tag = lambda storage: "cuda:0"
    try:
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters())
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    finally:
        serialization.location_tag = original
    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="CUDA"):
        load(path)
    return path


def test_inspect_shows_a_gpu_location(gpu_pt):
    code, out, _ = cli("inspect", gpu_pt)
    assert code == 0
    assert "cuda:0" in out and "--device cpu" in out
    code, out, _ = cli("inspect", gpu_pt, "--json")
    import json

    assert [t["device"] for t in json.loads(out)["tensors"]] == ["cuda:0", "cuda:0"]


def test_device_cpu_makes_the_file_load_without_a_gpu(tmp_path, gpu_pt):
    kept = tmp_path / "kept.pt"
    assert cli("convert", gpu_pt, "-o", kept)[0] == 0
    with pytest.raises(RuntimeError, match="CUDA"):
        load(kept)
    out = tmp_path / "cpu.pt"
    code, _, err = cli("convert", gpu_pt, "--device", "cpu", "-o", out)
    assert code == 0, err
    fixed, before = load(out), torch.load(gpu_pt, weights_only=True, map_location="cpu")
    for key in ("weight", "bias"):
        assert torch.equal(fixed["model"][key], before["model"][key])
    assert torch.equal(fixed["optimizer"]["state"][0]["exp_avg"], before["optimizer"]["state"][0]["exp_avg"])
    code, _, err = cli("zero", gpu_pt, "-p", "bias", "--device", "cpu", "-o", tmp_path / "z.pt")
    assert code == 0, err
    assert torch.equal(load(tmp_path / "z.pt")["model"]["bias"], torch.zeros(2))
    one_line_error(*cli("convert", gpu_pt, "--device", "cuda:1", "-o", out)[::2], "--device")


# 15. surprises are reported


def test_init_says_how_many_changed_tensors_are_buffers(tmp_path, resnet_pt):
    code, _, err = cli("init", resnet_pt, "--pattern", "layer1.*.bn*", "--const", "1", "-o", tmp_path / "o.pt")
    assert code == 0, err
    assert "12 of the 20 changed tensors are buffers" in err and "-k parameter" in err
    code, _, err = cli("init", resnet_pt, "--pattern", "layer1.*.bn*", "-k", "parameter", "--const", "1", "-o",
                       tmp_path / "o.pt")
    assert code == 0 and "buffers" not in err


def test_tie_says_the_target_values_are_discarded(tmp_path):
    path = tmp_path / "untied.pt"
    torch.manual_seed(0)
    state = TinyGPT().state_dict()
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 1
    torch.save(state, path)
    code, _, err = cli("tie", path, "--source", "wte.weight", "--target", "lm_head.weight", "-o", tmp_path / "t.pt")
    assert code == 0, err
    assert "replaces the different values of 1 target: lm_head.weight" in err
    same = tmp_path / "same.pt"
    state["lm_head.weight"] = state["wte.weight"].clone()
    torch.save(state, same)
    code, _, err = cli("tie", same, "--source", "wte.weight", "--target", "lm_head.weight", "-o", tmp_path / "t.pt")
    assert code == 0 and "different values" not in err


@pytest.fixture
def gpt_pt(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "gpt.pt"
    torch.save(TinyGPT().state_dict(), path)
    return path


def test_the_summary_counts_what_is_written(tmp_path, gpt_pt):
    from safetensors import safe_open

    out = tmp_path / "d.safetensors"
    code, _, err = cli("scale", gpt_pt, "-p", "ln_f.weight", "--by", "2", "--dedupe", "-o", out)
    assert code == 0, err
    with safe_open(out, "pt") as f:
        names = list(f.keys())
    size = os.path.getsize(out)
    assert len(names) == len(load(gpt_pt)) - 1
    written = sum(t.nbytes for t in (load_safetensors(out)).values())
    assert f"({len(names)} tensors, " in err and written < size
    from paramsurgeon.sizes import human_bytes

    assert human_bytes(written) in err
    code, _, err = cli("convert", gpt_pt, "--dedupe", "-o", tmp_path / "c.safetensors")
    assert f"{len(names)} tensors, {human_bytes(written)}" in err


def load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_which_strict_loaders_each_safetensors_form_serves(tmp_path, gpt_pt):
    from safetensors.torch import load_file, load_model

    every, deduped = tmp_path / "every.safetensors", tmp_path / "dedupe.safetensors"
    assert cli("convert", gpt_pt, "-o", every)[0] == 0
    assert cli("convert", gpt_pt, "--dedupe", "-o", deduped)[0] == 0
    reference = load(gpt_pt)
    model = TinyGPT()
    model.load_state_dict(load_file(every), strict=True)  # every name written: load_state_dict is served
    assert torch.equal(model.lm_head.weight, reference["lm_head.weight"])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_model(TinyGPT(), every, strict=True)
    model = TinyGPT()
    load_model(model, deduped, strict=True)  # one copy: safetensors' load_model is served
    assert torch.equal(model.lm_head.weight, reference["lm_head.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        TinyGPT().load_state_dict(load_file(deduped), strict=True)
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert "load_model(model, path)" in text and "load_state_dict(load_file(path))" in text


# 16. wording


def test_bare_command_prints_the_help():
    code, out, err = cli()
    assert code == 2
    assert "Usage: paramsurgeon" in err and "inspect" in err and out == ""


@pytest.mark.parametrize("command, usage", [("diff", "[OPTIONS] A B\n"), ("apply", "[OPTIONS] [CKPT] RECIPE\n"),
                                            ("inspect", "[OPTIONS] [CKPT]\n")])
def test_usage_lines_show_plain_metavars(command, usage):
    code, out, _ = cli(command, "--help")
    assert code == 0 and f"Usage: paramsurgeon {command} {usage}" in out
    assert "{" not in out.split("\n")[0]


def test_depth_without_tree_is_an_error(resnet_pt):
    one_line_error(*cli("inspect", resnet_pt, "--depth", "1")[::2], "--depth", "--tree")


def test_a_pattern_missing_the_wrapper_prefix_suggests_it(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "lightning.pt"
    state = {f"model.{k}": v for k, v in ResNet().state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state}, path)
    one_line_error(*cli("inspect", path, "-p", "fc.*")[::2], "did you mean 'model.fc.*'")


def test_copy_from_a_dataparallel_file_hints_the_mapping(tmp_path, resnet_pt):
    torch.manual_seed(0)
    source = tmp_path / "dp.pt"
    torch.save(torch.nn.DataParallel(ResNet()).state_dict(), source)
    one_line_error(*cli("copy", resnet_pt, "--source", source, "-o", tmp_path / "o.pt")[::2],
                   "--from 'module.*' --to '*'")
    one_line_error(*cli("copy", source, "--source", resnet_pt, "-o", tmp_path / "o.pt")[::2],
                   "--from '*' --to 'module.*'")


def test_odd_option_values_never_reach_an_internal_error(tmp_path):
    """Every value option of every writing command, given odd values: exit 0 or 2, never 3."""
    from paramsurgeon import declare
    from paramsurgeon.cli.commands import Sharding
    from paramsurgeon.cli.options import Read, Surgery, Write
    from paramsurgeon.ops import OPERATIONS

    base = {"init": ["-p", "fc.*", "--const", "0"], "scale": ["-p", "fc.*", "--by", "2"],
            "cast": ["-p", "fc.*", "--dtype", "float16"], "copy": ["--from", "layer1.0.*", "--to", "layer1.1.*"],
            "tie": ["--source", "layer1.0.bn1.weight", "--target", "layer1.0.bn2.weight"],
            "rename": ["--from", "fc.*", "--to", "head.*"], "quantize": ["-p", "fc.weight", "--scheme", "fp8-block"]}
    commands = {name: [op, Read, Write, Surgery] for name, op in OPERATIONS.items()} | {"convert": [Sharding, Read, Write]}
    found = []
    for command, groups in commands.items():
        flags = [d.flag.flags[-1] for g in groups for d in declare.declared(g) if d.flag.flags and d.type is not bool]
        for flag in (f for f in flags if f != "--output"):
            for value in ("-1", "1e400", "", "ü", "1" + "0" * 30, "uniform(a=0, b=1e40)"):
                args = list(base.get(command, ["-p", "fc.*"] if command != "convert" else []))
                if flag in args:
                    del args[args.index(flag):args.index(flag) + 2]
                if flag == "--scheme" and "--const" in args:  # init's --scheme replaces its --const
                    del args[args.index("--const"):args.index("--const") + 2]
                code, _, err = cli(command, os.path.join(ROOT, "samples", "resnet.pt"), *args, flag, value, "-o",
                                   tmp_path / "o.pt")
                if code == 3:
                    found.append((command, flag, value, err))
    assert not found
