"""layers on the block lists of encoder-decoder (T5, BART), multimodal (Llava) and other decoder layouts
(Falcon, GPT-NeoX): the block list is found or asked for by name, the config section that counts it is
updated and no other, the result loads with from_pretrained with no missing or unexpected weight, and it
computes what the model assembled in torch computes; --identity is exact where the blocks normalise
before their branches and refused where they normalise after the residual sum."""

import copy
import json
import shutil

import pytest
import torch
from helpers import config_json, register_input, registered_model, run

import layer_models as lm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(name, build)``: the model ``build()`` makes, saved once per module under ``name``."""
    made = {}
    root = tmp_path_factory.mktemp("architectures")

    def save(name, build):
        if name not in made:
            model = build()
            model.save_pretrained(root / name)
            made[name] = (model, str(root / name))
        return made[name]

    return save


@torch.no_grad()
def seq2seq_logits(model):
    return model(input_ids=lm.TOKENS, decoder_input_ids=lm.TOKENS, use_cache=False).logits  # copies share a cache slot


def t5_reordered(model, stack: str, order: list[int]):
    """T5 with the blocks of ``stack`` ('encoder') in ``order``: the stack's position bias is block 0's
    module, whichever block is first."""
    result = lm.with_list(model, f"{stack}.block", order)
    bias = model.get_submodule(f"{stack}.block.0.layer.0.SelfAttention").relative_attention_bias
    for i, block in enumerate(result.get_submodule(f"{stack}.block")):
        attention = block.layer[0].SelfAttention
        attention.has_relative_attention_bias = i == 0
        attention.relative_attention_bias = copy.deepcopy(bias) if i == 0 else None
    return result


@pytest.mark.parametrize("name, build, lists", [
    ("t5", lm.t5, "decoder.block.N x 2, encoder.block.N x 3"),
    ("bart", lm.bart, "model.decoder.layers.N x 2, model.encoder.layers.N x 3"),
    ("llava", lm.llava, "language_model.model.layers.N x 2, vision_tower.encoder.layers.N x 2"),
])
def test_two_block_lists_ask_for_prefix_and_nothing_is_written(request, saved, tmp_path, name, build, lists):
    """An encoder-decoder's two stacks, a multimodal model's language model and vision tower: the command
    does not pick one (BART's decoder was taken, its encoder unseen); both are named, with their counts."""
    _, path = registered_model(request, saved, name, build)
    first = lists.split(".N")[0]
    result = run("layers", path, "--drop", "0", "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.stderr.endswith(f"paramsurgeon: error: layers: several repeated blocks ({lists}); pass --prefix with"
                                  f" the one you mean (e.g. --prefix {first})\n"), result.stderr
    tree = run("inspect", path, "--tree", "--json").stdout
    assert sorted(b["prefix"] for b in json.loads(tree)["blocks"]) == sorted(p.split(".N")[0] for p in lists.split(", "))


@pytest.mark.parametrize("stack, args, order, counts", [
    ("encoder", ["--move", "0", "--to", "2"], [1, 2, 0], (3, 2)),
    ("encoder", ["--drop", "0"], [1, 2], (2, 2)),
    ("decoder", ["--keep", "1"], [1], (3, 1)),
    ("decoder", ["--duplicate", "0..1"], [0, 1, 0, 1], (3, 4)),
])
def test_t5_stacks(request, saved, tmp_path, stack, args, order, counts):
    """T5 keeps its stack's relative_attention_bias in block 0 alone: it stays there whatever moves (a dropped or
    moved block 0 no longer takes it away, a copy no longer carries one the model does not have); num_layers
    counts the encoder and num_decoder_layers the decoder."""
    model, path = registered_model(request, saved, "t5", lm.t5)
    out = tmp_path / "out"
    result = run("layers", path, "--prefix", f"{stack}.block", *args, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert (config_json(out)["num_layers"], config_json(out)["num_decoder_layers"]) == counts
    assert torch.equal(seq2seq_logits(lm.load(out)), seq2seq_logits(t5_reordered(model, stack, order)))


@pytest.mark.parametrize("stack, order, counts", [("encoder", [0], (1, 2)), ("decoder", [0], (2, 1))])
def test_a_t5_config_without_num_decoder_layers(request, saved, tmp_path, stack, order, counts):
    """Hub T5 configs often leave out num_decoder_layers, which then defaults to num_layers: a change to
    one stack writes the other's count as it was."""
    model, path = saved("t5-even", lambda: lm.t5(layers=2, decoder_layers=2))
    folder = tmp_path / "t5"
    shutil.copytree(path, folder)
    settings = config_json(folder)
    del settings["num_decoder_layers"]
    (folder / "config.json").write_text(json.dumps(settings))
    register_input(request, str(folder))
    out = tmp_path / "out"
    result = run("layers", folder, "--prefix", f"{stack}.block", "--drop", "1", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert (config_json(out)["num_layers"], config_json(out)["num_decoder_layers"]) == counts
    assert torch.equal(seq2seq_logits(lm.load(out)), seq2seq_logits(t5_reordered(model, stack, order)))


@pytest.mark.parametrize("stack, args, order, counts", [
    ("model.decoder.layers", ["--keep", "1"], [1], (3, 1)),
    ("model.encoder.layers", ["--move", "2", "--to", "0"], [2, 0, 1], (3, 2)),
])
def test_bart_stacks(request, saved, tmp_path, stack, args, order, counts):
    model, path = registered_model(request, saved, "bart", lm.bart)
    out = tmp_path / "out"
    assert run("layers", path, "--prefix", stack, *args, "-o", f"{out}/").exit_code == 0
    assert (config_json(out)["encoder_layers"], config_json(out)["decoder_layers"]) == counts
    assert torch.equal(seq2seq_logits(lm.load(out)), seq2seq_logits(lm.with_list(model, stack, order)))


@pytest.mark.parametrize("prefix, changed, kept", [
    ("language_model.model.layers", "text_config", "vision_config"),
    ("vision_tower.encoder.layers", "vision_config", "text_config"),
])
def test_a_multimodal_models_tower_and_its_config_section(request, saved, tmp_path, prefix, changed, kept):
    """Both towers have 2 layers: dropping one tower's block changes that tower's count, not the other's."""
    model, path = registered_model(request, saved, "llava", lm.llava)
    out = tmp_path / "out"
    result = run("layers", path, "--prefix", prefix, "--drop", "0", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert (config_json(out)[changed]["num_hidden_layers"], config_json(out)[kept]["num_hidden_layers"]) == (1, 2)
    loaded = lm.load(out)
    if changed == "text_config":  # the language model alone computes on text
        reference = lm.with_list(model, "model.language_model.layers", [1])
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=lm.TOKENS).logits, reference(input_ids=lm.TOKENS).logits)


def test_a_prefix_naming_no_list_names_those_there_are(request, saved, tmp_path):
    _, path = registered_model(request, saved, "llava", lm.llava)
    result = run("layers", path, "--prefix", "vision_tower", "--drop", "0", "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 2 and result.stderr == (
        "paramsurgeon: error: layers: no tensor is named 'vision_tower.N.…' (--prefix vision_tower); pass the dotted"
        " prefix of the numbered block list (the model's: language_model.model.layers, vision_tower.encoder.layers)\n")


@pytest.mark.parametrize("name, build, prefix, seq2seq", [
    ("t5", lm.t5, ["--prefix", "decoder.block"], True),
    ("t5", lm.t5, ["--prefix", "encoder.block"], True),
    ("falcon", lm.falcon, [], False),
    ("gpt_neox", lm.gpt_neox, [], False),
])
def test_identity_copies_of_more_architectures(request, saved, tmp_path, name, build, prefix, seq2seq):
    """T5's o and wo, Falcon's and GPT-NeoX's attention dense and dense_4h_to_h are their output projections."""
    model, path = registered_model(request, saved, name, build)
    out = tmp_path / "pro"
    result = run("layers", path, *prefix, "--duplicate", "0", "--identity", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    logits = seq2seq_logits if seq2seq else lm.logits
    assert torch.equal(logits(lm.load(out)), logits(model))


@pytest.mark.parametrize("name, build, prefix, said, logits", [
    ("opt-post", lambda: lm.opt(do_layer_norm_before=False), [], "do_layer_norm_before false", lm.logits),
    ("bart", lm.bart, ["--prefix", "model.decoder.layers"], "model_type bart", seq2seq_logits),
])
def test_identity_is_refused_for_blocks_that_normalise_after_the_sum(request, saved, tmp_path, name, build, prefix,
                                                                       said, logits):
    """OPT-350m and BART normalise x + branch(x): with the branch zeroed the copy still normalises x again,
    which changes the output once the norms are trained (shown in torch)."""
    model, path = registered_model(request, saved, name, build)
    out = tmp_path / "pro"
    result = run("layers", path, *prefix, "--duplicate", "0", "--identity", "-o", f"{out}/")
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr == (f"paramsurgeon: error: layers: --identity: config.json says the blocks normalise after the"
                             f" residual sum ({said}), so a copy with zeroed output projections still changes the"
                             " output; duplicate without --identity\n")
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for norm in (p for n, p in trained.named_parameters() if "layer_norm" in n):
            norm.uniform_(0.5, 1.5)
    grown = lm.with_list(trained, "model.decoder.layers", [0, 0, *range(1, len(trained.model.decoder.layers))])
    with torch.no_grad():
        for projection in ("self_attn.out_proj", "fc2", *(["encoder_attn.out_proj"] * (name == "bart"))):
            grown.get_submodule(f"model.decoder.layers.1.{projection}").weight.zero_()
            grown.get_submodule(f"model.decoder.layers.1.{projection}").bias.zero_()
    assert not torch.allclose(logits(grown), logits(trained), atol=1e-3)
