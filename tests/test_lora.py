"""merge-lora and extract-lora against PEFT itself: adapters written by PEFT's save_pretrained (every
trained part non-zero), the ground truth PEFT's merge_and_unload of the same adapter into the same model
(PeftModel.from_pretrained); every output reloaded with torch or safetensors, untouched tensors bit-identical."""

import argparse
import copy
import json
import os
import shutil

import pytest
import torch
from helpers import bits, load_torch, register_input, run, same_storage
from lora_models import convs, gpt2, llama, make_adapter, peft_merged, state
from safetensors.torch import load_file, save_file

pytest.importorskip("peft")

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def merge_lora(tmp_path, base, adapter, *args, out="merged.safetensors"):
    result = run("merge-lora", base, adapter, "-o", tmp_path / out, *args)
    assert result.exit_code == 0, result.stderr
    path = tmp_path / out
    return (load_file(path) if out.endswith(".safetensors") else load_torch(path)), result


def assert_merged(got: dict, truth: dict, base: dict, changed_at_least: int):
    """Every tensor as PEFT merged it; the ones PEFT left alone bit-identical to the base."""
    assert sorted(got) == sorted(truth)
    changed = 0
    for name, expected in truth.items():
        assert got[name].dtype == base[name].dtype, name
        if torch.equal(expected, base[name]):
            assert bits(got[name]) == bits(base[name]), f"{name} changed"
        else:
            changed += 1
            torch.testing.assert_close(got[name], expected, msg=name)
    assert changed >= changed_at_least


@pytest.fixture
def llama_base(request, tmp_path):
    model = llama()
    path = tmp_path / "llama.safetensors"
    save_file(state(model), path)
    return model, register_input(request, path)


# ---- PEFT's arithmetic -------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"r": 4, "lora_alpha": 8},
    {"r": 4, "lora_alpha": 8, "use_rslora": True},
    {"r": 4, "lora_alpha": 8, "use_dora": True},
    {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 3},
     "alpha_pattern": {"layers.0.self_attn.q_proj": 5, "q_proj": 7}},
], ids=["lora", "rslora", "dora", "patterns"])
def test_llama_linear_and_embedding_match_peft(tmp_path, llama_base, options):
    model, base = llama_base
    adapter = make_adapter(model, tmp_path / "adapter", target_modules=LLAMA_LINEAR + ["embed_tokens"], **options)
    got, _ = merge_lora(tmp_path, base, adapter)
    assert_merged(got, peft_merged(model, adapter), state(model), 2 * 7 + 1)


def test_bf16_base_is_computed_in_float32_and_written_in_bf16(request, tmp_path):
    model = llama(torch.bfloat16)
    base = tmp_path / "bf16.pt"
    torch.save(state(model), base)
    register_input(request, base)
    adapter = make_adapter(model, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=LLAMA_LINEAR)
    got, _ = merge_lora(tmp_path, base, adapter, out="merged.pt")
    truth = peft_merged(model, adapter)
    assert_merged(got, truth, state(model), 14)
    # the update is W + BA computed in float32, rounded once
    sd = load_file(adapter / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    a, b = sd[f"base_model.model.{name}.lora_A.weight"].float(), sd[f"base_model.model.{name}.lora_B.weight"].float()
    expected = (state(model)[f"{name}.weight"].float() + b @ a * 2).to(torch.bfloat16)
    assert torch.equal(got[f"{name}.weight"], expected)


def test_gpt2_conv1d_fan_in_fan_out_lora_bias_and_modules_to_save(request, tmp_path):
    model = gpt2()
    base = tmp_path / "gpt2.pt"
    torch.save(state(model), base)  # wte and lm_head tied, as GPT-2 saves them
    register_input(request, base)
    adapter = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"],
                           lora_bias=True, modules_to_save=["ln_f"], bias="all")
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"]  # PEFT forced it
    got, _ = merge_lora(tmp_path, base, adapter, out="merged.pt")
    # attn.c_proj is square (24x24): its layout comes from the config; the others from their shapes
    assert_merged(got, peft_merged(model, adapter), state(model), 2 * 3 * 2 + 2 + 2 * 2)  # + LayerNorm biases
    assert got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()  # untouched tie kept


def test_conv1d_2d_3d_dora_and_scale(request, tmp_path):
    model = convs()
    base = tmp_path / "convs.pt"
    torch.save(state(model), base)
    register_input(request, base)
    targets = ["c3", "c1", "d1", "d3", "head"]
    for dora in (False, True):
        adapter = make_adapter(model, tmp_path / f"adapter-{dora}", r=4, lora_alpha=4, target_modules=targets,
                               use_dora=dora, modules_to_save=["norm"])
        got, _ = merge_lora(tmp_path, base, adapter, out=f"merged-{dora}.pt")
        assert_merged(got, peft_merged(model, adapter), state(model), 5 + 2)
        half, _ = merge_lora(tmp_path, base, adapter, "--scale", "0.5", out=f"half-{dora}.pt")
        assert_merged(half, peft_merged(model, adapter, scale=0.5), state(model), 5 + 2)


