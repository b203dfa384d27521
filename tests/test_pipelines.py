"""diff, check, apply and groups: exit codes, reports and JSON documents for CI."""

import json
import math
import os
import shutil

import pytest
import torch
from helpers import (SAMPLES, bits, file_bytes, json_of, load_torch, run, run_on_terminal, run_process, same_storage,
                     validate)
from models import TinyGPT


# diff


def test_diff_identical_across_formats(tmp_path, resnet_pt):
    st = tmp_path / "m.safetensors"
    run("convert", resnet_pt, "-o", st)
    document = json_of("diff", resnet_pt, st, schema="diff")
    assert document["equal"] and document["identical"] == 122 and document["changed"] == []
    assert run("diff", resnet_pt, st).stdout.startswith(f"{resnet_pt} (A) vs {st} (B): equal: 122 identical")


def test_diff_refuses_standard_input_twice(resnet_pt):
    with open(resnet_pt, "rb") as f:
        result = run("diff", "-", "-", input=f.read())
    assert result.exit_code == 2
    assert result.stderr == "paramsurgeon: error: diff: only one checkpoint can come from standard input ('-')\n"


def test_diff_reports_changed_values_as_torch_computes_them(tmp_path, resnet_pt, resnet):
    changed = tmp_path / "changed.pt"
    run("scale", resnet_pt, "-p", "fc.weight", "--by", "1.5", "-o", changed)
    document = json_of("diff", resnet_pt, changed, schema="diff", code=1)
    (entry,) = document["changed"]
    a = resnet.state_dict()["fc.weight"].double()
    b = (resnet.state_dict()["fc.weight"] * 1.5).double()
    assert entry["name"] == "fc.weight" and entry["status"] == "different"
    assert entry["max_abs"] == pytest.approx((a - b).abs().max().item())
    assert entry["max_rel"] == pytest.approx(((a - b).abs() / b.abs()).max().item())
    assert entry["mismatched"] == int((a != b).sum())
    loose = json_of("diff", resnet_pt, changed, "--rtol", "0.34", schema="diff")
    assert loose["equal"] and loose["changed"][0]["status"] == "close"


def test_diff_names_shapes_and_dtypes(tmp_path, resnet_pt):
    other = tmp_path / "other.pt"
    state = torch.load(resnet_pt, weights_only=True)
    del state["fc.bias"]
    state["conv1.weight"] = state["conv1.weight"].half()
    state["fc.weight"] = torch.zeros(3, 32)
    state["extra"] = torch.ones(2)
    torch.save(state, other)
    document = json_of("diff", resnet_pt, other, schema="diff", code=1)
    assert document["only_a"] == ["fc.bias"] and document["only_b"] == ["extra"]
    status = {c["name"]: c["status"] for c in document["changed"]}
    assert status == {"conv1.weight": "dtype", "fc.weight": "shape"}
    headers_only = json_of("diff", resnet_pt, other, "--no-values", schema="diff", code=1)
    assert headers_only["values_compared"] is False and headers_only["identical"] == 119


def test_diff_with_nans(tmp_path):
    values = torch.tensor([1.0, float("nan"), 3.0])
    for name, tensor in (("a.pt", values), ("b.pt", values.clone()), ("c.pt", torch.tensor([1.0, 2.0, 3.0]))):
        torch.save({"w": tensor}, tmp_path / name)
    assert json_of("diff", tmp_path / "a.pt", tmp_path / "b.pt", schema="diff")["equal"]  # NaN where NaN
    document = json_of("diff", tmp_path / "a.pt", tmp_path / "c.pt", "--atol", "10", schema="diff", code=1)
    assert document["changed"][0]["max_abs"] == "inf" and document["changed"][0]["mismatched"] == 1


