"""merge: every method against a small torch implementation written straight from its formula
as the README's merge table and mergekit state it (not the tool's code), on hand-checked tensors
and on real modules; dtypes, DARE's seeds, ties, mixed formats, nested checkpoints, and every
error (exit 2, nothing written)."""

import json
import math
import os
import re

import pytest
import torch
from helpers import bits, file_bytes, load_torch, register_input, run, validate
from models import ResNet, TinyGPT
from safetensors.torch import load_file, save_file


import paramsurgeon as ps
from paramsurgeon.ops.merge.registry import NAMES

# ---- the formulas, independently -------------------------------------------------------------


def ref_linear(xs, ws, normalize=True):
    total = sum(w * x.float() for x, w in zip(xs, ws))
    return total / sum(ws) if normalize else total


def ref_slerp(t, a, b):
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = a64.norm(), b64.norm()
    dot = float((a64 / na) @ (b64 / nb))
    if abs(dot) > 0.9995:
        return ((1 - t) * a.double() + t * b.double()).float()
    theta = math.acos(dot)
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (s0 * a.double() + s1 * b.double()).float()


def ref_task(base, xs, ws, lam=1.0):
    return base.float() + lam * sum(w * (x.float() - base.float()) for x, w in zip(xs, ws))


def top_fraction(d, density):
    k = max(1, int(density * d.numel()))
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[d.abs().flatten().topk(k).indices] = True
    return d * keep.view(d.shape)