def test_grouped_conv_is_refused_as_peft_refuses_it(request, tmp_path):
    model = convs()
    base = tmp_path / "convs.pt"
    torch.save(state(model), base)
    register_input(request, base)
    adapter = make_adapter(model, tmp_path / "adapter", r=4, target_modules=["grouped", "c1"])
    with pytest.raises(NotImplementedError):
        peft_merged(model, adapter)
    result = run("merge-lora", base, adapter, "-o", tmp_path / "out.pt")
    assert result.exit_code == 2
    assert result.stderr == ("paramsurgeon: error: merge-lora: 'grouped': a grouped convolution (groups=2): its LoRA"
                             " update mixes every input channel, which the grouped weight cannot hold (PEFT refuses to"
                             " merge it too)\n")
    assert not (tmp_path / "out.pt").exists()


def test_sharded_base_and_bin_adapter(tmp_path, llama_base):
    model, base = llama_base
    adapter = make_adapter(model, tmp_path / "adapter", r=4, target_modules=["q_proj", "up_proj"])
    truth = peft_merged(model, adapter)
    sharded = tmp_path / "sharded"
    assert run("convert", base, "-o", sharded, "--max-shard-size", "20kB").exit_code == 0
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    os.remove(adapter / "adapter_model.safetensors")
    got, _ = merge_lora(tmp_path, sharded, adapter)
    assert_merged(got, truth, state(model), 4)


def test_adapter_whose_pickle_needs_a_global_is_refused_without_allow_global(tmp_path, llama_base):
    """The adapter is opened by the command's loader: --allow-global (and --unsafe-pickle) reach it."""
    model, base = llama_base
    adapter = make_adapter(model, tmp_path / "adapter", r=4, target_modules=["q_proj", "down_proj"])
    truth = peft_merged(model, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")  # a training script's .bin: the pairs and its hparams
    torch.save({**tensors, "hparams": argparse.Namespace(lr=1e-4, r=4)}, adapter / "adapter_model.bin")
    os.remove(adapter / "adapter_model.safetensors")
    message = refused(tmp_path, base, adapter)
    assert "\n" not in message and "argparse.Namespace" in message and "--allow-global argparse.Namespace" in message
    got, _ = merge_lora(tmp_path, base, adapter, "--allow-global", "argparse.Namespace")
    assert_merged(got, truth, state(model), 4)
    got, _ = merge_lora(tmp_path, base, adapter, "--unsafe-pickle", out="unsafe.safetensors")
    assert_merged(got, truth, state(model), 4)


def test_peft_wrapped_base_layer_names(tmp_path, llama_base):
    """A base saved from an unmerged PeftModel names its weights '<module>.base_layer.weight'."""
    model, _ = llama_base
    adapter = make_adapter(model, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    wrapped = {k.replace("q_proj.weight", "q_proj.base_layer.weight"): v for k, v in state(model).items()}
    save_file(wrapped, tmp_path / "wrapped.safetensors")
    got, _ = merge_lora(tmp_path, tmp_path / "wrapped.safetensors", adapter)
    truth = peft_merged(model, adapter)
    for name, tensor in truth.items():
        torch.testing.assert_close(got[name.replace("q_proj.weight", "q_proj.base_layer.weight")], tensor)


# ---- ties ----------------------------------------------------------------------------------------


def test_tied_embedding_adapted_on_one_side(request, tmp_path):
    model = llama(tie=True)
    base = tmp_path / "tied.pt"
    torch.save(state(model), base)
    register_input(request, base)
    before = state(model)
    adapter = make_adapter(model, tmp_path / "adapter", r=4, target_modules=["embed_tokens"])
    embed = peft_merged(model, adapter)["model.embed_tokens.weight"]
    kept, result = merge_lora(tmp_path, base, adapter, out="tied-out.pt")  # the default follows the tie
    assert kept["lm_head.weight"].untyped_storage().data_ptr() == kept["model.embed_tokens.weight"].untyped_storage().data_ptr()
    torch.testing.assert_close(kept["lm_head.weight"], embed)  # as PEFT's merge_and_unload leaves it
    assert "note: 'model.embed_tokens.weight' is tied to 'lm_head.weight': it takes the merged values too" in result.stderr
    got, result = merge_lora(tmp_path, base, adapter, "--untie", out="untied.pt")
    torch.testing.assert_close(got["model.embed_tokens.weight"], embed)
    assert bits(got["lm_head.weight"]) == bits(before["lm_head.weight"])  # what the unmerged adapted model computes
    assert got["lm_head.weight"].untyped_storage().data_ptr() != got["model.embed_tokens.weight"].untyped_storage().data_ptr()
    assert "note: 'model.embed_tokens.weight' was tied to 'lm_head.weight'; the tie is broken (--untie)" in result.stderr
    both = run("merge-lora", base, adapter, "--untie", "--follow-ties", "-o", tmp_path / "both.pt")
    assert both.exit_code == 2 and not (tmp_path / "both.pt").exists()
    assert both.stderr == "paramsurgeon: error: merge-lora: --untie and --follow-ties contradict each other; pass one\n"


@pytest.mark.parametrize("target", ["lm_head", "wte"])
def test_tied_gpt2_merges_as_merge_and_unload_and_stays_tied(request, tmp_path, target):
    """A torch GPT-2 whose lm_head and wte share storage: by default the merge changes both, as PEFT's
    merge_and_unload changes the shared weight, and the written file keeps them one storage."""
    model = gpt2(tie=True)
    base = tmp_path / "gpt2.pt"
    torch.save(model.state_dict(), base)
    register_input(request, base)
    loaded = torch.load(base, weights_only=True)
    assert loaded["lm_head.weight"].untyped_storage().data_ptr() == loaded["transformer.wte.weight"].untyped_storage().data_ptr()
    adapter = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=[target])
    truth = peft_merged(model, adapter)
    assert not torch.equal(truth["lm_head.weight"], state(model)["lm_head.weight"])  # PEFT changed the shared weight
    result = run("merge-lora", base, adapter, "-o", tmp_path / "merged.pt")
    assert result.exit_code == 0, result.stderr
    got = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert got["lm_head.weight"].untyped_storage().data_ptr() == got["transformer.wte.weight"].untyped_storage().data_ptr()
    assert_merged(got, truth, state(model), 2)


def test_tied_pair_adapted_on_both_sides(request, tmp_path):
    """An adapter on wte and on lm_head of a tied GPT-2: refused by default (the tied weight cannot
    hold both updates), said once; --untie gives each what the unmerged adapted model computes."""
    from peft import PeftModel

    model = gpt2(tie=True)
    base = tmp_path / "gpt2.pt"
    torch.save(model.state_dict(), base)
    register_input(request, base)
    adapter = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["wte", "lm_head"])
    assert refused(tmp_path, base, adapter) == ("merge-lora: 'transformer.wte.weight' and 'lm_head.weight' are tied but"
                                                " the adapter updates each, differently; pass --untie to give each its"
                                                " own values")
    got, _ = merge_lora(tmp_path, base, adapter, "--untie", out="untied.pt")
    adapted = PeftModel.from_pretrained(copy.deepcopy(model), adapter).base_model.model
    with torch.no_grad():
        rows = adapted.transformer.wte(torch.arange(model.config.vocab_size))
        head = adapted.lm_head(torch.eye(model.config.n_embd)).T  # (W + delta) applied to the identity
    torch.testing.assert_close(got["transformer.wte.weight"], rows)
    torch.testing.assert_close(got["lm_head.weight"], head)


