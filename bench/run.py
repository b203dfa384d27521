"""Benchmark paramsurgeon on a 2 GiB float32 checkpoint, side by side with the physical limit
(cp) and the scripts people write today, and write the results into bench/README.md (every row)
and the project's README.md (the headline rows).

    python bench/run.py                # 5 runs each, prints the table
    python bench/run.py --update-readme

Each measurement runs a fresh process; wall time is measured around it and peak anonymous
memory (RssAnon, the memory a process really allocates, not the file pages it maps; for a command
with worker processes, their Pss_Anon summed) is sampled from /proc every 5 ms. Medians over the runs; this machine is shared and noisy.
"""

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
BENCH_README = os.path.join(HERE, "README.md")
TABLE = re.compile(r"(<!-- bench:start -->\n).*?(<!-- bench:end -->)", re.S)
BIN = os.path.dirname(sys.executable)
TENSORS, SIDE = 128, 2048  # 128 float32 tensors of 2048 x 2048 = 16 MiB each: 2 GiB
MiB = 1 << 20

MAKE = """
import sys, torch
from safetensors.torch import save_file
torch.manual_seed(0)
state = {f"blocks.{i}.weight": torch.randn(%d, %d) for i in range(%d)}
torch.save(state, sys.argv[1] + "/model.pt")
save_file(state, sys.argv[1] + "/model.safetensors")
""" % (SIDE, SIDE, TENSORS)

MAKE_MANY_DCP = """
import sys, warnings, torch, torch.distributed.checkpoint as dcp
warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
torch.manual_seed(0)
dcp.save({f"layers.{i}.weight": torch.randn(64, 64) for i in range(int(sys.argv[2]))}, checkpoint_id=sys.argv[1])
"""
MANY = (1000, 10000)  # DCP directories of this many 64x64 float32 tensors: reading cost per tensor

MAKE_MANY_ST = """
import sys, torch
from safetensors.torch import save_file
torch.manual_seed(0)
save_file({f"layers.{i}.weight": torch.randn(16, 16) for i in range(int(sys.argv[2]))}, sys.argv[1])
"""
MANY_ST = (1000, 10000, 100000)  # safetensors files of this many 16x16 float32 tensors: cost per tensor
SAFE_OPEN_KEYS = """
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "np") as f:
    print(len(list(f.keys())))
"""
SCRIPT_INIT_DCP = """
import sys, warnings, torch, torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
warnings.simplefilter("ignore")
state = load_file(sys.argv[1])
for name, t in state.items():
    torch.nn.init.normal_(t, std=0.02)
dcp.save(state, checkpoint_id=sys.argv[2])
"""

SCRIPT_ZERO_PT = """
import sys, torch
state = torch.load(sys.argv[1], weights_only=True)
state["blocks.5.weight"].zero_()
torch.save(state, sys.argv[2])
"""
SCRIPT_ZERO_ST = """
import sys
from safetensors.torch import load_file, save_file
state = load_file(sys.argv[1])
state["blocks.5.weight"].zero_()
save_file(state, sys.argv[2])
"""
SCRIPT_MERGE = """
import sys, torch
from safetensors.torch import load_file
states = [load_file(p) if p.endswith(".safetensors") else torch.load(p, weights_only=True) for p in sys.argv[1:4]]
torch.save({name: sum(s[name] for s in states) / len(states) for name in states[0]}, sys.argv[4])
"""
SCRIPT_STATS = """
import sys, torch
from safetensors.torch import load_file
state = load_file(sys.argv[1]) if sys.argv[1].endswith(".safetensors") else torch.load(sys.argv[1], weights_only=True)
for name, t in state.items():
    x = t.double()
    print(name, list(t.shape), t.dtype, t.numel(), x.mean().item(), x.std().item(), x.min().item(), x.max().item(),
          x.abs().max().item(), (t == 0).sum().item(), torch.isnan(t).sum().item(), torch.isinf(t).sum().item())
"""

TIES_GROUP = "merge ties: one 250 MiB bf16 embedding (32000x4096) of three checkpoints"
MAKE_TIES = """
import sys, torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
base = torch.randn(32000, 4096, generator=g).mul_(0.02)
save_file({"embed.weight": base.to(torch.bfloat16)}, sys.argv[1] + "/ties-base.safetensors")
for i in (1, 2):
    tuned = base + 0.002 * torch.randn(32000, 4096, generator=g)
    save_file({"embed.weight": tuned.to(torch.bfloat16)}, sys.argv[1] + f"/ties-{i}.safetensors")
"""
SCRIPT_TIES = """
import sys, torch
from safetensors.torch import load_file, save_file
# TIES as mergekit computes it (whole task vectors: topk magnitudes, stacked, sign consensus), in float32
base, *tuned = [load_file(p)["embed.weight"].float() for p in sys.argv[1:4]]
deltas = []
for x in tuned:
    d = (x - base).view(-1)
    mask = torch.zeros_like(d, dtype=torch.bool)
    mask[d.abs().topk(int(0.5 * d.numel())).indices] = True
    deltas.append((d * mask).view(base.shape))
stacked = torch.stack(deltas)
agree = stacked.sign() == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
divisor = agree.float().sum(0)
merged = (stacked * agree).sum(0) / torch.where(divisor.abs() < 1e-8, 1.0, divisor)
save_file({"embed.weight": (base + merged).to(torch.bfloat16)}, sys.argv[4])
"""