def test_diff_selection_and_other_entries(training_pt, tmp_path):
    later = tmp_path / "later.pt"
    state = torch.load(training_pt, weights_only=True)
    state["epoch"] = 8
    torch.save(state, later)
    document = json_of("diff", training_pt, later, "-p", "fc.*", schema="diff")  # those tensors only
    assert document["identical"] == 2 and document["equal"] and not document["whole_file"]
    assert document["extras"] == []
    whole = json_of("diff", training_pt, later, schema="diff", code=1)
    assert whole["whole_file"] and whole["extras"] == [{"path": "epoch", "a": "7", "b": "8"}]


# check


def test_check_finite_on_good_and_bad(tmp_path, resnet_pt):
    assert json_of("check", resnet_pt, schema="check")["rules"] == [{"rule": "finite", "ok": True, "violations": []}]
    bad = tmp_path / "nan.pt"
    state = torch.load(resnet_pt, weights_only=True)
    state["fc.weight"][0, 0] = float("nan")
    state["layer1.0.bn1.bias"][3] = float("inf")
    torch.save(state, bad)
    result = run("check", bad, "--finite")
    assert result.exit_code == 1
    assert "FAIL finite: 2 violations" in result.stdout
    assert "layer1.0.bn1.bias has 0 NaN and 1 Inf of 8 values" in result.stdout
    document = json_of("check", bad, "--finite", schema="check", code=1)
    assert [v["name"] for v in document["rules"][0]["violations"]] == ["layer1.0.bn1.bias", "fc.weight"]


def test_check_bounds_shapes_and_references(tmp_path, resnet_pt, gpt_pt):
    keys = tmp_path / "keys.txt"
    keys.write_text("# the head\nfc.weight 10x32 float32\nfc.bias [10]\nconv1.weight 8x3x7x7 float16\nmissing.weight\n")
    document = json_of("check", resnet_pt, "--max-abs", "0.3", "--expect", "fc.weight=10x32", "--expect",
                       "conv1.weight=[8, 3, 5, 5]", "--expect-file", keys, "--like", gpt_pt, "--dtype", "fp32",
                       schema="check", code=1)
    rules = {r["rule"]: r for r in document["rules"]}
    assert not rules["max-abs 0.3"]["ok"] and rules["dtype float32"]["ok"]
    expect = {v["name"]: v["message"] for v in rules["expect"]["violations"]}
    assert expect == {"conv1.weight": "is float32, expected float16", "missing.weight": "is missing"}
    like = rules[f"like {gpt_pt}"]["violations"]
    assert {"name": "wte.weight", "message": f"is missing (it is in {gpt_pt})"} in like
    assert json_of("check", resnet_pt, "--like", resnet_pt, "--max-abs", "10", schema="check")["ok"]


def sharded_copy(tmp_path) -> str:
    folder = tmp_path / "sharded"
    shutil.copytree(os.path.join(SAMPLES, "resnet-sharded"), folder)
    return folder


def test_check_sharded_integrity(tmp_path):
    folder = sharded_copy(tmp_path)
    assert json_of("check", folder, schema="check")["ok"]
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    os.remove(folder / "model-00002-of-00003.safetensors")
    document = json_of("check", folder, schema="check", code=1)
    assert document["rules"][0]["rule"] == "shards"
    assert "shard model-00002-of-00003.safetensors is missing" in document["rules"][0]["violations"][0]["message"]

    shutil.rmtree(folder)
    folder = sharded_copy(tmp_path)
    moved = next(n for n, s in index["weight_map"].items() if s.startswith("model-00001"))
    index["weight_map"][moved] = "model-00003-of-00003.safetensors"
    index["metadata"]["total_size"] += 4
    index_path.write_text(json.dumps(index))
    messages = [v["message"] for v in json_of("check", folder, schema="check", code=1)["rules"][0]["violations"]]
    assert "is in model-00001-of-00003.safetensors but the index lists it for model-00003-of-00003.safetensors" in messages
    assert "the index says total_size 273452 but the shards hold 273448 bytes of tensors" in messages

    shutil.rmtree(folder)
    folder = sharded_copy(tmp_path)
    shard = folder / "model-00003-of-00003.safetensors"
    shard.write_bytes(file_bytes(shard)[:-100])
    result = run("check", folder)
    assert result.exit_code == 1 and "shard model-00003-of-00003.safetensors is unreadable: " in result.stdout
    # what an unreadable shard holds is not known: its tensors are not each reported as absent from it
    violations = json_of("check", folder, schema="check", code=1)["rules"][0]["violations"]
    assert [v["message"].split(":")[0] for v in violations] == ["shard model-00003-of-00003.safetensors is unreadable"]
    assert run("inspect", folder).exit_code == 2  # reading it is an input error; checking it is a finding


