"""GGUF files (llama.cpp's format): read lazily with PyTorch-order shapes and dequantized values,
converted to safetensors / torch / a Hugging Face directory, and written back as GGUF by surgery.

Ground truth: files written here with gguf.GGUFWriter from real torch weights (a tiny llama), read
back with gguf.GGUFReader and gguf.quants.dequantize, and transformers' LlamaForCausalLM."""

import os
import struct

import gguf
import numpy as np
import pytest
import torch
from helpers import json_of, register_input, run
from transformers import LlamaConfig, LlamaForCausalLM

T = gguf.GGMLQuantizationType
HEADS, KV_HEADS, ROPE_THETA = 4, 2, 10000.0
# HF name (inside model.layers.N. for per-layer ones) -> (GGUF name, type written)
GLOBAL = {"model.embed_tokens.weight": ("token_embd.weight", T.Q8_0), "model.norm.weight": ("output_norm.weight", T.F32),
          "lm_head.weight": ("output.weight", T.Q8_0)}
LAYER = {"input_layernorm.weight": ("attn_norm.weight", T.F32), "self_attn.q_proj.weight": ("attn_q.weight", T.Q4_0),
         "self_attn.k_proj.weight": ("attn_k.weight", T.Q8_0), "self_attn.v_proj.weight": ("attn_v.weight", T.F16),
         "self_attn.o_proj.weight": ("attn_output.weight", T.Q8_0),
         "post_attention_layernorm.weight": ("ffn_norm.weight", T.F32),
         "mlp.gate_proj.weight": ("ffn_gate.weight", T.BF16), "mlp.up_proj.weight": ("ffn_up.weight", T.Q5_1),
         "mlp.down_proj.weight": ("ffn_down.weight", T.F16)}


def llama_config(tie: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                       rms_norm_eps=1e-5, rope_theta=ROPE_THETA, tie_word_embeddings=tie)


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q and k."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def gguf_names(config: LlamaConfig) -> dict[str, tuple[str, T]]:
    names = dict(GLOBAL)
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}": (f"blk.{i}.{name}", kind) for hf, (name, kind) in LAYER.items()})
    return names


def write_gguf(path, model: LlamaForCausalLM, extra=(), alignment=None) -> None:
    """``model`` as llama.cpp's converter writes it (q/k permuted), with llama metadata; ``extra``:
    (name, raw uint8 blocks, type) written after the model's tensors."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_vocab_size(config.vocab_size)
    writer.add_token_list([f"tok{i}" for i in range(config.vocab_size)])
    state = model.state_dict()
    for hf, (name, kind) in gguf_names(config).items():
        if hf not in state or (hf == "lm_head.weight" and config.tie_word_embeddings):
            continue
        values = state[hf].float()
        if hf.endswith("q_proj.weight"):
            values = permute(values, HEADS)
        elif hf.endswith("k_proj.weight"):
            values = permute(values, KV_HEADS)
        array = values.numpy()
        if kind == T.F32:
            writer.add_tensor(name, array)
        elif kind == T.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    for name, blocks, kind in extra:
        writer.add_tensor(name, blocks, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


@pytest.fixture
def llama_gguf(request, tmp_path, llama):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, llama)
    register_input(request, path)
    return path


def reference(path) -> dict[str, tuple[str, tuple, np.ndarray]]:
    """Name -> (type, PyTorch-order shape, float32 values) as gguf's own reader and dequantize give them."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, tuple(reversed(t.shape.tolist())),
                     gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
                         tuple(reversed(t.shape.tolist()))))
            for t in reader.tensors}


# Reading


def test_inspect_lists_gguf_types_torch_order_shapes_and_dequantized_statistics(llama_gguf):
    document = json_of("inspect", llama_gguf, schema="inspect")
    expected = reference(llama_gguf)
    assert document["format"] == "gguf"
    assert [t["name"] for t in document["tensors"]] == list(expected)
    assert {t["gguf_type"] for t in document["tensors"]} == {"Q8_0", "Q4_0", "Q5_1", "F32", "F16", "BF16"}
    for entry in document["tensors"]:
        kind, shape, values = expected[entry["name"]]
        assert entry["gguf_type"] == kind and tuple(entry["shape"]) == shape
        assert entry["dtype"] == {"F16": "float16", "BF16": "bfloat16"}.get(kind, "float32")
        stats = entry["stats"]
        assert stats["min"] == pytest.approx(float(values.min()), abs=1e-7)
        assert stats["max"] == pytest.approx(float(values.max()), abs=1e-7)
        assert stats["mean"] == pytest.approx(float(values.astype(np.float64).mean()), abs=1e-7)
    assert document["tensors"][0]["shape"] == [96, 64]  # GGUF lists [64, 96]


