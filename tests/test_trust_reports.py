"""Issue "Trust at first use": what a user sees on first runs of inspect, check and diff,
checked against torch's own view of the files."""

import io
import os
import subprocess
import sys

import pytest
import torch
from helpers import json_of, run, run_on_terminal
from models import ResNet

COLOR = {"TERM": "xterm-256color"}


# 1. Escape codes and progress bars


def test_table_headers_are_styled_on_a_colour_terminal_not_escaped_as_text(resnet_pt):
    code, shown, _ = run_on_terminal("inspect", resnet_pt, "-p", "fc.*", terminal=("stdout",), env=COLOR)
    assert code == 0
    assert b"\\x1b" not in shown  # no escape code printed as text
    assert b"\x1b[1mname" in shown  # the header is bold
    assert b"fc.weight" in shown and b"fc.bias" in shown


def test_control_characters_in_names_are_escaped_on_a_colour_terminal(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"evil\x1b[31m.weight": torch.ones(3)}, path)
    assert list(torch.load(path, weights_only=True)) == ["evil\x1b[31m.weight"]
    shown = run_on_terminal("inspect", path, terminal=("stdout",), env=COLOR)[1]
    assert b"evil\\x1b[31m.weight" in shown and b"\x1b[31m" not in shown
    piped = run("inspect", path).stdout
    assert "evil\\x1b[31m.weight" in piped and "\x1b" not in piped


def test_line_breaks_bidi_overrides_and_c1_controls_in_names_are_escaped(tmp_path):
    """U+0085 and U+2028 break lines for Python and some terminals, U+009B starts an escape sequence on
    8-bit terminals, U+202E prints the rest of a name backwards: each shows as its code."""
    names = ["a\x85b.weight", "c\u2028d.weight", "e\x9b31mf.weight", "g\u202egnp.exe.weight", "h\u2066i.weight"]
    path = tmp_path / "evil.pt"
    torch.save({name: torch.ones(3) for name in names}, path)
    assert list(torch.load(path, weights_only=True)) == names
    piped = run("inspect", path).stdout
    for shown in ("a\\x85b.weight", "c\\u2028d.weight", "e\\x9b31mf.weight", "g\\u202egnp.exe.weight",
                  "h\\u2066i.weight"):
        assert shown in piped
    assert not any(c in piped for c in "\x85\u2028\x9b\u202e\u2066")
    assert piped.splitlines() == piped.rstrip("\n").split("\n")  # no line break but the table's own


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bar_shown(monkeypatch, steps: list[tuple[float, int]], total: int) -> bool:
    """Whether a bar appears for work advancing by ``nbytes`` at each (time, nbytes) of ``steps``."""
    from paramsurgeon.cli import console as common

    clock = iter([0.0] + [t for t, _ in steps])
    monkeypatch.setattr(common, "monotonic", lambda: next(clock))
    monkeypatch.setattr(sys, "stderr", _Terminal())
    monkeypatch.delenv("NO_COLOR", raising=False)
    with common.progress(total, "reading") as advance:
        for _, nbytes in steps:
            advance(nbytes)
    return "reading" in sys.stderr.getvalue()


def test_no_progress_bar_for_a_tiny_file_after_a_slow_start(monkeypatch):
    """torch took 1.5 s to import, then 1.3 kB were read in a millisecond: no bar."""
    assert not _bar_shown(monkeypatch, [(1.5, 1280), (1.501, 40)], 1320)


def test_progress_bar_for_work_that_takes_seconds(monkeypatch):
    assert _bar_shown(monkeypatch, [(0.3 * i, 10) for i in range(1, 11)], 100)


# 5. check: rules about values look at floating-point tensors


@pytest.fixture
def trained_pt(tmp_path):
    """A ResNet after 100 training-mode batches: every BatchNorm's num_batches_tracked is 100."""
    torch.manual_seed(0)
    model = ResNet().train()
    with torch.no_grad():
        for _ in range(100):
            model(torch.randn(2, 3, 16, 16))
    path = tmp_path / "trained.pt"
    torch.save(model.state_dict(), path)
    return path


def test_check_max_abs_ignores_step_counters(trained_pt):
    state = torch.load(trained_pt, weights_only=True)
    assert state["bn1.num_batches_tracked"].item() == 100
    assert max(t.abs().max().item() for t in state.values() if t.is_floating_point()) <= 50
    result = run("check", trained_pt, "--max-abs", "50", "--finite")
    assert result.exit_code == 0, result.stdout
    assert "every rule holds" in result.stdout