# apply

RECIPE = """
seed = 3

[[step]]
op = "init"
kind = "conv"
pattern = "*.weight"
scheme = "kaiming_normal(mode=fan_out, nonlinearity=relu)"

[[step]]
op = "zero"
pattern = ["layer*.*.bn2.weight"]

[[step]]
op = "cast"
pattern = "fc.*"
dtype = "float16"

[[step]]
op = "rename"
from = "layer*"
to = "stage*"
"""


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_apply_equals_the_commands_one_after_another(tmp_path, resnet_pt, suffix):
    steps = [["init", "-k", "conv", "-p", "*.weight", "--scheme", "kaiming_normal(mode=fan_out, nonlinearity=relu)",
              "--seed", "3"], ["zero", "-p", "layer*.*.bn2.weight"], ["cast", "-p", "fc.*", "--dtype", "float16"],
             ["rename", "--from", "layer*", "--to", "stage*"]]
    current = resnet_pt
    for i, step in enumerate(steps):
        folder = tmp_path / f"step{i}"
        folder.mkdir()
        result = run(step[0], current, *step[1:], "-o", folder / f"out{suffix}")
        assert result.exit_code == 0, result.stderr
        current = folder / f"out{suffix}"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    (tmp_path / "applied").mkdir()
    applied = tmp_path / "applied" / f"out{suffix}"
    result = run("apply", resnet_pt, recipe, "-o", applied)
    assert result.exit_code == 0, result.stderr
    assert file_bytes(applied) == file_bytes(current)


def test_apply_reads_once_and_writes_once_through_a_pipe(tmp_path, resnet_pt):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    with open(resnet_pt, "rb") as stdin:
        result = run_process("apply", recipe, stdin=stdin)
    assert result.returncode == 0, result.stderr
    (tmp_path / "out.pt").write_bytes(result.stdout)
    state = load_torch(tmp_path / "out.pt")
    assert "stage1.0.conv1.weight" in state and state["fc.weight"].dtype == torch.float16
    assert torch.equal(state["stage1.1.bn2.weight"], torch.zeros(8))


@pytest.mark.parametrize("recipe,message", [
    ('[[step]]\nop = "zero"\npatern = "fc.*"\n', "step 1 (zero): zero has no option 'patern'"),
    ('[[step]]\nop = "squash"\n', "step 1 (squash): unknown op 'squash'; choose from init, zero"),
    ('[[step]]\nop = "scale"\npattern = "fc.*"\nby = "two"\n', "step 1 (scale): 'by' must be a number"),
    ('[[step]]\nop = "zero"\npattern = "fc.*"\n[[step]]\nop = "drop"\npattern = "fc.*"\n'
     '[[step]]\nop = "zero"\npattern = "fc.weight"\n', "step 3 (zero): --pattern 'fc.weight' matches no tensor"),
    ('[[step]]\nop = "init"\npattern = "fc.bias"\nscheme = "orthogonal"\n',
     "step 1 (init): init: 'fc.bias' has 1 dimension"),
    ("[[step]\n", "not valid TOML"),
    ('speed = 3\n[[step]]\nop = "zero"\n', "unknown top-level key 'speed'"),
])
def test_apply_checks_the_whole_recipe_first(tmp_path, resnet_pt, recipe, message):
    path = tmp_path / "recipe.toml"
    path.write_text(recipe)
    out = tmp_path / "out.pt"
    result = run("apply", resnet_pt, path, "-o", out)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not out.exists()


