"""layers and stack on transformers models saved with save_pretrained: the result loads with from_pretrained
and computes what the model assembled in torch from the original blocks computes (blocks removed, kept,
moved, duplicated; --identity copies leave the output exactly as it was; a stack is the sources' blocks
in sequence); config.json follows; bad ranges are refused with nothing written."""

import json
import os
import shutil

import pytest
import torch
from helpers import SAMPLES, json_of, register_input, run
from safetensors import safe_open
from safetensors.torch import load_file

import layer_models as lm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(name, build)``: the model ``build()`` makes, saved once per module under ``name``."""
    made = {}
    root = tmp_path_factory.mktemp("models")

    def save(name, build, **options):
        if name not in made:
            model = build()
            model.save_pretrained(root / name, **options)
            made[name] = (model, str(root / name))
        return made[name]

    return save


def model_dir(request, saved, name, build, **options):
    model, path = saved(name, build, **options)
    register_input(request, path)
    return model, path


def config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def assert_computes(path, reference):
    """The model at ``path`` (from_pretrained) gives exactly the output of ``reference``."""
    assert torch.equal(lm.logits(lm.load(path)), lm.logits(reference))


def test_drop_the_last_layers_of_a_llama(request, saved, tmp_path):
    model, path = model_dir(request, saved, "llama", lm.llama)
    out = tmp_path / "short"
    result = run("layers", path, "--drop", "2..3", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert "num_hidden_layers 4 -> 2" in result.stderr
    assert config(out)["num_hidden_layers"] == 2
    assert_computes(out, lm.reordered(model, [0, 1]))


def test_a_directory_input_writes_a_directory(request, saved, tmp_path):
    """-o DIR without an extension (nor a trailing '/') names a directory: the weights, the updated config.json
    and the model's other files."""
    model, path = model_dir(request, saved, "llama", lm.llama)
    out = tmp_path / "short"
    assert run("layers", path, "--drop", "3", "-o", out).exit_code == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert_computes(out, lm.reordered(model, [0, 1, 2]))


def test_drop_in_the_middle_renumbers(request, saved, tmp_path):
    model, path = model_dir(request, saved, "llama", lm.llama)
    out = tmp_path / "out"
    assert run("layers", path, "--drop", "1,2", "-o", f"{out}/").exit_code == 0
    names = load_file(out / "model.safetensors")
    original = load_file(os.path.join(path, "model.safetensors"))
    assert sorted({n.split(".")[2] for n in names if n.startswith("model.layers.")}) == ["0", "1"]
    assert torch.equal(names["model.layers.1.mlp.down_proj.weight"], original["model.layers.3.mlp.down_proj.weight"])
    assert_computes(out, lm.reordered(model, [0, 3]))


def test_keep_on_gpt2(request, saved, tmp_path):
    model, path = model_dir(request, saved, "gpt2", lm.gpt2)
    out = tmp_path / "kept"
    assert run("layers", path, "--keep", "0,2", "-o", f"{out}/").exit_code == 0
    assert config(out)["n_layer"] == 2
    assert_computes(out, lm.reordered(model, [0, 2]))


def test_move_puts_the_first_moved_block_at_the_index(request, saved, tmp_path):
    model, path = model_dir(request, saved, "llama", lm.llama)
    out = tmp_path / "moved"
    assert run("layers", path, "--move", "2..3", "--to", "1", "-o", f"{out}/").exit_code == 0
    assert_computes(out, lm.reordered(model, [0, 2, 3, 1]))


