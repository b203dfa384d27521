"""Ties across formats: ``save_pretrained`` leaves a tied output embedding out of the file and
``config.json`` says the model ties it; the same weights as a torch state dict hold both names on
one storage. diff, merge, copy --source and check --like see one checkpoint in both (tiny GPT-2,
Llama and BERT built by transformers itself, loaded back with ``from_pretrained``)."""

import json
import shutil

import pytest
import torch
from helpers import load_torch, register_input, run, same_storage

# The name save_pretrained leaves out, and the name it is tied to, in each model.
TIED = {"gpt2": ("lm_head.weight", "transformer.wte.weight"),
        "llama": ("lm_head.weight", "model.embed_tokens.weight"),
        "bert": ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")}


def _model(arch: str, **config):
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=80, n_positions=32, n_embd=24, n_layer=2, n_head=2,
                                                bos_token_id=0, eos_token_id=0, **config))
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, tie_word_embeddings=True, **config))
    return tf.BertForMaskedLM(tf.BertConfig(vocab_size=90, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            max_position_embeddings=32, **config))


def _save(model, folder, name: str) -> tuple:
    """The model as a save_pretrained directory and as torch.save(model.state_dict())."""
    model.save_pretrained(folder / name)
    torch.save(model.state_dict(), folder / f"{name}.pt")
    return folder / name, folder / f"{name}.pt"


@pytest.fixture(scope="module", params=sorted(TIED))
def saved(request, tmp_path_factory):
    """arch -> {'base', 'ft1', 'ft2'}: each (directory, torch file); the fine-tunes move every weight."""
    arch = request.param
    folder = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    model = _model(arch).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as in use
    paths = {"arch": arch, "base": _save(model, folder, "base")}
    for i in (1, 2):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
        paths[f"ft{i}"] = _save(model, folder, f"ft{i}")
    return paths


@pytest.fixture
def inputs(request, saved):
    for key in ("base", "ft1", "ft2"):
        for path in saved[key]:
            register_input(request, path)
    return saved


def _expected_average(a, b) -> dict:
    """The linear merge of two state dicts, computed in torch (float32)."""
    first, second = load_torch(a), load_torch(b)
    return {k: ((v.float() + second[k].float()) / 2).to(v.dtype) if v.is_floating_point() else v
            for k, v in first.items()}


def _loaded(arch: str, weights, like, folder):
    """The model transformers builds from ``weights`` (a safetensors file) beside ``like``'s config."""
    import transformers as tf

    folder.mkdir()
    shutil.copy(like / "config.json", folder / "config.json")
    shutil.copy(weights, folder / "model.safetensors")
    auto = tf.AutoModelForMaskedLM if arch == "bert" else tf.AutoModelForCausalLM
    return auto.from_pretrained(folder).state_dict()