def test_a_step_names_itself_in_an_error_of_any_class(monkeypatch):
    """The step's label goes before the message; the error keeps its class and what it carries
    (an error built with more than a message could not be rebuilt as type(e)(message))."""
    from paramsurgeon import declare
    from paramsurgeon.errors import UnsafePickleError
    from paramsurgeon.ops import recipes

    def refuse(*args, **kwargs):
        raise UnsafePickleError("pass --allow-global a.B", ["a.B"])

    monkeypatch.setattr(declare, "from_mapping", refuse)
    with pytest.raises(UnsafePickleError) as raised:
        recipes.parse('[[step]]\nop = "zero"\n', "r.toml")
    assert str(raised.value) == "r.toml: step 1 (zero): pass --allow-global a.B"
    assert raised.value.globals_wanted == ["a.B"] and raised.value.exit_code == 2


def test_apply_dry_run_lists_every_step(tmp_path, resnet_pt):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    document = json_of("apply", resnet_pt, recipe, "--dry-run", schema="plan")
    assert [s["op"] for s in document["steps"]] == ["init", "zero", "cast", "rename"]
    assert document["steps"][3]["changes"][0] == {"name": "layer1.0.conv1.weight", "shape": [8, 8, 3, 3],
                                                  "dtype": "float32", "action": "rename to stage1.0.conv1.weight",
                                                  "new_shape": [8, 8, 3, 3], "new_dtype": "float32"}


def test_apply_reads_a_recipes_paths_beside_the_recipe(tmp_path, resnet_pt, resnet, monkeypatch):
    project = tmp_path / "project"
    (project / "weights").mkdir(parents=True)
    pretrained = {k: v + 1 if v.is_floating_point() else v for k, v in resnet.state_dict().items()}
    torch.save(pretrained, project / "weights" / "pretrained.pt")
    recipe = project / "recipe.toml"
    recipe.write_text('[[step]]\nop = "copy"\nsource = "weights/pretrained.pt"\npattern = ["fc.*"]\n'
                      '[[step]]\nop = "merge"\ninputs = ["weights/pretrained.pt"]\npattern = ["conv1.*"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not where the recipe is
    document = json_of("apply", resnet_pt, "../project/recipe.toml", "--dry-run", schema="plan")
    assert [s["op"] for s in document["steps"]] == ["copy", "merge"]
    result = run("apply", resnet_pt, "../project/recipe.toml", "-o", "out.pt")
    assert result.exit_code == 0, result.stderr
    after, before = load_torch(elsewhere / "out.pt"), resnet.state_dict()
    for name, value in before.items():
        expected = pretrained[name] if name.startswith("fc.") else \
            (value + pretrained[name]) / 2 if name.startswith("conv1.") else value
        torch.testing.assert_close(after[name], expected, rtol=0, atol=0 if not name.startswith("conv1.") else 1e-7,
                                   msg=name)
    absolute = tmp_path / "absolute.toml"
    absolute.write_text(f'[[step]]\nop = "copy"\nsource = "{project / "weights" / "pretrained.pt"}"\n'
                        'pattern = ["fc.*"]\n')
    assert run("apply", resnet_pt, absolute, "-o", "abs.pt").exit_code == 0
    assert torch.equal(load_torch(elsewhere / "abs.pt")["fc.weight"], pretrained["fc.weight"])


# groups


def test_groups_match_hand_written_training_code(gpt_pt, gpt):
    document = json_of("groups", gpt_pt, schema="groups")
    decay, no_decay = [], []
    for module_name, module in gpt.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            exempt = name.endswith("bias") or isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d))
            (no_decay if exempt else decay).append(full)
    named = dict(gpt.named_parameters())  # tied weights appear once, under their first name
    assert sorted(document["decay"]) == sorted(n for n in decay if n in named)
    assert sorted(document["no_decay"]) == sorted(n for n in no_decay if n in named)
    params = dict(gpt.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [params[n] for n in document["decay"]], "weight_decay": 0.1},
                                   {"params": [params[n] for n in document["no_decay"]], "weight_decay": 0.0}])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)


