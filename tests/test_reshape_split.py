"""split and concat against torch.split / torch.cat on GPT-2-style and Llama-style (GQA) tensors, in
every format: split then concat gives the input back bit for bit; every disagreement and every existing
destination is exit 2 naming it, with nothing written; tied sources need a tie flag."""

import pytest
import torch
from helpers import bits, load_torch, register_input, run
from safetensors.torch import load_file, save_file

import paramsurgeon as ps

DIM, HEADS, KV_HEADS, HEAD_DIM = 64, 8, 2, 8


def gpt2_state(layers=2):
    """GPT-2 attention as HF stores it: Conv1D c_attn.weight (in, 3*out), c_attn.bias (3*out)."""
    torch.manual_seed(7)
    state = {"wte.weight": torch.randn(50, DIM)}
    for i in range(layers):
        state[f"h.{i}.attn.c_attn.weight"] = torch.randn(DIM, 3 * DIM)
        state[f"h.{i}.attn.c_attn.bias"] = torch.randn(3 * DIM)
        state[f"h.{i}.attn.c_proj.weight"] = torch.randn(DIM, DIM)
    return state


@pytest.fixture
def gpt2(request, tmp_path):
    path = tmp_path / "gpt2.pt"
    torch.save(gpt2_state(), path)
    register_input(request, path)
    return path


def qkv_args(leaf, *extra):
    return ["--from", f"h.*.attn.c_attn.{leaf}", "--to", f"h.*.attn.q.{leaf}", f"h.*.attn.k.{leaf}",
            f"h.*.attn.v.{leaf}", *extra]


def test_gpt2_c_attn_into_q_k_v_and_back(gpt2, tmp_path):
    before = load_torch(gpt2)
    parts = tmp_path / "parts.pt"
    assert run("split", gpt2, *qkv_args("weight", "--dim", "1"), "-o", parts).exit_code == 0
    after = load_torch(parts)
    for i in range(2):
        expected = torch.split(before[f"h.{i}.attn.c_attn.weight"], DIM, dim=1)
        for leaf, value in zip("qkv", expected):
            got = after[f"h.{i}.attn.{leaf}.weight"]
            assert got.is_contiguous() and bits(got) == bits(value.contiguous())
        assert f"h.{i}.attn.c_attn.weight" not in after
    assert list(after)[1:5] == ["h.0.attn.q.weight", "h.0.attn.k.weight", "h.0.attn.v.weight", "h.0.attn.c_attn.bias"]
    q = after["h.0.attn.q.weight"]  # each part is a Conv1D (in, out): x @ W_q is the q of x @ W_attn
    x = torch.randn(3, DIM)
    torch.testing.assert_close(x @ q, (x @ before["h.0.attn.c_attn.weight"])[:, :DIM])

    back = tmp_path / "back.pt"
    assert run("concat", parts, "--from", "h.*.attn.q.weight", "h.*.attn.k.weight", "h.*.attn.v.weight",
               "--to", "h.*.attn.c_attn.weight", "--dim", "1", "-o", back).exit_code == 0
    again = load_torch(back)
    assert list(again) == list(before)
    assert all(bits(again[n]) == bits(t) for n, t in before.items())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", "sharded"])
def test_split_then_concat_is_bit_identical_in_every_format(gpt2, tmp_path, suffix):
    source = gpt2
    if suffix != ".pt":
        source = tmp_path / ("in.safetensors" if suffix == ".safetensors" else "in-sharded")
        extra = ["--max-shard-size", "20kB"] if suffix == "sharded" else []
        assert run("convert", gpt2, "-o", source, *extra).exit_code == 0
    parts, back = tmp_path / f"parts{suffix}", tmp_path / f"back{suffix}"
    assert run("split", source, *qkv_args("bias"), "-o", parts).exit_code == 0
    assert run("concat", parts, "--from", "h.*.attn.q.bias", "h.*.attn.k.bias", "h.*.attn.v.bias",
               "--to", "h.*.attn.c_attn.bias", "-o", back).exit_code == 0
    assert run("diff", source, back).exit_code == 0
    original, result = ps.load(str(source)), ps.load(str(back))
    assert original.names == result.names