def ref_ties(base, xs, ws, lam=1.0, density=0.5, normalize=True):
    base = base.float()
    deltas = torch.stack([w * top_fraction(x.float() - base, density) for x, w in zip(xs, ws)])
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas) == elected
    w = torch.tensor(ws).view(-1, *([1] * base.dim()))
    merged = (deltas * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        merged = merged / torch.where(divisor == 0, torch.ones(()), divisor)
    return base + lam * merged


# ---- helpers -------------------------------------------------------------------------------------


def save(request, path, state):
    torch.save(state, path)
    return register_input(request, path)


def perturbed(state, seed, scale=0.1):
    """A 'fine-tune': every float tensor moved by seeded noise, integers untouched."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def merged(tmp_path, *args, name="out.pt"):
    out = tmp_path / name
    out.parent.mkdir(exist_ok=True)
    result = run("merge", *args, "-o", out)
    assert result.exit_code == 0, result.stderr
    return out, result


def refused(tmp_path, *args):
    out = tmp_path / "refused.pt"
    result = run("merge", *args, "-o", out)
    assert result.exit_code == 2, result.stderr
    assert not out.exists()
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.fixture
def three(request, tmp_path, resnet):
    """A base ResNet and two fine-tunes of it, as .pt files."""
    base = resnet.state_dict()
    paths = [save(request, tmp_path / f"{n}.pt", s) for n, s in
             (("base", base), ("ft1", perturbed(base, 1)), ("ft2", perturbed(base, 2)))]
    return paths, [base, perturbed(base, 1), perturbed(base, 2)]


# ---- hand-checked tensors --------------------------------------------------------------------------


def test_hand_checked_values(request, tmp_path):
    a = save(request, tmp_path / "a.pt", {"w": torch.tensor([1.0, 2.0, -4.0]), "n": torch.tensor(3)})
    b = save(request, tmp_path / "b.pt", {"w": torch.tensor([3.0, 6.0, 0.0]), "n": torch.tensor(9)})
    out, result = merged(tmp_path, a, b, "--weights", "1,3")
    assert load_torch(out)["w"].tolist() == [2.5, 5.0, -1.0]  # (1*x + 3*y) / 4
    assert load_torch(out)["n"].item() == 3  # integers come from the first input
    assert "took 1 integer tensor from" in result.stderr
    out, _ = merged(tmp_path, a, b, "--weights", "1,3", "--no-normalize", name="sum.pt")
    assert load_torch(out)["w"].tolist() == [10.0, 20.0, -4.0]
    out, _ = merged(tmp_path, a, b, "--method", "task-arithmetic", "--base", a, "--lambda", "0.5", name="ta.pt")
    assert load_torch(out)["w"].tolist() == [2.0, 4.0, -2.0]  # a + 0.5 (b - a)


def test_slerp_hand_checked(request, tmp_path):
    a = save(request, tmp_path / "a.pt", {"w": torch.tensor([1.0, 0.0]), "c": torch.tensor([1.0, 1.0])})
    b = save(request, tmp_path / "b.pt", {"w": torch.tensor([0.0, 2.0]), "c": torch.tensor([2.0, 2.0])})
    out, _ = merged(tmp_path, a, b, "--method", "slerp")
    after = load_torch(out)
    s = math.sin(math.pi / 4) / math.sin(math.pi / 2)  # a quarter of the way round, from each end
    torch.testing.assert_close(after["w"], torch.tensor([s, 2 * s]))
    torch.testing.assert_close(after["c"], torch.tensor([1.5, 1.5]))  # colinear: lerp
    out, _ = merged(tmp_path, a, b, "--method", "slerp", "--t", "0", name="t0.pt")
    torch.testing.assert_close(load_torch(out)["w"], torch.tensor([1.0, 0.0]))


def test_ties_hand_checked(request, tmp_path):
    base = save(request, tmp_path / "base.pt", {"w": torch.zeros(4)})
    x = save(request, tmp_path / "x.pt", {"w": torch.tensor([3.0, -1.0, 2.0, 0.5])})
    y = save(request, tmp_path / "y.pt", {"w": torch.tensor([-1.0, -2.0, 4.0, -0.25])})
    # density 0.5 keeps 2 of 4: x -> [3, 0, 2, 0], y -> [0, -2, 4, 0]; signs elected: +, -, +, + (0 counts as +)
    # agreeing entries averaged by weight: [3, -2, (2+4)/2, 0]
    out, _ = merged(tmp_path, x, y, "--base", base, "--method", "ties")
    assert load_torch(out)["w"].tolist() == [3.0, -2.0, 3.0, 0.0]
    out, _ = merged(tmp_path, x, y, "--base", base, "--method", "ties", "--weights", "1,3", "--density", "1",
                    name="full.pt")
    # weighted: x [3,-1,2,.5], y [-3,-6,12,-.75]; sums [0,-7,14,-.25] -> signs +,-,+,-
    assert load_torch(out)["w"].tolist() == [3.0, (-1 - 6) / 4, (2 + 12) / 4, -0.75 / 3]


# ---- every method on real modules ------------------------------------------------------------------

METHODS = [
    ("linear", [], lambda base, fts: ref_linear([base] + fts, [1, 1, 1])),
    ("linear", ["--weights", "0.2,0.3,0.5"], lambda base, fts: ref_linear([base] + fts, [0.2, 0.3, 0.5])),
    ("task-arithmetic", ["--lambda", "0.7", "--weights", "1,0.5"],
     lambda base, fts: ref_task(base, fts, [1, 0.5], 0.7)),
    ("ties", [], lambda base, fts: ref_ties(base, fts, [1, 1])),
    ("ties", ["--density", "0.3", "--weights", "0.6,1.2", "--lambda", "0.9"],
     lambda base, fts: ref_ties(base, fts, [0.6, 1.2], 0.9, 0.3)),
    ("ties", ["--no-normalize"], lambda base, fts: ref_ties(base, fts, [1, 1], normalize=False)),
    ("dare-linear", ["--density", "1"], lambda base, fts: ref_task(base, fts, [1, 1])),
    ("dare-ties", ["--density", "1"], lambda base, fts: ref_ties(base, fts, [1, 1], density=1.0)),
]


@pytest.mark.parametrize("method, options, reference", METHODS)
def test_methods_on_a_real_module(tmp_path, three, method, options, reference):
    (base_pt, ft1, ft2), (base, s1, s2) = three
    inputs = [base_pt, ft1, ft2] if method == "linear" else [ft1, ft2, "--base", base_pt]
    out, _ = merged(tmp_path, *inputs, "--method", method, *options)
    after = load_torch(out)
    for name, value in base.items():
        if value.is_floating_point():
            torch.testing.assert_close(after[name], reference(value, [s1[name], s2[name]]), msg=name)
        else:
            assert bits(after[name]) == bits(value)
    ResNet().load_state_dict(after, strict=True)


def test_slerp_on_a_real_module(tmp_path, three):
    (_, ft1, ft2), (_, s1, s2) = three
    out, _ = merged(tmp_path, ft1, ft2, "--method", "slerp", "--t", "0.3")
    after = load_torch(out)
    for name, value in s1.items():
        if value.is_floating_point():
            torch.testing.assert_close(after[name], ref_slerp(0.3, value, s2[name]), msg=name)


def test_half_precision_is_computed_in_float32_and_written_back(request, tmp_path, three):
    (_, _, _), (base, s1, s2) = three
    for dtype in (torch.float16, torch.bfloat16):
        states = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()} for s in (base, s1, s2)]
        paths = [save(request, tmp_path / f"{dtype}-{i}.pt", s) for i, s in enumerate(states)]
        out, _ = merged(tmp_path, paths[1], paths[2], "--base", paths[0], "--method", "task-arithmetic",
                        "--lambda", "0.5", name=f"{dtype}.safetensors")
        linear, _ = merged(tmp_path, *paths, name=f"{dtype}-linear.pt")
        after, averaged = load_file(out), load_torch(linear)
        for name, value in states[0].items():
            assert after[name].dtype == averaged[name].dtype == value.dtype
            if value.is_floating_point():
                ones = [states[1][name], states[2][name]]
                torch.testing.assert_close(after[name], ref_task(value, ones, [1, 1], 0.5).to(dtype), msg=name)
                torch.testing.assert_close(averaged[name], ref_linear([value] + ones, [1, 1, 1]).to(dtype))


# ---- DARE ------------------------------------------------------------------------------------------


def test_dare_is_seeded_per_tensor_and_drops_as_documented(tmp_path, three):
    (base_pt, ft1, ft2), (base, s1, _) = three
    first, _ = merged(tmp_path, ft1, "--base", base_pt, "--method", "dare-linear", "--density", "0.25", "--seed",
                      "7", name="a/out.pt")
    again, _ = merged(tmp_path, ft1, "--base", base_pt, "--method", "dare-linear", "--density", "0.25", "--seed",
                      "7", name="b/out.pt")
    other, _ = merged(tmp_path, ft1, "--base", base_pt, "--method", "dare-linear", "--density", "0.25", "--seed",
                      "8", name="c/out.pt")
    assert file_bytes(first) == file_bytes(again)
    assert file_bytes(first) != file_bytes(other)
    after = load_torch(first)
    kept = total = 0
    for name, value in base.items():
        if not value.is_floating_point():
            continue
        delta, got = s1[name] - value, after[name] - value
        dropped = got == 0
        torch.testing.assert_close(got[~dropped], delta[~dropped] / 0.25)  # kept entries are rescaled by 1/density
        kept, total = kept + int((~dropped).sum()), total + value.numel()
    assert abs(kept / total - 0.25) < 0.02  # ~47k entries: 0.25 +- 4 sigma
    # a tensor's drops depend on the seed and its name only, not on which tensors are merged
    one, _ = merged(tmp_path, ft1, "--base", base_pt, "--method", "dare-linear", "--density", "0.25", "--seed", "7",
                    "-p", "fc.weight", name="one.pt")
    assert bits(load_torch(one)["fc.weight"]) == bits(after["fc.weight"])
    # dare-ties with two fine-tunes: each draws its own drops, still reproducible
    twice = [merged(tmp_path, ft1, ft2, "--base", base_pt, "--method", "dare-ties", "--seed", "3",
                    name=f"t{i}/out.pt")[0] for i in range(2)]
    assert file_bytes(twice[0]) == file_bytes(twice[1])


def test_dare_without_seed_says_which_it_drew(tmp_path, three):
    (base_pt, ft1, _), _ = three
    _, result = merged(tmp_path, ft1, "--base", base_pt, "--method", "dare-linear")
    assert "merge: seed " in result.stderr and "to repeat this exactly" in result.stderr


# ---- inputs, outputs, the rest of the file ----------------------------------------------------------


def test_mixed_formats_stdin_and_any_output(request, tmp_path, three):
    (base_pt, ft1, ft2), (base, s1, s2) = three
    st = tmp_path / "ft1.safetensors"
    save_file({k: v.contiguous() for k, v in s1.items()}, st)
    register_input(request, st)
    sharded = tmp_path / "ft2-sharded"
    assert run("convert", ft2, "-o", sharded, "--max-shard-size", "100kB").exit_code == 0
    assert len([f for f in os.listdir(sharded) if f.endswith(".bin")]) > 1
    out = tmp_path / "out.safetensors"
    result = run("merge", base_pt, st, "-", "-o", out, input=file_bytes(ft2))
    assert result.exit_code == 0, result.stderr
    result2 = run("merge", base_pt, st, sharded, "-o", tmp_path / "out2.pt")
    assert result2.exit_code == 0, result2.stderr
    for after in (load_file(out), load_torch(tmp_path / "out2.pt")):
        for name, value in base.items():
            expected = ref_linear([value, s1[name], s2[name]], [1, 1, 1]) if value.is_floating_point() else value
            torch.testing.assert_close(after[name], expected, msg=name)
    assert refused(tmp_path, "-", "-", base_pt).count("only one checkpoint can come from standard input") == 1


def test_nested_training_checkpoint(request, tmp_path, training_pt):
    training = torch.load(training_pt, weights_only=True)
    other = dict(training, state_dict=perturbed(training["state_dict"], 5), epoch=9)
    other_pt = save(request, tmp_path / "other.pt", other)
    out, result = merged(tmp_path, training_pt, other_pt)
    after = load_torch(out)
    assert after["epoch"] == 7 and after["hyper_parameters"] == training["hyper_parameters"]
    assert bits(after["optimizer"]["state"][0]["exp_avg"]) == bits(training["optimizer"]["state"][0]["exp_avg"])
    for name, value in training["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(after["state_dict"][name], (value + other["state_dict"][name]) / 2)
    assert "also holds optimizer state at 'optimizer'" in result.stderr
    flat = tmp_path / "other.safetensors"  # --key applies to the torch inputs; safetensors is already flat
    save_file({k: v.contiguous() for k, v in other["state_dict"].items()}, flat)
    keyed, _ = merged(tmp_path, training_pt, register_input(request, flat), "--key", "state_dict", name="keyed.pt")
    for name, value in after["state_dict"].items():
        assert bits(load_torch(keyed)["state_dict"][name]) == bits(value), name


def test_notes_of_every_input_are_shown_named(request, tmp_path):
    """What was decided about an input other than the first (the --key chosen in a nested training
    checkpoint) is said once, after its path, for merge's second input and for copy --source."""
    flat = {"w": torch.ones(3, 3), "b": torch.zeros(3)}
    trained = {k: v + 1 for k, v in flat.items()}
    first = save(request, tmp_path / "flat.pt", flat)
    nested = save(request, tmp_path / "nested.pt", {"state_dict": trained, "ema": {k: v + 2 for k, v in flat.items()},
                                                    "epoch": 3})
    out, result = merged(tmp_path, first, nested)
    for name, value in load_torch(out).items():
        torch.testing.assert_close(value, (flat[name] + trained[name]) / 2, msg=name)
    chosen = f"note: {nested}: using 'state_dict'; the file also holds tensors in ema (pick with --key)"
    assert result.stderr.splitlines().count(chosen) == 1, result.stderr
    assert result.stderr.count("using 'state_dict'") == 1
    copied = tmp_path / "copied.pt"
    result = run("copy", first, "--source", nested, "-o", copied)
    assert result.exit_code == 0, result.stderr
    assert all(torch.equal(value, trained[name]) for name, value in load_torch(copied).items())
    assert result.stderr.splitlines().count(chosen) == 1, result.stderr
    assert result.stderr.count("using 'state_dict'") == 1


def test_ties_are_merged_once_and_stay_tied(request, tmp_path, gpt):
    paths = []
    for seed in (1, 2):
        model = TinyGPT()
        model.load_state_dict(gpt.state_dict())
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for p in model.parameters():  # the tied weight is one parameter
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        paths.append(save(request, tmp_path / f"gpt{seed}.pt", model.state_dict()))
    out, _ = merged(tmp_path, *paths)
    after = load_torch(out)
    assert after["lm_head.weight"].data_ptr() == after["wte.weight"].data_ptr()
    ones = [torch.load(p, weights_only=True) for p in paths]
    torch.testing.assert_close(after["wte.weight"], (ones[0]["wte.weight"] + ones[1]["wte.weight"]) / 2)
    untied = dict(ones[1], **{"lm_head.weight": ones[1]["lm_head.weight"].clone()})
    untied_pt = save(request, tmp_path / "untied.pt", untied)
    message = refused(tmp_path, paths[0], untied_pt)
    assert "'wte.weight' is tied (lm_head.weight, wte.weight) in" in message and "but not in" in message
    out, result = merged(tmp_path, paths[0], untied_pt, "--skip-mismatched", name="skipped.pt")
    assert bits(load_torch(out)["wte.weight"]) == bits(ones[0]["wte.weight"])
    assert "because the inputs differ (--skip-mismatched)" in result.stderr


def test_selection_limits_what_is_merged(tmp_path, three):
    (base_pt, ft1, _), (base, s1, _) = three
    out, result = merged(tmp_path, base_pt, ft1, "-p", "fc.*")
    after = load_torch(out)
    for name, value in base.items():
        expected = (value + s1[name]) / 2 if name.startswith("fc.") else value
        torch.testing.assert_close(after[name], expected, rtol=0, atol=0)
    assert "unselected tensors from" in result.stderr


def test_dry_run_and_json(tmp_path, three):
    (base_pt, ft1, ft2), _ = three
    result = run("merge", ft1, ft2, "--base", base_pt, "--method", "ties", "--dry-run")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f"merge ties of {ft1}, {ft2} over {base_pt} (weights 1, 1; density 0.5; lambda 1)")
    assert "merge: 102 tensors would change (dry run: nothing written)" in result.stdout
    assert "left as they are: 20 tensors" in result.stdout
    assert "int64 (not combined)" in result.stdout
    document = validate(json.loads(run("merge", ft1, ft2, "--base", base_pt, "--method", "ties", "--dry-run",
                                       "--json").stdout), "plan")
    assert document["method"] == "ties" and document["base"] == str(base_pt)
    assert document["inputs"] == [str(ft1), str(ft2)] and document["weights"] == [1.0, 1.0]
    assert len(document["changes"]) == 102 and document["changes"][0]["action"] == "ties"
    assert {k["reason"] for k in document["kept"]} == {"int64 (not combined)"}