def test_inspect_lists_the_metadata_with_the_tokenizer_summarised(llama_gguf):
    document = json_of("inspect", llama_gguf, schema="inspect")
    metadata = document["metadata"]
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.attention.head_count_kv"] == "2"
    assert metadata["llama.attention.layer_norm_rms_epsilon"] == "1e-05"
    assert metadata["tokenizer.ggml.tokens"] == "[96 strings]"
    text = run("inspect", llama_gguf, "--no-stats")
    assert text.exit_code == 0, text.stderr
    assert "GGUF, 21 tensors" in text.stdout and "tokenizer.ggml.tokens=[96 strings]" in text.stdout
    assert "tok95" not in text.stdout + json_of("inspect", llama_gguf, schema="inspect").__repr__()


def test_a_type_gguf_cannot_dequantize_is_listed_without_values(request, tmp_path, llama):
    path = tmp_path / "odd.gguf"
    raw = np.arange(2 * 40, dtype=np.uint8).reshape(2, 40)  # two Q8_1 blocks of 32 values each
    write_gguf(path, llama, extra=[("odd.weight", raw, T.Q8_1)])
    register_input(request, path)
    document = json_of("inspect", path, schema="inspect")
    odd = document["tensors"][-1]
    assert (odd["name"], odd["gguf_type"], odd["shape"], odd["stats"]) == ("odd.weight", "Q8_1", [2, 32], None)
    assert any("odd.weight: no values: type Q8_1" in note for note in document["notes"])
    text = run("inspect", path)
    assert text.exit_code == 0 and "odd.weight: no values: type Q8_1" in text.stdout


def test_check_and_diff_name_a_tensor_whose_values_cannot_be_read(request, tmp_path, llama):
    paths = {}
    for name, first in (("odd", 0), ("copy", 0), ("other", 1)):  # Q8_1 blocks: the same bytes, or others
        paths[name] = tmp_path / f"{name}.gguf"
        write_gguf(paths[name], llama, extra=[("odd.weight", np.arange(first, first + 80, dtype=np.uint8).reshape(2, 40),
                                               T.Q8_1)])
        register_input(request, paths[name])
    for args in (("check", paths["odd"]), ("check", "--health", paths["odd"]), ("check", "--max-abs", "9", paths["odd"]),
                 ("diff", paths["odd"], paths["other"])):
        result = run(*args)
        assert result.exit_code == 2, (args, result.stdout)
        assert "cannot read the values of 'odd.weight' (type Q8_1, which the gguf package cannot dequantize)" \
            in result.stderr and "-x odd.weight" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert run("check", paths["odd"], "-x", "odd.weight").exit_code == 0
    assert run("diff", paths["odd"], paths["copy"]).exit_code == 0  # the same blocks: equal without reading values
    assert run("diff", paths["odd"], paths["other"], "-x", "odd.weight").exit_code == 0


def test_inspect_gives_gguf_names_the_kinds_of_the_modules_they_come_from(llama_gguf, llama):
    """Each GGUF tensor's kind is that of the Hugging Face module it was converted from."""
    modules = dict(llama.named_modules())
    layers = {torch.nn.Embedding: "embedding", torch.nn.Linear: "linear", type(llama.model.norm): "rmsnorm"}
    expected = {gguf_name: layers[type(modules[hf.rsplit(".", 1)[0]])]
                for hf, (gguf_name, _) in gguf_names(llama.config).items()}
    document = json_of("inspect", llama_gguf, "--no-stats", schema="inspect")
    assert {t["name"]: t["kind"] for t in document["tensors"]} == expected
    assert {t["role"] for t in document["tensors"]} == {"weight"}