@pytest.mark.parametrize("arch", ["t5", "llama", "gpt2", "bert"])
def test_groups_agree_with_the_hugging_face_trainer(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    configs = {
        "t5": ("T5ForConditionalGeneration", transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32,
                                                                   num_layers=2, num_heads=2)),
        "llama": ("LlamaForCausalLM", transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                               num_hidden_layers=2, num_attention_heads=2,
                                                               num_key_value_heads=1)),
        "gpt2": ("GPT2LMHeadModel", transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                                            n_positions=32)),
        "bert": ("BertForMaskedLM", transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                            num_attention_heads=2, intermediate_size=32,
                                                            max_position_embeddings=32)),
    }
    cls, config = configs[arch]
    model = getattr(transformers, cls)(config)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    document = json_of("groups", tmp_path / "model.pt", schema="groups")
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))  # it uses nothing of the Trainer
    named = [n for n, _ in model.named_parameters()]  # tied weights appear once, under their first name
    assert sorted(document["decay"]) == sorted(n for n in named if n in decay)
    assert sorted(document["no_decay"]) == sorted(n for n in named if n not in decay)


def test_groups_rules_can_be_adjusted(resnet_pt, resnet):
    document = json_of("groups", resnet_pt, "--no-decay", "fc.weight", "--decay", "bn1.*", schema="groups")
    assert "fc.weight" in document["no_decay"] and "bn1.weight" in document["decay"]
    assert "layer1.0.bn1.running_mean" in document["buffers"]
    assert len(document["decay"]) + len(document["no_decay"]) == len(list(resnet.parameters()))


# documents and shell ergonomics


def test_every_json_document_validates(tmp_path, resnet_pt, gpt_pt, training_pt):
    validate(json.loads(run("inspect", training_pt, "--json", "--tree", "--hash").stdout), "inspect")
    validate(json.loads(run("inspect", os.path.join(SAMPLES, "resnet-sharded"), "--json").stdout), "inspect")
    for args in (["zero", gpt_pt, "-p", "wpe.weight"], ["copy", resnet_pt, "--from", "fc.*", "--to", "fc.*"],
                 ["tie", gpt_pt, "--source", "h.0.mlp.0.bias", "--target", "h.1.mlp.0.bias"],
                 ["rename", resnet_pt, "--from", "fc.*", "--to", "head.*"]):
        validate(json.loads(run(*args, "--dry-run", "--json").stdout), "plan")
    written = run("drop", resnet_pt, "-p", "fc.*", "-o", tmp_path / "x.pt", "--json")
    assert validate(json.loads(written.stdout), "plan")["dry_run"] is False


def test_version():  # every command's --help example: test_docs.py
    from paramsurgeon import __version__

    assert run("--version").stdout == f"paramsurgeon {__version__}\n"


def test_plain_output_without_a_terminal_or_with_no_color(resnet_pt):
    args = ("inspect", resnet_pt, "-p", "fc.*")
    assert b"\x1b[" in run_on_terminal(*args)[1]  # colour on a terminal...
    assert b"\x1b[" not in run_on_terminal(*args, env={"NO_COLOR": "1"})[1]  # ...but not with NO_COLOR
    assert b"\x1b[" not in run_on_terminal(*args, terminal=())[2]  # nor in a pipe


