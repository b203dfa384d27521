"""Hugging Face model directories: a directory output carries the input's config, tokenizer and
generation files, with config.json updated where the surgery changed what it describes, so that
transformers' from_pretrained loads the result (the ground truth)."""

import json
import os
import shutil

import pytest
import torch
from helpers import register_input, run
from lora_models import gpt2, llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def save_model(model, folder, shard="8KB"):
    """``model`` saved by save_pretrained in shards, with a tokenizer built offline beside it."""
    import tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder, max_shard_size=shard)
    vocab = {f"w{i}": i for i in range(model.config.vocab_size - 2)}
    vocab.update({"[UNK]": len(vocab), "[PAD]": len(vocab) + 1})
    tokenizer = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return str(folder)


def load_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def read(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@pytest.fixture
def llama_dir(request, tmp_path):
    return register_input(request, save_model(llama(), tmp_path / "llama"))


@pytest.fixture
def gpt2_dir(request, tmp_path):
    return register_input(request, save_model(gpt2(), tmp_path / "gpt2"))


def test_resize_output_loads_with_the_new_vocab_and_the_same_tokenizer(llama_dir, tmp_path):
    out = tmp_path / "out"
    result = run("resize", llama_dir, "-p", "model.embed_tokens.weight", "-p", "lm_head.weight", "--size", 104,
                 "--fill", "zeros", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert "config.json: vocab_size 96 -> 104" in result.stderr
    model = load_model(out)  # a size mismatch if config.json were stale or missing
    assert model.config.vocab_size == 104 and model.lm_head.weight.shape == (104, 32)
    original = load_model(llama_dir)
    torch.testing.assert_close(model.model.embed_tokens.weight[:96], original.model.embed_tokens.weight,
                               rtol=0, atol=0)
    assert not model.lm_head.weight[96:].any()
    for name in TOKENIZER_FILES + ("generation_config.json",):
        assert read(out / name) == read(os.path.join(llama_dir, name)), name
    # the rest of config.json is as transformers wrote it: one line differs
    before, after = read(os.path.join(llama_dir, "config.json")), read(out / "config.json")
    assert after == before.replace(b'"vocab_size": 96', b'"vocab_size": 104')


def test_resize_of_a_tied_gpt2_embedding(gpt2_dir, tmp_path):
    out = tmp_path / "out"
    result = run("resize", gpt2_dir, "-p", "transformer.wte.weight", "--size", 88, "--follow-ties", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    model = load_model(out)
    assert model.config.vocab_size == 88 and model.lm_head.weight.shape == (88, 24)
    ids = torch.tensor([[1, 5, 87]])
    assert model(ids).logits.shape == (1, 3, 88)


def test_vocab_size_that_never_matched_the_rows_is_left_and_said(llama_dir, tmp_path):
    config = json.loads(read(os.path.join(llama_dir, "config.json")))
    source = tmp_path / "padded"
    shutil.copytree(llama_dir, source)
    config["vocab_size"] = 90  # a tokenizer smaller than the padded embedding
    (source / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    out = tmp_path / "out"
    result = run("resize", source, "-p", "model.embed_tokens.weight", "-p", "lm_head.weight", "--size", 104, "-o",
                 f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert read(out / "config.json") == read(source / "config.json")
    assert "vocab_size 90 left as it was: it did not match the 96 rows of model.embed_tokens.weight" in result.stderr


def test_tie_and_untie_set_tie_word_embeddings(llama_dir, tmp_path):
    tied, untied = tmp_path / "tied", tmp_path / "untied"
    result = run("tie", llama_dir, "--source", "model.embed_tokens.weight", "--target", "lm_head.weight", "-o",
                 f"{tied}/")
    assert result.exit_code == 0, result.stderr
    assert json.loads(read(tied / "config.json"))["tie_word_embeddings"] is True
    model = load_model(tied)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    result = run("untie", tied, "-p", "lm_head.weight", "-o", f"{untied}/")
    assert result.exit_code == 0, result.stderr
    assert json.loads(read(untied / "config.json"))["tie_word_embeddings"] is False
    model = load_model(untied)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert model.model.embed_tokens.weight.any()


def test_dedupe_keeps_the_name_save_pretrained_keeps(request, tmp_path):
    from safetensors import safe_open

    source = register_input(request, save_model(llama(), tmp_path / "llama", shard="1GB"))  # one file: lm_head first
    tied = tmp_path / "tied"
    result = run("tie", source, "--source", "model.embed_tokens.weight", "--target", "lm_head.weight", "--dedupe",
                 "-o", f"{tied}/")
    assert result.exit_code == 0, result.stderr
    reference = tmp_path / "reference"
    llama(tie=True).save_pretrained(reference)  # vLLM and llama.cpp read model.embed_tokens.weight alone
    names = []
    for folder in (tied, reference):
        with safe_open(folder / "model.safetensors", "pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1] and "lm_head.weight" not in names[0]
    model, original = load_model(tied), load_model(source)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, original.model.embed_tokens.weight, rtol=0, atol=0)


def test_cast_of_every_weight_sets_the_configs_dtype(gpt2_dir, tmp_path):
    out, part = tmp_path / "half", tmp_path / "part"
    result = run("cast", gpt2_dir, "--all", "--dtype", "float16", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert 'config.json: dtype "float32" -> "float16"' in result.stderr
    model = load_model(out)  # transformers loads in the config's dtype: float32 if it were stale
    assert model.dtype == torch.float16
    original = load_model(gpt2_dir)
    torch.testing.assert_close(model.state_dict(), original.half().state_dict(), rtol=0, atol=0)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # a cast of a few tensors leaves the dtype of the rest, and so the config, as they were
    assert run("cast", gpt2_dir, "-p", "transformer.h.0.*", "--dtype", "float16", "-o", f"{part}/").exit_code == 0
    assert read(part / "config.json") == read(os.path.join(gpt2_dir, "config.json"))


def test_convert_to_shards_carries_the_side_files(gpt2_dir, tmp_path):
    source = tmp_path / "hub"
    shutil.copytree(gpt2_dir, source)
    (source / "train.py").write_text("print('mine')\n")
    os.mkdir(source / "runs")
    out = tmp_path / "out"
    result = run("convert", source, "-o", out, "--max-shard-size", "4KB")
    assert result.exit_code == 0, result.stderr
    carried = {"config.json", "generation_config.json", *TOKENIZER_FILES}
    assert carried <= set(os.listdir(out))
    for name in carried:
        assert read(out / name) == read(source / name), name
    assert not {"train.py", "runs"} & set(os.listdir(out))
    assert f"not carried from {source} (not model files): runs/, train.py" in result.stderr
    torch.testing.assert_close(load_model(out).state_dict(), load_model(source).state_dict(), rtol=0, atol=0)


def test_side_files_linked_into_a_hub_cache_are_copied_as_files(llama_dir, tmp_path):
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    os.mkdir(blobs)
    os.mkdir(snapshot)
    for name in os.listdir(llama_dir):  # how huggingface_hub lays out a downloaded model
        shutil.copy(os.path.join(llama_dir, name), blobs / name)
        os.symlink(os.path.join("..", "blobs", name), snapshot / name)
    out = tmp_path / "out"
    assert run("zero", snapshot, "-p", "lm_head.weight", "-o", f"{out}/").exit_code == 0
    assert not os.path.islink(out / "tokenizer.json")
    assert read(out / "tokenizer.json") == read(blobs / "tokenizer.json")
    assert not load_model(out).lm_head.weight.any()


@pytest.mark.rewrites_input
def test_in_place_updates_the_config_and_keeps_every_other_file(llama_dir):
    with open(os.path.join(llama_dir, "train.py"), "w") as handle:
        handle.write("print('mine')\n")
    result = run("resize", llama_dir, "-p", "model.embed_tokens.weight", "-p", "lm_head.weight", "--size", 100,
                 "--in-place")
    assert result.exit_code == 0, result.stderr
    assert read(os.path.join(llama_dir, "train.py")) == b"print('mine')\n"
    assert load_model(llama_dir).config.vocab_size == 100


def test_a_dcp_output_carries_no_side_files(llama_dir, tmp_path):
    out = tmp_path / "dcp"
    result = run("convert", llama_dir, "--format", "dcp", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert ".metadata" in os.listdir(out) and not {"config.json", *TOKENIZER_FILES} & set(os.listdir(out))


@pytest.mark.parametrize("surgery, key, value", [
    (["resize", "-p", "model.embed_tokens.weight", "-p", "lm_head.weight", "--size", "104"], "vocab_size", 104),
    (["tie", "--source", "model.embed_tokens.weight", "--target", "lm_head.weight"], "tie_word_embeddings", True),
])
def test_config_of_a_bin_that_needs_a_global_is_updated_as_a_safetensors_directorys(request, tmp_path, surgery, key,
                                                                                      value):
    """The input is compared with the result as the command's loader read it (--allow-global), not
    opened again without the command's options: config.json is updated as for model.safetensors."""
    import argparse

    from safetensors.torch import save_file

    model, outputs = llama(), {}
    for weights in ("pytorch_model.bin", "model.safetensors"):
        folder = tmp_path / weights
        model.config.save_pretrained(folder)
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        if weights.endswith(".bin"):
            torch.save({**state, "args": argparse.Namespace(lr=0.1)}, folder / weights)  # a training script's args
        else:
            save_file(state, folder / weights)
        register_input(request, str(folder))
        outputs[weights] = out = tmp_path / f"out-{weights}"
        result = run(surgery[0], folder, *surgery[1:], "--allow-global", "argparse.Namespace", "--tensors-only",
                     "-o", f"{out}/")
        assert result.exit_code == 0 and "copied as it was" not in result.stderr, result.stderr
    assert read(outputs["pytorch_model.bin"] / "config.json") == read(outputs["model.safetensors"] / "config.json")
    assert getattr(load_model(outputs["pytorch_model.bin"]).config, key) == value
