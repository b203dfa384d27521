"""inspect reports what torch computes directly: names, shapes, dtypes, numel and statistics,
in the table and in --json."""

import hashlib
import json
import math
import os

import pytest
import torch
from helpers import SAMPLES, json_of, run
from safetensors.torch import save_file

import paramsurgeon
from paramsurgeon.checkpoint.values import to_torch

SAMPLE_FILES = ["resnet.pt", "resnet.safetensors", "resnet-legacy.pt", "resnet-sharded", "training.pt", "gpt.pt",
                "gpt-bf16.pt", "gpt.safetensors"]


def truth(tensor: torch.Tensor) -> dict:
    """Statistics as torch computes them, in float64."""
    values = tensor.double()
    numel = values.numel()
    return {
        "mean": values.mean().item() if numel else None,
        "std": values.std().item() if numel > 1 else None,
        "min": values.min().item() if numel else None,
        "max": values.max().item() if numel else None,
        "abs_max": values.abs().max().item() if numel else None,
        "zeros": int((tensor == 0).sum()),
        "nan": int(torch.isnan(values).sum()),
        "inf": int(torch.isinf(values).sum()),
    }


def close(got, expected) -> bool:
    if expected is None:
        return got is None
    if isinstance(got, str):  # non-finite values are written as strings
        return got == ("nan" if math.isnan(expected) else ("inf" if expected > 0 else "-inf"))
    return math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-6)


def tensors_by_torch(path: str) -> dict[str, torch.Tensor]:
    """The state dict as torch itself (or safetensors) loads it."""
    if os.path.isdir(path) or path.endswith(".safetensors"):
        from safetensors.torch import load_file

        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")] \
            if os.path.isdir(path) else [path]
        merged = {}
        for f in files:
            merged.update(load_file(f))
        return merged
    loaded = torch.load(path, weights_only=True)
    return loaded.get("state_dict", loaded)