# ---- errors: exit 2, one line naming the offender, nothing written ----------------------------------


def refused(tmp_path, base, adapter, *args) -> str:
    out = tmp_path / "refused.safetensors"
    for extra in ([], ["--dry-run"]):
        result = run("merge-lora", base, adapter, "-o", out, *args, *extra)
        assert result.exit_code == 2, result.stderr
        assert not out.exists()
    return result.stderr.removeprefix("paramsurgeon: error: ").strip()


def test_errors(tmp_path, llama_base):
    model, base = llama_base
    adapter = make_adapter(model, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())

    def variant(name, **changes):
        folder = tmp_path / name
        shutil.copytree(adapter, folder)
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return folder

    other = tmp_path / "other.safetensors"
    save_file({k.replace("layers.", "blocks."): v for k, v in state(model).items()}, other)
    assert refused(tmp_path, other, adapter) == (
        f"merge-lora: 2 adapted modules match no tensor of {other}: model.layers.0.self_attn.q_proj,"
        " model.layers.1.self_attn.q_proj (looked for '<module>.weight' and '<module>.base_layer.weight'); is this"
        " the adapter's base model?")
    assert refused(tmp_path, base, variant("pattern", rank_pattern={"k_proj": 2})) == (
        f"merge-lora: {tmp_path / 'pattern'}: rank_pattern key 'k_proj' matches no adapted module")
    assert refused(tmp_path, base, variant("pissa", init_lora_weights="pissa")) == (
        f"merge-lora: {tmp_path / 'pissa'}: init_lora_weights 'pissa' changed the base weights during training;"
        " convert the adapter first (save_pretrained with path_initial_model_for_weight_conversion), then merge it")
    message = refused(tmp_path, base, variant("features", layer_replication=[[0, 1], [1, 2]],
                                              trainable_token_indices=[1, 2]))
    assert message == (f"merge-lora: {tmp_path / 'features'}: layer_replication (the adapted model repeats base"
                       " layers) cannot be merged exactly; trainable_token_indices (trainable-token deltas are not"
                       " LoRA pairs) cannot be merged exactly")
    assert refused(tmp_path, base, variant("rank", r=8)) == (
        f"merge-lora: {tmp_path / 'rank'}: 'model.layers.0.self_attn.q_proj' has rank 4 in the file but r 8 in the"
        " config; 'model.layers.1.self_attn.q_proj' has rank 4 in the file but r 8 in the config")
    assert refused(tmp_path, base, tmp_path / "missing") == (
        f"merge-lora: '{tmp_path / 'missing'}' is not a directory; an adapter is the directory save_pretrained writes, with"
        " adapter_config.json and adapter_model.safetensors")


# ---- extract-lora: PEFT loads what it writes, and merging it recovers the fine-tune ----------------


def low_rank(shape, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)


def extracted(tmp_path, base, tuned, *args):
    out = tmp_path / "extracted"
    result = run("extract-lora", base, tuned, "-o", out, *args)
    assert result.exit_code == 0, result.stderr
    return out, result


