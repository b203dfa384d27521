"""Memory: bounded on a file larger than every budget (the session's 384 MiB ``large`` file), and no
torch where only headers are read; sizes and progress on that file. Nothing here is timed: speed is the
benchmark's job (bench/run.py)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from helpers import bits, load_torch, register_input, run, run_on_terminal, run_process

MiB = 1 << 20


def peak_anon(args: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    """Run ``python -m paramsurgeon ARGS`` and sample its RssAnon until it exits."""
    process = subprocess.Popen([sys.executable, "-m", "paramsurgeon", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                with open(f"/proc/{process.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = process.communicate(timeout=600)
    done.set()
    sampler.join()
    return peak[0], subprocess.CompletedProcess(args, process.returncode, out, err)


@pytest.mark.parametrize("name", ["large.pt", "large.safetensors"])
def test_surgery_memory_is_bounded_by_what_changes(request, tmp_path, large, name):
    size = os.path.getsize(register_input(request, large / name))
    peak, result = peak_anon(["zero", large / name, "-p", "blocks.7.weight", "-o", tmp_path / name])
    assert result.returncode == 0, result.stderr
    assert peak < 96 * MiB < size, f"zero used {peak / MiB:.0f} MiB of anonymous memory on a {size / MiB:.0f} MiB file"
    peak, result = peak_anon(["convert", large / name, "-o", tmp_path / "copy.safetensors"])
    assert result.returncode == 0 and peak < 96 * MiB, f"convert used {peak / MiB:.0f} MiB"
    zeroed = load_torch(tmp_path / name) if name.endswith(".pt") else None
    if zeroed is not None:
        assert zeroed["blocks.7.weight"].abs().sum() == 0 and zeroed["blocks.8.weight"][0, 0] == 8


def test_statistics_memory_does_not_grow_with_the_file(request, large):
    path = register_input(request, large / "large.safetensors")
    peak, result = peak_anon(["inspect", path, "--json"])
    assert result.returncode == 0, result.stderr
    assert peak < 320 * MiB < os.path.getsize(path), f"inspect used {peak / MiB:.0f} MiB"
    stats = {t["name"]: t["stats"] for t in json.loads(result.stdout)["tensors"]}
    assert stats["blocks.5.weight"]["mean"] == 5.0 and stats["blocks.5.weight"]["std"] == 0.0


def test_commands_that_compute_nothing_never_import_torch(tmp_path, resnet_pt, gpt_pt):
    dcp_dir = tmp_path / "dcp"
    assert run("convert", resnet_pt, "-o", dcp_dir, "--format", "dcp").exit_code == 0
    code = ("import sys\nfrom paramsurgeon.cli import main\nsys.argv = ['paramsurgeon'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, 1), e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    st = tmp_path / "m.safetensors"
    run("convert", resnet_pt, "-o", st)
    for args in (["inspect", "--no-stats", st], ["inspect", "--no-stats", resnet_pt], ["inspect", "--no-stats", dcp_dir], ["diff", "--no-values", resnet_pt, st],
                 ["zero", resnet_pt, "-p", "fc.bias", "-o", tmp_path / "z.pt"], ["--help"],
                 ["untie", gpt_pt, "-p", "lm_head.weight", "-o", tmp_path / "u.pt"],
                 ["copy", resnet_pt, "--from", "layer1.0.*", "--to", "layer1.1.*", "-o", tmp_path / "c.pt"],
                 ["tie", gpt_pt, "--source", "h.0.ln_1.weight", "--target", "h.1.ln_1.weight", "-o", tmp_path / "t.pt"],
                 ["rename", resnet_pt, "--from", "fc.*", "--to", "head.*", "-o", tmp_path / "r.safetensors"],
                 ["check", "--like", st, "--expect", "fc.bias=10", resnet_pt, "--dtype", "float32"]):
        result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert result.stderr.strip().endswith("NO-TORCH"), (args, result.stderr)


def test_processes_report_sizes(request, large):
    result = run_process("inspect", register_input(request, large / "large.pt"), "--no-stats")
    assert result.returncode == 0 and b"96 tensors, 100,663,296 parameters" in result.stdout


def test_progress_bar_on_a_terminal_only(request, tmp_path, large):
    """A bar with bytes and throughput on a terminal's stderr; nothing in a pipe or with NO_COLOR."""
    args = ("convert", register_input(request, large / "large.pt"), "-o", tmp_path / "copy.safetensors")
    now = {"PARAMSURGEON_PROGRESS_DELAY": "0"}
    shown = run_on_terminal(*args, terminal=("stderr",), env=now)[1]
    assert b"writing" in shown and b"/s" in shown and b"402.7 MB" in shown
    assert b"writing" not in run_on_terminal(*args, terminal=("stderr",), env={**now, "NO_COLOR": "1"})[1]
    assert run_on_terminal(*args, terminal=(), env=now)[2].startswith(b"wrote ")


def test_a_quantized_weight_is_dequantized_a_band_at_a_time(tmp_path):
    """dequantize writes, and inspect reduces, an fp8-block weight of 8192 x 8192 (128 MiB in bfloat16)
    a few MiB of rows at a time: neither holds the whole dequantized tensor (both did)."""
    from fp8_reference import dequantize, quantize
    from safetensors.torch import save_file

    weight = torch.randn(8192, 8192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    codes, scale = quantize(weight)
    save_file({"big.weight": codes, "big.weight_scale_inv": scale}, tmp_path / "fp8.safetensors")
    save_file({"big.weight": dequantize(codes, scale)}, tmp_path / "reference.safetensors")
    save_file({"tiny": torch.ones(4)}, tmp_path / "tiny.safetensors")
    whole = 8192 * 8192 * 2
    base, _ = peak_anon(["inspect", tmp_path / "tiny.safetensors", "--workers", "1"])  # Python, torch and the CLI
    peak, result = peak_anon(["dequantize", tmp_path / "fp8.safetensors", "-o", tmp_path / "out.safetensors",
                              "--workers", "1"])
    assert result.returncode == 0, result.stderr
    assert peak - base < whole // 2, f"dequantize used {(peak - base) / MiB:.0f} MiB over the {base / MiB:.0f} MiB start"
    assert bits(load_file(tmp_path / "out.safetensors")["big.weight"]) == bits(dequantize(codes, scale))
    peak, result = peak_anon(["inspect", tmp_path / "fp8.safetensors", "--json", "--workers", "1"])
    assert result.returncode == 0, result.stderr
    assert peak - base < whole * 7 // 8, f"inspect used {(peak - base) / MiB:.0f} MiB over the {base / MiB:.0f} MiB start"
    plain = run_process("inspect", tmp_path / "reference.safetensors", "--json", "--workers", "1")
    assert json.loads(result.stdout)["tensors"][0]["stats"] == json.loads(plain.stdout)["tensors"][0]["stats"]
