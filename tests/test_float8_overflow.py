"""Overflow into a dtype without Inf: torch's cast to float8_e4m3fn clamps to 448 (the fnuz dtypes
give NaN), so the refusal float16 gets must look at the values before their last rounding. Ground
truth: each value rounded to the dtype's mantissa in float64 (round half to even, the exponent
unbounded) overflows when it lands beyond the largest value; where torch's cast gives Inf or NaN
it agrees. Results within range equal torch's own computation, in float32 then rounded once."""

import json

import pytest
import torch
from helpers import run
from safetensors.torch import load_file, save_file

MANTISSA_BITS = {torch.float8_e4m3fn: 3, torch.float8_e4m3fnuz: 3, torch.float8_e5m2: 2, torch.float8_e5m2fnuz: 2,
                 torch.float16: 10, torch.bfloat16: 7}
FLOATS = list(MANTISSA_BITS)


def overflows(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Which ``values`` rounding to ``dtype`` carries beyond its largest value."""
    wide = values.double()
    mantissa, exponent = torch.frexp(wide)  # |mantissa| in [0.5, 1)
    scale = 2.0 ** (MANTISSA_BITS[dtype] + 1)
    rounded = torch.ldexp(torch.round(mantissa * scale) / scale, exponent)  # torch.round: half to even
    return rounded.abs() > torch.finfo(dtype).max


def refused(*args) -> str:
    """The one line of a refusal (exit 2)."""
    result = run(*args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("paramsurgeon: error: "), result.stderr
    return lines[0]


def written(*args) -> dict:
    """The tensors of the output ``-o`` names, after a successful run."""
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    return load_file(str(args[args.index("-o") + 1]))


def same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), \
        (got, expected)


def boundary(dtype: torch.dtype) -> torch.Tensor:
    """float32 values either side of where rounding to ``dtype`` overflows, and well within."""
    largest = torch.finfo(dtype).max
    step = 2.0 ** (torch.tensor(largest).log2().floor().item() - MANTISSA_BITS[dtype])
    halfway = largest + step / 2
    return torch.tensor([0.5, -3.0, largest, -largest, halfway * 0.999, halfway, -halfway, halfway * 1.001, 1e30])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_the_ground_truth_agrees_with_torch_where_torch_tells(dtype):
    """Where torch's cast gives Inf or NaN, it is exactly where the rounding overflows."""
    values = boundary(dtype)
    cast = values.to(dtype).float()
    if dtype == torch.float8_e4m3fn:
        assert torch.isfinite(cast).all() or torch.isnan(cast[overflows(values, dtype)]).all()  # clamped (or NaN)
    else:
        assert torch.equal(~torch.isfinite(cast), overflows(values, dtype))
    assert overflows(values, dtype).sum() >= 2


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_scale_refuses_what_would_overflow_and_writes_torchs_product_otherwise(tmp_path, dtype):
    largest = torch.finfo(dtype).max
    near = torch.tensor([largest / 4, -largest / 8, 1.0, 0.0]).to(dtype)
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"w": near, "other": torch.ones(2)}, path)
    for factor in (3.0, 4.0, 5.0, 8.0):
        product = near.float() * factor
        expected = int(overflows(product, dtype).sum())
        if expected:
            line = refused("scale", path, "-p", "w", "--by", factor, "-o", out)
            assert f"{expected} of 4 values of 'w'" in line and "--allow-overflow" in line, line
            assert ("would become Inf or NaN" in line) == (dtype in (torch.float16, torch.bfloat16, torch.float8_e5m2))
            assert not out.exists()
            assert refused("scale", path, "-p", "w", "--by", factor, "--dry-run") == line
            same_bits(written("scale", path, "-p", "w", "--by", factor, "--allow-overflow", "-o", out)["w"],
                      product.to(dtype))
        else:
            same_bits(written("scale", path, "-p", "w", "--by", factor, "-o", out)["w"], product.to(dtype))
        out.unlink(missing_ok=True)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz], ids=str)
def test_copy_from_a_wider_source_counts_the_values_the_target_would_clamp(tmp_path, dtype):
    source = boundary(dtype)
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"src": source, "dst": torch.zeros(len(source)).to(dtype)}, path)
    expected = int(overflows(source, dtype).sum())
    line = refused("copy", path, "--from", "src", "--to", "dst", "-o", out)
    assert f"{expected} of 9 values of 'dst' would exceed {str(dtype).removeprefix('torch.')}'s largest value" \
           f" {torch.finfo(dtype).max:g}" in line, line
    assert not out.exists()
    fits = source[~overflows(source, dtype)]
    save_file({"src": fits, "dst": torch.zeros(len(fits)).to(dtype)}, path)
    same_bits(written("copy", path, "--from", "src", "--to", "dst", "-o", out)["dst"], fits.to(dtype))