def test_apply_then_untie_loads_into_the_model(tmp_path, gpt_pt, gpt):
    """A recipe on a tied model: the tie is undone as a step says, and the model loads the result."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\nop = "init"\nkind = "linear"\npattern = "*weight"\nexclude = "lm_head.weight"\n'
                      'scheme = "trunc_normal(std=0.02)"\nseed = 1\n[[step]]\nop = "untie"\npattern = "lm_head.weight"\n')
    assert run("apply", gpt_pt, recipe, "-o", tmp_path / "o.pt").exit_code == 0
    state = load_torch(tmp_path / "o.pt")
    assert not same_storage(state, "wte.weight", "lm_head.weight")
    assert bits(state["lm_head.weight"]) == bits(gpt.state_dict()["wte.weight"])  # untied, values kept
    assert not torch.equal(state["h.0.mlp.0.weight"], gpt.state_dict()["h.0.mlp.0.weight"])  # initialised
    TinyGPT().load_state_dict(state, strict=True)


def test_diff_compares_across_chunks_and_layouts(tmp_path, monkeypatch):
    """A non-contiguous tensor against its contiguous copy, compared piece by piece."""
    from paramsurgeon.checkpoint import values as tensors

    monkeypatch.setattr(tensors, "CHUNK", 100)
    base = torch.randn(64, 50)
    torch.save({"w": base.t()}, tmp_path / "a.pt")
    changed = base.t().contiguous()
    changed[37, 11] += 0.5
    torch.save({"w": changed}, tmp_path / "b.pt")
    torch.save({"w": base.t().contiguous()}, tmp_path / "c.pt")
    assert json_of("diff", tmp_path / "a.pt", tmp_path / "c.pt", schema="diff")["identical"] == 1
    (entry,) = json_of("diff", tmp_path / "a.pt", tmp_path / "b.pt", schema="diff", code=1)["changed"]
    assert entry["mismatched"] == 1 and entry["max_abs"] == pytest.approx(0.5, rel=1e-6)


def test_diff_counts_as_torch_isclose_does_with_infinities_and_nans(tmp_path, monkeypatch):
    """mismatched is the count torch.isclose(equal_nan=True) rejects, over pieces (a piece holding
    a finite value against an infinity and another piece do not hide each other); a value
    infinite or NaN on one side only differs by inf, absolutely and relatively."""
    monkeypatch.setattr("paramsurgeon.checkpoint.values.CHUNK", 4000)  # pieces of 1,000 values
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5000, generator=g)
    b = a + 1e-3 * torch.randn(5000, generator=g)
    b[::7] = a[::7]
    special = {10: (float("inf"), 1.0), 11: (2.0, float("-inf")), 12: (float("nan"), 3.0), 13: (4.0, float("nan")),
               14: (float("nan"), float("nan")), 15: (float("inf"), float("inf")), 16: (float("inf"), float("-inf")),
               17: (5.0, 0.0), 18: (0.0, 0.0), 2500: (1.0, 1e-30)}
    for i, (x, y) in special.items():
        a[i], b[i] = x, y
    torch.save({"w": a}, tmp_path / "a.pt")
    torch.save({"w": b}, tmp_path / "b.pt")
    for atol, rtol in ((0.0, 0.0), (1e-3, 1e-2), (1.0, 0.0)):
        change = json_of("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--atol", str(atol), "--rtol", str(rtol),
                         schema="diff", code=1)["changed"][0]
        expected = int((~torch.isclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)).sum())
        assert change["mismatched"] == expected, (atol, rtol)
    assert change["max_abs"] == "inf" and change["max_rel"] == "inf"
    finite = torch.tensor([i not in special for i in range(5000)])
    torch.save({"w": a[finite]}, tmp_path / "fa.pt")
    torch.save({"w": b[finite]}, tmp_path / "fb.pt")
    change = json_of("diff", tmp_path / "fa.pt", tmp_path / "fb.pt", schema="diff", code=1)["changed"][0]
    gap = (a[finite].double() - b[finite].double()).abs()
    assert change["max_abs"] == float(gap.max())
    rel = torch.where(gap == 0, 0.0, gap / b[finite].double().abs())
    assert change["max_rel"] == float(rel.max())
    torch.save({"w": torch.tensor([1.0, 5.0])}, tmp_path / "za.pt")  # finite values against a zero in B
    torch.save({"w": torch.tensor([1.0, 0.0])}, tmp_path / "zb.pt")
    change = json_of("diff", tmp_path / "za.pt", tmp_path / "zb.pt", schema="diff", code=1)["changed"][0]
    assert float((torch.tensor([5.0]) / torch.tensor([0.0])).item()) == math.inf and change["max_rel"] == "inf"