def test_library_call(tmp_path, three):
    (base_pt, ft1, ft2), (base, s1, s2) = three
    ckpt = ps.merge([str(ft1), str(ft2)], base=str(base_pt), method="task-arithmetic", weights=[0.5, 0.5])
    ps.save(ckpt, str(tmp_path / "lib.pt"))
    after = load_torch(tmp_path / "lib.pt")
    torch.testing.assert_close(after["fc.weight"], ref_task(base["fc.weight"], [s1["fc.weight"], s2["fc.weight"]],
                                                            [0.5, 0.5]))


# ---- errors: exit 2, nothing written ----------------------------------------------------------------


def test_usage_errors(tmp_path, three):
    (base_pt, ft1, ft2), _ = three
    assert "needs at least two checkpoints (1 given)" in refused(tmp_path, ft1)
    assert "slerp interpolates between exactly two checkpoints (3 given)" in \
        refused(tmp_path, base_pt, ft1, ft2, "--method", "slerp")
    assert "ties adds task vectors to a base model: pass --base BASE" in refused(tmp_path, ft1, ft2, "--method", "ties")
    assert "--weights has 2 values for 3 checkpoints" in refused(tmp_path, base_pt, ft1, ft2, "--weights", "1,2")
    assert "--weights has 1 value for 2 checkpoints; pass one per fine-tuned checkpoint" in \
        refused(tmp_path, ft1, ft2, "--base", base_pt, "--method", "task-arithmetic", "--weights", "1")
    for density in ("0", "1.5", "-0.1"):
        assert "--density must be in (0, 1]" in refused(tmp_path, ft1, ft2, "--base", base_pt, "--method", "ties",
                                                        "--density", density)
    assert "--t applies to slerp, not linear" in refused(tmp_path, ft1, ft2, "--t", "0.3")
    assert "--base applies to task-arithmetic" in refused(tmp_path, ft1, ft2, "--base", base_pt)
    assert f"--method mean: choose from {', '.join(NAMES)}" in refused(tmp_path, ft1, ft2, "--method", "mean")
    assert "--weights sum to 0" in refused(tmp_path, ft1, ft2, "--weights", "1,-1")
    assert "'x' is not a number" in refused(tmp_path, ft1, ft2, "--weights", "1,x")
    # task-arithmetic with one fine-tune and a base is two checkpoints: valid
    assert run("merge", ft1, "--base", base_pt, "--method", "task-arithmetic", "--dry-run").exit_code == 0


