"""Quantized checkpoints through the commands a user runs: inspect (one row per quantized weight, --raw,
--json's quant entry), check --health (scale, orphan), dequantize and quantize (fp8-block), and what
value-changing and moving operations do to a group.

Ground truth is computed here: DeepSeek-V3's fp8 layout written tile by tile (scale_inv = amax / 448,
an all-zero tile scale 1, codes rounded to e4m3) and its ``weight_dequant`` (each code times its tile's
scale in float32, rounded to the dtype), and transformers' Llama for the end to end.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8_reference import BLOCK, dequantize, quantize
from helpers import SAMPLES, bits, json_of, register_input, run, run_on_terminal, run_process

DOWN, UP, NORM = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def stored(path) -> dict[str, torch.Tensor]:
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")] \
        if os.path.isdir(path) else [str(path)]
    found = {}
    for file in files:
        with safe_open(file, "pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})
    return found


def fp8_folder(folder, tensors: dict, config: dict | None = None):
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config or {"torch_dtype": "bfloat16",
                                                                "quantization_config": FP8_CONFIG}))
    return folder


@pytest.fixture
def fp8_dir(request, tmp_path):
    """A DeepSeek-style FP8 directory: two quantized projections (edge tiles partial) and a bf16 norm."""
    torch.manual_seed(0)
    tensors, reference = {}, {}
    for name, shape in ((DOWN, (200, 300)), (UP, (130, 200))):
        codes, scale = quantize(torch.randn(shape) * 0.02)
        tensors[name], tensors[name + "_scale_inv"] = codes, scale
        reference[name] = dequantize(codes, scale)
    tensors[NORM] = reference[NORM] = torch.ones(200, dtype=torch.bfloat16)
    folder = fp8_folder(tmp_path / "fp8", tensors)
    register_input(request, folder)
    return folder, tensors, reference


# inspect


def test_inspect_shows_the_scheme_the_stored_bytes_and_the_parts(fp8_dir):
    folder, tensors, reference = fp8_dir
    document = json_of("inspect", folder, "--json", schema="inspect")
    rows = {t["name"]: t for t in document["tensors"]}
    down = rows[DOWN]
    assert down["dtype"] == "bfloat16"  # what it dequantizes to
    assert down["quant"] == {"scheme": "fp8-block", "bits": 8, "block": [128, 128],
                             "parts": [DOWN, DOWN + "_scale_inv"]}
    stored_bytes = tensors[DOWN].nbytes + tensors[DOWN + "_scale_inv"].nbytes
    assert down["nbytes"] == stored_bytes and down["numel"] == 200 * 300
    assert "quant" not in rows[NORM]
    assert document["totals"]["bytes"] == sum(t.nbytes for t in tensors.values())  # what the file holds
    assert document["totals"]["by_dtype"]["fp8-block"]["tensors"] == 2

    table = run("inspect", folder)
    assert table.exit_code == 0
    line = next(line for line in table.stdout.splitlines() if line.startswith(DOWN))
    assert " fp8-block " in line and "f8e4m3" not in line


def test_inspect_raw_lists_the_stored_parts_as_they_are(fp8_dir):
    folder, tensors, _ = fp8_dir
    document = json_of("inspect", folder, "--raw", "--json", schema="inspect")
    rows = {t["name"]: t for t in document["tensors"]}
    assert sorted(rows) == sorted(tensors)
    assert rows[DOWN]["dtype"] == "float8_e4m3fn" and "quant" not in rows[DOWN]
    codes = tensors[DOWN].float()
    assert rows[DOWN]["stats"]["abs_max"] == codes.abs().max().item() == 448
    assert rows[DOWN + "_scale_inv"]["shape"] == [2, 3]


def test_diff_raw_compares_the_stored_parts(fp8_dir, tmp_path):
    folder, tensors, reference = fp8_dir
    plain = tmp_path / "plain.safetensors"
    save_file(reference, plain)
    assert run("diff", folder, plain).exit_code == 0  # the values are equal
    raw = run("diff", folder, plain, "--raw")
    assert raw.exit_code == 1 and "only in A" in raw.stdout and DOWN + "_scale_inv" in raw.stdout


# check --health


def test_health_fails_a_nan_zero_or_negative_scale_and_an_orphaned_part(request, tmp_path):
    torch.manual_seed(1)
    codes, scale = quantize(torch.randn(200, 300) * 0.02)
    bad = scale.clone()
    bad[0, 0], bad[0, 1], bad[1, 2] = float("nan"), 0.0, -scale[1, 2]
    lonely, _ = quantize(torch.randn(64, 64) * 0.02)
    folder = fp8_folder(tmp_path / "bad", {"a.weight": codes, "a.weight_scale_inv": bad, "b.weight": codes.clone(),
                                           "b.weight_scale_inv": scale, "c.weight": lonely,
                                           "d.weight_scale_inv": torch.ones(1, 1)})
    register_input(request, folder)
    document = json_of("check", folder, "--health", "--json", schema="check", code=1)
    rules = {r["rule"]: r for r in document["rules"]}
    assert [v["name"] for v in rules["health scale"]["violations"]] == ["a.weight"]
    assert "a.weight_scale_inv has 1 NaN, 1 zero, 1 negative of 6 scales" in rules["health scale"]["violations"][0][
        "message"]
    orphans = {v["name"]: v["message"] for v in rules["health orphan"]["violations"]}
    assert sorted(orphans) == ["c.weight", "d.weight_scale_inv"]
    assert "without its weight d.weight" in orphans["d.weight_scale_inv"]
    ignored = json_of("check", folder, "--health", "--json", "--ignore", "scale", "--ignore", "orphan",
                      "--ignore", "nonfinite", "--ignore", "untrained", schema="check")
    assert ignored["ok"]


def test_health_of_a_sound_fp8_checkpoint_passes_scale_and_orphan(fp8_dir):
    folder, _, _ = fp8_dir
    document = json_of("check", folder, "--health", "--json", "--ignore", "untrained", schema="check")
    rules = {r["rule"]: r["ok"] for r in document["rules"]}
    assert rules["health scale"] and rules["health orphan"] and document["ok"]


def test_a_quant_method_not_read_is_named_not_passed_over(request, tmp_path):
    """HQQ's (or any other) quantization_config: its tensors are listed as stored, and a note says why."""
    folder = register_input(request, fp8_folder(tmp_path / "hqq", {"w.W_q": torch.zeros(8, 4, dtype=torch.uint8),
                                                                   "w.scale": torch.ones(8, 1)},
                                                {"quantization_config": {"quant_method": "hqq", "nbits": 4}}))
    document = json_of("inspect", folder, "--json", schema="inspect")
    assert sorted(t["name"] for t in document["tensors"]) == ["w.W_q", "w.scale"]
    assert ('config.json: quantization_config\'s quant_method "hqq" is not read (only fp8, compressed-tensors,'
            " modelopt, bitsandbytes, gptq, awq, mxfp4, modelopt_fp4): its tensors are listed as stored") \
        in document["notes"]