def test_gqa_parts_of_unequal_sizes(request, tmp_path):
    torch.manual_seed(2)
    q, k, v = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)
    state = {f"layers.{i}.qkv_proj.weight": torch.randn(q + k + v, DIM) for i in range(3)}
    state["layers.0.gate_up_proj.weight"] = torch.randn(2 * 96, DIM).to(torch.bfloat16)
    path = tmp_path / "llama.safetensors"
    save_file(state, path)
    register_input(request, path)
    out = tmp_path / "split.safetensors"
    result = run("split", path, "--from", "layers.{0..2}.qkv_proj.weight", "--to", "layers.{0..2}.q_proj.weight",
                 "layers.{0..2}.k_proj.weight", "layers.{0..2}.v_proj.weight", "--sizes", f"{q},{k},{v}", "-o", out)
    assert result.exit_code == 0, result.stderr
    after = load_file(out)
    for i in range(3):
        for leaf, value in zip(("q", "k", "v"), torch.split(state[f"layers.{i}.qkv_proj.weight"], [q, k, v])):
            assert bits(after[f"layers.{i}.{leaf}_proj.weight"]) == bits(value)
    assert run("split", path, "--from", "layers.0.gate_up_proj.weight", "--to", "layers.0.gate.weight",
               "layers.0.up.weight", "--keep-source", "-o", out).exit_code == 0
    after = load_file(out)
    gate, up = state["layers.0.gate_up_proj.weight"].chunk(2)
    assert after["layers.0.gate.weight"].dtype == torch.bfloat16 and bits(after["layers.0.gate.weight"]) == bits(gate)
    assert bits(after["layers.0.up.weight"]) == bits(up) and "layers.0.gate_up_proj.weight" in after