def test_names_shapes_and_dtypes_that_differ(request, tmp_path, resnet):
    state = resnet.state_dict()
    a = save(request, tmp_path / "a.pt", state)
    other = dict(state)
    other["fc.weight"], other["fc.bias"] = torch.zeros(5, 32), torch.zeros(5)
    del other["conv1.weight"]
    other["extra.weight"] = torch.zeros(2)
    other["bn1.running_mean"] = torch.zeros(state["bn1.running_mean"].shape, dtype=torch.int64)
    b = save(request, tmp_path / "b.pt", other)
    message = refused(tmp_path, a, b)
    assert f"'fc.weight' is [10, 32] in {a} but [5, 32] in {b}" in message
    assert f"'fc.bias' is [10] in {a} but [5] in {b}" in message
    assert f"1 tensor of {a} is missing from {b}: conv1.weight" in message
    assert f"{b} has 1 tensor that {a} lacks: extra.weight" in message
    assert f"'bn1.running_mean' is float32 in {a} but int64 in {b}" in message
    assert "pass --skip-mismatched" in message
    del other["bn1.running_mean"]
    c = save(request, tmp_path / "c.pt", other)
    out, result = merged(tmp_path, a, c, "--skip-mismatched")
    after = load_torch(out)
    for name in ("fc.weight", "fc.bias", "conv1.weight", "bn1.running_mean"):
        assert bits(after[name]) == bits(state[name])
    torch.testing.assert_close(after["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"] / 2 + 
                               other["layer1.0.conv1.weight"] / 2)
    assert "extra.weight" not in after
    assert "because the inputs differ (--skip-mismatched)" in result.stderr