@pytest.mark.parametrize("flags", [[], ["--hist"], ["--tree"], ["--workers", "2"]])
def test_a_checkpoints_note_is_shown_once_on_a_terminal(request, tmp_path, flags):
    """What reading the checkpoint noted is a note on stderr, shown as it is opened; the table on
    stdout does not repeat it (on a terminal the two streams are one screen)."""
    folder = register_input(request, fp8_folder(tmp_path / "hqq", {"w.W_q": torch.zeros(8, 4, dtype=torch.uint8),
                                                                   "w.scale": torch.ones(8, 1)},
                                                {"quantization_config": {"quant_method": "hqq", "nbits": 4}}))
    note = b'quant_method "hqq" is not read'
    code, shown, _ = run_on_terminal("inspect", folder, *flags)
    assert code == 0 and shown.count(note) == 1, shown.decode()
    piped = run_process("inspect", folder, *flags)
    assert note not in piped.stdout and piped.stderr.count(note) == 1, piped.stderr


@pytest.mark.parametrize("method", ["hqq", "torchao", "eetq"])
def test_a_quant_method_not_read_is_refused_by_what_would_dequantize_quantize_or_change_values(request, tmp_path,
                                                                                                method):
    """Its stored tensors may be codes: dequantize would copy them unchanged (it exited 0), a value change
    would change codes as values. One line naming the method, exit 2, nothing written; moves still run."""
    w_q, scale, norm = torch.randint(0, 16, (8, 4), dtype=torch.uint8), torch.rand(8, 1) + 0.5, torch.ones(4)
    config = {"torch_dtype": "float16", "quantization_config": {"quant_method": method, "nbits": 4}}
    tensors = {"w.W_q": w_q, "w.scale": scale, "norm.weight": norm}
    folder = register_input(request, fp8_folder(tmp_path / method, tensors, config))
    cannot = {"dequantize": "dequantized here", "quantize": "quantized anew"}
    for args in (("dequantize",), ("dequantize", "-p", "norm.weight"), ("quantize", "-p", "w.scale", "--scheme",
                 "fp8-block"), ("zero", "-p", "w.W_q"), ("scale", "-p", "norm.weight", "--by", "2"),
                 ("init", "-p", "w.scale", "--const", "1"), ("cast", "--all", "--dtype", "bfloat16")):
        out = tmp_path / f"out-{'-'.join(args)}"
        result = run(args[0], folder, *args[1:], "-o", f"{out}/")
        assert result.exit_code == 2, (args, result.stderr)
        error = [line for line in result.stderr.splitlines() if line.startswith("paramsurgeon: error:")]
        assert error == [f"paramsurgeon: error: {args[0]}: config.json's quantization_config has quant_method"
                         f" \"{method}\", which paramsurgeon does not read (it reads fp8, compressed-tensors,"
                         " modelopt, bitsandbytes, gptq, awq, mxfp4, modelopt_fp4): its stored tensors may be codes"
                         f" and scales, not values, so they cannot be {cannot.get(args[0], 'changed as values')};"
                         " nothing written"], result.stderr
        assert not out.exists()
    out = tmp_path / "dropped"
    assert run("drop", folder, "-p", "norm.weight", "-o", f"{out}/").exit_code == 0
    assert bits(stored(out)["w.W_q"]) == bits(w_q) and json.loads((out / "config.json").read_text()) == config