DIFF_GROUP = "diff two 250 MiB bf16 embeddings, every value changed (within --atol 1)"
SCRIPT_DIFF = """
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
for name in a:  # what diff reports: largest |a-b| and |a-b|/|b|, and the count isclose rejects, in float64
    x, y = a[name].double(), b[name].double()
    gap = (x - y).abs()
    print(name, float(gap.max()), float((gap / y.abs()).nan_to_num(0).max()),
          int((~torch.isclose(x, y, atol=1.0, equal_nan=True)).sum()))
"""
LAYERS, LAYER_SIDE = 32, 2048  # 32 layers of 4 float32 tensors of 2048 x 2048: 2 GiB
LAYERS_GROUP = f"layers --drop 4 of {LAYERS} layers (2 GiB safetensors)"
STACK_GROUP = f"stack two {LAYERS}-layer checkpoints, half of each (2 GiB safetensors)"
MAKE_LAYERS = """
import os, sys, torch
from safetensors.torch import save_file
folder, layers, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for name, seed in (("layers.safetensors", 0), ("layers-b.safetensors", 1)):
    torch.manual_seed(seed)
    save_file({f"model.layers.{i}.self_attn.{p}_proj.weight": torch.randn(side, side) for i in range(layers)
               for p in "qkvo"}, os.path.join(folder, name))
size = os.path.getsize(os.path.join(folder, "layers.safetensors")) * (layers - 4) // layers
with open(os.path.join(folder, "layers.safetensors"), "rb") as source, open(os.path.join(folder, "layers-cut.bin"), "wb") as cut:
    cut.write(source.read(size))  # a file of the size of the result of dropping 4 layers
"""
LORA_GROUP = "merge a rank-16 LoRA into a 1 GiB bf16 Llama-like checkpoint"
MAKE_LORA = """
import json, os, sys, torch
from safetensors.torch import save_file
from transformers import LlamaConfig
folder = sys.argv[1]
config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
os.makedirs(folder + "/llama", exist_ok=True)
config.save_pretrained(folder + "/llama")
g = torch.Generator().manual_seed(0)
h, i = config.hidden_size, config.intermediate_size
shapes = {"model.embed_tokens.weight": (config.vocab_size, h)}
linear = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
          "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
for layer in range(config.num_hidden_layers):
    for name, shape in linear.items():
        shapes[f"model.layers.{layer}.{name}.weight"] = shape
    shapes[f"model.layers.{layer}.input_layernorm.weight"] = (h,)
    shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (h,)
shapes["model.norm.weight"] = (h,)
shapes["lm_head.weight"] = (config.vocab_size, h)
state = {k: (0.02 * torch.randn(s, generator=g)).to(torch.bfloat16) for k, s in shapes.items()}
save_file(state, folder + "/llama/model.safetensors", metadata={"format": "pt"})
del state
r = 16  # PEFT's key names and config, as save_pretrained writes them for target_modules=all linear layers
adapter = {}
for layer in range(config.num_hidden_layers):
    for name, (out, inn) in linear.items():
        key = f"base_model.model.model.layers.{layer}.{name}"
        adapter[key + ".lora_A.weight"] = 0.01 * torch.randn(r, inn, generator=g)
        adapter[key + ".lora_B.weight"] = 0.01 * torch.randn(out, r, generator=g)
os.makedirs(folder + "/adapter", exist_ok=True)
save_file(adapter, folder + "/adapter/adapter_model.safetensors", metadata={"format": "pt"})
json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": sorted({n.split(".")[-1] for n in linear}),
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
           "base_model_name_or_path": None}, open(folder + "/adapter/adapter_config.json", "w"))
"""
SCRIPT_PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import LlamaForCausalLM
model = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2])
assert model.base_model.model.model.layers[7].mlp.down_proj.lora_B["default"].weight.abs().sum() > 0  # loaded
model.merge_and_unload().save_pretrained(sys.argv[3])
"""


FP8_SIDE = 4096  # fp8-block weights of 4096 x 4096, 4 shards; 128 of them: 2 G parameters, 2 GiB of codes
FP8_TENSORS = int(os.environ.get("PARAMSURGEON_BENCH_FP8_TENSORS", "128"))  # fewer: a quick check of the rows
FP8_GROUP = f"dequantize fp8-block ({FP8_TENSORS * FP8_SIDE ** 2 / 1e9:.1f} G parameters, 4 shards) to bf16"
FP8_INSPECT = f"inspect fp8-block ({FP8_TENSORS * FP8_SIDE ** 2 / 1e9:.1f} G parameters) with statistics"
FP8_QUANTIZE = "quantize --scheme fp8-block the bf16 result"
MAKE_FP8 = """
import json, os, sys, torch
from safetensors.torch import save_file
torch.manual_seed(0)
folder, count, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shards = int(sys.argv[4]) if len(sys.argv) > 4 else 4
os.makedirs(folder)
weight_map, per_shard = {}, count // shards
for shard in range(shards):
    name, state = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors", {}
    for i in range(shard * per_shard, (shard + 1) * per_shard):
        state[f"layers.{i}.weight"] = (torch.randn(side, side) * 100).to(torch.float8_e4m3fn)
        state[f"layers.{i}.weight_scale_inv"] = torch.rand(side // 128, side // 128) * 1e-4 + 1e-5
    save_file(state, os.path.join(folder, name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(state, name))
json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(folder, "model.safetensors.index.json"), "w"))
json.dump({"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
           "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}, open(os.path.join(folder, "config.json"), "w"))
"""
SCRIPT_FP8_CAST = """
import json, os, sys, torch
from safetensors.torch import load_file, save_file
def weight_dequant(x, s, block_size=128):  # DeepSeek's kernel on the CPU: each code times its tile's scale
    rows, columns = x.shape
    scale = s.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:rows, :columns]
    return (x.float() * scale).to(torch.bfloat16)
source, target = sys.argv[1], sys.argv[2]
os.makedirs(target)
weight_map = json.load(open(os.path.join(source, "model.safetensors.index.json")))["weight_map"]
new_map = {}
for shard in sorted(set(weight_map.values())):  # fp8_cast_bf16.py: a shard at a time
    state, out = load_file(os.path.join(source, shard)), {}
    for name, tensor in state.items():
        if name.endswith("_scale_inv"):
            continue
        scale = state.get(name + "_scale_inv")
        out[name] = weight_dequant(tensor, scale) if scale is not None else tensor
        new_map[name] = shard
    save_file(out, os.path.join(target, shard))
json.dump({"metadata": {}, "weight_map": new_map}, open(os.path.join(target, "model.safetensors.index.json"), "w"))
"""


GGUF_LAYERS, GGUF_SIDE = 30, 4096  # 30 layers of 4 Q8_0 weights of 4096 x 4096 (17 MiB each): 2 GiB of blocks
GGUF_HEADER = "header only (2 GiB gguf, 120 Q8_0 tensors, a 32,000-token vocabulary)"
GGUF_CONVERT = "convert a 2 GiB Q8_0 gguf to bf16 safetensors"
GGUF_ZERO = "zero one Q8_0 tensor of a 2 GiB gguf"
MAKE_GGUF = """
import sys, numpy as np, gguf
path, layers, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
writer = gguf.GGUFWriter(path, "llama")
writer.add_block_count(layers)
writer.add_embedding_length(side)
writer.add_tokenizer_model("llama")
writer.add_token_list([f"token{i}" for i in range(32000)])
writer.add_token_scores([0.0] * 32000)
names = [f"blk.{i}.attn_{p}.weight" for i in range(layers) for p in ("q", "k", "v", "output")]
row = side // 32 * 34  # bytes of a row of Q8_0 blocks
for name in names:
    writer.add_tensor_info(name, (side, row), np.dtype(np.uint8), side * row, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_ti_data_to_file()
rng = np.random.default_rng(0)
for name in names:  # random int8 codes, each block's float16 scale 0.0005 to 0.001
    blocks = rng.integers(0, 256, (side * side // 32, 34), dtype=np.uint8)
    blocks[:, :2] = rng.uniform(0.0005, 0.001, (side * side // 32, 1)).astype(np.float16).view(np.uint8)
    writer.write_tensor_data(blocks.reshape(side, row))
writer.close()
"""
SCRIPT_GGUF_CONVERT = """
import sys, torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
reader = GGUFReader(sys.argv[1])
state = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type)).to(torch.bfloat16) for t in reader.tensors}
save_file(state, sys.argv[2])
"""
GGUF_NAMES = """
import sys
from gguf import GGUFReader
print(len(GGUFReader(sys.argv[1]).tensors))
"""


REMOTE_HEADERS = "header only: a remote 8-shard checkpoint (hf://, a local hub endpoint with its CDN redirect)"
REMOTE_STATS = "inspect with statistics: a remote 2 GiB file (http://127.0.0.1, ranged reads)"
SERVE = """
import sys
sys.path.insert(0, sys.argv[2])
from remote_server import Server  # the tests' hub endpoint and file server, and a second one as its CDN
hub, cdn = Server(sys.argv[1]), Server(sys.argv[1])
hub.redirect_to = cdn.url
print(hub.url, flush=True)
sys.stdin.read()  # serves until the benchmark closes its standard input
"""
SCRIPT_HF_METADATA = """
import os, shutil, sys, tempfile
os.environ["HF_HUB_CACHE"] = cache = tempfile.mkdtemp()  # the index downloaded afresh, as on a first call
from huggingface_hub import HfApi
meta = HfApi().get_safetensors_metadata(sys.argv[1])
print(len(meta.files_metadata), sum(len(f.tensors) for f in meta.files_metadata.values()))
shutil.rmtree(cache)
"""


def peak_anon(pid: int, stop: threading.Event, result: list) -> None:
    """The peak anonymous memory of ``pid``: its RssAnon; with child processes (--workers), the
    Pss_Anon of each summed, since a forked worker shares its parent's pages until it writes them
    (summing their RssAnon would count those pages once per process). Appends (peak, whether it had
    children)."""
    peak, forked = 0, False
    while not stop.is_set():
        children = _children(pid)
        forked = forked or bool(children)
        total = _anon(pid, "status", "RssAnon:") if not children else \
            sum(_anon(p, "smaps_rollup", "Pss_Anon:") or 0 for p in [pid, *children])
        if total is None:
            break
        peak = max(peak, total)
        stop.wait(0.005)
    result.append((peak, forked))


def _anon(pid: int, source: str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/{source}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            found = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return found + [g for c in found for g in _children(c)]


# As an installed package runs: with compiled bytecode (an editable install only has it once written).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def measure(command: list[str], cwd: str, sampled: bool = True) -> tuple[float, int, bool]:
    """(wall seconds, peak anonymous bytes, whether it had child processes) of one run of ``command``;
    not ``sampled``: its wall alone."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=peak_anon, args=(process.pid, stop, peak))
    if sampled:
        sampler.start()
    _, err = process.communicate()
    wall = time.perf_counter() - start
    stop.set()
    if sampled:
        sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {err.decode()}")
    return (wall, *(peak[0] if peak else (0, False)))


WORKERS_SHARDS = 8
W_STATS = "inspect with statistics, 2 GiB in 8 shards: workers"
W_CAST = "cast --dtype bfloat16 --all, 2 GiB in 8 shards: workers"
W_DEQUANTIZE = f"dequantize fp8-block ({FP8_TENSORS * FP8_SIDE ** 2 / 1e9:.1f} G parameters, 8 shards): workers"
ONE_WORKER = "paramsurgeon --workers 1 (the reference)"
TWO_WORKERS = "paramsurgeon --workers 2"
CLUSTER = "paramsurgeon --scheduler (LocalCluster: 2 workers of 1 thread)"
SCHEDULER = "tcp://127.0.0.1:8799"


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def tool(*args: str) -> list[str]:
    return [os.path.join(BIN, "paramsurgeon"), *args]


def cases(folder: str) -> list[tuple]:
    """(group, label, command, output file to delete after each run[, command run before each run])."""
    rows = []
    for fmt, ext in (("safetensors", "safetensors"), ("torch zip", "pt")):
        source, out = f"model.{ext}", f"out.{ext}"
        zero_script = SCRIPT_ZERO_ST if ext == "safetensors" else SCRIPT_ZERO_PT
        group = f"zero one 16 MiB tensor ({fmt})"
        rows += [(group, "cp (the physical limit)", ["cp", source, out], out),
                 (group, "cp, then sync (the limit, durable)", ["sh", "-c", f"cp {source} {out} && sync {out}"], out),
                 (group, "paramsurgeon zero (atomic, fsync'd)", tool("zero", source, "-p", "blocks.5.weight", "-o", out), out),
                 (group, "script: load, zero_(), save", python(zero_script, source, out), out)]
    group = "zero one tensor of a 4-shard directory, in place"
    rows += [(group, "cp -r (the physical limit)", ["cp", "-r", "sharded", "copied"], "copied"),
             (group, "cp -r, then sync (the limit, durable)",
              ["sh", "-c", "cp -r sharded copied && sync copied/* copied"], "copied"),
             (group, "paramsurgeon zero --in-place (atomic, fsync'd)",
              tool("zero", "--in-place", "work", "-p", "blocks.5.weight"), "", ["cp", "-r", "sharded", "work"])]
    for fmt, ext in (("safetensors", "safetensors"), ("torch zip", "pt")):
        group = f"inspect with statistics ({fmt})"
        rows += [(group, "paramsurgeon inspect", tool("inspect", f"model.{ext}"), ""),
                 (group, "script: load, then torch reductions", python(SCRIPT_STATS, f"model.{ext}"), "")]
    rows += [("header only", "paramsurgeon inspect --no-stats (safetensors)",
              tool("inspect", "--no-stats", "model.safetensors"), ""),
             ("header only", "paramsurgeon --help", tool("--help"), "")]
    rows += [("DCP (torch.distributed.checkpoint)", "paramsurgeon convert safetensors -> DCP",
              tool("convert", "model.safetensors", "-o", "dcp-out", "--format", "dcp"), "dcp-out"),
             ("DCP (torch.distributed.checkpoint)", "paramsurgeon convert DCP -> torch zip",
              tool("convert", "model-dcp", "-o", "from-dcp.pt"), "from-dcp.pt")]
    group = "merge three 2 GiB checkpoints (linear)"
    inputs = ["model.pt", "model.safetensors", "model-c.safetensors"]
    rows += [(group, "paramsurgeon merge (streaming)", tool("merge", *inputs, "-o", "merged.pt"), "merged.pt"),
             (group, "script: torch.load the three, average, save", python(SCRIPT_MERGE, *inputs, "merged.pt"),
              "merged.pt")]
    reference = "inspect, statistics only (the reference)"
    for group, label, extra in (("inspect --hist (2 GiB safetensors)", "paramsurgeon inspect --hist", ["--hist"]),
                                ("check --health (2 GiB safetensors)", "paramsurgeon check --health", [])):
        command = tool("inspect", "model.safetensors", *extra) if extra else tool("check", "model.safetensors",
                                                                                  "--health")
        rows += [(group, reference, tool("inspect", "model.safetensors"), ""), (group, label, command, "")]
    rows += [("report (2 GiB safetensors)", reference, tool("inspect", "model.safetensors"), ""),
             ("report (2 GiB safetensors)", "paramsurgeon report", tool("report", "model.safetensors", "-o",
                                                                        "report.html"), "report.html")]
    rows += [(LORA_GROUP, "paramsurgeon merge-lora (streaming)",
              tool("merge-lora", "lora/llama/model.safetensors", "lora/adapter", "-o", "lora-merged.safetensors"),
              "lora-merged.safetensors"),
             (LORA_GROUP, "PEFT: from_pretrained, merge_and_unload, save_pretrained",
              python(SCRIPT_PEFT_MERGE, "lora/llama", "lora/adapter", "peft-merged"), "peft-merged")]
    ties = ["ties-1.safetensors", "ties-2.safetensors", "ties-base.safetensors"]
    rows += [(TIES_GROUP, "paramsurgeon merge --method ties (streaming)",
              tool("merge", *ties[:2], "--base", ties[2], "--method", "ties", "-o", "ties-out.safetensors"),
              "ties-out.safetensors"),
             (TIES_GROUP, "script: TIES as mergekit computes it (whole tensors)",
              python(SCRIPT_TIES, ties[2], *ties[:2], "ties-out.safetensors"), "ties-out.safetensors")]
    rows += [(DIFF_GROUP, "paramsurgeon diff --atol 1", tool("diff", ties[0], ties[2], "--atol", "1"), ""),
             (DIFF_GROUP, "script: load both, the same measures in float64", python(SCRIPT_DIFF, ties[0], ties[2]),
              "")]
    rows += [(FP8_GROUP, "script: DeepSeek's fp8_cast_bf16 on the CPU (weight_dequant in torch)",
              python(SCRIPT_FP8_CAST, "fp8", "fp8-cast"), "fp8-cast"),
             (FP8_GROUP, "paramsurgeon dequantize (streaming)", tool("dequantize", "fp8", "-o", "fp8-out/"), "fp8-out"),
             (FP8_INSPECT, "inspect of a bf16 checkpoint of as many parameters (the reference)",
              tool("inspect", "fp8-bf16"), ""),
             (FP8_INSPECT, "paramsurgeon inspect (dequantized statistics)", tool("inspect", "fp8"), ""),
             (FP8_QUANTIZE, "dequantize, as above (the reference)", tool("dequantize", "fp8", "-o", "fp8-out/"),
              "fp8-out"),
             (FP8_QUANTIZE, "paramsurgeon quantize --scheme fp8-block",
              tool("quantize", "fp8-bf16", "--all", "--scheme", "fp8-block", "-o", "fp8-out/"), "fp8-out")]
    rows += [(GGUF_HEADER, "gguf's GGUFReader: open, count the tensors", python(GGUF_NAMES, "q8.gguf"), ""),
             (GGUF_HEADER, "paramsurgeon --help (the command line's start)", tool("--help"), ""),
             (GGUF_HEADER, "paramsurgeon inspect --no-stats (gguf)", tool("inspect", "--no-stats", "q8.gguf"), ""),
             (GGUF_CONVERT, "write as many bytes (3.75 GiB), then sync (the limit, durable)",
              ["sh", "-c", f"head -c {GGUF_LAYERS * 4 * GGUF_SIDE ** 2 * 2} /dev/zero > gguf-out.safetensors"
               " && sync gguf-out.safetensors"], "gguf-out.safetensors"),
             (GGUF_CONVERT, "script: GGUFReader, gguf.quants.dequantize, save_file",
              python(SCRIPT_GGUF_CONVERT, "q8.gguf", "gguf-out.safetensors"), "gguf-out.safetensors"),
             (GGUF_CONVERT, "paramsurgeon convert --dtype bfloat16 (streaming)",
              tool("convert", "q8.gguf", "-o", "gguf-out.safetensors", "--dtype", "bfloat16"),
              "gguf-out.safetensors"),
             (GGUF_ZERO, "cp, then sync (the limit, durable)",
              ["sh", "-c", "cp q8.gguf gguf-out.gguf && sync gguf-out.gguf"], "gguf-out.gguf"),
             (GGUF_ZERO, "paramsurgeon zero (atomic, fsync'd)",
              tool("zero", "q8.gguf", "-p", "blk.5.attn_q.weight", "-o", "gguf-out.gguf"), "gguf-out.gguf")]
    for n in MANY:
        group = f"DCP of {n:,} tensors of 64x64 -> torch zip"
        rows += [(group, "paramsurgeon convert", tool("convert", f"dcp-{n}", "-o", "many.pt"), "many.pt"),
                 (group, "torch format_utils dcp_to_torch",
                  [sys.executable, "-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch", f"dcp-{n}",
                   "many.pt"], "many.pt")]
    many = f"many-{MANY_ST[-1]}.safetensors"
    for group, label, args in ((f"{MANY_ST[-1]:,} tensors of 16x16: list names (safetensors)",
                                "paramsurgeon inspect --no-stats", ["inspect", "--no-stats", many]),
                               (f"{MANY_ST[-1]:,} tensors of 16x16: zero one, write all (safetensors)",
                                "paramsurgeon zero one tensor", ["zero", many, "-p", "layers.5.weight", "-o",
                                                                 "many-out.safetensors"])):
        rows += [(group, "safetensors safe_open().keys()", python(SAFE_OPEN_KEYS, many), ""),
                 (group, label, tool(*args), "many-out.safetensors")]
    # how the cost grows with the number of tensors
    rows += [("scaling: inspect --no-stats (safetensors)", f"paramsurgeon, {n:,} tensors",
              tool("inspect", "--no-stats", f"many-{n}.safetensors"), "") for n in MANY_ST]
    rows += [("scaling: zero one tensor (safetensors)", f"paramsurgeon, {n:,} tensors",
              tool("zero", f"many-{n}.safetensors", "-p", "layers.5.weight", "-o", "many-out.safetensors"),
              "many-out.safetensors") for n in MANY_ST]
    for group, args, out in ((W_STATS, ["inspect", "sharded8"], ""),
                             (W_CAST, ["cast", "sharded8", "--all", "--dtype", "bfloat16", "-o", "w-out/"], "w-out"),
                             (W_DEQUANTIZE, ["dequantize", "fp8-8", "-o", "w-out/"], "w-out")):
        rows += [(group, ONE_WORKER, tool(*args, "--workers", "1"), out),
                 (group, TWO_WORKERS, tool(*args, "--workers", "2"), out),
                 (group, CLUSTER, tool(*args, "--scheduler", SCHEDULER), out)]
    half = LAYERS // 2
    rows += [(LAYERS_GROUP, "cp, then sync (the limit, durable)",
              ["sh", "-c", "cp layers-cut.bin cut-out.bin && sync cut-out.bin"], "cut-out.bin"),
             (LAYERS_GROUP, "paramsurgeon layers --drop 8..11 (atomic, fsync'd)",
              tool("layers", "layers.safetensors", "--drop", "8..11", "-o", "layers-out.safetensors"),
              "layers-out.safetensors"),
             (STACK_GROUP, "cp, then sync (the limit, durable)",
              ["sh", "-c", "cp layers.safetensors cut-out.bin && sync cut-out.bin"], "cut-out.bin"),
             (STACK_GROUP, "paramsurgeon stack (atomic, fsync'd)",
              tool("stack", f"layers.safetensors:0..{half - 1}", f"layers-b.safetensors:{half}..{LAYERS - 1}", "-o",
                   "stack-out.safetensors"), "stack-out.safetensors")]
    rows += [(REMOTE_HEADERS, "huggingface_hub HfApi.get_safetensors_metadata", python(SCRIPT_HF_METADATA, "org/model8"),
              ""),
             (REMOTE_HEADERS, "paramsurgeon inspect --no-stats hf://org/model8",
              tool("inspect", "--no-stats", "hf://org/model8"), ""),
             (REMOTE_STATS, "inspect, the local file (the reference)", tool("inspect", "model.safetensors"), ""),
             (REMOTE_STATS, "transfer: curl of the whole file (the reference)",
              ["sh", "-c", 'curl -sSf "$BENCH_FILES/model.safetensors" > /dev/null'], ""),
             (REMOTE_STATS, "paramsurgeon inspect http://127.0.0.1:PORT/files/model.safetensors",
              ["sh", "-c", f'exec {tool("inspect")[0]} inspect "$BENCH_FILES/model.safetensors"'], "")]
    group = "init --all into DCP (2 GiB, 16 MiB tensors)"
    scheme = ["--all", "--scheme", "normal(std=0.02)", "--seed", "1", "-o", "init-dcp", "--format", "dcp"]
    rows += [(group, "paramsurgeon init --all, safetensors -> DCP", tool("init", "model.safetensors", *scheme),
              "init-dcp"),
             (group, "paramsurgeon init --all, DCP -> DCP", tool("init", "model-dcp", *scheme), "init-dcp"),
             (group, "script: load_file, normal_, dcp.save", python(SCRIPT_INIT_DCP, "model.safetensors", "init-dcp"),
              "init-dcp")]
    return rows


TARGETS = {  # group -> label of ours -> (compare to, wall ratio limit, memory limit)
    "zero one 16 MiB tensor (safetensors)": ("cp, then sync (the limit, durable)", 1.25, 256 * MiB),
    "zero one 16 MiB tensor (torch zip)": ("cp, then sync (the limit, durable)", 1.25, 256 * MiB),
    "zero one tensor of a 4-shard directory, in place": ("cp -r (the physical limit)", 1.5, 256 * MiB),
    "inspect with statistics (safetensors)": ("script: load, then torch reductions", 1.0, 400 * MiB),
    "inspect with statistics (torch zip)": ("script: load, then torch reductions", 1.0, 400 * MiB),
    "merge three 2 GiB checkpoints (linear)": ("script: torch.load the three, average, save", None, 320 * MiB),
    "inspect --hist (2 GiB safetensors)": ("inspect, statistics only (the reference)", 1.35, 400 * MiB),
    "check --health (2 GiB safetensors)": ("inspect, statistics only (the reference)", 1.2, 400 * MiB),
    "report (2 GiB safetensors)": ("inspect, statistics only (the reference)", 2.0, 512 * MiB),
    f"{MANY_ST[-1]:,} tensors of 16x16: list names (safetensors)": ("safetensors safe_open().keys()", 3.0, 256 * MiB),
    f"{MANY_ST[-1]:,} tensors of 16x16: zero one, write all (safetensors)": ("safetensors safe_open().keys()", 4.0,
                                                                             256 * MiB),
    "init --all into DCP (2 GiB, 16 MiB tensors)": ("script: load_file, normal_, dcp.save", None, 272 * MiB),
    LORA_GROUP: ("PEFT: from_pretrained, merge_and_unload, save_pretrained", 1.0, 320 * MiB),
    TIES_GROUP: ("script: TIES as mergekit computes it (whole tensors)", 1.0, 576 * MiB),
    DIFF_GROUP: ("script: load both, the same measures in float64", 1.0, 320 * MiB),
    LAYERS_GROUP: ("cp, then sync (the limit, durable)", 1.25, 64 * MiB),  # a copy with new names
    STACK_GROUP: ("cp, then sync (the limit, durable)", 1.25, 64 * MiB),
    FP8_GROUP: ("script: DeepSeek's fp8_cast_bf16 on the CPU (weight_dequant in torch)", 0.5, 320 * MiB),
    FP8_INSPECT: ("inspect of a bf16 checkpoint of as many parameters (the reference)", 1.5, 400 * MiB),
    FP8_QUANTIZE: ("dequantize, as above (the reference)", 1.25, 320 * MiB),
    GGUF_CONVERT: ("script: GGUFReader, gguf.quants.dequantize, save_file", 0.6, 320 * MiB),
    GGUF_ZERO: ("cp, then sync (the limit, durable)", 1.25, 256 * MiB),
    REMOTE_HEADERS: ("huggingface_hub HfApi.get_safetensors_metadata", 1.0, 64 * MiB),
    REMOTE_STATS: (("inspect, the local file (the reference)", "transfer: curl of the whole file (the reference)"),
                   1.5, 400 * MiB),  # within 1.5x of the local inspect plus the transfer
}  # merge: 256 MiB plus a few 16 MiB tensors; no limit on time; init into DCP: 256 MiB plus one tensor;
# merge-lora: 256 MiB plus a few float32 copies of its largest adapted tensor (5632x2048: 44 MiB, 16 MiB at a time);
# merge ties: 256 MiB, the merged tensor (250 MiB) and a few 16 MiB pieces; diff: 256 MiB and a few 8 MiB pieces
# DCP has no target yet; measured and shown.
BY_LABEL = {(group, label): (ONE_WORKER, limit, memory) for group in (W_STATS, W_CAST, W_DEQUANTIZE)
            for label, limit, memory in ((TWO_WORKERS, 0.65, 2.0), (CLUSTER, 0.8, None))}
# (group, label) -> (compare to, wall ratio limit, peak anon limit as a multiple of the reference's, or None)
HEADLINE = ("zero one 16 MiB tensor (torch zip)", "inspect with statistics (torch zip)", "header only",
            "merge three 2 GiB checkpoints (linear)", LORA_GROUP)  # the tasks README.md shows


def run(folder: str, runs: int, selected: list[tuple]) -> list[dict]:
    results = []
    for group, label, command, out, *setup in selected:
        walls, peaks = [], []
        for _ in range(runs):
            _set_up(folder, setup)
            wall, peak, forked = measure(command, folder)
            _remove(folder, out)
            if forked:  # sampling worker processes (smaps_rollup) slows them: timed again, alone
                _set_up(folder, setup)
                wall = measure(command, folder, sampled=False)[0]
                _remove(folder, out)
            walls.append(wall)
            peaks.append(peak)
        results.append({"group": group, "label": label, "wall": statistics.median(walls),
                        "anon": statistics.median(peaks), "walls": walls})
        print(f"{group:40s} {label:42s} {statistics.median(walls):7.2f} s {statistics.median(peaks) / MiB:8.0f} MiB",
              flush=True)
    return results


def _set_up(folder: str, setup: list) -> None:
    """Run a row's setup command (a fresh copy of what it changes in place), then sync."""
    if setup:
        time.sleep(2.5)  # a file the last run replaced is freed by another process within 2 s
        shutil.rmtree(os.path.join(folder, setup[0][-1]), ignore_errors=True)
        subprocess.run(setup[0], cwd=folder, check=True)
    subprocess.run(["sync"], check=False)


def _remove(folder: str, out: str) -> None:
    """Remove the output ``out`` of the last run, if it made one."""
    if out and os.path.isdir(os.path.join(folder, out)):
        shutil.rmtree(os.path.join(folder, out))
    elif out and os.path.exists(os.path.join(folder, out)):
        os.remove(os.path.join(folder, out))


def short(label: str) -> str:
    """What a ratio is to: 'cp+sync', 'cp -r', 'script', 'PEFT', 'inspect', 'safe_open().keys()', 'transfer'."""
    if label.startswith(("cp", "transfer")):
        return label.split(" (")[0].split(":")[0].replace(", then sync", "+sync")
    if "reference" in label:
        return label.split(",")[0]
    return label.split(":")[0].split(" (")[0].split()[-1]


def table(results: list[dict], runs: int) -> str:
    lines = [f"Medians of {runs} runs on a 2 GiB float32 checkpoint ({TENSORS} tensors of {SIDE}x{SIDE});"
             f" peak anonymous memory (RssAnon). Measured by `python bench/run.py`.", "",
             "| task | command | wall | ratio | peak anon memory | target | met |", "|---|---|---|---|---|---|---|"]
    by_label = {(r["group"], r["label"]): r for r in results}
    for r in results:
        target, ratio, met = "", "", ""
        if (r["group"], r["label"]) in BY_LABEL:
            base_label, limit, times = BY_LABEL[(r["group"], r["label"])]
            base = by_label[(r["group"], base_label)]
            ratio = f"{r['wall'] / base['wall']:.2f}x --workers 1"
            target = f"<= {limit}x" + (f", <= {times:g}x its memory" if times else "")
            met = "yes" if r["wall"] <= limit * base["wall"] and (not times or r["anon"] <= times * base["anon"]) \
                else "no"
        elif r["group"] in TARGETS and r["label"].startswith("paramsurgeon"):
            base_labels, limit, memory = TARGETS[r["group"]]
            base_labels = base_labels if isinstance(base_labels, tuple) else (base_labels,)  # a sum of references
            base = sum(by_label[(r["group"], label)]["wall"] for label in base_labels)
            ratio = f"{r['wall'] / base:.2f}x {'+'.join(short(label) for label in base_labels)}"
            target = (f"<= {limit}x, " if limit else "") + f"<= {memory // MiB} MiB"
            met = "yes" if (limit is None or r["wall"] <= limit * base) and r["anon"] <= memory else "no"
        elif r["group"].startswith("header only") and r["label"].startswith("paramsurgeon"):
            target, met = "<= 0.25 s", "yes" if r["wall"] <= 0.25 else "no"
        lines.append(f"| {r['group']} | {r['label']} | {r['wall']:.2f} s | {ratio} | {r['anon'] / MiB:.0f} MiB"
                     f" | {target} | {met} |")
    return "\n".join(lines) + "\n"


def headline(text: str) -> str:
    """The rows of the README's short table: those of HEADLINE's tasks (bench/README.md has them all)."""
    return "".join(line + "\n" for line in text.splitlines()
                   if not line.startswith("| ") or line.split(" | ")[0][2:] in HEADLINE + ("task",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to put the 12 GiB of test files (default: a temp dir)")
    parser.add_argument("--only", default="", help="run only the tasks whose name contains this text")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    folder = args.dir or tempfile.mkdtemp(prefix="paramsurgeon-bench-", dir=os.path.dirname(HERE))
    os.makedirs(folder, exist_ok=True)
    selected = [case for case in cases(folder) if args.only in case[0]]
    server = None
    try:
        for n in MANY:
            if not os.path.exists(os.path.join(folder, f"dcp-{n}")):
                subprocess.run(python(MAKE_MANY_DCP, os.path.join(folder, f"dcp-{n}"), str(n)), check=True)
        for n in MANY_ST:
            path = os.path.join(folder, f"many-{n}.safetensors")
            if not os.path.exists(path) and any(f"many-{n}.safetensors" in command for _, _, command, *_ in selected):
                subprocess.run(python(MAKE_MANY_ST, path, str(n)), check=True)
        if any(any(a.startswith(("model", "sharded")) for a in command) for _, _, command, *_ in selected):
            prepare(folder)
        if any(group in (TIES_GROUP, DIFF_GROUP) for group, *_ in selected) and not os.path.exists(
                os.path.join(folder, "ties-base.safetensors")):
            subprocess.run(python(MAKE_TIES, folder), check=True)
        if any(group in (LAYERS_GROUP, STACK_GROUP) for group, *_ in selected) and not os.path.exists(
                os.path.join(folder, "layers-cut.bin")):
            subprocess.run(python(MAKE_LAYERS, folder, str(LAYERS), str(LAYER_SIDE)), check=True)
        if any(group in (FP8_GROUP, FP8_INSPECT, FP8_QUANTIZE) for group, *_ in selected):
            prepare_fp8(folder)
        if any(group in (GGUF_HEADER, GGUF_CONVERT, GGUF_ZERO) for group, *_ in selected) and not os.path.exists(
                os.path.join(folder, "q8.gguf")):
            subprocess.run(python(MAKE_GGUF, os.path.join(folder, "q8.gguf"), str(GGUF_LAYERS), str(GGUF_SIDE)),
                           check=True)
        if any(group == LORA_GROUP for group, *_ in selected) and not os.path.exists(os.path.join(folder, "lora")):
            subprocess.run(python(MAKE_LORA, os.path.join(folder, "lora")), check=True)
        if any(group in (W_STATS, W_CAST, W_DEQUANTIZE) for group, *_ in selected):
            prepare_workers(folder)
        if any(group in (REMOTE_HEADERS, REMOTE_STATS) for group, *_ in selected):
            server = serve(folder)
        subprocess.run(tool("--help"), check=True, env=ENV, capture_output=True)  # writes bytecode if missing
        with cluster(any(label == CLUSTER for _, label, *_ in selected)):
            results = run(folder, args.runs, selected)
    finally:
        if server is not None:
            server.stdin.close()
            server.wait()
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    text = table(results, args.runs)
    print(text)
    if args.update_readme:
        for path, shown in ((BENCH_README, text), (README, headline(text))):
            with open(path) as f:
                readme = f.read()
            with open(path, "w") as f:
                f.write(TABLE.sub(lambda m: m.group(1) + shown + m.group(2), readme))


def prepare(folder: str) -> None:
    """The 2 GiB checkpoint in each format, made once."""
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        subprocess.run(python(MAKE, folder), check=True)
    if not os.path.exists(os.path.join(folder, "model-c.safetensors")):  # a third input for merge
        os.link(os.path.join(folder, "model.safetensors"), os.path.join(folder, "model-c.safetensors"))
    if not os.path.exists(os.path.join(folder, "sharded")):  # 4 shards of 560 MiB at most
        subprocess.run(tool("convert", "model.safetensors", "-o", "sharded", "--max-shard-size", "600MB"), cwd=folder,
                       check=True, env=ENV, capture_output=True)
    if not os.path.exists(os.path.join(folder, "model-dcp")):
        subprocess.run(tool("convert", "model.safetensors", "-o", "model-dcp", "--format", "dcp"), cwd=folder,
                       check=True, env=ENV, capture_output=True)


def serve(folder: str) -> subprocess.Popen:
    """The tests' hub endpoint (tests/remote_server.py) on 127.0.0.1, its weights redirected to a second
    server as the hub's go to its CDN, serving the 2 GiB file under /files/ and an 8-shard copy of it
    as the hub repository org/model8; the commands reach it through HF_ENDPOINT and BENCH_FILES."""
    prepare(folder)
    root = os.path.join(folder, "remote")
    repo = os.path.join(root, "hub", "org", "model8", "main")
    if not os.path.exists(repo):  # 8 shards of 256 MiB, with a config.json as a hub repository has
        os.makedirs(os.path.dirname(repo), exist_ok=True)
        subprocess.run(tool("convert", "model.safetensors", "-o", repo, "--max-shard-size", "280MB"), cwd=folder,
                       check=True, env=ENV, capture_output=True)
        with open(os.path.join(repo, "config.json"), "w") as f:
            f.write('{"model_type": "llama"}\n')
    os.makedirs(os.path.join(root, "files"), exist_ok=True)
    if not os.path.exists(os.path.join(root, "files", "model.safetensors")):
        os.link(os.path.join(folder, "model.safetensors"), os.path.join(root, "files", "model.safetensors"))
    tests = os.path.join(os.path.dirname(HERE), "tests")
    server = subprocess.Popen(python(SERVE, root, tests), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().strip()
    ENV.update({"HF_ENDPOINT": url, "BENCH_FILES": f"{url}/files", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1"})
    return server


def prepare_fp8(folder: str) -> None:
    """The fp8-block directory (4 shards) and its bf16 dequantization, made once."""
    if not os.path.exists(os.path.join(folder, "fp8")):
        subprocess.run(python(MAKE_FP8, os.path.join(folder, "fp8"), str(FP8_TENSORS), str(FP8_SIDE)), check=True)
    if not os.path.exists(os.path.join(folder, "fp8-bf16")):
        subprocess.run(tool("dequantize", "fp8", "-o", "fp8-bf16/"), cwd=folder, check=True, env=ENV,
                       capture_output=True)


def prepare_workers(folder: str) -> None:
    """The 2 GiB checkpoint in 8 shards, and an fp8-block one of 8 shards, made once."""
    prepare(folder)
    if not os.path.exists(os.path.join(folder, "sharded8")):
        subprocess.run(tool("convert", "model.safetensors", "-o", "sharded8", "--max-shard-size", "270MB"),
                       cwd=folder, check=True, env=ENV, capture_output=True)
    if not os.path.exists(os.path.join(folder, "fp8-8")):
        subprocess.run(python(MAKE_FP8, os.path.join(folder, "fp8-8"), str(FP8_TENSORS), str(FP8_SIDE),
                              str(WORKERS_SHARDS)), check=True)


@contextlib.contextmanager
def cluster(wanted: bool):
    """A Dask scheduler and two workers of one thread on this machine (a LocalCluster's processes) for
    the --scheduler rows; a worker imports torch in its first task (the median leaves that run out)."""
    if not wanted:
        yield
        return
    dask = os.path.join(BIN, "dask")
    port = SCHEDULER.rsplit(":", 1)[1]
    processes = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(3)
    processes += [subprocess.Popen([dask, "worker", SCHEDULER, "--nthreads", "1", "--no-dashboard"], env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        time.sleep(8)
        yield
    finally:
        for process in processes[::-1]:
            process.terminate()
            process.wait()


if __name__ == "__main__":
    main()