def test_extract_llama_recovers_a_low_rank_fine_tune(request, tmp_path, llama_base):
    from peft import PeftModel

    model, base = llama_base
    tuned = state(model)
    tuned["model.layers.0.self_attn.q_proj.weight"] += low_rank((32, 32), 3, 1)
    tuned["model.layers.1.mlp.down_proj.weight"] += low_rank((32, 48), 2, 2)
    tuned["model.embed_tokens.weight"] += low_rank((96, 32), 3, 3)
    tuned["model.layers.1.input_layernorm.weight"] += 0.5
    tuned_path = tmp_path / "tuned.safetensors"
    save_file(tuned, tuned_path)
    register_input(request, tuned_path)
    adapter, result = extracted(tmp_path, base, tuned_path, "--rank", "4", "--alpha", "8")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["model.embed_tokens", "model.layers.0.self_attn.q_proj",
                                                "model.layers.1.mlp.down_proj"]
    assert config["modules_to_save"] == ["model.layers.1.input_layernorm"]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["tensor", "shape", "layout", "rank", "error"]
    errors = {line.split()[0]: line.split()[-1] for line in lines[2:]}
    assert all(float(errors[f"{m}.weight"]) < 1e-5 for m in config["target_modules"])
    merged = PeftModel.from_pretrained(llama(), adapter).merge_and_unload().state_dict()
    for name, expected in tuned.items():
        torch.testing.assert_close(merged[name], expected, msg=name, atol=1e-5, rtol=1e-4)
    # and merge-lora agrees with PEFT on the extracted adapter
    got, _ = merge_lora(tmp_path, base, adapter)
    for name, expected in tuned.items():
        torch.testing.assert_close(got[name], expected, msg=name, atol=1e-5, rtol=1e-4)


def test_extract_truncates_to_the_best_rank_r_approximation(request, tmp_path, llama_base):
    model, base = llama_base
    tuned = state(model)
    name = "model.layers.0.mlp.up_proj.weight"
    delta = low_rank((48, 32), 6, 4)
    tuned[name] = tuned[name] + delta
    tuned_path = tmp_path / "tuned.safetensors"
    save_file(tuned, tuned_path)
    register_input(request, tuned_path)
    dry = run("extract-lora", base, tuned_path, "-o", tmp_path / "dry", "--rank", "2", "--dry-run")
    assert dry.exit_code == 0 and not (tmp_path / "dry").exists()
    assert dry.stdout.splitlines()[3].split() == [name, "48x32", "linear", "2"]
    adapter, result = extracted(tmp_path, base, tuned_path, "--rank", "2")
    u, s, vh = torch.linalg.svd((tuned[name] - state(model)[name]).double())
    best = state(model)[name].double() + (u[:, :2] * s[:2]) @ vh[:2]
    error = float(s[2:].norm() / s.norm())
    assert float(result.stdout.splitlines()[2].split()[-1]) == pytest.approx(error, rel=1e-3)
    got, _ = merge_lora(tmp_path, base, adapter)
    torch.testing.assert_close(got[name].double(), best, atol=1e-5, rtol=1e-4)
    from helpers import json_of
    document = json_of("extract-lora", base, tuned_path, "-o", tmp_path / "again", "--rank", "2", schema="extract-lora")
    assert [(m["tensor"], m["rank"]) for m in document["modules"]] == [(name, 2)]
    assert document["modules"][0]["error"] == pytest.approx(error, rel=1e-3)
    assert document["config"] == json.loads((tmp_path / "again" / "adapter_config.json").read_text())