def test_the_type_table_read_without_gguf_is_the_gguf_packages_own():
    from gguf.constants import GGML_QUANT_SIZES

    from paramsurgeon.quant.gguf_types import TYPES

    assert {(code, name, block, size) for code, name, block, size in TYPES} == \
        {(t.value, t.name, *GGML_QUANT_SIZES[t]) for t in T if t in GGML_QUANT_SIZES}


def _imported(*args) -> tuple[str, str]:
    """(stdout, stderr) of the CLI run in a fresh process; stderr ends with which of gguf, numpy and
    torch it imported."""
    code = ("import sys, runpy; sys.argv = ['paramsurgeon'] + sys.argv[1:];"
            " import atexit; atexit.register(lambda: print('IMPORTED', [m for m in ('gguf', 'numpy', 'torch')"
            " if m in sys.modules], file=sys.stderr)); runpy.run_module('paramsurgeon', run_name='__main__')")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


def test_inspect_no_stats_of_a_gguf_imports_neither_gguf_nor_numpy(llama_gguf):
    stdout, stderr = _imported("inspect", llama_gguf, "--no-stats")
    assert "IMPORTED []" in stderr and "GGUF, 21 tensors" in stdout


def test_zeroing_a_quantized_gguf_tensor_does_not_import_torch(tmp_path, llama_gguf):
    """gguf quantizes in numpy: importing torch would be a second of a large file's copy."""
    out = tmp_path / "zeroed.gguf"
    assert "IMPORTED ['gguf', 'numpy']" in _imported("zero", llama_gguf, "-p", "blk.0.attn_k.weight", "-o", out)[1]
    zeroed = _tensors(gguf.GGUFReader(str(out)))["blk.0.attn_k.weight"]
    assert zeroed.tensor_type == T.Q8_0 and not gguf.quants.dequantize(zeroed.data, T.Q8_0).any()


def _tensor_entry(data: bytes, name: str) -> int:
    """Where the entry of tensor ``name`` starts its dimension count in a GGUF file's bytes."""
    encoded = name.encode()
    return data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)


def _patched(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


def _offset_at(data: bytes, name: str) -> int:
    at = _tensor_entry(data, name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims + 4


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"GGUX" + d[4:], "not a checkpoint format paramsurgeon reads"),
    (lambda d: _patched(d, 4, struct.pack("<I", 1)), "GGUF version 1; paramsurgeon reads versions 2 and 3"),
    (lambda d: _patched(d, 4, struct.pack(">I", 3)), "a big-endian GGUF file"),
    (lambda d: d[:len(d) - 100], "truncated: tensor '"),
    (lambda d: d[:200], "truncated"),
    (lambda d: _patched(d, 8, struct.pack("<Q", 1 << 60)), "claims 1,152,921,504,606,846,976 tensors"),
    (lambda d: _patched(d, 16, struct.pack("<Q", 1 << 40)), "metadata entries, more than"),
    (lambda d: _patched(d, _offset_at(d, "output.weight"), struct.pack("<Q", 1 << 40)),
     "truncated: tensor 'output.weight'"),
    (lambda d: _patched(d, _offset_at(d, "output.weight"), d[_offset_at(d, "output_norm.weight"):][:8]),
     "tensors 'output_norm.weight' and 'output.weight' overlap"),
    (lambda d: _patched(d, _offset_at(d, "output.weight") - 4, struct.pack("<I", 99)), "unknown GGML type 99"),
    (lambda d: _patched(d, _tensor_entry(d, "output.weight"), struct.pack("<I", 9)), "9 dimensions"),
])
def test_a_broken_gguf_is_refused_in_one_line(tmp_path, llama_gguf, damage, message):
    path = tmp_path / "broken.gguf"
    path.write_bytes(damage(llama_gguf.read_bytes()))
    result = run("inspect", path, "--no-stats")
    assert result.exit_code == 2, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# convert