def test_dequantize_of_nothing_quantized_is_an_empty_selection(request, fp8_dir, tmp_path):
    """As a pattern that matches nothing: exit 2 unless --allow-empty, which warns and copies."""
    path = tmp_path / "plain.safetensors"
    plain = {"a.weight": torch.randn(8, 8), "b.bias": torch.randn(8)}
    save_file(plain, path)
    register_input(request, path)
    result = run("dequantize", path, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2 and result.stderr == (
        "paramsurgeon: error: dequantize: none of the 2 tensors is a quantized weight ('paramsurgeon inspect' shows"
        " each one's scheme); nothing to dequantize; pass --allow-empty to go on anyway\n")
    assert not (tmp_path / "out.safetensors").exists()
    result = run("dequantize", path, "--allow-empty", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0 and "warning: none of the 2 tensors is a quantized weight" in result.stderr
    written = stored(tmp_path / "out.safetensors")
    assert {n: bits(t) for n, t in written.items()} == {n: bits(t) for n, t in plain.items()}
    folder, _, _ = fp8_dir
    result = run("dequantize", folder, "-p", NORM, "-o", f"{tmp_path / 'fp8-out'}/")
    assert result.exit_code == 2 and f"dequantize: '{NORM}' is not a quantized weight" in result.stderr
    assert not (tmp_path / "fp8-out").exists()


def test_health_of_a_plain_checkpoint_lists_no_quantization_rules(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.randn(8, 8)}, path)
    document = json_of("check", path, "--health", "--json", schema="check")
    assert not {"health scale", "health orphan"} & {r["rule"] for r in document["rules"]}


# dequantize


def test_dequantize_writes_plain_tensors_and_a_config_without_quantization_config(fp8_dir, tmp_path):
    folder, tensors, reference = fp8_dir
    out = tmp_path / "bf16"
    result = run("dequantize", folder, "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    written = stored(out)
    assert sorted(written) == sorted(reference)
    for name, value in reference.items():
        assert written[name].dtype == torch.bfloat16 and bits(written[name]) == bits(value), name
    config = json.loads((out / "config.json").read_text())
    assert config == {"torch_dtype": "bfloat16"}
    assert "quantization_config removed" in result.stderr


@pytest.mark.parametrize("given", ["directory", "file"])
def test_dequantize_in_place_of_a_single_file_directory_updates_its_config(fp8_dir, tmp_path, given):
    """The file is rewritten, and the config.json beside it (which said how to read it) follows: without
    its quantization_config after dequantize, with it again after quantize."""
    import shutil

    folder, _, reference = fp8_dir
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    place = copy if given == "directory" else copy / "model.safetensors"
    result = run("dequantize", place, "--in-place")
    assert result.exit_code == 0, result.stderr
    assert "note: config.json: quantization_config removed" in result.stderr
    assert sorted(os.listdir(copy)) == ["config.json", "model.safetensors"]
    written = stored(copy)
    assert all(bits(written[name]) == bits(value) for name, value in reference.items())
    assert json.loads((copy / "config.json").read_text()) == {"torch_dtype": "bfloat16"}

    assert run("quantize", place, "-p", DOWN, "-p", UP, "--scheme", "fp8-block", "--in-place").exit_code == 0
    assert json.loads((copy / "config.json").read_text())["quantization_config"] == FP8_CONFIG


def test_dequantize_dtype_computes_in_that_dtype_and_a_selection_keeps_the_rest(fp8_dir, tmp_path):
    folder, tensors, reference = fp8_dir
    out = tmp_path / "f32"
    assert run("dequantize", folder, "-p", DOWN, "--dtype", "float32", "-o", f"{out}/").exit_code == 0
    written = stored(out)
    expected = dequantize(tensors[DOWN], tensors[DOWN + "_scale_inv"], torch.float32)
    assert written[DOWN].dtype == torch.float32 and bits(written[DOWN]) == bits(expected)
    assert bits(written[UP]) == bits(tensors[UP]) and bits(written[UP + "_scale_inv"]) == bits(tensors[UP + "_scale_inv"])
    assert json.loads((out / "config.json").read_text())["quantization_config"] == {  # UP still needs it
        **FP8_CONFIG, "modules_to_not_convert": [DOWN.removesuffix(".weight")]}  # DOWN's module is plain


def test_dequantize_and_quantize_refuse_a_partial_group_and_write_nothing(request, tmp_path):
    codes, scale = quantize(torch.randn(300, 200) * 0.02)
    folder = fp8_folder(tmp_path / "broken", {"a.weight": codes, "a.weight_scale_inv": scale[:2].clone()})
    register_input(request, folder)
    for args in (("dequantize",), ("quantize", "--all", "--scheme", "fp8-block"), ("scale", "--all", "--by", "2")):
        out = tmp_path / f"out-{args[0]}"
        result = run(*args[:1], folder, *args[1:], "-o", f"{out}/")
        assert result.exit_code == 2, result.stderr
        assert "a.weight, a.weight_scale_inv (the scale grid [2, 2] float32 does not fit [300, 200]" in result.stderr
        assert not out.exists()


def test_dequantize_dry_run_plans_and_writes_nothing(fp8_dir, tmp_path):
    folder, _, _ = fp8_dir
    out = tmp_path / "never"
    document = json_of("dequantize", folder, "--dry-run", "--json", "-o", f"{out}/", schema="plan")
    assert [(c["name"], c["action"], c["new_dtype"]) for c in document["changes"]] == [
        (DOWN, "dequantize fp8-block", "bfloat16"), (UP, "dequantize fp8-block", "bfloat16")]
    assert not out.exists()


# quantize


def test_quantize_writes_deepseeks_layout_and_adds_the_quantization_config(request, tmp_path):
    torch.manual_seed(2)
    weight = (torch.randn(200, 300) * 0.02).to(torch.bfloat16)
    weight[:128, 256:] = 0  # an all-zero tile: scale 1
    folder = tmp_path / "bf16"
    folder.mkdir()
    save_file({"w.weight": weight, "n.weight": torch.ones(300, dtype=torch.bfloat16)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    register_input(request, folder)
    out = tmp_path / "fp8"
    result = run("quantize", folder, "-p", "w.weight", "--scheme", "fp8-block", "-o", f"{out}/")
    assert result.exit_code == 0, result.stderr
    written = stored(out)
    codes, scale = quantize(weight)
    assert scale[0, 2] == 1
    assert sorted(written) == ["n.weight", "w.weight", "w.weight_scale_inv"]
    assert written["w.weight"].dtype == torch.float8_e4m3fn and bits(written["w.weight"]) == bits(codes)
    assert written["w.weight_scale_inv"].dtype == torch.float32 and bits(written["w.weight_scale_inv"]) == bits(scale)
    assert json.loads((out / "config.json").read_text()) == {"quantization_config": FP8_CONFIG,
                                                             "torch_dtype": "bfloat16"}

    back = tmp_path / "back"
    assert run("dequantize", out, "-o", f"{back}/").exit_code == 0
    values = stored(back)["w.weight"].float()
    tiles = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:200, :300]
    # e4m3 keeps 3 mantissa bits (half an ulp: 2^-4 relative), subnormals below 2^-6 in steps of 2^-9 of the
    # scale; bfloat16 rounds the product once more (2^-9 relative)
    error = (values - weight.float()).abs()
    assert bool((error <= weight.float().abs() * (2 ** -4 + 2 ** -8) + tiles * 2 ** -10).all())
    assert bits(stored(back)["w.weight"]) == bits(dequantize(codes, scale))


def test_quantize_block_and_refusals(tmp_path):
    path = tmp_path / "m.safetensors"
    weight = torch.randn(64, 96) * 0.02
    save_file({"w.weight": weight, "b": torch.zeros(64), "n": torch.ones(32, dtype=torch.int64)}, path)
    out = tmp_path / "q.safetensors"
    assert run("quantize", path, "-p", "w.weight", "--scheme", "fp8-block", "--block", "32x32", "-o", out).exit_code == 0
    codes, scale = quantize(weight, 32)
    written = stored(out)
    assert bits(written["w.weight"]) == bits(codes) and bits(written["w.weight_scale_inv"]) == bits(scale)

    unknown = run("quantize", path, "--all", "--scheme", "int3", "-o", out)
    assert unknown.exit_code == 2 and "--scheme int3: no such scheme; quantize writes fp8-block" in unknown.stderr
    vector = run("quantize", path, "--all", "--scheme", "fp8-block", "-o", tmp_path / "never.safetensors")
    assert vector.exit_code == 2 and vector.stderr == (  # the advice they share said once
        "paramsurgeon: error: quantize: 'n' is [32] int64; 'b' is [64] float32; fp8-block stores 2-D floating-point"
        " weights: choose them with -k linear\n")
    block = run("quantize", path, "--all", "--scheme", "fp8-block", "--block", "0x4", "-o", out)
    assert block.exit_code == 2 and "--block 0x4" in block.stderr
    assert not (tmp_path / "never.safetensors").exists()


@pytest.mark.parametrize("sample, held", [("llama-nf4", "nf4 64"), ("llama-gptq", "gptq 1x64")])
def test_quantize_beside_weights_of_another_scheme_is_refused_in_one_line(request, tmp_path, sample, held):
    """bitsandbytes' (saved by transformers) and GPTQ's one-number-a-side blocks are named, not a crash."""
    source = register_input(request, os.path.join(SAMPLES, sample))
    result = run("quantize", source, "-p", "lm_head.weight", "--scheme", "fp8-block", "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.splitlines() == [f"paramsurgeon: error: quantize: the checkpoint holds {held} weights, and a"
                                          " model config describes one quantization; dequantize them first"]
    assert not (tmp_path / "out").exists()


def test_quantize_beside_fp8_of_another_block_names_the_block_that_fits(request, fp8_dir, tmp_path):
    folder, _, _ = fp8_dir
    result = run("quantize", folder, "-p", DOWN, "--scheme", "fp8-block", "--block", "64x64", "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 2 and not (tmp_path / "o").exists()
    assert result.stderr.strip().endswith("dequantize them first, or quantize with --block 128x128"), result.stderr


# other operations on a group


def test_value_changes_write_plain_tensors_with_a_note_and_moves_carry_every_part(fp8_dir, tmp_path):
    folder, tensors, reference = fp8_dir
    zeroed = tmp_path / "zeroed.safetensors"
    result = run("zero", folder, "-p", DOWN, "-o", zeroed)
    assert result.exit_code == 0
    assert f"{DOWN} was fp8-block: written as plain bfloat16 (the quantized parts dropped)" in result.stderr
    assert sorted(stored(zeroed)) == sorted([DOWN, UP, UP + "_scale_inv", NORM])

    torch.manual_seed(3)
    codes, scale = quantize(torch.randn(200, 300) * 0.02)
    two = fp8_folder(tmp_path / "two", {"a.weight": codes, "a.weight_scale_inv": scale,
                                        "b.weight": tensors[DOWN], "b.weight_scale_inv": tensors[DOWN + "_scale_inv"]})
    copied = tmp_path / "copied.safetensors"
    result = run("copy", two, "--from", "a.weight", "--to", "b.weight", "-o", copied)
    assert result.exit_code == 0 and "written as plain" not in result.stderr
    out = stored(copied)
    assert bits(out["b.weight"]) == bits(codes) and bits(out["b.weight_scale_inv"]) == bits(scale)
    assert out["b.weight"].dtype == torch.float8_e4m3fn

    tied = tmp_path / "tied.pt"
    assert run("tie", two, "--source", "a.weight", "--target", "b.weight", "-o", tied).exit_code == 0
    state = torch.load(tied, weights_only=True)
    assert state["b.weight"].untyped_storage().data_ptr() == state["a.weight"].untyped_storage().data_ptr()
    assert state["b.weight_scale_inv"].untyped_storage().data_ptr() == \
        state["a.weight_scale_inv"].untyped_storage().data_ptr()
    assert bits(state["b.weight"]) == bits(codes)


@pytest.mark.parametrize("sample", ["llama-gptq", "llama-nf4"])
def test_a_whole_copy_between_alike_quantized_weights_copies_the_parts(tmp_path, sample):
    """GPTQ weights name their own g_idx, NF4 ones hold their own nested offset: quantized alike all the same."""
    folder = os.path.join(SAMPLES, sample)
    source, target = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    out = tmp_path / "copied.safetensors"
    result = run("copy", folder, "--from", source + ".weight", "--to", target + ".weight", "-o", out)
    assert result.exit_code == 0 and "written as plain" not in result.stderr
    before, after = stored(folder), stored(out)
    assert sorted(after) == sorted(before)
    for name, value in before.items():
        expected = before[name.replace(target, source)] if name.startswith(target) else value
        assert bits(after[name]) == bits(expected), name


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_tied_quantized_weights_read_again_are_one_tied_tensor(tmp_path, suffix):
    """A weight whose parts all share another's storage (as tie wrote them) is that weight, tied: shown
    and counted once, and dequantized to one tensor both names share."""
    codes, scale = quantize(torch.randn(200, 300) * 0.02)
    folder = fp8_folder(tmp_path / "two", {"a.weight": codes, "a.weight_scale_inv": scale,
                                           "b.weight": codes.clone(), "b.weight_scale_inv": scale.clone()})
    tied = tmp_path / f"tied{suffix}"
    assert run("tie", folder, "--source", "a.weight", "--target", "b.weight", "-o", tied).exit_code == 0
    document = json_of("inspect", tied, "--json", schema="inspect")
    assert document["ties"] == [["a.weight", "b.weight"]]
    assert document["totals"]["parameters"] == 200 * 300
    assert document["totals"]["bytes"] == codes.numel() + scale.numel() * 4

    plain = tmp_path / "plain.pt"
    assert run("dequantize", tied, "-o", plain).exit_code == 0
    state = torch.load(plain, weights_only=True)
    assert state["a.weight"].untyped_storage().data_ptr() == state["b.weight"].untyped_storage().data_ptr()
    assert bits(state["b.weight"]) == bits(dequantize(codes, scale))


# end to end: transformers loads what dequantize wrote


def test_a_quantized_llama_dequantized_loads_in_transformers_with_the_reference_logits(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=160, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    source = tmp_path / "llama"
    model.save_pretrained(source)

    fp8 = tmp_path / "llama-fp8"
    result = run("quantize", source, "-p", "model.layers.*", "-k", "linear", "--scheme", "fp8-block", "-o", f"{fp8}/")
    assert result.exit_code == 0, result.stderr
    assert json.loads((fp8 / "config.json").read_text())["quantization_config"] == FP8_CONFIG
    written, weights = stored(fp8), {}
    for name, value in model.state_dict().items():
        if name.startswith("model.layers.") and value.dim() == 2:
            codes, scale = quantize(value)  # the test's own DeepSeek layout
            assert bits(written[name]) == bits(codes) and bits(written[name + "_scale_inv"]) == bits(scale), name
            weights[name] = dequantize(codes, scale)
        else:
            weights[name] = value
    assert sum(n.endswith("_scale_inv") for n in written) == 2 * 7

    plain = tmp_path / "llama-bf16"
    assert run("dequantize", fp8, "-o", f"{plain}/").exit_code == 0
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16).eval()
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()  # as loaded, buffers too
    original = reference(torch.arange(12)[None]).logits
    reference.load_state_dict(weights)
    for name, value in loaded.state_dict().items():
        assert bits(value) == bits(weights[name]), name
    ids = torch.randint(0, 160, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
        assert not torch.equal(reference(torch.arange(12)[None]).logits, original)  # the rounding is real


def test_dequantize_of_a_sharded_directory_writes_a_new_index_without_the_parts(request, tmp_path):
    torch.manual_seed(5)
    folder, weight_map, reference = tmp_path / "sharded", {}, {}
    folder.mkdir()
    for shard, names in enumerate((["a.weight", "b.weight"], ["c.weight"])):
        file, state = f"model-{shard + 1:05d}-of-00002.safetensors", {}
        for name in names:
            state[name], state[name + "_scale_inv"] = quantize(torch.randn(150, 260) * 0.02)
            reference[name] = dequantize(state[name], state[name + "_scale_inv"])
        save_file(state, folder / file)
        weight_map.update(dict.fromkeys(state, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": FP8_CONFIG}))
    register_input(request, folder)
    out = tmp_path / "out"
    assert run("dequantize", folder, "-o", f"{out}/").exit_code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["a.weight", "b.weight", "c.weight"]
    written = stored(out)
    assert sorted(written) == sorted(reference)
    for name, value in reference.items():
        assert bits(written[name]) == bits(value), name
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in reference.values())