def test_extract_gpt2_conv1d_with_bias_and_convs(request, tmp_path):
    from peft import PeftModel

    for build, weights in ((gpt2, ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"]),
                           (convs, ["c3.weight", "c1.weight", "d1.weight", "d3.weight", "head.weight"])):
        model = build()
        before = state(model)
        tuned = {k: v.clone() for k, v in before.items()}
        for i, name in enumerate(weights):
            shape = tuned[name].shape
            tuned[name] += low_rank((shape[0], tuned[name].numel() // shape[0]), 2, i).reshape(shape)
            tuned[name.replace("weight", "bias")] += 0.1
        folder = tmp_path / build.__name__
        folder.mkdir()
        torch.save(before, folder / "base.pt")
        torch.save(tuned, folder / "tuned.pt")
        adapter, _ = extracted(folder, folder / "base.pt", folder / "tuned.pt", "--rank", "2")
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["bias"] == "lora_only" and config["modules_to_save"] is None
        merged = PeftModel.from_pretrained(build(), adapter).merge_and_unload().state_dict()
        for name, expected in tuned.items():
            torch.testing.assert_close(merged[name], expected, msg=name, atol=1e-5, rtol=1e-4)


def tuned_gpt2(model, seed=5):
    """A copy of ``model`` whose every 2-D weight but wpe moved by a rank-2 delta (attn.c_proj, square,
    and the lm_head and wte when they are their own), with a Conv1D bias and ln_f moved too."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if param.dim() == 2 and "wpe" not in name:
                param += 0.1 * torch.randn(param.shape[0], 2, generator=g) @ torch.randn(2, param.shape[1], generator=g)
        tuned.transformer.h[0].attn.c_attn.bias += 0.1
        tuned.transformer.ln_f.weight += 0.1
    return tuned


def test_extract_gpt2_tells_conv1d_from_linear_per_tensor(request, tmp_path):
    """GPT-2 with an untied lm_head: Conv1D (in, out) attention and MLP, square attn.c_proj among them,
    and an nn.Linear (out, in) lm_head in the same file. PEFT loads the adapter and computes the tuned
    model's logits; merge_and_unload and merge-lora of it give the tuned weights."""
    from peft import PeftModel

    model = gpt2(tie=False)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    tuned = tuned_gpt2(model)
    model.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    base = register_input(request, tmp_path / "base")
    tokens = torch.randint(0, 80, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tuned(tokens).logits
    for flag in ([], ["--fan-in-fan-out"]):  # the flag changes nothing where the checkpoint tells
        adapter, result = extracted(tmp_path, base, tmp_path / "tuned", "--rank", "3", *flag)
        layouts = {line.split()[0]: line.split()[2] for line in result.stdout.splitlines()[2:]}
        assert {n: layouts[n] for n in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                                        "transformer.h.1.mlp.c_proj.weight", "lm_head.weight",
                                        "transformer.wte.weight")} == {
            "transformer.h.0.attn.c_attn.weight": "transposed", "transformer.h.0.attn.c_proj.weight": "transposed",
            "transformer.h.1.mlp.c_proj.weight": "transposed", "lm_head.weight": "linear",
            "transformer.wte.weight": "embedding"}
        assert ("--fan-in-fan-out changed nothing" in result.stderr) == bool(flag)
        loaded = PeftModel.from_pretrained(gpt2(tie=False), adapter).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens).logits, expected, atol=1e-5, rtol=1e-5)
        merged = loaded.merge_and_unload().state_dict()
        for name, weight in tuned.state_dict().items():
            torch.testing.assert_close(merged[name], weight, msg=name, atol=1e-5, rtol=1e-4)
        # paramsurgeon's own merge agrees with PEFT's (a round trip through the same mistake cannot pass)
        got, _ = merge_lora(tmp_path, base, adapter)
        for name, weight in state(tuned).items():
            torch.testing.assert_close(got[name], weight, msg=name, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("build", [gpt2, lambda: llama(tie=True)], ids=["gpt2", "llama"])
def test_extract_of_a_tied_model_adapts_the_shared_weight_once(request, tmp_path, build):
    """Base and fine-tune both tie lm_head to the input embedding: the adapter adapts the embedding
    alone, so PEFT's merge_and_unload into the base gives the fine-tune, still tied (an update for
    each name would be added to the shared weight twice)."""
    from peft import PeftModel

    model = build()
    embedding = model.get_input_embeddings()
    assert model.get_output_embeddings().weight is embedding.weight
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in tuned.parameters():  # the tied weight once
            if param.dim() == 2:
                param += 0.1 * torch.randn(param.shape[0], 2, generator=g) @ torch.randn(2, param.shape[1], generator=g)
    model.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    base = register_input(request, tmp_path / "base")
    adapter, result = extracted(tmp_path, base, tmp_path / "tuned", "--rank", "3")
    name = next(n for n, m in model.named_modules() if m is embedding)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert name in config["target_modules"] and "lm_head" not in config["target_modules"]
    assert f"note: lm_head.weight is tied to {name}.weight in " in result.stderr
    merged = PeftModel.from_pretrained(build(), adapter).merge_and_unload()
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    merged = merged.state_dict()
    for key, weight in tuned.state_dict().items():
        torch.testing.assert_close(merged[key], weight, msg=key, atol=1e-5, rtol=1e-4)
    got, _ = merge_lora(tmp_path, base, adapter, out="merged.pt")  # paramsurgeon's merge follows the tie alike
    for key, weight in state(tuned).items():
        torch.testing.assert_close(got[key], weight, msg=key, atol=1e-5, rtol=1e-4)
    assert same_storage(got, "lm_head.weight", f"{name}.weight")
    untied = copy.deepcopy(tuned)  # a head that left the embedding: no adapter on the tied base gives it
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach() + 0.1)
    torch.save(untied.state_dict(), tmp_path / "untied.pt")
    refused = run("extract-lora", base, tmp_path / "untied.pt", "-o", tmp_path / "refused", "--rank", "3")
    assert refused.exit_code == 2 and not (tmp_path / "refused").exists()
    assert f"'{name}.weight' and 'lm_head.weight' are tied in " in refused.stderr
    assert "untie them in BASE first" in refused.stderr


def test_extract_saves_a_module_with_submodules_whole(request, tmp_path):
    """BERT's masked-LM head holds its own bias beside submodules (transform, decoder): PEFT copies a
    module to save whole and loads every tensor of the copy, so the adapter holds them all, and a
    changed weight inside it is saved there, not adapted."""
    from peft import PeftModel
    from transformers import BertConfig, BertForMaskedLM

    def bert():
        torch.manual_seed(0)
        return BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=24, max_position_embeddings=32)).eval()

    model, tuned = bert(), bert()
    with torch.no_grad():
        tuned.cls.predictions.bias += 0.5
        tuned.cls.predictions.transform.dense.weight += low_rank((16, 16), 2, 1)
        tuned.bert.encoder.layer[0].attention.self.query.weight += low_rank((16, 16), 2, 2)
    model.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    base = register_input(request, tmp_path / "base")
    adapter, _ = extracted(tmp_path, base, tmp_path / "tuned", "--rank", "2")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["cls.predictions"]
    assert config["target_modules"] == ["bert.encoder.layer.0.attention.self.query"]
    merged = PeftModel.from_pretrained(bert(), adapter).merge_and_unload().state_dict()
    for key, weight in tuned.state_dict().items():
        if key.startswith("cls."):
            assert torch.equal(merged[key], weight), key
        else:
            torch.testing.assert_close(merged[key], weight, msg=key, atol=1e-5, rtol=1e-4)
    got, _ = merge_lora(tmp_path, base, adapter)  # written as save_pretrained writes it, the tied names once
    for key, weight in load_file(tmp_path / "tuned" / "model.safetensors").items():
        torch.testing.assert_close(got[key], weight, msg=key, atol=1e-5, rtol=1e-4)