def test_convert_copies_plain_types_exactly_and_dequantizes_the_others(tmp_path, llama_gguf):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "out.safetensors"
    result = run("convert", llama_gguf, "-o", out)
    assert result.exit_code == 0, result.stderr
    written = load_file(out)
    reader = gguf.GGUFReader(str(llama_gguf))
    assert list(written) == [t.name for t in reader.tensors]  # GGUF's names
    for t in reader.tensors:
        shape = tuple(reversed(t.shape.tolist()))
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.tensor_type.name]
            raw = torch.frombuffer(bytearray(t.data.tobytes()), dtype=dtype).reshape(shape)
            assert written[t.name].dtype == dtype and torch.equal(written[t.name].view(torch.uint8),
                                                                   raw.view(torch.uint8)), t.name
        else:
            expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape)
            assert written[t.name].dtype == torch.float32 and torch.equal(written[t.name], expected), t.name
    with safe_open(out, "pt") as f:
        assert not any(key.startswith(("general.", "llama.", "tokenizer.")) for key in (f.metadata() or {}))


def test_convert_dtype_writes_every_tensor_in_that_dtype(tmp_path, llama_gguf):
    out = tmp_path / "out.pt"
    assert run("convert", llama_gguf, "-o", out, "--dtype", "bfloat16").exit_code == 0
    written = torch.load(out, weights_only=True)
    for name, (_, shape, values) in reference(llama_gguf).items():
        assert written[name].dtype == torch.bfloat16 and written[name].shape == shape
        assert torch.equal(written[name], torch.from_numpy(values).to(torch.bfloat16)), name


def test_convert_names_hf_loads_in_transformers_with_the_logits_of_its_own_gguf_loader(tmp_path, llama_gguf, llama):
    out = tmp_path / "hf"
    result = run("convert", llama_gguf, "-o", out, "--names", "hf")
    assert result.exit_code == 0, result.stderr
    assert "config.json" in result.stderr
    converted = LlamaForCausalLM.from_pretrained(out).eval()
    assert converted.config.tie_word_embeddings is False
    theirs = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=llama_gguf.name).eval()
    tokens = torch.arange(24)[None] % 96
    with torch.no_grad():
        ours, transformers_gguf, original = converted(tokens).logits, theirs(tokens).logits, llama(tokens).logits
    assert torch.equal(ours, transformers_gguf)
    # and the weights are the model's own (q and k un-permuted), within the rounding of their types
    state = converted.state_dict()
    for name, values in llama.state_dict().items():
        torch.testing.assert_close(state[name], values, atol=0.01, rtol=0, msg=name)
    torch.testing.assert_close(ours, original, atol=0.02, rtol=0)


def test_convert_names_hf_puts_config_json_in_place_with_the_weights_in_one_step(tmp_path, llama_gguf, monkeypatch):
    """The directory appears whole: config.json is in it when it is swapped in, never written after."""
    from paramsurgeon.formats import atomic

    swapped, swap = [], atomic._swap
    monkeypatch.setattr(atomic, "_swap", lambda staging, target: (swapped.append(sorted(os.listdir(staging))),
                                                                  swap(staging, target))[1])
    out = tmp_path / "hf"
    for _ in range(2):  # a new directory, then the same one replaced
        assert run("convert", llama_gguf, "-o", out, "--names", "hf").exit_code == 0
    assert swapped == [["config.json", "model.safetensors"]] * 2
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert LlamaForCausalLM.from_pretrained(out).config.num_key_value_heads == KV_HEADS


def test_convert_names_hf_of_a_file_without_output_weight_ties_the_embeddings(request, tmp_path):
    torch.manual_seed(1)
    model = LlamaForCausalLM(llama_config(tie=True)).eval()
    path = tmp_path / "tied.gguf"
    write_gguf(path, model)
    register_input(request, path)
    out = tmp_path / "hf"
    assert run("convert", path, "-o", out, "--names", "hf", "--dtype", "float32").exit_code == 0
    converted = LlamaForCausalLM.from_pretrained(out).eval()
    assert converted.config.tie_word_embeddings is True
    tokens = torch.arange(24)[None] % 96
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens).logits, model(tokens).logits, atol=0.02, rtol=0)


def test_convert_refuses_a_type_it_cannot_dequantize_unless_excluded(request, tmp_path, llama):
    path = tmp_path / "odd.gguf"
    write_gguf(path, llama, extra=[("odd.weight", np.zeros((2, 40), dtype=np.uint8), T.Q8_1)])
    register_input(request, path)
    out = tmp_path / "out.safetensors"
    result = run("convert", path, "-o", out)
    assert result.exit_code == 2
    assert "cannot read the values of 'odd.weight' (type Q8_1, which the gguf package cannot dequantize)" \
        in result.stderr
    assert "-x" in result.stderr and not out.exists()
    assert run("convert", path, "-o", out, "-x", "odd.weight").exit_code == 0
    from safetensors.torch import load_file

    assert "odd.weight" not in load_file(out) and "output.weight" in load_file(out)