def test_what_names_the_methods_names_those_registered(tmp_path):
    """--help, the refusal of an unknown --method and the plan schema's enum all list exactly the
    methods of the registry (ops/merge/registry), in its order: a new method is one module and one
    entry, and nothing that names the methods drifts from it."""
    from importlib import resources

    from paramsurgeon.declare import declared
    from paramsurgeon.ops.merge import Merge
    from paramsurgeon.ops.merge.registry import METHODS

    names = [m.name for m in METHODS]
    shown = " ".join(re.sub(r"-\n\s*", "-", run("merge", "--help").stdout).split())  # a name wrapped at its hyphen
    assert f"Methods: {', '.join(names)}; streaming" in shown
    assert f"--method M {names[0]} (default), {', '.join(names[1:-1])} or {names[-1]}." in shown
    assert refused(tmp_path, tmp_path / "a.pt", tmp_path / "b.pt", "--method", "nonesuch") == \
        f"paramsurgeon: error: merge: --method nonesuch: choose from {', '.join(names)}\n"
    with resources.files("paramsurgeon").joinpath("schemas/plan.json").open() as f:
        assert json.load(f)["properties"]["method"]["enum"] == names
    options = {d.key for d in declared(Merge)}
    for method in METHODS:  # each declares only options Merge has
        assert method.takes <= options, method.name