def test_diff_of_a_state_dict_and_its_saved_directory_is_equal(inputs):
    """What the user did: the same weights as a torch state dict and as save_pretrained's directory."""
    directory, state = inputs["base"]
    omitted, partner = TIED[inputs["arch"]]
    result = run("diff", state, directory)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "0 only in A, 0 only in B" in result.stdout
    assert f"{omitted} is not in the file: config.json ties it to {partner}" in result.stderr
    assert run("diff", directory, state).exit_code == 0
    changed = run("diff", state, inputs["ft1"][0])  # a different model is still told apart
    assert changed.exit_code == 1 and "only in" not in changed.stdout.split("\n", 1)[1]


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_models_leave_out_three_names(tmp_path, arch):
    """T5 and BART tie the encoder's and decoder's embeddings and the LM head to the shared one."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                      num_heads=2)) if arch == "t5" else \
        tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                                                      encoder_attention_heads=2, decoder_attention_heads=2,
                                                      encoder_ffn_dim=32, decoder_ffn_dim=32,
                                                      max_position_embeddings=32))
    directory, state = _save(model, tmp_path, arch)
    result = run("diff", state, directory)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stderr.count("is not in the file: config.json ties it to") == 3


def test_check_like_a_saved_directory(inputs):
    directory, state = inputs["base"]
    for args in ((state, "--like", directory), (directory, "--like", state)):
        result = run("check", *args)
        assert result.exit_code == 0, result.stdout + result.stderr


@pytest.mark.parametrize("order", ["torch-first", "directory-first", "directories"])
def test_merge_across_formats_merges_the_tie_once(inputs, tmp_path, order):
    """The merge loads with from_pretrained and equals the average computed in torch; a torch
    output keeps the pair on one storage."""
    arch, (dir1, pt1), (dir2, pt2) = inputs["arch"], inputs["ft1"], inputs["ft2"]
    first, second = {"torch-first": (pt1, dir2), "directory-first": (dir1, pt2), "directories": (dir1, dir2)}[order]
    omitted, partner = TIED[arch]
    expected = _expected_average(pt1, pt2)
    for output in ("merged.pt", "merged.safetensors"):
        result = run("merge", first, second, "-o", tmp_path / output)
        assert result.exit_code == 0, result.stderr
    merged = load_torch(tmp_path / "merged.pt")
    assert same_storage(merged, omitted, partner)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    model = _loaded(arch, tmp_path / "merged.safetensors", dir1, tmp_path / "model")
    for name, value in model.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_merge_skip_mismatched_merges_the_tied_embedding(inputs, tmp_path):
    """The user's case: --skip-mismatched took the tied embedding from the first input, unmerged."""
    arch, (_, pt1), (dir2, pt2) = inputs["arch"], inputs["ft1"], inputs["ft2"]
    omitted, partner = TIED[arch]
    result = run("merge", pt1, dir2, "--skip-mismatched", "-o", tmp_path / "merged.pt")
    assert result.exit_code == 0, result.stderr
    assert "took from" not in result.stderr
    merged, expected = load_torch(tmp_path / "merged.pt"), _expected_average(pt1, pt2)
    torch.testing.assert_close(merged[partner], expected[partner], rtol=1e-6, atol=1e-7)
    assert same_storage(merged, omitted, partner)


@pytest.mark.parametrize("source", ["directory", "torch"])
def test_copy_from_a_tied_source_keeps_the_tie(inputs, tmp_path, source):
    """copy dst --source SRC: the tied weight reaches both names, which still share one storage."""
    arch, (_, base), (dir1, pt1) = inputs["arch"], inputs["base"], inputs["ft1"]
    omitted, partner = TIED[arch]
    result = run("copy", base, "--source", dir1 if source == "directory" else pt1, "-o", tmp_path / "copied.pt")
    assert result.exit_code == 0, result.stderr
    copied, expected = load_torch(tmp_path / "copied.pt"), load_torch(pt1)
    assert same_storage(copied, omitted, partner)
    assert list(copied) == list(expected)
    for name, value in expected.items():
        assert torch.equal(copied[name], value), name


def test_no_alias_without_evidence(tmp_path):
    """A config that does not tie, and a model class without an LM head, leave the name missing."""
    import transformers as tf

    torch.manual_seed(0)
    untied = _model("gpt2", tie_word_embeddings=False)
    untied.save_pretrained(tmp_path / "untied")
    with torch.no_grad():
        untied.lm_head.weight.copy_(untied.transformer.wte.weight)
    torch.save(untied.state_dict(), tmp_path / "untied.pt")
    (tmp_path / "bare").mkdir()  # the head left out, as if tied, but the config says it is not
    shutil.copy(tmp_path / "untied" / "config.json", tmp_path / "bare")
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in untied.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "bare" / "model.safetensors", metadata={"format": "pt"})
    result = run("diff", tmp_path / "untied.pt", tmp_path / "bare")
    assert result.exit_code == 1 and "only in A (1):\n  lm_head.weight" in result.stdout

    classifier = tf.GPT2ForSequenceClassification(tf.GPT2Config(vocab_size=80, n_positions=32, n_embd=24, n_layer=2,
                                                                 n_head=2, num_labels=3, pad_token_id=0))
    classifier.save_pretrained(tmp_path / "classifier")
    assert json.loads((tmp_path / "classifier" / "config.json").read_text())["tie_word_embeddings"] is True
    torch.save(classifier.state_dict(), tmp_path / "classifier.pt")
    result = run("diff", tmp_path / "classifier.pt", tmp_path / "classifier")
    assert result.exit_code == 0 and "lm_head" not in result.stdout + result.stderr