def test_convert_names_hf_refuses_another_architecture_and_a_file_output(tmp_path, llama_gguf):
    result = run("convert", llama_gguf, "-o", tmp_path / "out.safetensors", "--names", "hf")
    assert result.exit_code == 2 and "--names hf writes a Hugging Face directory" in result.stderr
    result = run("convert", llama_gguf, "-o", tmp_path / "x.pt", "--names", "gguf")
    assert result.exit_code == 2 and "expected --names hf" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


# Surgery written back as GGUF


def _fields(reader: gguf.GGUFReader) -> dict[str, list[bytes]]:
    return {k: [part.tobytes() for part in f.parts] for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(reader: gguf.GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def test_zero_and_scale_write_gguf_with_untouched_bytes_and_requantized_changes(tmp_path, llama_gguf):
    zeroed, scaled = tmp_path / "zeroed.gguf", tmp_path / "scaled.gguf"
    result = run("zero", llama_gguf, "-p", "blk.0.attn_q.weight", "-p", "blk.0.attn_v.weight", "-o", zeroed)
    assert result.exit_code == 0, result.stderr
    assert run("scale", llama_gguf, "-p", "blk.1.attn_k.weight", "--by", "2", "-o", scaled).exit_code == 0
    before = gguf.GGUFReader(str(llama_gguf))
    for out, changed in ((zeroed, {"blk.0.attn_q.weight", "blk.0.attn_v.weight"}), (scaled, {"blk.1.attn_k.weight"})):
        after = gguf.GGUFReader(str(out))
        assert _fields(after) == _fields(before)  # metadata bit for bit, no key added
        old, new = _tensors(before), _tensors(after)
        assert list(new) == list(old)
        for name, tensor in new.items():
            assert tensor.tensor_type == old[name].tensor_type, name  # Q4_0 stays Q4_0, F16 stays F16
            assert tensor.data_offset % before.alignment == 0
            same = tensor.data.tobytes() == old[name].data.tobytes()
            assert same == (name not in changed), name
    values = {n: gguf.quants.dequantize(t.data, t.tensor_type) for n, t in _tensors(gguf.GGUFReader(str(zeroed))).items()}
    assert not values["blk.0.attn_q.weight"].any() and not values["blk.0.attn_v.weight"].any()
    zeroed_q = _tensors(gguf.GGUFReader(str(zeroed)))["blk.0.attn_q.weight"]  # Q4_0 zeros are not zero bytes
    assert zeroed_q.data.tobytes() == gguf.quants.quantize(np.zeros((64, 64), np.float32), T.Q4_0).tobytes()
    old = _tensors(before)["blk.1.attn_k.weight"]
    new = _tensors(gguf.GGUFReader(str(scaled)))["blk.1.attn_k.weight"]
    expected = gguf.quants.quantize(2 * gguf.quants.dequantize(old.data, old.tensor_type), T.Q8_0)
    np.testing.assert_allclose(gguf.quants.dequantize(new.data, T.Q8_0), gguf.quants.dequantize(expected, T.Q8_0),
                               atol=1e-3)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_dequantize_to_gguf_stores_the_values_unquantized_not_in_their_type_again(request, tmp_path, llama, dtype):
    """A Q4_0, a Q8_0 and a K-quant (which gguf cannot quantize) dequantized into a GGUF are F32 of
    gguf's own dequantized values; the other tensors keep their type and bytes."""
    path = tmp_path / "k.gguf"
    blocks = np.random.default_rng(0).integers(0, 256, (2, 144), dtype=np.uint8)
    blocks[:, :4] = np.array([1e-3, 1e-4], np.float16).view(np.uint8)  # d, dmin: finite values
    write_gguf(path, llama, extra=[("extra.weight", blocks, T.Q4_K)])
    register_input(request, path)
    chosen = {"blk.0.attn_q.weight", "blk.1.attn_k.weight", "extra.weight"}
    out = tmp_path / "out.gguf"
    result = run("dequantize", path, *(a for n in sorted(chosen) for a in ("-p", n)), *(["--dtype", dtype] if dtype else []),
                 "-o", out)
    assert result.exit_code == 0, result.stderr
    expected, old = reference(path), _tensors(gguf.GGUFReader(str(path)))
    for name, tensor in _tensors(gguf.GGUFReader(str(out))).items():
        if name in chosen:
            assert tensor.tensor_type == T.F32, name
            values = np.asarray(tensor.data).reshape(expected[name][1])
            assert values.tobytes() == expected[name][2].tobytes(), name
        else:
            assert (tensor.tensor_type, tensor.data.tobytes()) == (old[name].tensor_type, old[name].data.tobytes())


def test_quantize_of_a_gguf_tensor_is_written_as_safetensors_and_refused_as_gguf(tmp_path, llama_gguf):
    """fp8-block has no GGUF type: a GGUF output is refused in one line; a safetensors one holds DeepSeek's
    layout of the tensor's values and gguf's dequantized values of the others (GGUF's types are no config)."""
    from fp8_reference import quantize
    from safetensors import safe_open

    name = "blk.0.ffn_down.weight"  # F16
    refused = run("quantize", llama_gguf, "-p", name, "--scheme", "fp8-block", "-o", tmp_path / "q.gguf")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"'{name}' is fp8-block, which GGUF has no type for" in refused.stderr
    assert not (tmp_path / "q.gguf").exists()
    out = tmp_path / "q.safetensors"
    result = run("quantize", llama_gguf, "-p", name, "--scheme", "fp8-block", "-o", out)
    assert result.exit_code == 0, result.stderr
    expected = reference(llama_gguf)
    codes, scale = quantize(torch.from_numpy(expected[name][2]))
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor(name).view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(f.get_tensor(name + "_scale_inv"), scale)
        for other in ("blk.0.attn_q.weight", "token_embd.weight"):  # Q4_0, Q8_0
            assert f.get_tensor(other).numpy().tobytes() == expected[other][2].tobytes(), other


def test_rename_and_drop_write_gguf_moving_tensors_whole(tmp_path, llama_gguf):
    renamed, dropped = tmp_path / "renamed.gguf", tmp_path / "dropped.gguf"
    result = run("rename", llama_gguf, "--from", "output.weight", "--to", "head.weight", "-o", renamed)
    assert result.exit_code == 0, result.stderr
    assert run("drop", llama_gguf, "-p", "blk.1.*", "-o", dropped).exit_code == 0
    before = _tensors(gguf.GGUFReader(str(llama_gguf)))
    after = _tensors(gguf.GGUFReader(str(renamed)))
    assert "output.weight" not in after and after["head.weight"].tensor_type == T.Q8_0
    assert after["head.weight"].data.tobytes() == before["output.weight"].data.tobytes()
    kept = gguf.GGUFReader(str(dropped))
    assert [t.name for t in kept.tensors] == [n for n in before if not n.startswith("blk.1.")]
    assert all(t.data.tobytes() == before[t.name].data.tobytes() for t in kept.tensors)
    assert _fields(kept) == _fields(gguf.GGUFReader(str(llama_gguf)))


def test_gguf_output_keeps_a_custom_alignment(request, tmp_path, llama):
    path = tmp_path / "aligned.gguf"
    writer_alignment = 256
    write_gguf(path, llama, alignment=writer_alignment)
    register_input(request, path)
    out = tmp_path / "out.gguf"
    assert run("zero", path, "-p", "blk.0.attn_norm.weight", "-o", out).exit_code == 0
    reader = gguf.GGUFReader(str(out))
    assert reader.alignment == writer_alignment and reader.data_offset % writer_alignment == 0
    assert all((t.data_offset - reader.data_offset) % writer_alignment == 0 for t in reader.tensors)
    assert _fields(reader) == _fields(gguf.GGUFReader(str(path)))


def test_a_changed_tensor_of_a_type_gguf_cannot_quantize_is_refused_unless_cast(request, tmp_path, llama):
    path = tmp_path / "kquant.gguf"
    blocks = np.zeros((2, 144), dtype=np.uint8)  # two rows of one Q4_K block (256 values) each
    write_gguf(path, llama, extra=[("extra.weight", blocks, T.Q4_K)])
    register_input(request, path)
    out = tmp_path / "out.gguf"
    result = run("zero", path, "-p", "extra.weight", "-o", out)
    assert result.exit_code == 2
    assert "'extra.weight' was Q4_K, which the gguf package cannot quantize" in result.stderr
    assert not out.exists()
    assert "pass --dtype float16" in result.stderr
    assert run("cast", path, "-p", "extra.weight", "--dtype", "float16", "-o", out).exit_code == 0
    written = _tensors(gguf.GGUFReader(str(out)))["extra.weight"]
    assert written.tensor_type == T.F16 and tuple(reversed(written.shape.tolist())) == (2, 256)


def test_dtype_stores_a_changed_k_quant_unquantized_and_requantizes_the_others(request, tmp_path, llama):
    path = tmp_path / "kquant.gguf"
    write_gguf(path, llama, extra=[("extra.weight", np.zeros((2, 144), dtype=np.uint8), T.Q4_K)])
    register_input(request, path)
    out = tmp_path / "out.gguf"
    result = run("init", path, "-p", "extra.weight", "-p", "output.weight", "--const", "0.5", "--dtype", "bfloat16",
                 "-o", out)
    assert result.exit_code == 0, result.stderr
    written = _tensors(gguf.GGUFReader(str(out)))
    assert written["extra.weight"].tensor_type == T.BF16
    assert (gguf.quants.dequantize(written["extra.weight"].data, T.BF16) == 0.5).all()
    assert written["output.weight"].tensor_type == T.Q8_0  # gguf quantizes Q8_0: requantized, --dtype aside
    expected = gguf.quants.quantize(np.full((96, 64), 0.5, dtype=np.float32), T.Q8_0)
    assert written["output.weight"].data.tobytes() == expected.tobytes()
    bad = run("zero", path, "-p", "extra.weight", "--dtype", "int8", "-o", tmp_path / "bad.gguf")
    assert bad.exit_code == 2 and "float16, bfloat16 or float32" in bad.stderr
    other = run("zero", path, "-p", "extra.weight", "--dtype", "float16", "-o", tmp_path / "out.safetensors")
    assert other.exit_code == 2 and "GGUF output" in other.stderr


def test_surgery_in_place_rewrites_the_gguf(tmp_path, llama_gguf):
    path = tmp_path / "copy.gguf"
    path.write_bytes(llama_gguf.read_bytes())
    assert run("zero", path, "-p", "output_norm.weight", "--in-place").exit_code == 0
    after = _tensors(gguf.GGUFReader(str(path)))
    assert not after["output_norm.weight"].data.any()
    assert after["output.weight"].data.tobytes() == _tensors(gguf.GGUFReader(str(llama_gguf)))["output.weight"].data.tobytes()


def test_gguf_is_written_only_from_a_gguf(tmp_path, resnet_pt):
    out = tmp_path / "out.gguf"
    result = run("zero", resnet_pt, "-p", "fc.bias", "-o", out)
    assert result.exit_code == 2 and "GGUF is written from a GGUF input" in result.stderr
    assert not out.exists()
    planned = run("zero", resnet_pt, "-p", "fc.bias", "-o", out, "--dry-run")  # refused before any work
    assert planned.exit_code == 2 and "GGUF is written from a GGUF input" in planned.stderr


def test_a_gguf_input_may_be_written_as_gguf(tmp_path, llama_gguf):
    result = run("zero", llama_gguf, "-p", "output_norm.weight", "--format", "npz", "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.endswith("--format npz: expected pt, safetensors, dcp or gguf\n")


def test_a_gguf_typed_tensor_in_another_checkpoint_is_written_plain(tmp_path, llama_gguf, resnet_pt):
    """GGUF's types are a native scheme: no other format lays their blocks out, so a GGUF tensor
    put into a torch checkpoint is written dequantized (its dtype, float32), never as raw blocks."""
    import paramsurgeon as ps
    from safetensors.torch import load_file

    ckpt, source = ps.load(str(resnet_pt)), ps.load(str(llama_gguf))
    ckpt["embedding"] = source.tensors["token_embd.weight"]  # Q8_0
    for name in ("out.safetensors", "out.pt"):
        ps.save(ckpt, str(tmp_path / name))
    kind, shape, values = reference(llama_gguf)["token_embd.weight"]
    for written in (load_file(tmp_path / "out.safetensors"), torch.load(tmp_path / "out.pt", weights_only=True)):
        assert kind == "Q8_0" and written["embedding"].dtype == torch.float32
        assert torch.equal(written["embedding"], torch.from_numpy(values).reshape(shape))
        assert torch.equal(written["fc.weight"], torch.load(resnet_pt, weights_only=True)["fc.weight"])


def test_convert_memory_does_not_grow_with_the_largest_tensor(request, tmp_path, llama_gguf):
    from test_memory import peak_anon

    path = tmp_path / "wide.gguf"
    blocks = np.random.default_rng(0).integers(0, 256, (8192, 8192 // 32 * 34), dtype=np.uint8)
    blocks.reshape(-1, 34)[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # the scales
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("wide.weight", blocks, raw_dtype=T.Q8_0)  # 64 Mi values: 128 MiB in bfloat16
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    register_input(request, path)
    small, result = peak_anon(["convert", llama_gguf, "-o", tmp_path / "small.safetensors", "--dtype", "bfloat16"])
    assert result.returncode == 0, result.stderr
    peak, result = peak_anon(["convert", path, "-o", tmp_path / "wide.safetensors", "--dtype", "bfloat16"])
    assert result.returncode == 0, result.stderr
    MiB = 1 << 20
    assert peak - small < 128 * MiB, f"convert used {(peak - small) / MiB:.0f} MiB more for a 128 MiB tensor"
    from safetensors import safe_open

    with safe_open(tmp_path / "wide.safetensors", "pt") as f:
        rows = f.get_slice("wide.weight")[4000:4002]
    expected = gguf.quants.dequantize(blocks[4000:4002], T.Q8_0)
    assert torch.equal(rows, torch.from_numpy(expected).to(torch.bfloat16))


def test_a_version_2_gguf_is_read_and_written_back_as_version_2(tmp_path, llama_gguf):
    path = tmp_path / "v2.gguf"
    path.write_bytes(_patched(llama_gguf.read_bytes(), 4, struct.pack("<I", 2)))  # v2 and v3 share the layout
    document = json_of("inspect", path, schema="inspect")
    assert len(document["tensors"]) == 21
    out = tmp_path / "out.gguf"
    assert run("zero", path, "-p", "output_norm.weight", "-o", out).exit_code == 0
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["GGUF.version"].parts[0][0] == 2
    assert not _tensors(reader)["output_norm.weight"].data.any()


def test_convert_with_a_selection_writes_just_those_tensors(tmp_path, resnet_pt, resnet):
    out = tmp_path / "backbone.pt"
    assert run("convert", resnet_pt, "-x", "fc.*", "-o", out).exit_code == 0
    written = torch.load(out, weights_only=True)
    assert list(written) == [n for n in resnet.state_dict() if not n.startswith("fc.")]
    assert all(torch.equal(written[n], resnet.state_dict()[n]) for n in written)


def test_a_gguf_output_is_one_file_not_a_directory(tmp_path, llama_gguf):
    result = run("zero", llama_gguf, "-p", "output_norm.weight", "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 2 and "a GGUF checkpoint is one file" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_an_apply_recipe_changes_a_k_quant_and_stores_it_cast(request, tmp_path, llama):
    path = tmp_path / "kquant.gguf"
    write_gguf(path, llama, extra=[("extra.weight", np.zeros((2, 144), dtype=np.uint8), T.Q4_K)])
    register_input(request, path)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[step]]\nop = "scale"\npattern = "extra.weight"\nby = 2\n\n'
                      '[[step]]\nop = "cast"\npattern = "extra.weight"\ndtype = "bfloat16"\n')
    out = tmp_path / "out.gguf"
    result = run("apply", path, recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    written = _tensors(gguf.GGUFReader(str(out)))
    assert written["extra.weight"].tensor_type == T.BF16
    assert written["output.weight"].data.tobytes() == _tensors(gguf.GGUFReader(str(path)))["output.weight"].data.tobytes()