def test_a_method_without_parameters_shows_none_in_its_description(tmp_path, three, monkeypatch):
    """A method that takes no option (a new registry entry) is described without an empty '()'."""
    from paramsurgeon.ops.merge import registry

    class First(registry.MergeMethod):
        name = "first"
        takes = frozenset()

        def compute(self, views, params, work, dtype, generator):
            return views[0].to(dtype, copy=True)

    monkeypatch.setattr(registry, "METHODS", registry.METHODS + (First(),))
    (base_pt, ft1, _), (base, _, _) = three
    ckpt = ps.merge([str(base_pt), str(ft1)], method="first")
    out = tmp_path / "first.pt"
    ps.save(ckpt, str(out))
    assert json.loads(ckpt.metadata["paramsurgeon.operations"])[-1] == f"merge first of {base_pt}, {ft1}"
    assert all(bits(value) == bits(base[name]) for name, value in load_torch(out).items())


def test_values_are_computed_when_written_one_tensor_at_a_time(tmp_path, three, monkeypatch):
    """Streaming: merging computes nothing; the writer computes each merged tensor once, in turn."""
    from paramsurgeon.ops.merge import methods

    calls = []
    real = methods.linear
    monkeypatch.setattr(methods, "linear", lambda *a, **k: calls.append(a[0][0].shape) or real(*a, **k))
    (base_pt, ft1, _), (base, _, _) = three
    ckpt = ps.merge([str(base_pt), str(ft1)])
    assert calls == []
    ps.save(ckpt, str(tmp_path / "streamed.safetensors"))
    assert len(calls) == sum(v.is_floating_point() for v in base.values())


def test_values_that_overflow_their_dtype_are_refused_unless_allowed(tmp_path):
    """Task arithmetic scaled far past float16's range: an error naming the tensor and the count,
    in the dry run too, no output file; --allow-overflow writes the Inf values."""
    base = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), "b": torch.tensor([0.5], dtype=torch.float16)}
    tuned = {"w": torch.tensor([1.0, 2.5, 3.0], dtype=torch.float16), "b": torch.tensor([0.5], dtype=torch.float16)}
    torch.save(base, tmp_path / "base.pt")
    torch.save(tuned, tmp_path / "tuned.pt")
    args = ("merge", tmp_path / "tuned.pt", "--base", tmp_path / "base.pt", "--method", "task-arithmetic",
            "--lambda", "1e6", "-o", tmp_path / "out.pt")
    refused, dry = run(*args), run(*args, "--dry-run")
    for result in (refused, dry):  # the dry run refuses what the run refuses
        assert result.exit_code == 2, result.stderr
        assert "1 of 3 values of 'w' would become Inf or NaN" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["base.pt", "tuned.pt"]
    assert run(*args, "--allow-overflow").exit_code == 0
    written = load_torch(tmp_path / "out.pt")
    expected = (base["w"].float() + 1e6 * (tuned["w"].float() - base["w"].float())).half()
    assert torch.equal(written["w"], expected) and torch.isinf(written["w"]).sum() == 1