def test_split_errors_name_every_offender_and_write_nothing(request, tmp_path):
    state = {"a.qkv": torch.randn(10, 4), "b.qkv": torch.randn(9, 4), "c.qkv": torch.randn(7), "a.q": torch.ones(1),
             "s.qkv": torch.tensor(1.0)}
    path = tmp_path / "m.pt"
    torch.save(state, path)
    register_input(request, path)
    out = tmp_path / "out.pt"
    result = run("split", path, "--from", "*.qkv", "--to", "*.q", "*.k", "*.v", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    message = result.stderr
    assert "'a.q' exists already (from 'a.qkv')" in message
    assert "'a.qkv' has 10 along dim 0, which does not cut into 3 equal parts; pass --sizes" in message
    assert "'b.qkv'" not in message  # 9 cuts into three
    assert "'c.qkv' has 7 along dim 0, which does not cut into 3 equal parts" in message
    assert "'s.qkv' has 0 dimensions [], so --dim 0 does not exist" in message
    result = run("split", path, "--from", "b.qkv", "--to", "b.x", "b.y", "--sizes", "4,4", "-o", out)
    assert result.exit_code == 2 and "'b.qkv' has 9 along dim 0, but --sizes 4,4 add up to 8" in result.stderr
    result = run("split", path, "--from", "b.qkv", "--to", "b.x", "b.x", "-o", out)
    assert result.exit_code == 2 and "'b.x' is named twice as a destination" in result.stderr
    result = run("split", path, "--from", "b.qvk", "--to", "b.x", "b.y", "-o", out)
    assert result.exit_code == 2 and "--from 'b.qvk' matches no tensor" in result.stderr
    for args, message in [(["--to", "b.x"], "name two or more"), (["--to", "x", "y", "--sizes", "9"], "--sizes has 1")]:
        result = run("split", path, "--from", "b.qkv", *args, "-o", out)
        assert result.exit_code == 2 and message in result.stderr
    assert not out.exists()


def test_concat_errors_name_every_offender_and_write_nothing(request, tmp_path):
    state = {"l0.q": torch.randn(4, 8), "l0.k": torch.randn(2, 8), "l0.v": torch.randn(2, 8).half(),
             "l1.q": torch.randn(4, 8), "l1.k": torch.randn(2, 6), "l1.v": torch.randn(2, 8),
             "l2.q": torch.randn(4, 8), "l2.k": torch.randn(2, 8), "l3.qkv": torch.randn(8, 8),
             "l3.q": torch.randn(4, 8), "l3.k": torch.randn(2, 8), "l3.v": torch.randn(2, 8)}
    path = tmp_path / "m.pt"
    torch.save(state, path)
    register_input(request, path)
    out = tmp_path / "out.pt"
    result = run("concat", path, "--from", "*.q", "*.k", "*.v", "--to", "*.qkv", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    message = result.stderr
    assert "'l0.qkv': the parts differ in dtype: 'l0.q' float32, 'l0.k' float32, 'l0.v' float16" in message
    assert "'l1.qkv': the parts differ off dim 0 (in dim 1): 'l1.q' [4, 8], 'l1.k' [2, 6], 'l1.v' [2, 8]" in message
    assert "'l2.qkv' gets no part from --from '*.v'" in message
    assert "'l3.qkv' exists already (from 'l3.q')" in message
    good = tmp_path / "good.pt"
    assert run("concat", path, "--from", "l2.q", "l2.k", "--to", "l2.qk", "--keep-source", "-o", good).exit_code == 0
    after = load_torch(good)
    assert bits(after["l2.qk"]) == bits(torch.cat([state["l2.q"], state["l2.k"]])) and "l2.q" in after


def test_tied_sources_need_a_tie_flag(request, tmp_path):
    fused = torch.randn(6, 4)
    state = {"enc.qkv": fused, "dec.qkv": fused, "other": torch.randn(3)}
    path = tmp_path / "tied.pt"
    torch.save(state, path)
    register_input(request, path)
    out = tmp_path / "out.pt"
    result = run("split", path, "--from", "enc.qkv", "--to", "enc.a", "enc.b", "-o", out)
    assert result.exit_code == 2 and not out.exists()
    assert "'enc.qkv' shares its storage with 'dec.qkv', which is not a source of this split; pass --untie" in \
        result.stderr
    assert run("split", path, "--from", "enc.qkv", "--to", "enc.a", "enc.b", "--untie", "-o", out).exit_code == 0
    after = torch.load(out, weights_only=True)
    assert bits(after["dec.qkv"]) == bits(fused) and bits(after["enc.a"]) == bits(fused[:3])
    # both aliases split: their parts keep the tie, part by part
    assert run("split", path, "--from", "*.qkv", "--to", "*.a", "*.b", "-o", out).exit_code == 0
    after = torch.load(out, weights_only=True)
    assert after["enc.a"].untyped_storage().data_ptr() == after["dec.a"].untyped_storage().data_ptr()
    assert after["enc.b"].untyped_storage().data_ptr() == after["dec.b"].untyped_storage().data_ptr()
    assert bits(after["dec.b"]) == bits(fused[3:])
    back = tmp_path / "back.pt"
    assert run("concat", out, "--from", "*.a", "*.b", "--to", "*.qkv", "-o", back).exit_code == 0
    again = torch.load(back, weights_only=True)
    assert again["enc.qkv"].untyped_storage().data_ptr() == again["dec.qkv"].untyped_storage().data_ptr()
    assert bits(again["enc.qkv"]) == bits(fused)


def test_dry_run_recipe_and_library(gpt2, tmp_path):
    result = run("split", gpt2, *qkv_args("weight", "--dim", "1"), "--dry-run")
    assert result.exit_code == 0 and "h.0.attn.q.weight" in result.stdout and "drop" in result.stdout
    assert "split from h.0.attn.c_attn.weight: part 2, 64:128 of dim 1" in result.stdout
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\nop = "split"\nfrom = "h.*.attn.c_attn.weight"\n'
                      'to = ["h.*.attn.q.weight", "h.*.attn.k.weight", "h.*.attn.v.weight"]\ndim = 1\n'
                      '[[step]]\nop = "transpose"\npattern = "h.*.attn.{q,k,v}.weight"\n'
                      '[[step]]\nop = "concat"\n'
                      'from = ["h.*.attn.q.weight", "h.*.attn.k.weight", "h.*.attn.v.weight"]\n'
                      'to = "h.*.attn.in_proj_weight"\n')
    out = tmp_path / "r.pt"
    result = run("apply", gpt2, recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    before = load_torch(gpt2)
    after = load_torch(out)
    assert bits(after["h.1.attn.in_proj_weight"]) == bits(before["h.1.attn.c_attn.weight"].t().contiguous())
    ckpt = ps.load(str(gpt2))
    ps.split(ckpt, from_="wte.weight", to=["wte.a", "wte.b"], sizes="10,40")
    assert ckpt["wte.b"].shape == (40, DIM) and "wte.weight" not in ckpt.tensors


def test_names_after_to_and_from_run_up_to_the_next_option_or_the_checkpoint(gpt2, tmp_path):
    expected = torch.split(gpt2_state()["h.0.attn.c_attn.bias"], DIM)
    spellings = [["--to", "q", "k", "v", str(gpt2)], [str(gpt2), "--to", "q", "--to", "k", "--to", "v"],
                 [str(gpt2), "--to=q", "k", "v"]]
    for number, spelling in enumerate(spellings):
        out = tmp_path / f"{number}.pt"
        result = run("split", "--from", "h.0.attn.c_attn.bias", *spelling, "-o", out)
        assert result.exit_code == 0, (spelling, result.stderr)
        after = load_torch(out)
        assert [bits(after[n]) for n in "qkv"] == [bits(e) for e in expected]
    out = tmp_path / "c.pt"
    result = run("concat", "--from", "h.0.attn.c_attn.bias", "h.1.attn.c_attn.bias", gpt2, "--to", "both", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert load_torch(out)["both"].shape == (6 * DIM,)