def test_init_const_says_what_a_float8_without_inf_does_with_it(tmp_path):
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"w": torch.ones(3).to(torch.float8_e4m3fn), "h": torch.ones(3, dtype=torch.float16)}, path)
    line = refused("init", path, "-p", "w", "--const", "1000", "-o", out)
    assert "'w' is float8_e4m3fn, and --const 1000 exceeds its largest value 448" in line and "Inf;" not in line
    assert "--allow-overflow" in line and not out.exists()
    assert "--const 1e+06 would be Inf" in refused("init", path, "-p", "h", "--const", "1e6", "-o", out)
    # 460 rounds to 448 as 65519 rounds to 65504: a rounding, not an overflow
    same_bits(written("init", path, "-p", "w", "--const", "460", "-o", out)["w"], torch.full((3,), 460.0).to(
        torch.float8_e4m3fn))
    same_bits(written("init", path, "-p", "h", "--const", "65519", "-o", out)["h"],
              torch.full((3,), 65519.0).to(torch.float16))
    forced = written("init", path, "-p", "w", "--const", "1000", "--allow-overflow", "-o", out)["w"]
    same_bits(forced, torch.full((3,), 1000.0).to(torch.float8_e4m3fn))


def test_init_and_resize_refuse_draws_beyond_float8(tmp_path):
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"w": torch.ones(64, 8).to(torch.float8_e4m3fn)}, path)
    line = refused("init", path, "-p", "w", "--scheme", "normal(std=1000)", "--seed", "1", "-o", out)
    assert "of 512 values of 'w' would exceed float8_e4m3fn's largest value 448" in line, line
    line = refused("resize", path, "-p", "w", "--size", "80", "--fill", "normal(std=1000)", "--seed", "1", "-o", out)
    assert "of 640 values of 'w' would exceed float8_e4m3fn's largest value 448" in line, line
    assert not out.exists()


@pytest.mark.parametrize("method", ["task-arithmetic", "ties"])
def test_merge_into_float8_refuses_what_it_would_clamp(tmp_path, method):
    base = torch.tensor([100.0, -200.0, 1.0, 0.5]).to(torch.float8_e4m3fn)
    tuned = torch.tensor([300.0, -200.0, 2.0, 0.5]).to(torch.float8_e4m3fn)
    paths = [tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"]
    out = tmp_path / "out.safetensors"
    save_file({"w": base}, paths[0])
    save_file({"w": tuned}, paths[1])
    merged = base.float() + 2 * (tuned.float() - base.float())  # lambda 2: 500 overflows, the rest fit
    assert overflows(merged, torch.float8_e4m3fn).tolist() == [True, False, False, False]
    density = ["--density", "1"] if method == "ties" else []  # ties keeps every entry: task arithmetic's sum
    args = ["merge", paths[1], "--base", paths[0], "--method", method, *density, "--lambda", "2"]
    line = refused(*args, "-o", out)
    assert "merge: 1 of 4 values of 'w' would exceed float8_e4m3fn's largest value 448" in line, line
    assert not out.exists()
    same_bits(written(*args, "--allow-overflow", "-o", out)["w"], merged.to(torch.float8_e4m3fn))
    within = ["merge", paths[1], "--base", paths[0], "--method", method, *density, "--lambda", "0.5"]
    half = base.float() + 0.5 * (tuned.float() - base.float())
    same_bits(written(*within, "-o", out)["w"], half.to(torch.float8_e4m3fn))


def test_scale_of_an_fp8_block_weight_writes_bfloat16(tmp_path):
    """A quantized weight is scaled as its dequantized values (codes times their tile's scale) and
    written as a plain bfloat16 tensor: its codes never overflow, the bfloat16 range is what counts."""
    codes = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn)
    path, out = tmp_path / "q.safetensors", tmp_path / "out.safetensors"
    save_file({"l.weight": codes, "l.weight_scale_inv": torch.tensor([[2.0]])}, path)
    got = written("scale", path, "-p", "l.weight", "--by", "1000", "-o", out)
    assert list(got) == ["l.weight"]
    same_bits(got["l.weight"], (codes.float() * 2.0 * 1000).to(torch.bfloat16))
    line = refused("scale", path, "-p", "l.weight", "--by", "1e38", "-o", out)
    assert "2 of 4 values of 'l.weight' would become Inf or NaN (bfloat16" in line, line


@pytest.mark.parametrize("up", [10.0, 100.0])
def test_merge_lora_into_a_float8_weight(tmp_path, up):
    """PEFT's W + B @ A * alpha / r, in float32 and rounded once to the base's float8; beyond 448 refused."""
    weight = torch.tensor([[1.0, 2.0], [3.0, 400.0]]).to(torch.float8_e4m3fn)
    a, b = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [up]])
    base, adapter, out = tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors"
    save_file({"l.weight": weight}, base)
    adapter.mkdir()
    save_file({"base_model.model.l.lora_A.weight": a, "base_model.model.l.lora_B.weight": b},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2,
                                                             "target_modules": ["l"]}))
    merged = weight.float() + b @ a * 2.0
    if overflows(merged, torch.float8_e4m3fn).any():
        line = refused("merge-lora", base, adapter, "-o", out)
        assert "1 of 4 values of 'l.weight' would exceed float8_e4m3fn's largest value 448" in line, line
        assert refused("merge-lora", base, adapter, "--dry-run") == line and not out.exists()
    else:
        same_bits(written("merge-lora", base, adapter, "-o", out)["l.weight"], merged.to(torch.float8_e4m3fn))