def test_check_max_abs_lists_floating_point_offenders_only(trained_pt):
    state = torch.load(trained_pt, weights_only=True)
    offenders = [n for n, t in state.items() if t.is_floating_point() and t.abs().max().item() > 1]
    document = json_of("check", trained_pt, "--max-abs", "1", schema="check", code=1)
    (rule,) = document["rules"]
    assert [v["name"] for v in rule["violations"]] == offenders


@pytest.mark.parametrize("args, message", [
    (("--dtype", "int64"), "--dtype int64: check --dtype is about floating-point tensors"),
    (("--max-abs", "-1"), "check: --max-abs must be at least 0, not -1"),
    (("--max-abs", "nan"), "check: --max-abs must be a finite number, not nan"),
])
def test_check_refuses_rules_that_cannot_hold(resnet_pt, args, message):
    result = run("check", resnet_pt, *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"paramsurgeon: error: {message}")


# 16. Wording


def test_counts_are_singular_for_one(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 1)).sum().backward()
    optimizer.step()
    path = tmp_path / "one.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    assert len(torch.load(path, weights_only=True)["optimizer"]["state"]) == 1
    out = run("inspect", path).stdout
    assert "1 tensor, 1 parameter," in out
    assert "Adam state for 1 param (" in out
    assert "1 parameters" not in out and "1 tensors" not in out and "1 params" not in out
    groups = run("groups", path).stdout
    assert "decay: 1 tensor, 1 value" in groups


def test_round_numbers_print_without_a_trailing_point(tmp_path):
    path = tmp_path / "round.pt"
    torch.save({"w": torch.tensor([0.0, 100.0, 25.0, 50.0])}, path)
    values = torch.load(path, weights_only=True)["w"]
    assert values.max().item() == 100.0 and values.mean().item() == 43.75
    out = run("inspect", path).stdout
    assert "100." not in out
    row = next(line.split() for line in out.splitlines() if line.startswith("w "))
    assert row[4:9] == [f"{values.mean().item():.3g}", f"{values.std().item():.3g}", "0", "100", "25.0%"]


def test_expect_takes_shapes_as_torch_prints_them(resnet_pt, resnet):
    weight, bias = resnet.fc.weight.shape, resnet.fc.bias.shape
    forms = [f"fc.weight={weight}", f"fc.weight={list(weight)}", f"fc.bias={tuple(bias)}", "fc.weight=10x32",
             f"fc.bias {bias} float32", "fc.weight=(10, 32)"]
    assert str(weight) == "torch.Size([10, 32])" and str(tuple(bias)) == "(10,)"
    args = [a for form in forms for a in ("--expect", form)]
    result = run("check", resnet_pt, *args)
    assert result.exit_code == 0, result.stdout + result.stderr
    wrong = run("check", resnet_pt, "--expect", "fc.weight=torch.Size([32, 10])")
    assert wrong.exit_code == 1 and "fc.weight has shape [10, 32], expected [32, 10]" in wrong.stdout


def test_check_text_caps_the_violations_json_keeps_them_all(resnet_pt):
    state = torch.load(resnet_pt, weights_only=True)
    offenders = [n for n, t in state.items() if t.is_floating_point() and t.abs().max().item() > 0]
    assert len(offenders) > 30
    document = json_of("check", resnet_pt, "--max-abs", "0", schema="check", code=1)
    assert [v["name"] for v in document["rules"][0]["violations"]] == offenders
    lines = run("check", resnet_pt, "--max-abs", "0").stdout.splitlines()
    assert f"FAIL max-abs 0: {len(offenders)} violations" in lines[1]
    shown = [line.split()[0] for line in lines[2:-1]]
    assert shown == offenders[:20]
    assert lines[-1].strip() == f"... and {len(offenders) - 20} more (--json lists every one)"


# 6. Only paramsurgeon's lines on stderr


@pytest.fixture
def without_numpy(tmp_path):
    """An environment in which ``import numpy`` fails as in a venv without it (numpy is a test extra)."""
    shim = tmp_path / "no-numpy"
    shim.mkdir()
    (shim / "numpy.py").write_text('raise ModuleNotFoundError("No module named \'numpy\'", name="numpy")\n')
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", "import numpy"], capture_output=True, env={**os.environ, **env})
    assert b"ModuleNotFoundError" in probe.stderr
    return env


def test_no_library_warnings_without_numpy(tmp_path, resnet_pt, without_numpy):
    from helpers import run_process

    runs = {
        ("inspect", resnet_pt, "-p", "fc.*"): 0,
        ("check", resnet_pt, "--finite"): 0,
        ("diff", resnet_pt, resnet_pt): 0,
        ("scale", resnet_pt, "-p", "fc.*", "--by", "2", "-o", tmp_path / "scaled.pt"): 0,
    }
    for args, code in runs.items():
        result = run_process(*args, env=without_numpy)
        assert result.returncode == code, result.stderr
        assert b"Warning" not in result.stderr and b"NumPy" not in result.stderr, (args, result.stderr)
    scaled = torch.load(tmp_path / "scaled.pt", weights_only=True)
    original = torch.load(resnet_pt, weights_only=True)
    torch.testing.assert_close(scaled["fc.weight"], 2 * original["fc.weight"])