def test_directory_output_leaves_the_tied_name_out_as_its_input_did(inputs, tmp_path):
    """A surgery on a save_pretrained directory writes what save_pretrained writes: the tied name
    stays out of the file while it is still tied, and transformers ties it again on loading."""
    from safetensors import safe_open

    directory, state = inputs["base"]
    omitted, partner = TIED[inputs["arch"]]
    out = tmp_path / "out"
    result = run("scale", directory, "-p", partner, "--by", 2, "--follow-ties", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    with safe_open(out / "model.safetensors", "pt") as f:
        assert partner in f.keys() and omitted not in f.keys()
    import transformers as tf

    auto = tf.AutoModelForMaskedLM if inputs["arch"] == "bert" else tf.AutoModelForCausalLM
    model = auto.from_pretrained(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    torch.testing.assert_close(model.get_input_embeddings().weight, 2 * load_torch(state)[partner], rtol=0, atol=0)
    untied = tmp_path / "untied"
    assert run("untie", directory, "-p", omitted, "-o", f"{untied}/").exit_code == 0
    with safe_open(untied / "model.safetensors", "pt") as f:  # no longer tied: written under its own name
        assert omitted in f.keys()


def test_a_failing_command_prints_its_error_alone(inputs, tmp_path):
    """The note on the tied name comes with a command that did its work, not before an error: a
    failure is one line on stderr."""
    directory, _ = inputs["base"]
    omitted, partner = TIED[inputs["arch"]]
    failed = run("zero", directory, "-p", "no.such.tensor", "-o", tmp_path / "out/")
    assert failed.exit_code == 2
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("paramsurgeon: error: "), failed.stderr
    assert not (tmp_path / "out").exists()
    done = run("zero", directory, "-p", partner, "--follow-ties", "-o", tmp_path / "out/")
    assert done.exit_code == 0, done.stderr
    assert f"note: {omitted} is not in the file: config.json ties it to {partner}" in done.stderr


@pytest.mark.parametrize("side", ["omitted", "partner"])
def test_dropping_one_name_of_the_tie_keeps_tie_word_embeddings(inputs, tmp_path, side):
    """Tied names are one parameter: dropping either leaves the weight under the other, and
    config.json still says tied, so from_pretrained ties the head to the embedding again (the
    model the directory held), rather than initialising a random head or embedding."""
    import transformers as tf

    arch, (directory, state) = inputs["arch"], inputs["base"]
    omitted, partner = TIED[arch]
    dropped, kept = (omitted, partner) if side == "omitted" else (partner, omitted)
    out = tmp_path / "out"
    result = run("drop", "-p", dropped, directory, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    assert f"tie_word_embeddings left true: transformers ties {dropped} to {kept} again" in result.stderr
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    auto = tf.AutoModelForMaskedLM if arch == "bert" else tf.AutoModelForCausalLM
    model = auto.from_pretrained(out)
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embedding.data_ptr()
    torch.testing.assert_close(embedding, load_torch(state)[partner], rtol=0, atol=0)


@pytest.mark.parametrize("command", ["diff", "check"])
def test_notes_of_two_inputs_name_their_input(inputs, command):
    """Two tied directories give one note each, named after its input, not the same line twice."""
    arch, (dir1, _), (dir2, _) = inputs["arch"], inputs["ft1"], inputs["ft2"]
    omitted, partner = TIED[arch]
    result = run("diff", dir1, dir2) if command == "diff" else run("check", dir1, "--like", dir2)
    assert result.exit_code == (1 if command == "diff" else 0), result.stdout + result.stderr
    notes = [line for line in result.stderr.splitlines() if f"{omitted} is not in the file" in line]
    assert notes == [f"note: {d / 'model.safetensors'}: {omitted} is not in the file: config.json ties it to {partner};"
                     " read as its alias" for d in (dir1, dir2)]