class LoneConv1D(torch.nn.Module):
    """One square GPT-2 Conv1D and nothing near it that tells its layout."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.proj = Conv1D(8, 8)

    def forward(self, x):
        return self.proj(x)


def test_extract_square_weight_nothing_tells_follows_the_flag(request, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = LoneConv1D().eval()
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.proj.weight += low_rank((8, 8), 2, 7)
    torch.save(state(model), tmp_path / "base.pt")
    torch.save(state(tuned), tmp_path / "tuned.pt")
    register_input(request, tmp_path / "base.pt")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    for flag, right in (([], False), (["--fan-in-fan-out"], True)):
        adapter, result = extracted(tmp_path, tmp_path / "base.pt", tmp_path / "tuned.pt", "--rank", "2", *flag)
        assumed = "GPT-2 Conv1D's (in, out) (--fan-in-fan-out)" if flag else \
            "nn.Linear's (out, in); pass --fan-in-fan-out if they are GPT-2 Conv1D's (in, out)"
        assert result.stderr.splitlines()[0] == (
            "extract-lora: note: the checkpoint does not tell the layout of proj.weight (square, and no weight near it"
            f" tells by its bias): took {assumed}")
        with torch.no_grad():
            got = PeftModel.from_pretrained(copy.deepcopy(model), adapter)(x)
        assert torch.allclose(got, tuned(x), atol=1e-5) == right  # PEFT lays it as a Conv1D


def test_merge_lora_lays_each_module_as_peft_does_whatever_the_config_says(request, tmp_path):
    """PEFT forces fan_in_fan_out on for a Conv1D and off for an nn.Linear; the square attn.c_proj
    follows the base's layout, not the config's flag."""
    model = gpt2(tie=False)
    base = tmp_path / "gpt2.safetensors"
    save_file(state(model), base)
    register_input(request, base)
    adapter = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj",
                                                                                          "lm_head"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    for flag in (False, True):
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": flag}))
        got, _ = merge_lora(tmp_path, base, adapter, out=f"merged-{flag}.safetensors")
        assert_merged(got, peft_merged(model, adapter), state(model), 2 * 3 + 1)


def test_dtype_of_extracted_and_merged_outputs(request, tmp_path):
    """bf16 in, bf16 out by default (the base's dtype); --dtype float32 writes float32: the adapter's
    tensors, and every floating-point tensor of a merge (the merged ones rounded once, from float32)."""
    from peft import PeftModel

    model = llama(torch.bfloat16)
    before = state(model)
    tuned = {k: v.clone() for k, v in before.items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    tuned[name] = (tuned[name].float() + low_rank((32, 32), 2, 1)).to(torch.bfloat16)
    tuned["model.norm.weight"] += 0.5  # saved whole (modules_to_save)
    base, tuned_path = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file(before, base)
    save_file(tuned, tuned_path)
    register_input(request, base)
    for flag, dtype in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        adapter, _ = extracted(tmp_path, base, tuned_path, "--rank", "2", *flag)
        written = load_file(adapter / "adapter_model.safetensors")
        assert sorted(written) == [f"base_model.model.{name[:-7]}.lora_A.weight",
                                   f"base_model.model.{name[:-7]}.lora_B.weight", "base_model.model.model.norm.weight"]
        assert {k: v.dtype for k, v in written.items()} == dict.fromkeys(written, dtype)
        merged = PeftModel.from_pretrained(llama(torch.bfloat16), adapter).merge_and_unload().state_dict()
        torch.testing.assert_close(merged[name], tuned[name], atol=2e-2, rtol=2e-2)  # bf16's resolution
        assert torch.equal(merged["model.norm.weight"], tuned["model.norm.weight"])
    adapter = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    got, _ = merge_lora(tmp_path, base, adapter, out="bf16.safetensors")
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    got, _ = merge_lora(tmp_path, base, adapter, "--dtype", "float32", out="f32.safetensors")
    wide = llama().float()
    wide.load_state_dict({k: v.float() for k, v in before.items()})
    truth = peft_merged(wide, adapter)  # PEFT's merge into the bf16 values held as float32
    assert {v.dtype for v in got.values()} == {torch.float32}
    assert_merged(got, truth, state(wide), 4)
    result = run("merge-lora", base, adapter, "--dtype", "int8", "-o", tmp_path / "int8.safetensors")
    assert result.exit_code == 2 and not (tmp_path / "int8.safetensors").exists()
    assert result.stderr == "paramsurgeon: error: --dtype int8: choose from float32, float16, bfloat16, float64\n"


def test_extract_errors(request, tmp_path, llama_base):
    model, base = llama_base
    tuned = state(model)
    tuned.pop("lm_head.weight")
    path = tmp_path / "short.safetensors"
    save_file(tuned, path)
    result = run("extract-lora", base, path, "-o", tmp_path / "out", "--rank", "2")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.stderr == (f"paramsurgeon: error: extract-lora: 1 tensor of {base} missing from {path}:"
                             " lm_head.weight\n")
    torch.save({"pos_embed": torch.zeros(4, 8), "fc.weight": torch.zeros(3, 8)}, tmp_path / "vit.pt")
    torch.save({"pos_embed": torch.ones(4, 8), "fc.weight": torch.ones(3, 8), "new.weight": torch.ones(3)},
               tmp_path / "vit-tuned.pt")
    result = run("extract-lora", tmp_path / "vit.pt", tmp_path / "vit-tuned.pt", "-o", tmp_path / "out", "--rank", "2")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.stderr == (f"paramsurgeon: error: extract-lora: 1 tensor of {tmp_path / 'vit-tuned.pt'} missing"
                             f" from {tmp_path / 'vit.pt'}: new.weight\n")
    result = run("extract-lora", tmp_path / "vit.pt", tmp_path / "vit-tuned.pt", "-o", tmp_path / "out", "--rank", "2",
                 "-x", "new.*")
    assert result.stderr == ("paramsurgeon: error: extract-lora: pos_embed changed but is not a module's .weight,"
                             " which LoRA adapts; leave it out with -x\n")
    result = run("extract-lora", tmp_path / "vit.pt", tmp_path / "vit-tuned.pt", "-o", tmp_path / "out", "--rank", "2",
                 "-x", "new.*", "-x", "pos_embed")
    assert result.exit_code == 0 and (tmp_path / "out" / "adapter_config.json").exists()
    result = run("extract-lora", tmp_path / "vit.pt", tmp_path / "vit-tuned.pt", "-o", tmp_path, "--rank", "2")
    assert result.exit_code == 2 and result.stderr == (f"paramsurgeon: error: -o {tmp_path} holds the input"
                                                       f" {tmp_path / 'vit.pt'} (base); nothing was written;"
                                                       " write elsewhere\n")
    result = run("extract-lora", tmp_path / "vit.pt", tmp_path / "vit.pt", "-o", tmp_path / "same", "--rank", "2")
    assert result.exit_code == 2 and not (tmp_path / "same").exists()
    assert result.stderr == (f"paramsurgeon: error: extract-lora: {tmp_path / 'vit.pt'} and {tmp_path / 'vit.pt'} hold"
                             " the same values in all 2 selected tensors; there is no fine-tune to extract (is TUNED"
                             " the fine-tuned checkpoint?)\n")


def test_json_plan_stdin_and_overflow(tmp_path, llama_base):
    from helpers import validate

    model, base = llama_base
    adapter = make_adapter(model, tmp_path / "adapter", r=4, target_modules=["o_proj"])
    result = run("merge-lora", base, adapter, "--dry-run", "--json")
    document = validate(json.loads(result.stdout), "plan")
    assert [c["name"] for c in document["changes"]] == [f"model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)]
    assert {m["module"]: (m["r"], m["scaling"]) for m in document["modules"]} == {
        f"model.layers.{i}.self_attn.o_proj": (4, 2.0) for i in (0, 1)}
    piped = run("merge-lora", "-", adapter, "--format", "safetensors", input=open(base, "rb").read())
    assert piped.exit_code == 0, piped.stderr
    from safetensors.torch import load
    assert_merged(load(piped.stdout_bytes), peft_merged(model, adapter), state(model), 2)
    # float16: an update beyond 65504 is refused, in the dry run too, unless --allow-overflow
    half = {k: v.half() for k, v in state(model).items()}
    save_file(half, tmp_path / "half.safetensors")
    big = tmp_path / "big"
    shutil.copytree(adapter, big)
    config = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 4e6}))
    message = refused(tmp_path, tmp_path / "half.safetensors", big)
    assert message.startswith("merge-lora: ") and "values of 'model.layers.0.self_attn.o_proj.weight' would become Inf"\
        " or NaN (float16 holds |x| <= 65504); nothing was written; pass --allow-overflow to write them anyway" in message
    got, _ = merge_lora(tmp_path, tmp_path / "half.safetensors", big, "--allow-overflow")
    assert torch.isinf(got["model.layers.0.self_attn.o_proj.weight"]).any()


def test_lora_bias_without_a_base_bias(tmp_path, llama_base):
    model, base = llama_base
    adapter = make_adapter(model, tmp_path / "adapter", r=4, target_modules=["q_proj"], lora_bias=True)
    assert refused(tmp_path, base, adapter) == (
        "merge-lora: 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias' (lora_bias) has no base bias to"
        " update: 'model.layers.0.self_attn.q_proj.bias' does not exist (PEFT cannot merge it either);"
        " 'base_model.model.model.layers.1.self_attn.q_proj.lora_B.bias' (lora_bias) has no base bias to update:"
        " 'model.layers.1.self_attn.q_proj.bias' does not exist (PEFT cannot merge it either)")


def test_library_calls(tmp_path, llama_base):
    import paramsurgeon as ps

    model, base = llama_base
    adapter = make_adapter(model, tmp_path / "adapter", r=4, target_modules=["gate_proj"])
    ps.save(ps.merge_lora(str(base), str(adapter), scale=0.5), str(tmp_path / "half.safetensors"))
    assert_merged(load_file(tmp_path / "half.safetensors"), peft_merged(model, adapter, scale=0.5), state(model), 2)
    tuned = tmp_path / "half.safetensors"
    rows = ps.extract_lora(str(base), str(tuned), str(tmp_path / "back"), rank=4)
    assert [(r["tensor"], r["rank"]) for r in rows] == [(f"model.layers.{i}.mlp.gate_proj.weight", 4) for i in (0, 1)]
    assert all(r["error"] < 1e-5 for r in rows)


def test_adapter_of_a_resized_vocabulary(tmp_path, llama_base):
    model, base = llama_base
    resized = llama()
    resized.resize_token_embeddings(100)
    adapter = make_adapter(resized, tmp_path / "adapter", r=4, target_modules=["embed_tokens", "q_proj"])
    assert refused(tmp_path, base, adapter) == (
        "merge-lora: 'base_model.model.model.embed_tokens.base_layer.weight' is [100, 32] but the base's"
        " 'model.embed_tokens.weight' is [96, 32]; the adapter was trained on a model with another vocabulary:"
        " resize the base the same way first; 'model.embed_tokens': lora_embedding_A [4, 100] and lora_embedding_B"
        " [32, 4] do not fit the weight [96, 32]")


def test_merge_lora_as_a_recipe_step(tmp_path, llama_base):
    """op = "merge-lora" in apply: PEFT's merge, then the next step on the merged values."""
    model, base = llama_base
    adapter = make_adapter(model, tmp_path / "adapter", r=4, target_modules=["o_proj"])
    recipe = tmp_path / "deploy.toml"
    recipe.write_text(f'[[step]]\nop = "merge-lora"\nadapter = "{adapter}"\n\n'
                      '[[step]]\nop = "scale"\npattern = ["model.layers.0.self_attn.o_proj.weight"]\nby = 2\n')
    result = run("apply", base, recipe, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.stderr
    got, truth = load_file(tmp_path / "out.safetensors"), peft_merged(model, adapter)
    name = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(got[name], 2 * truth[name])
    assert_merged({**got, name: truth[name]}, truth, state(model), 1)
    (tmp_path / "bad.toml").write_text('[[step]]\nop = "merge-lora"\n')
    result = run("apply", base, tmp_path / "bad.toml", "-o", tmp_path / "bad.safetensors")
    assert result.exit_code == 2 and "step 1 (merge-lora): needs 'adapter'" in result.stderr
    assert not (tmp_path / "bad.safetensors").exists()


def test_extract_says_which_key_it_read_of_each_input_named(request, tmp_path):
    """A training checkpoint as BASE: the --key chosen in it is said once, after its path, and the
    adapter is the change from that state_dict (not from its EMA copy)."""
    torch.manual_seed(0)
    weight, change = torch.randn(6, 8), torch.outer(torch.randn(6), torch.randn(8))
    base = tmp_path / "base.pt"
    torch.save({"state_dict": {"fc.weight": weight}, "ema": {"fc.weight": weight + 5}}, base)
    tuned = tmp_path / "tuned.pt"
    torch.save({"fc.weight": weight + change}, tuned)
    for path in (base, tuned):
        register_input(request, path)
    result = run("extract-lora", base, tuned, "-o", tmp_path / "adapter", "--rank", "1")
    assert result.exit_code == 0, result.stderr
    chosen = f"note: {base}: using 'state_dict'; the file also holds tensors in ema (pick with --key)"
    assert result.stderr.splitlines().count(chosen) == 1, result.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    sd = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    delta = sd["base_model.model.fc.lora_B.weight"] @ sd["base_model.model.fc.lora_A.weight"]
    torch.testing.assert_close(delta * config["lora_alpha"] / config["r"], change, rtol=1e-4, atol=1e-5)


def test_extract_to_a_path_that_is_no_directory_is_refused_before_any_work(request, tmp_path):
    """-o naming a file or a FIFO: one line, exit 2, nothing printed or computed, the file kept."""
    torch.manual_seed(1)
    weight = torch.randn(6, 8)
    base, tuned = tmp_path / "base.pt", tmp_path / "tuned.pt"
    torch.save({"fc.weight": weight}, base)
    torch.save({"fc.weight": weight + 1}, tuned)
    taken, fifo = tmp_path / "taken.txt", tmp_path / "fifo"
    taken.write_text("keep")
    os.mkfifo(fifo)
    for out in (taken, fifo):
        result = run("extract-lora", base, tuned, "-o", out, "--rank", "1")
        assert result.exit_code == 2 and result.stdout == "", result.stdout
        assert result.stderr == (f"paramsurgeon: error: -o {out} exists and is not a directory, which a PEFT adapter"
                                 " is; nothing was written; pass a new or empty directory\n")
    assert taken.read_text() == "keep"