@pytest.mark.parametrize("sample", SAMPLE_FILES)
def test_json_matches_torch_on_every_sample(sample):
    path = os.path.join(SAMPLES, sample)
    result = run("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    expected = tensors_by_torch(path)
    got = {t["name"]: t for t in document["tensors"]}
    if sample == "gpt.safetensors":  # save_model stored the tied pair once; we restore the alias
        expected["wte.weight"] = expected["lm_head.weight"]
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        entry = got[name]
        assert entry["shape"] == list(tensor.shape) and entry["dtype"] == str(tensor.dtype).removeprefix("torch.")
        assert entry["numel"] == tensor.numel() and entry["nbytes"] == tensor.numel() * tensor.element_size()
        for stat, value in truth(tensor).items():
            assert close(entry["stats"][stat], value), (name, stat, entry["stats"][stat], value)


def test_table_shows_every_tensor_with_its_numbers(resnet_pt, resnet):
    result = run("inspect", resnet_pt)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    header = lines[1].split()
    assert header == ["name", "kind", "shape", "dtype", "mean", "std", "min", "max", "zeros", "|max|", "numel"]
    rows = {line.split()[0]: line.split() for line in lines[3:] if line and line.split()[0] in resnet.state_dict()}
    assert list(rows) == list(resnet.state_dict())
    for name, tensor in resnet.state_dict().items():
        cells = dict(zip(header, rows[name]))
        assert cells["shape"] == ("x".join(map(str, tensor.shape)) or "scalar")
        assert cells["numel"] == f"{tensor.numel():,}"
        expected = truth(tensor)
        for stat in ("mean", "min", "max"):
            assert math.isclose(float(cells[stat]), expected[stat], rel_tol=5e-3, abs_tol=1e-6), (name, stat)
    assert lines[0].startswith(f"{resnet_pt}: torch zip, 122 tensors, "
                               f"{sum(p.numel() for p in resnet.parameters()):,} parameters")


def test_totals_count_tied_weights_once(gpt_pt, gpt):
    document = json.loads(run("inspect", gpt_pt, "--json", "--no-stats").stdout)
    assert document["ties"] == [["wte.weight", "lm_head.weight"]]
    assert document["totals"]["parameters"] == sum(p.numel() for p in gpt.parameters())
    assert document["totals"]["tensors"] == len(gpt.state_dict())
    tensors = {t["name"]: t for t in document["tensors"]}
    assert tensors["lm_head.weight"]["tied_to"] == ["wte.weight"]


def test_views_into_one_storage_count_as_the_tensor_they_view(tmp_path):
    """A state dict holding a tensor and views into it (a strided slice saved before the whole,
    a row after it) stores one storage: totals and the tree count its elements once, whichever
    name comes first."""
    torch.manual_seed(0)
    fused = torch.randn(6, 8)
    state = {"head.q": fused[:, ::2], "head.fused": fused, "head.row": fused[1], "other.w": torch.randn(5)}
    path = tmp_path / "views.pt"
    torch.save(state, path)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in torch.load(path).values()}
    document = json.loads(run("inspect", path, "--json", "--no-stats", "--tree").stdout)
    assert document["ties"] == [["head.q", "head.fused", "head.row"]]
    assert document["totals"]["numel"] == fused.numel() + 5
    assert document["totals"]["bytes"] == sum(storages.values())
    tree = document["tree"]
    head = next(c for c in tree["children"] if c["name"] == "head")
    assert (tree["parameters"], head["parameters"], head["bytes"]) == (fused.numel() + 5, fused.numel(), fused.nbytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_of_huge_finite_values_do_not_overflow(tmp_path, dtype):
    """Weights of a diverged run (|x| ~ 1e30, finite in float32 and bfloat16): their squares
    overflow float32, yet the std is torch's float64 answer, not inf, and nothing counts as Inf."""
    torch.manual_seed(0)
    huge = (torch.randn(1000) * 1e30).to(dtype)
    with_inf = huge.clone()
    with_inf[7] = math.inf
    torch.save({"huge": huge, "with_inf": with_inf}, tmp_path / "diverged.pt")
    rows = {t["name"]: t["stats"] for t in json.loads(run("inspect", tmp_path / "diverged.pt", "--json").stdout)["tensors"]}
    for name, values in [("huge", huge.double()), ("with_inf", with_inf.double()[torch.isfinite(with_inf.double())])]:
        assert rows[name]["std"] == pytest.approx(values.std().item(), rel=1e-6), name
        assert rows[name]["mean"] == pytest.approx(values.mean().item(), rel=1e-6, abs=1e22), name
    assert (rows["huge"]["inf"], rows["with_inf"]["inf"]) == (0, 1)


def test_nan_and_inf_are_counted_and_reported(tmp_path):
    values = torch.tensor([1.0, float("nan"), float("inf"), -2.0, 0.0, float("nan")])
    path = tmp_path / "bad.pt"
    torch.save({"w": values, "ok": torch.ones(3)}, path)
    document = json.loads(run("inspect", path, "--json").stdout)
    stats = document["tensors"][0]["stats"]
    assert (stats["nan"], stats["inf"], stats["zeros"]) == (2, 1, 1)
    finite = values[torch.isfinite(values)]  # the statistics are the finite values', counts beside them
    assert (stats["mean"], stats["max"], stats["min"]) == (pytest.approx(float(finite.mean())), 1.0, -2.0)
    table = run("inspect", path).stdout
    assert "nan" in table.splitlines()[1] and "inf" in table.splitlines()[1]


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_statistics_of_a_tensor_with_nan_or_inf_are_over_its_finite_values(tmp_path, monkeypatch, chunk):
    from paramsurgeon.checkpoint import values as tensors

    monkeypatch.setattr(tensors, "CHUNK", chunk)  # streaming: NaN and Inf in some chunks, none in others
    torch.manual_seed(0)
    state = {"one_bad": torch.randn(100), "holes": torch.randn(40, 25).half(), "all_nan": torch.full((5,), math.nan),
             "inf_only": torch.tensor([float("inf"), 3.0, -1.0, float("-inf")] * 5)}
    state["one_bad"][37] = math.nan
    state["holes"][::3, 2] = math.nan
    state["holes"][5, ::4] = math.inf
    path = tmp_path / "holes.safetensors"
    save_file(state, path)
    document = json_of("inspect", path, "--hist", schema="inspect")
    for entry in document["tensors"]:
        t = state[entry["name"]].float().flatten()
        finite, stats = t[torch.isfinite(t)], entry["stats"]
        assert (stats["nan"], stats["inf"]) == (int(t.isnan().sum()), int(t.isinf().sum())), entry["name"]
        assert sum(entry["histogram"]["counts"]) == t.numel() - stats["nan"]
        if not finite.numel():
            assert [stats[k] for k in ("mean", "std", "min", "max", "abs_max")] == [None] * 5
            continue
        assert stats["mean"] == pytest.approx(float(finite.double().mean()), rel=1e-6), entry["name"]
        assert stats["std"] == pytest.approx(float(finite.double().std()), rel=1e-6), entry["name"]
        assert (stats["min"], stats["max"]) == (float(finite.min()), float(finite.max()))
        assert stats["abs_max"] == float(finite.abs().max())
        edges = entry["histogram"]["edges"]
        assert (edges[0], edges[-1]) == (float(finite.min()), float(finite.max()))  # --hist agrees
    assert "nan" not in run("inspect", path, "-p", "one_bad").stdout.splitlines()[2]  # the table: numbers, a count
    bound = json_of("check", path, "--max-abs", "100", schema="check", code=1)["rules"][0]["violations"]
    assert sorted(v["name"] for v in bound) == ["all_nan", "holes", "inf_only", "one_bad"]  # NaN and Inf break any bound


def test_large_tensor_stats_are_exact_across_chunks(tmp_path, monkeypatch):
    from paramsurgeon.checkpoint import values as tensors

    monkeypatch.setattr(tensors, "CHUNK", 1000)
    torch.manual_seed(3)
    state = {"big": torch.randn(37, 101) * 3 + 5, "ints": torch.randint(-5, 5, (4099,)),
             "strided": torch.randn(50, 40).t(), "half": torch.randn(2001).half(), "one": torch.tensor([2.5])}
    path = tmp_path / "chunks.pt"
    torch.save(state, path)
    document = json.loads(run("inspect", path, "--json").stdout)
    for entry in document["tensors"]:
        for stat, value in truth(state[entry["name"]]).items():
            assert close(entry["stats"][stat], value), (entry["name"], stat)
    assert document["tensors"][-1]["stats"]["std"] is None


def test_selection_filters_and_kinds_are_shown(resnet_pt):
    document = json.loads(run("inspect", resnet_pt, "--json", "-p", "layer1.*.bn*", "-x", "*.num_batches_tracked").stdout)
    names = [t["name"] for t in document["tensors"]]
    assert names[:4] == ["layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn1.running_mean",
                         "layer1.0.bn1.running_var"]
    assert all(t["kind"] == "batchnorm" for t in document["tensors"])
    assert {t["role"] for t in document["tensors"]} == {"weight", "bias", "buffer"}


def test_extras_are_summarised(training_pt):
    document = json.loads(run("inspect", training_pt, "--json", "--no-stats").stdout)
    extras = {e["path"]: e for e in document["extras"]}
    assert document["key"] == "state_dict"
    assert extras["epoch"]["value"] == 7
    assert extras["optimizer"]["summary"].startswith("Adam state for 62 params")
    text = run("inspect", training_pt, "--no-stats").stdout
    assert "  epoch: 7" in text and "optimizer: Adam state for 62 params" in text


def test_tree_sums_parameters_per_module(resnet_pt, resnet):
    document = json.loads(run("inspect", resnet_pt, "--json", "--tree").stdout)
    tree = document["tree"]
    assert tree["parameters"] == sum(p.numel() for p in resnet.parameters())
    layer1 = next(c for c in tree["children"] if c["name"] == "layer1")
    assert layer1["parameters"] == sum(p.numel() for p in resnet.layer1.parameters())
    assert layer1["buffers"] == sum(b.numel() for b in resnet.layer1.buffers())
    text = run("inspect", resnet_pt, "--tree", "--depth", "1").stdout
    assert f"{sum(p.numel() for p in resnet.layer1.parameters()):,}" in text and "conv1" not in text.split("layer1")[1]


def test_hash_is_the_sha256_of_the_values(tmp_path, resnet_pt, resnet):
    document = json.loads(run("inspect", resnet_pt, "--json", "--hash", "--no-stats").stdout)
    for entry in document["tensors"]:
        tensor = resnet.state_dict()[entry["name"]].contiguous()
        assert entry["sha256"] == hashlib.sha256(tensor.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        assert entry["stats"] is None
    st = tmp_path / "m.safetensors"
    run("convert", resnet_pt, "-o", st)
    again = json.loads(run("inspect", st, "--json", "--hash", "--no-stats").stdout)
    assert [t["sha256"] for t in again["tensors"]] == [t["sha256"] for t in document["tensors"]]


def test_inspect_reads_standard_input(resnet_pt):
    with open(resnet_pt, "rb") as f:
        result = run("inspect", "--json", "--no-stats", input=f.read())
    assert result.exit_code == 0 and json.loads(result.stdout)["source"] == "<stdin>"


def test_library_reads_the_values_torch_saved(resnet_pt, resnet):
    ckpt = paramsurgeon.load(str(resnet_pt))
    for name, value in resnet.state_dict().items():
        assert torch.equal(to_torch(ckpt[name]), value)


def test_key_picks_the_tensors_of_a_nested_checkpoint(tmp_path, resnet):
    state = resnet.state_dict()
    path = tmp_path / "ema.pt"
    torch.save({"model": state, "ema": {k: v * 2 for k, v in state.items()}, "step": 3}, path)
    preferred = run("inspect", path, "--json", "--no-stats")
    assert json.loads(preferred.stdout)["key"] == "model"  # a well-known name wins, and the user is told
    assert "note: using 'model'; the file also holds tensors in ema (pick with --key)" in preferred.stderr
    chosen = run("zero", path, "--key", "ema", "-p", "fc.bias", "-o", tmp_path / "out.pt")
    assert chosen.exit_code == 0, chosen.stderr
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(written["ema"]["fc.bias"], torch.zeros(10)) and written["step"] == 3
    assert torch.equal(written["model"]["fc.bias"], state["fc.bias"])
    ambiguous = tmp_path / "ambiguous.pt"
    torch.save({"student": state, "teacher": state}, ambiguous)
    result = run("inspect", ambiguous)
    assert result.exit_code == 2
    assert result.stderr == (f"paramsurgeon: error: {ambiguous}: several entries hold tensors (student, teacher);"
                             " pick one with --key, e.g. --key student\n")
    wrong = run("inspect", path, "--key", "emma")
    assert wrong.exit_code == 2 and "no entry 'emma' in the top level (it has: model, ema, step)" in wrong.stderr


def test_json_values_are_written_as_json_dumps_writes_them():
    """The --json writer's fast path for strings, ints and shapes gives json.dumps' own text."""
    import json

    from paramsurgeon.report.render import to_json

    values = ["a\"\\x\u00e9\n\u2028", 3, -5, 10**30, True, False, None, 1.5, -0.0, [1, 2], [], [True, 1], ["a"],
              [1.0, 2], "nan"]
    document = {"values": [{"v": v} for v in values]}
    assert [json.loads(line.split(": ", 1)[1]) for line in to_json(document).split("\n") if '"v"' in line] == values
    assert [line.split(": ", 1)[1] for line in to_json(document).split("\n") if '"v"' in line] == \
        [json.dumps(v, ensure_ascii=False) for v in values]