def test_duplicate_a_range_after_a_block_on_bert(request, saved, tmp_path):
    model, path = model_dir(request, saved, "bert", lm.bert)
    out = tmp_path / "deeper"
    result = run("layers", path, "--duplicate", "0..1", "--after", "2", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert config(out)["num_hidden_layers"] == 6
    assert_computes(out, lm.reordered(model, [0, 1, 2, 0, 1, 3]))


def test_duplicate_without_after_puts_copies_after_their_range(request, saved, tmp_path):
    model, path = model_dir(request, saved, "llama", lm.llama)
    out = tmp_path / "solar"
    assert run("layers", path, "--duplicate", "1..2,3", "-o", f"{out}/").exit_code == 0
    assert_computes(out, lm.reordered(model, [0, 1, 2, 1, 2, 3, 3]))


def test_duplicated_tensors_are_copies_not_ties(request, saved, tmp_path):
    """A torch output stores a copy's bytes of its own: loading it gives separate parameters."""
    _, path = model_dir(request, saved, "llama", lm.llama)
    out = tmp_path / "copied.pt"
    assert run("layers", path, "--duplicate", "1", "-o", out).exit_code == 0
    state = torch.load(out, weights_only=True)
    a, b = state["model.layers.1.mlp.up_proj.weight"], state["model.layers.2.mlp.up_proj.weight"]
    assert torch.equal(a, b) and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


@pytest.mark.parametrize("name, build, ranges, count", [
    ("llama", lm.llama, "0,2", 6), ("gpt2", lm.gpt2, "0..2", 6), ("mixtral", lambda: lm.moe("mixtral"), "1", 3),
    ("dsv3", lambda: lm.moe("dsv3"), "2", 4), ("gpt-oss", lm.gpt_oss, "0", 3)])
def test_identity_copies_leave_the_output_exactly_unchanged(request, saved, tmp_path, name, build, ranges, count):
    model, path = model_dir(request, saved, name, build)
    out = tmp_path / "pro"
    result = run("layers", path, "--duplicate", ranges, "--identity", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    grown = lm.load(out)
    assert len(getattr(*lm.blocks_of(grown))) == count
    assert torch.equal(lm.logits(grown), lm.logits(model))


def test_identity_copies_zero_only_the_output_projections(request, saved, tmp_path):
    _, path = model_dir(request, saved, "llama", lm.llama)
    out = tmp_path / "pro"
    assert run("layers", path, "--duplicate", "3", "--identity", "-o", f"{out}/").exit_code == 0
    state, original = load_file(out / "model.safetensors"), load_file(os.path.join(path, "model.safetensors"))
    zero = sorted(n for n, t in state.items() if not t.any())
    assert zero == ["model.layers.4.mlp.down_proj.weight", "model.layers.4.self_attn.o_proj.weight"]
    assert torch.equal(state["model.layers.4.self_attn.q_proj.weight"], original["model.layers.3.self_attn.q_proj.weight"])


def test_per_layer_lists_of_the_config_follow(request, saved, tmp_path):
    model, path = model_dir(request, saved, "qwen2", lm.qwen2)
    before = config(path)["layer_types"]
    assert len(set(before)) == 2
    out = tmp_path / "moved"
    assert run("layers", path, "--move", "2..3", "--to", "0", "-o", f"{out}/").exit_code == 0
    assert config(out)["layer_types"] == [before[i] for i in (2, 3, 0, 1)]
    assert_computes(out, lm.reordered(model, [2, 3, 0, 1]))


def test_dense_layers_of_a_deepseek_follow(request, saved, tmp_path):
    """first_k_dense_replace counts the dense layers left at the front; a dense layer after one with experts
    cannot be said so, and is refused."""
    model, path = model_dir(request, saved, "dsv3", lambda: lm.moe("dsv3"))
    out = tmp_path / "out"
    assert run("layers", path, "--drop", "0", "-o", f"{out}/").exit_code == 0
    assert config(out)["first_k_dense_replace"] == 0 and config(out)["num_hidden_layers"] == 2
    assert_computes(out, lm.reordered(model, [1, 2]))
    result = run("layers", path, "--move", "0", "--to", "1", "-o", f"{tmp_path / 'moved'}/")
    assert result.exit_code == 2 and "first_k_dense_replace 1" in result.stderr
    assert not (tmp_path / "moved").exists()


def test_sparse_step_of_a_qwen_moe_becomes_a_list(request, saved, tmp_path):
    """Every second layer has experts (decoder_sparse_step 2): after a drop, mlp_only_layers names the dense ones."""
    model, path = model_dir(request, saved, "qwen2moe-step", lambda: lm.moe("qwen2moe", decoder_sparse_step=2,
                                                                          num_hidden_layers=4))
    out = tmp_path / "out"
    assert run("layers", path, "--drop", "0", "-o", f"{out}/").exit_code == 0
    assert (config(out)["decoder_sparse_step"], config(out)["mlp_only_layers"]) == (1, [1])
    assert_computes(out, lm.reordered(model, [1, 2, 3]))


def test_the_moe_layers_of_a_llama4_follow(request, saved, tmp_path):
    """Llama 4 lists the layers with experts by index (moe_layers): they follow, as its per-layer lists do."""
    model, path = model_dir(request, saved, "llama4", lm.llama4)
    assert config(path)["moe_layers"] == [1, 3]
    out = tmp_path / "out"
    assert run("layers", path, "--move", "3", "--to", "0", "-o", f"{out}/").exit_code == 0
    assert (config(out)["moe_layers"], config(out)["no_rope_layers"]) == ([0, 2], [0, 1, 1, 1])
    reference = lm.reordered(model, [3, 0, 1, 2])
    reference.config.no_rope_layers = [0, 1, 1, 1]
    assert_computes(out, reference)


def test_sharded_directory(request, saved, tmp_path):
    model, path = model_dir(request, saved, "llama-sharded", lm.llama, max_shard_size="40KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    out = tmp_path / "short"
    assert run("layers", path, "--drop", "0", "-o", out).exit_code == 0
    assert os.path.exists(out / "model.safetensors.index.json")
    assert_computes(out, lm.reordered(model, [1, 2, 3]))


def test_a_dcp_checkpoint(request, saved, tmp_path):
    """A DCP input gives a DCP output with the blocks renumbered; its values are the safetensors run's."""
    _, path = model_dir(request, saved, "llama", lm.llama)
    assert run("convert", path, "-o", tmp_path / "dcp", "--format", "dcp").exit_code == 0
    assert run("layers", tmp_path / "dcp", "--duplicate", "1..2", "--after", "3", "-o", tmp_path / "grown").exit_code == 0
    assert run("layers", path, "--duplicate", "1..2", "--after", "3", "-o", f"{tmp_path / 'direct'}/").exit_code == 0
    assert run("diff", tmp_path / "grown", tmp_path / "direct", "--tensors-only").exit_code == 0
    assert run("stack", f"{tmp_path / 'dcp'}:0..1", f"{path}:3", "-o", tmp_path / "stacked.pt").exit_code == 0
    state, original = torch.load(tmp_path / "stacked.pt", weights_only=True), load_file(os.path.join(path, "model.safetensors"))
    assert torch.equal(state["model.layers.2.mlp.up_proj.weight"], original["model.layers.3.mlp.up_proj.weight"])
    assert not any(n.startswith("model.layers.3.") for n in state)


def test_a_torch_file_with_a_prefix(request, tmp_path):
    """--prefix names a block list of another name; the result loads into the module with those blocks."""
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.stages = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(4))
    path = tmp_path / "net.pt"
    torch.save({"net": net.state_dict()}, path)
    register_input(request, path)
    out = tmp_path / "out.pt"
    for args, order in ((["--move", "3", "--to", "0"], (3, 0, 1, 2)), (["--drop", "1"], (0, 2, 3)),
                        (["--duplicate", "2"], (0, 1, 2, 2, 3))):
        assert run("layers", path, "--prefix", "stages.N.", *args, "-o", out).exit_code == 0
        expected = torch.nn.Sequential()
        expected.stages = torch.nn.ModuleList(net.stages[i] for i in order)
        state = torch.load(out, weights_only=True)["net"]
        assert list(state) == list(expected.state_dict())
        assert dict(state._metadata) == dict(expected.state_dict()._metadata)  # per-module versions follow
        assert all(torch.equal(state[k], v) for k, v in expected.state_dict().items())
        os.remove(out)


def test_recipe_step(request, saved, tmp_path):
    _, path = model_dir(request, saved, "llama", lm.llama)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\nop = "layers"\ndrop = "1..2"\n\n[[step]]\nop = "layers"\nduplicate = "0"\n'
                      'identity = true\n')
    by_recipe, by_commands = tmp_path / "a", tmp_path / "b"
    assert run("apply", path, recipe, "-o", f"{by_recipe}/").exit_code == 0
    assert run("layers", path, "--drop", "1..2", "-o", f"{tmp_path / 'c'}/").exit_code == 0
    assert run("layers", tmp_path / "c", "--duplicate", "0", "--identity", "-o", f"{by_commands}/").exit_code == 0
    assert run("diff", by_recipe, by_commands, "--tensors-only").exit_code == 0
    assert config(by_recipe)["num_hidden_layers"] == 3


def test_inspect_tree_names_the_repeated_block(request, saved):
    _, path = model_dir(request, saved, "llama", lm.llama)
    result = run("inspect", path, "--tree", "--depth", "1")
    assert result.exit_code == 0
    assert "model.layers.N x 4" in result.stdout
    assert json_of("inspect", path, "--tree", schema="inspect")["blocks"] == [{"prefix": "model.layers", "count": 4}]
    gpt2 = json_of("inspect", os.path.join(SAMPLES, "gpt.pt"), "--tree", schema="inspect")
    assert gpt2["blocks"] == []  # h.N is no known block list (--prefix h names it to the commands)


def test_the_json_plans(request, saved, tmp_path):
    _, path = model_dir(request, saved, "llama", lm.llama)
    plan = json_of("layers", path, "--duplicate", "3", "--identity", "--dry-run", schema="plan")
    actions = {c["name"]: c["action"] for c in plan["changes"]}
    assert actions["model.layers.3.mlp.up_proj.weight"] == "copy to model.layers.4.mlp.up_proj.weight"
    assert actions["model.layers.4.mlp.down_proj.weight"] == "zero (identity copy)"
    plan = json_of("stack", f"{path}:0..1", f"{path}:1", "--dry-run", schema="plan")
    actions = {c["name"]: c["action"] for c in plan["changes"]}
    assert plan["command"] == "stack" and actions["model.layers.3.input_layernorm.weight"] == "drop"
    assert actions["model.layers.1.mlp.up_proj.weight"] == "copy to model.layers.2.mlp.up_proj.weight"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--drop", "4"], "layers: --drop 4: index 4 is out of range; the model has 4 blocks (0..3)"),
    (["--keep", "1,1"], "layers: --keep 1,1: block 1 is given twice"),
    (["--drop", "0..2,1..3"], "layers: --drop 0..2,1..3: block 1 is given twice (the ranges overlap)"),
    (["--drop", "0..3"], "layers: --drop 0..3 leaves no block; the model has 4"),
    (["--drop", "2..1"], "layers: --drop 2..1: the range 2..1 ends before it starts"),
    (["--move", "0..1", "--to", "3"], "layers: --to 3 is out of range"),
    (["--duplicate", "1", "--after", "4"], "layers: --after 4 is out of range"),
    (["--drop", "1", "--keep", "2"], "layers: pass one of --drop, --keep, --duplicate or --move (not --drop and --keep)"),
    (["--drop", "1", "--identity"], "layers: --identity goes with --duplicate"),
    (["--prefix", "model.blocks", "--drop", "1"], "no tensor is named 'model.blocks.N.…'"),
])
def test_bad_ranges_are_refused_and_nothing_written(request, saved, tmp_path, args, message):
    _, path = model_dir(request, saved, "llama", lm.llama)
    result = run("layers", path, *args, "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_no_repeated_block(tmp_path):
    result = run("layers", os.path.join(SAMPLES, "resnet.pt"), "--drop", "1", "-o", tmp_path / "out.pt")
    assert result.exit_code == 2 and "layers: no repeated block found" in result.stderr and "--prefix" in result.stderr
    assert not (tmp_path / "out.pt").exists()


def test_stack_is_the_blocks_in_sequence(request, saved, tmp_path):
    a, path_a = model_dir(request, saved, "llama", lm.llama)
    b, path_b = model_dir(request, saved, "llama-b", lambda: lm.llama(seed=1))
    out = tmp_path / "stacked"
    result = run("stack", f"{path_a}:0..2", f"{path_b}:1..3", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert config(out)["num_hidden_layers"] == 6
    layers_a, layers_b = a.model.layers, b.model.layers
    assert_computes(out, lm.with_blocks(a, [*layers_a[:3], *layers_b[1:]]))


def test_stack_rest_takes_the_other_tensors_from_another_source(request, saved, tmp_path):
    a, path_a = model_dir(request, saved, "llama", lm.llama)
    b, path_b = model_dir(request, saved, "llama-b", lambda: lm.llama(seed=1))
    out = tmp_path / "stacked"
    assert run("stack", f"{path_a}:0", f"{path_a}:0", f"{path_b}:3", "--rest", path_b, "-o", f"{out}/").exit_code == 0
    assert_computes(out, lm.with_blocks(b, [a.model.layers[0], a.model.layers[0], b.model.layers[3]]))


def test_stack_refuses_blocks_of_different_shapes(request, saved, tmp_path):
    _, path_a = model_dir(request, saved, "llama", lm.llama)
    _, path_c = model_dir(request, saved, "llama-wide", lambda: lm.llama(intermediate=48))
    result = run("stack", f"{path_a}:0..1", f"{path_c}:2..3", "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 2 and "'mlp.down_proj.weight' is [32, 48]" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_stack_refuses_blocks_unlike_those_of_the_rest(request, saved, tmp_path):
    _, path_a = model_dir(request, saved, "llama", lm.llama)
    _, path_c = model_dir(request, saved, "llama-wide", lambda: lm.llama(intermediate=48))
    result = run("stack", f"{path_a}:0..1", "--rest", path_c, "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 2 and "'mlp.down_proj.weight' is [32, 64]" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_block_the_config_does_not_count_is_refused_not_renumbered_into_the_model(request, saved, tmp_path):
    """DeepSeek-V3 stores its multi-token-prediction layer as model.layers.61 of a 61-layer model:
    renumbering it into the layers would make transformers load it as one of them."""
    _, path = model_dir(request, saved, "llama", lm.llama)
    folder = tmp_path / "mtp"
    folder.mkdir()
    state = load_file(os.path.join(path, "model.safetensors"))
    last = config(path)["num_hidden_layers"] - 1
    extra = {n.replace(f"layers.{last}.", f"layers.{last + 1}."): v.clone() for n, v in state.items()
             if f"layers.{last}." in n}
    from safetensors.torch import save_file

    save_file({**state, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config(path)))
    out = tmp_path / "out"
    result = run("layers", folder, "--drop", "0", "-o", f"{out}/")
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr == (f"paramsurgeon: error: layers: the checkpoint has {last + 2} blocks (model.layers.0 to"
                             f" model.layers.{last + 1}) but config.json says num_hidden_layers {last + 1} (a"
                             " multi-token-prediction layer numbered after the model's, as DeepSeek-V3's?);"
                             " renumbering would make the extra blocks model layers: drop them first"
                             f" (paramsurgeon drop -p 'model.layers.{last + 1}.*')\n")


# a quantized model's list of modules left unquantized follows the layers (ground truth: the dtypes the
# output stores, read with safe_open, and the modules transformers' own fp8 quantizer leaves plain; its CPU
# load dequantizes every fp8 weight whatever the list says, so it cannot tell)


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    """Two tiny fp8 Llamas (DeepSeek's layout), one layer of each stored plain and named in
    modules_to_not_convert: 'a' its layer 2, 'b' its layer 0; and 'plain', a Llama of their shapes
    without quantization."""
    root = tmp_path_factory.mktemp("fp8")
    for name, plain, seed in (("a", [2], 2), ("b", [0], 3), ("plain", range(4), 4)):
        lm.fp8_llama(str(root / name), plain, seed)
    settings = config(root / "plain")
    del settings["quantization_config"]
    (root / "plain" / "config.json").write_text(json.dumps(settings))
    return {name: str(root / name) for name in ("a", "b", "plain")}


def plain_modules(folder) -> dict[str, bool]:
    """Each linear module of the directory's layers -> whether the output stores its weight plain (bfloat16)."""
    return {name.removesuffix(".weight"): dtype == "BF16" for name, dtype in lm.stored_dtypes(folder).items()
            if name.startswith("model.layers.") and name.endswith("proj.weight")}


def assert_skips_the_plain_modules(folder):
    """transformers' fp8 quantizer, given the output's config, leaves exactly the modules whose weights the
    output stores plain nn.Linear (what a GPU loads), and each entry of modules_to_not_convert names a
    module of the model (by transformers' own matcher)."""
    from test_quant_partial import converted, quantization_config
    from transformers.quantizers.quantizers_utils import should_convert_module

    plain, modules = plain_modules(folder), converted(folder)
    assert {m: modules[m] for m in plain} == {m: "Linear" if p else "FP8Linear" for m, p in plain.items()}
    for entry in quantization_config(folder)["modules_to_not_convert"]:
        assert not all(should_convert_module(m, [entry]) for m in modules), entry


@pytest.mark.parametrize("args, order", [
    (["--drop", "1"], [0, 2, 3]),
    (["--keep", "0,1,3"], [0, 1, 3]),
    (["--duplicate", "2"], [0, 1, 2, 2, 3]),
    (["--move", "2", "--to", "0"], [2, 0, 1, 3]),
    (["--duplicate", "3", "--identity"], [0, 1, 2, 3, 3]),  # the copy's o_proj and down_proj zeroed, plain
])
def test_the_skip_list_of_a_quantized_model_follows_its_layers(request, fp8_models, tmp_path, args, order):
    folder = register_input(request, fp8_models["a"])
    out = tmp_path / "out"
    result = run("layers", folder, *args, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    zeroed = ("o_proj", "down_proj") if "--identity" in args else ()
    expected = {m: order[int(m.split(".")[2])] == 2 or (m.endswith(zeroed) and m.startswith("model.layers.4."))
                for m in plain_modules(out)}  # the weights moved with their layer: the old layer 2 is the plain one
    assert plain_modules(out) == expected
    assert_skips_the_plain_modules(out)


def test_stack_takes_each_blocks_skip_entries_from_its_own_source(request, fp8_models, tmp_path):
    a, b = (register_input(request, fp8_models[name]) for name in ("a", "b"))
    out = tmp_path / "stacked"
    result = run("stack", f"{b}:1..3", f"{a}:2..3", "-o", f"{out}/")  # b's plain layer 0 left out
    assert result.exit_code == 0, result.stderr
    assert {int(m.split(".")[2]) for m, p in plain_modules(out).items() if p} == {3}  # a's layer 2
    assert_skips_the_plain_modules(out)


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory):
    """A tiny Llama compressed by compressed-tensors, two matrices of its layer 1 ignored (kept bfloat16)."""
    folder = tmp_path_factory.mktemp("ct") / "llama"
    lm.ct_llama(folder, ["lm_head", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"])
    return str(folder)


@pytest.mark.parametrize("args", [["--drop", "0"], ["--duplicate", "1"], ["--move", "1", "--to", "2"],
                                  ["--keep", "0,2"]])
def test_compressed_tensors_ignores_the_modules_stored_plain_after_layers(request, ct_model, tmp_path, args):
    """compressed-tensors' own apply_quantization_config, given the output's config, quantizes exactly the
    modules whose weights the output stores as fp8 codes."""
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from test_quant_partial import quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "out"
    result = run("layers", register_input(request, ct_model), *args, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    stored = lm.stored_dtypes(out)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    apply_quantization_config(model, QuantizationConfig.model_validate(quantization_config(out)))
    quantized = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert quantized == {n.removesuffix(".weight") for n, dtype in stored.items() if dtype == "F8_E4M3"}
    assert any(dtype == "BF16" for n, dtype in stored.items() if n.endswith("proj.weight")) == (args != ["--keep", "0,2"])


def test_a_regex_naming_a_layer_is_left_as_it_is_with_a_note(request, ct_model, tmp_path):
    folder = tmp_path / "ct"
    shutil.copytree(ct_model, folder)
    settings = config(folder)
    settings["quantization_config"]["ignore"] += [r"re:model\.layers\.2\.mlp\.up_proj$", "re:.*mlp.gate$"]
    (folder / "config.json").write_text(json.dumps(settings))
    out = tmp_path / "out"
    result = run("layers", register_input(request, str(folder)), "--drop", "0", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert config(out)["quantization_config"]["ignore"] == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "lm_head",
        r"re:model\.layers\.2\.mlp\.up_proj$", "re:.*mlp.gate$"]
    assert (r"note: config.json: quantization_config.ignore: re:model\.layers\.2\.mlp\.up_proj$ left as it is: a"
            " pattern or a name's suffix that names renumbered modules by number, which cannot follow them; check it"
            " against the new numbering\n") in result.stderr


@pytest.mark.parametrize("args, plain", [(["--drop", "0"], [0]), (["--duplicate", "1"], [1, 2]), (["--keep", "0,2"], [])])
@pytest.mark.parametrize("in_place", [False, True])
def test_modelopts_exclude_modules_follow_the_layers(request, tmp_path, args, plain, in_place):
    """ModelOpt's hf_quant_config.json: its loaders (vLLM's is_layer_excluded) leave a module unquantized
    when its name is an entry of exclude_modules or matches one as a wildcard (fnmatch); also rewritten
    --in-place."""
    model = tmp_path / "model"
    lm.modelopt_fp8(model)
    out = model if in_place else tmp_path / "out"
    result = run("layers", model, *args, "--in-place") if in_place else \
        run("layers", register_input(request, str(model)), *args, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    stored = {n.removesuffix(".weight"): dtype for n, dtype in lm.stored_dtypes(out).items() if n.endswith(".weight")}
    assert [int(n.split(".")[2]) for n, dtype in stored.items() if dtype == "BF16"] == plain
    excluded = assert_excludes_the_plain_modules(out)
    assert "lm_head" in excluded and "*mlp.gate" in excluded


def assert_excludes_the_plain_modules(folder) -> list:
    """ModelOpt's loaders (vLLM's is_layer_excluded: an entry of exclude_modules, or a wildcard by fnmatch)
    leave exactly the modules whose weights the output stores plain unquantized; returns the list."""
    from fnmatch import fnmatchcase

    excluded = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    stored = {n.removesuffix(".weight"): dtype for n, dtype in lm.stored_dtypes(folder).items() if n.endswith(".weight")}
    assert {n: any(fnmatchcase(n, pattern) for pattern in excluded) for n in stored} == \
        {n: dtype == "BF16" for n, dtype in stored.items()}
    return excluded


def test_stack_names_the_blocks_it_takes_from_a_plain_model(request, fp8_models, tmp_path):
    a, plain = (register_input(request, fp8_models[name]) for name in ("a", "plain"))
    out = tmp_path / "stacked"
    result = run("stack", f"{plain}:0", f"{a}:0..2", "--rest", a, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert {int(m.split(".")[2]) for m, p in plain_modules(out).items() if p} == {0, 3}  # a's layer 2 now 3
    assert_skips_the_plain_modules(out)


def assert_loads_plain_where_stored(folder) -> set[str]:
    """transformers (bitsandbytes NF4 on the CPU) loads ``folder`` with nn.Linear exactly where it stores
    plain (bf16) matrices, with their values, and Linear4bit where it stores NF4 codes; the plain ones."""
    from transformers import AutoModelForCausalLM

    stored = lm.stored_dtypes(folder)
    matrices = [n.removesuffix(".weight") for n in stored if n.startswith("model.layers.") and n.endswith("proj.weight")]
    plain = {m for m in matrices if stored[m + ".weight"] == "BF16"}
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    assert {m: type(loaded.get_submodule(m)).__name__ for m in matrices} == \
        {m: "Linear" if m in plain else "Linear4bit" for m in matrices}
    with safe_open(folder / "model.safetensors", "pt") as f:
        for m in plain:
            assert torch.equal(loaded.get_submodule(m).weight.data, f.get_tensor(m + ".weight")), m
    return plain


@pytest.mark.parametrize("args", [["--move", "0", "--to", "1"], ["--duplicate", "0"]])
def test_a_partly_plain_nf4_model_loads_in_transformers_after_layers(request, tmp_path, args):
    """bitsandbytes NF4 (from_pretrained on the CPU): layer 0 dequantized (llm_int8_skip_modules names its
    modules), then the layers moved or duplicated: the loaded model has nn.Linear exactly where the output
    stores plain weights, with their values, and Linear4bit where it stores NF4 codes."""
    from test_quant_partial import NF4

    partial = tmp_path / "partial"
    assert run("dequantize", register_input(request, str(NF4)), "-p", "model.layers.0.*", "-o", f"{partial}/") \
        .exit_code == 0
    out = tmp_path / "out"
    result = run("layers", partial, *args, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert_loads_plain_where_stored(out)


def test_a_stack_into_a_null_nf4_skip_list_names_the_plain_blocks_it_takes(request, tmp_path):
    """The rest's llm_int8_skip_modules is null (transformers' defaults); the other source's layer 0 is
    plain (dequantized): the list becomes explicit and names its modules, so from_pretrained loads them."""
    from test_quant_partial import NF4

    partial = tmp_path / "partial"
    assert run("dequantize", register_input(request, str(NF4)), "-p", "model.layers.0.*", "-o", f"{partial}/") \
        .exit_code == 0
    out = tmp_path / "out"
    result = run("stack", f"{NF4}:1", f"{partial}:0", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    plain = assert_loads_plain_where_stored(out)
    matrices = [n.removesuffix(".weight") for n in lm.stored_dtypes(out) if n.endswith("proj.weight")]
    assert plain == {m for m in matrices if ".layers.1." in m}


# rename: an entry naming a module whose tensors were renamed as a whole follows it (ground truth: the
# dtypes the output stores, and each loader's own matcher applied to the names it stores)

RENAMES = [("model.*", "base.model.*"), ("model.layers.2.*", "model.layers.7.*"),
           ("model.layers.2.mlp.*", "model.layers.2.ffn.*")]


def linear_modules(folder) -> dict[str, bool]:
    """Each linear module the directory stores (a Llama's weights but its embedding and norms) -> whether its
    weight is plain."""
    return {n.removesuffix(".weight"): dtype == "BF16" for n, dtype in lm.stored_dtypes(folder).items()
            if n.endswith(".weight") and "norm" not in n and "embed_tokens" not in n}


@pytest.mark.parametrize("source, target, listed", [
    *zip(*zip(*RENAMES), (["lm_head", "base.model.layers.2"], ["lm_head", "model.layers.7"], ["lm_head", "model.layers.2"])),
    ("lm_head.*", "output.*", ["output", "model.layers.2"]),
    # a rename that splits the skipped layer 2 (its mlp, or one projection, moved out of it): both parts skipped
    ("model.layers.2.mlp.*", "model.mlp2.*", ["lm_head", "model.layers.2", "model.mlp2"]),
    ("model.layers.2.self_attn.q*", "model.q2*", ["lm_head", "model.layers.2", "model.q2_proj"])])
def test_the_skip_list_of_a_quantized_model_follows_a_rename(request, fp8_models, tmp_path, source, target, listed):
    """transformers' own matcher (should_convert_module, as its fp8 quantizer calls it) leaves exactly the
    modules the output stores plain, wherever the rename put them."""
    from test_quant_partial import quantization_config
    from transformers.quantizers.quantizers_utils import should_convert_module

    out = tmp_path / "out"
    result = run("rename", register_input(request, fp8_models["a"]), "--from", source, "--to", target, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    skipped = quantization_config(out)["modules_to_not_convert"]
    assert skipped == listed
    modules = linear_modules(out)
    assert sum(modules.values()) == 8  # lm_head and layer 2's seven matrices, wherever they went
    assert {m: not should_convert_module(m, skipped) for m in modules} == modules
    assert "left as it is" not in result.stderr


@pytest.mark.parametrize("source, target", [("model.*", "base.model.*"), ("model.layers.1.mlp.*", "model.layers.1.ffn.*")])
def test_compressed_tensors_ignores_the_modules_stored_plain_after_a_rename(request, ct_model, tmp_path, source, target):
    """compressed-tensors' own matcher (match_name: an ignore entry is the module's name, or 're:' a regex)
    ignores exactly the modules the output stores plain; a regex naming a renamed module gets a note."""
    from compressed_tensors.utils.match import match_name
    from test_quant_partial import quantization_config

    folder = tmp_path / "ct"
    shutil.copytree(ct_model, folder)
    settings = config(folder)
    settings["quantization_config"]["ignore"].append(r"re:.*\.mlp\.gate$")  # no such module in a Llama
    (folder / "config.json").write_text(json.dumps(settings))
    out = tmp_path / "out"
    result = run("rename", register_input(request, str(folder)), "--from", source, "--to", target, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    ignore = quantization_config(out)["ignore"]
    modules = linear_modules(out)
    assert sum(modules.values()) == 3  # lm_head, layer 1's o_proj and down_proj
    assert {m: any(match_name(m, entry) for entry in ignore) for m in modules} == modules
    assert ignore[-1] == r"re:.*\.mlp\.gate$"
    assert (r"quantization_config.ignore: re:.*\.mlp\.gate$ left as it is" in result.stderr) == ("mlp" in source)


@pytest.mark.parametrize("source, target, in_place", [("model.*", "base.model.*", False),
                                                      ("model.layers.1.mlp.*", "model.layers.1.ffn.*", False),
                                                      ("model.layers.1.mlp.*", "model.layers.1.ffn.*", True)])
def test_modelopts_exclude_modules_follow_a_rename(request, tmp_path, source, target, in_place):
    model = tmp_path / "model"
    lm.modelopt_fp8(model)
    out = model if in_place else tmp_path / "out"
    result = run("rename", model, "--from", source, "--to", target, "--in-place") if in_place else \
        run("rename", register_input(request, str(model)), "--from", source, "--to", target, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    excluded = assert_excludes_the_plain_modules(out)
    assert excluded == ["lm_head", target.replace("*", "") + ("layers.1.mlp.down_proj" if "base" in target
                                                                else "down_proj"), "*mlp.gate"]
    assert ("note: hf_quant_config.json: exclude_modules: *mlp.gate left as it is" in result.stderr) == ("mlp" in source)


def test_a_partly_plain_nf4_model_loads_in_transformers_after_renames(request, tmp_path):
    """bitsandbytes NF4: layer 0 dequantized (llm_int8_skip_modules names its modules), then layers 0 and 1
    swapped by three renames: from_pretrained on the CPU loads nn.Linear exactly where the output stores
    plain weights (now layer 1), with their values, and Linear4bit where it stores NF4 codes."""
    from test_quant_partial import LAYER0, NF4, quantization_config

    step = tmp_path / "partial"
    assert run("dequantize", register_input(request, str(NF4)), "-p", "model.layers.0.*", "-o", f"{step}/") \
        .exit_code == 0
    for number, (old, new) in enumerate([(0, 9), (1, 0), (9, 1)]):
        result = run("rename", step, "--from", f"model.layers.{old}.*", "--to", f"model.layers.{new}.*",
                     "-o", f"{tmp_path / str(number)}/")
        assert result.exit_code == 0, result.stderr
        step = tmp_path / str(number)
    assert {m for m in quantization_config(step)["llm_int8_skip_modules"] if ".layers." in m} == \
        {m.replace(".0.", ".1.") for m in LAYER0}
    assert assert_loads_plain_where_stored(step) == {m.replace(".0.", ".1.") for m in LAYER0}