# 7. diff compares the whole file


def _training_state(resnet) -> dict:
    """A training checkpoint with real Adam moments after one step."""
    optimizer = torch.optim.Adam(resnet.parameters(), lr=1e-3)
    resnet(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return {"state_dict": resnet.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7}


def test_diff_sees_another_epoch(tmp_path, resnet):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    state = _training_state(resnet)
    torch.save(state, a)
    torch.save({**state, "epoch": 8}, b)
    assert [torch.load(p, weights_only=True)["epoch"] for p in (a, b)] == [7, 8]
    result = run("diff", a, b)
    assert result.exit_code == 1
    assert result.stdout.startswith(f"{a} (A) vs {b} (B): different: 122 identical, 0 only in A, 0 only in B;"
                                    " rest of the file: ")
    assert "  epoch: 7 -> 8" in result.stdout.splitlines()
    document = json_of("diff", a, b, schema="diff", code=1)
    assert not document["equal"] and document["extras"] == [{"path": "epoch", "a": "7", "b": "8"}]
    assert run("diff", a, b, "--tensors-only").exit_code == 0
    assert json_of("diff", a, a, schema="diff")["equal"]


def test_diff_sees_a_changed_adam_moment(tmp_path, resnet):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    state = _training_state(resnet)
    torch.save(state, a)
    moment = state["optimizer"]["state"][3]["exp_avg"]
    changed = moment.clone()
    changed.view(-1)[5] += 0.25
    state["optimizer"]["state"][3] = {**state["optimizer"]["state"][3], "exp_avg": changed}
    torch.save(state, b)
    loaded = [torch.load(p, weights_only=True)["optimizer"]["state"][3]["exp_avg"] for p in (a, b)]
    expected = (loaded[0] - loaded[1]).abs().max().item()
    assert expected > 0 and int((loaded[0] != loaded[1]).sum()) == 1
    document = json_of("diff", a, b, schema="diff", code=1)
    assert document["changed"] == [] and document["extras"] == []
    (entry,) = document["extra_tensors"]
    assert entry["name"] == "optimizer.state.3.exp_avg" and entry["status"] == "different"
    assert entry["max_abs"] == pytest.approx(expected) and entry["mismatched"] == 1
    text = run("diff", a, b)
    assert text.exit_code == 1 and "optimizer.state.3.exp_avg" in text.stdout
    assert run("diff", a, b, "--tensors-only").exit_code == 0
    assert json_of("diff", a, b, "--atol", "1", schema="diff")["equal"]  # the tolerances apply here too


def test_diff_sees_tied_and_untied_storage(tmp_path, gpt):
    tied, untied = tmp_path / "tied.pt", tmp_path / "untied.pt"
    torch.save(gpt.state_dict(), tied)
    torch.save({k: v.clone() for k, v in gpt.state_dict().items()}, untied)
    ptr = {p: {k: v.untyped_storage().data_ptr() for k, v in torch.load(p, weights_only=True).items()}
           for p in (tied, untied)}
    assert ptr[tied]["lm_head.weight"] == ptr[tied]["wte.weight"]
    assert ptr[untied]["lm_head.weight"] != ptr[untied]["wte.weight"]
    document = json_of("diff", tied, untied, schema="diff", code=1)
    assert document["changed"] == [] and document["only_a"] == document["only_b"] == []
    assert document["ties"] == {"only_a": [["wte.weight", "lm_head.weight"]], "only_b": []}
    text = run("diff", untied, tied)
    assert text.exit_code == 1 and "tied in B only: wte.weight = lm_head.weight" in text.stdout
    assert run("diff", tied, tied).exit_code == 0


def test_messages_count_one_in_the_singular(tmp_path):
    path = tmp_path / "one.pt"
    torch.save({"w": torch.tensor([float("nan")]), "b": torch.ones(2)}, path)
    writes = [run("zero", path, "-p", "w", "-o", tmp_path / "z.pt", "--dry-run"),
              run("drop", path, "-p", "b", "-o", tmp_path / "d.pt")]
    said = "\n".join(r.stderr + r.stdout for r in writes)
    said += run("check", path, "--finite", "--max-abs", "1").stdout
    said += run("merge", path, path, "--weights", "1", "-o", tmp_path / "m.pt").stderr
    assert "1 tensors" not in said and "1 values" not in said and " 1 checkpoints" not in said, said
    assert "of 1 value" in said and "1 tensor" in said, said