# ---- one piece at a time: the same values as whole tensors ----------------------------------------


def top_fraction_first(d, density):
    """TIES' trim: the top max(1, int(density*numel)) magnitudes, and among
    equal magnitudes the first in row-major order (a stable sort keeps that order)."""
    k = max(1, int(density * d.numel()))
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[torch.sort(d.abs().flatten(), descending=True, stable=True).indices[:k]] = True
    return d * keep.view(d.shape)


@pytest.fixture
def small_pieces(monkeypatch):
    """Chunks of 1,000 values (merge's pieces: 250): a tensor of a few thousand spans many, as a
    large one spans 4 Mi."""
    monkeypatch.setattr("paramsurgeon.checkpoint.values.CHUNK", 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_ties_trims_across_pieces_with_ties_at_the_threshold(request, tmp_path, small_pieces, dtype):
    """Task vectors of small integers (most magnitudes tie), 4,999 values in many pieces, also as a
    strided view: the kept entries at the threshold are the first in row-major order, over the
    pieces, exactly as the whole-tensor rule keeps them."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (4999,), generator=g).to(dtype)
    fts = [base + torch.randint(-2, 3, (4999,), generator=g).to(dtype) for _ in range(2)]
    state = lambda t: {"w": t, "t": t.reshape(4999, 1).t()}  # noqa: E731  ('t': a transposed, strided view)
    paths = [save(request, tmp_path / f"{n}.pt", state(t)) for n, t in (("base", base), ("a", fts[0]), ("b", fts[1]))]
    for density in (0.3, 0.5, 0.77):
        out, _ = merged(tmp_path, paths[1], paths[2], "--base", paths[0], "--method", "ties", "--density",
                        str(density), "--weights", "1,0.5", name=f"{density}.pt")
        expected = ref_ties_first(base, fts, [1, 0.5], density)
        after = load_torch(out)
        assert bits(after["w"]) == bits(expected.to(dtype)), density
        assert bits(after["t"].contiguous()) == bits(expected.to(dtype).reshape(4999, 1).t().contiguous())


def ref_ties_first(base, xs, ws, density):
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    base = base.to(work)
    deltas = torch.stack([w * top_fraction_first(x.to(work) - base, density) for x, w in zip(xs, ws)])
    elected = deltas.sum(0) >= 0
    agree = torch.where(elected, deltas > 0, deltas < 0)
    divisor = (torch.tensor(ws, dtype=work).view(-1, 1) * agree).sum(0)
    return base + (deltas * agree).sum(0) / torch.where(divisor == 0, torch.ones((), dtype=work), divisor)


@pytest.mark.parametrize("special", [float("inf"), float("nan")])
def test_ties_ranks_infinite_and_nan_task_vector_entries_first(request, tmp_path, small_pieces, special):
    """An Inf or NaN in a fine-tune (so in its task vector) ranks above every number, as
    torch.sort and topk rank it, and takes one of the kept places; the merged value is Inf or NaN
    there (sum mask*w*d as mergekit writes it: a NaN that agrees with no sign still
    poisons its entry), not an overflow of the merge. Every entry is as the reference computes it."""
    base = torch.linspace(-1, 1, 3000)
    a, b = base + 0.01 * torch.arange(3000.0).sin(), base - 0.02 * torch.arange(3000.0).cos()
    a[1234] = special
    paths = [save(request, tmp_path / f"{n}.pt", {"w": t}) for n, t in (("base", base), ("a", a), ("b", b))]
    out, _ = merged(tmp_path, paths[1], paths[2], "--base", paths[0], "--method", "ties", "--density", "0.4")
    got = load_torch(out)["w"]
    assert bits(got) == bits(ref_ties_first(base, [a, b], [1, 1], 0.4))
    assert bits(got[1234:1235]) == bits(torch.tensor([special])) and torch.isfinite(got[:1234]).all()


@pytest.mark.parametrize("method", ["dare-linear", "dare-ties"])
def test_dare_drops_drawn_in_pieces_are_one_draw_per_task_vector(request, tmp_path, small_pieces, method):
    """Each task vector's drops are those of one torch.rand over the whole tensor, the task
    vectors drawing one after another from the tensor's generator (seed and name), as documented;
    drawing them a piece at a time changes nothing."""
    from paramsurgeon.ops.schemes import tensor_seed

    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 1700, generator=g)
    fts = [base + 0.1 * torch.randn(3, 1700, generator=g) for _ in range(2)]
    paths = [save(request, tmp_path / f"{n}.pt", {"w": t}) for n, t in (("base", base), ("a", fts[0]), ("b", fts[1]))]
    out, _ = merged(tmp_path, paths[1], paths[2], "--base", paths[0], "--method", method, "--density", "0.3",
                    "--seed", "9")
    draws = torch.Generator().manual_seed(tensor_seed(9, "w"))
    deltas = [(x - base) * (torch.rand(base.shape, generator=draws) < 0.3) / 0.3 for x in fts]
    if method == "dare-linear":
        expected = base + deltas[0] + deltas[1]
    else:
        stacked = torch.stack(deltas)
        agree = torch.where(stacked.sum(0) >= 0, stacked > 0, stacked < 0)
        divisor = agree.sum(0).float()
        expected = base + (stacked * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    torch.testing.assert_close(load_torch(out)["w"], expected)


# ---- merge as a recipe step ------------------------------------------------------------------------


def recipe(folder, text):
    folder.mkdir(exist_ok=True)
    path = folder / "merge.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("method, step, options", [
    ("linear", 'weights = "0.2,0.3,0.5"', ["--weights", "0.2,0.3,0.5"]),
    ("ties", 'density = 0.3\nlambda = 0.9\nweights = "0.6,1.2"', ["--density", "0.3", "--lambda", "0.9",
                                                                    "--weights", "0.6,1.2"]),
])
def test_recipe_merge_equals_the_command(tmp_path, three, monkeypatch, method, step, options):
    (base_pt, ft1, ft2), (base, s1, s2) = three
    recipe(tmp_path / "recipes", f'[[step]]\nop = "merge"\nmethod = "{method}"\n'
                                 f'inputs = ["../ft1.pt", "../ft2.pt"]\n{step}\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recipe's paths are relative to the recipe, not to here
    out = tmp_path / "apply" / "out.pt"  # the same name as the command's: a torch file holds its stem
    out.parent.mkdir()
    result = run("apply", "../base.pt", "../recipes/merge.toml", "-o", out)
    assert result.exit_code == 0, result.stderr
    inputs = ["../base.pt", "../ft1.pt", "../ft2.pt"] if method == "linear" else \
        ["../ft1.pt", "../ft2.pt", "--base", "../base.pt"]
    expected, _ = merged(tmp_path, *inputs, "--method", method, *options, name="command/out.pt")
    assert file_bytes(out) == file_bytes(expected)
    reference = (lambda b, f: ref_linear([b] + f, [0.2, 0.3, 0.5])) if method == "linear" else \
        (lambda b, f: ref_ties(b, f, [0.6, 1.2], 0.9, 0.3))
    after = load_torch(out)
    for name, value in base.items():
        if value.is_floating_point():
            torch.testing.assert_close(after[name], reference(value, [s1[name], s2[name]]), msg=name)


def test_recipe_merge_over_a_base_it_names(tmp_path, three):
    (base_pt, ft1, ft2), (base, s1, s2) = three
    path = recipe(tmp_path / "recipes", '[[step]]\nop = "merge"\nmethod = "ties"\nbase = "../base.pt"\n'
                                        'inputs = ["../ft2.pt"]\n[[step]]\nop = "scale"\npattern = ["fc.*"]\nby = 2\n')
    out = tmp_path / "applied.pt"
    result = run("apply", ft1, path, "-o", out)
    assert result.exit_code == 0, result.stderr
    after = load_torch(out)
    for name, value in base.items():
        if value.is_floating_point():
            expected = ref_ties(value, [s1[name], s2[name]], [1, 1]) * (2 if name.startswith("fc.") else 1)
            torch.testing.assert_close(after[name], expected, msg=name)


def test_recipe_merge_is_checked_against_the_steps_before_it(tmp_path, three):
    (base_pt, ft1, ft2), _ = three
    path = recipe(tmp_path / "recipes", '[[step]]\nop = "resize"\npattern = ["fc.*"]\nsize = 12\n'
                                        '[[step]]\nop = "merge"\ninputs = ["../ft1.pt"]\n')
    out = tmp_path / "applied.pt"
    result = run("apply", base_pt, path, "--dry-run")
    assert result.exit_code == 2
    assert f"step 2 (merge): merge: 'fc.weight' is [12, 32] in {base_pt} but [10, 32] in {ft1}" in result.stderr
    assert not out.exists()
