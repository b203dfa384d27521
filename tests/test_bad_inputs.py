"""Broken, foreign and hostile inputs: exit 2, one clear line, no traceback, nothing written,
and no pickled code ever executed."""

import argparse
import json
import os
import struct
import zipfile

import pytest
import torch
from helpers import file_bytes, run, run_process


def assert_refused(result, *words):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("paramsurgeon: error: ")
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


class Marker:
    """Pickles to a call of os.system that would create a file: the test checks it never appears."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class EvalMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({self.path!r}, 'w').close()",))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out" / "result.pt"


@pytest.fixture(autouse=True)
def output_folder(out):
    out.parent.mkdir()
    yield
    assert os.listdir(out.parent) == [], "a failed run left something at the output"


def test_missing_file(tmp_path, out):
    assert_refused(run("convert", tmp_path / "nope.pt", "-o", out), "nope.pt", "No such file")


def test_empty_file(tmp_path, out):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert_refused(run("convert", path, "-o", out), "empty")


def test_random_bytes(tmp_path, out):
    path = tmp_path / "noise.bin"
    path.write_bytes(os.urandom(4096))
    assert_refused(run("inspect", path), "noise.bin")
    assert_refused(run("convert", path, "-o", out))


def test_json_files_of_a_model_directory_say_they_are_json(tmp_path, out):
    from peft import LoraConfig
    from transformers import LlamaConfig

    model, adapter = tmp_path / "model", tmp_path / "adapter"
    LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(model)
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(adapter)
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    for path in (model / "config.json", model / "tokenizer.json", adapter / "adapter_config.json"):
        for command in (("inspect", path), ("convert", path, "-o", out)):
            assert_refused(run(*command), f"{path}: a JSON file", "not a checkpoint", f"the directory that holds it"
                           f" ({path.parent})")
    piped = run_process("inspect", "-", stdin=open(model / "config.json", "rb"))
    assert piped.returncode == 2 and b"<stdin>: a JSON file" in piped.stderr and piped.stderr.count(b"\n") == 1


def test_lfs_pointer(tmp_path, out):
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 123456\n")
    assert_refused(run("inspect", path), "Git LFS pointer", "git lfs pull")


def test_torchscript_archive(tmp_path, out, resnet):
    path = tmp_path / "scripted.pt"
    torch.jit.script(resnet.eval()).save(str(path))
    assert_refused(run("inspect", path), "TorchScript", "torch.jit.load")


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_truncated_torch_file(tmp_path, out, resnet_pt, cut):
    data = file_bytes(resnet_pt)
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * cut)])
    assert_refused(run("convert", path, "-o", out), "cut.pt")


@pytest.mark.parametrize("cut", [4, 20, 0.5, -1])
def test_truncated_safetensors(tmp_path, out, resnet_pt, cut):
    full = tmp_path / "full.safetensors"
    assert run("convert", resnet_pt, "-o", full).exit_code == 0
    data = file_bytes(full)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    assert_refused(run("convert", path, "-o", out), "cut.safetensors")


def test_lying_safetensors_headers(tmp_path, out):
    def write(header: bytes, data: bytes = b"\0" * 16):
        path = tmp_path / "lie.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + data)
        return path

    cases = [
        b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,32]}}',  # past the end
        b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
        b'{"a":{"dtype":"Q99","shape":[4],"data_offsets":[0,16]}}',  # unknown dtype
        b'{"a":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}',  # shape disagrees with size
        b'{"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}',
        b'{"a":"nonsense"}',
        b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',  # leaves bytes unaccounted for
        b'{not json',
    ]
    for header in cases:
        assert_refused(run("convert", write(header), "-o", out), "lie.safetensors")


def test_huge_header_claim(tmp_path, out):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b'{"a":1}')
    assert_refused(run("inspect", path), "huge.safetensors")


def test_pickled_code_in_zip_is_refused_and_never_run(tmp_path, out):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": Marker(marker)}, path)
    result = run("convert", path, "-o", out)
    assert_refused(result, "posix.system", "--unsafe-pickle")
    assert "--allow-global" not in result.stderr  # os/posix can never be admitted by name
    assert not marker.exists()


def test_every_refused_global_is_named_at_once(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"a": Marker(tmp_path / "x"), "b": EvalMarker(tmp_path / "y")}, path)
    result = run("inspect", path)
    assert_refused(result, "posix.system", "builtins.eval")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_pickled_code_inside_optimizer_state(tmp_path, out, resnet):
    marker = tmp_path / "pwned"
    optimizer = torch.optim.SGD(resnet.parameters(), lr=0.1)
    state = optimizer.state_dict()
    state["param_groups"][0]["hook"] = Marker(marker)
    torch.save({"model": resnet.state_dict(), "optimizer": state}, tmp_path / "evil.pt")
    assert_refused(run("convert", tmp_path / "evil.pt", "-o", out), "posix.system")
    assert not marker.exists()


def test_pickled_code_in_legacy_format(tmp_path, out):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy-evil.pt"
    torch.save({"w": torch.ones(3), "x": EvalMarker(marker)}, path, _use_new_zipfile_serialization=False)
    assert_refused(run("convert", path, "-o", out), "builtins.eval")
    assert not marker.exists()


def test_unsafe_pickle_keeps_the_object_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path, result_path = tmp_path / "evil.pt", tmp_path / "kept.pt"
    torch.save({"w": torch.ones(3), "x": Marker(marker)}, path)
    assert run("convert", path, "-o", result_path, "--unsafe-pickle").exit_code == 0
    assert not marker.exists()
    assert b"cposix\nsystem\n" in zipfile.ZipFile(result_path).read("kept/data.pkl")  # kept, as asked


@pytest.mark.parametrize("saved", ["module", "nested"])
def test_a_whole_pickled_module_says_so_and_how_to_save_its_state_dict(tmp_path, out, saved):
    """torch.save(model), alone or inside a dict, read with --unsafe-pickle: the module's tensors
    are no mapping that --key could name, so the error says what the file is and what to save."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())
    path = tmp_path / "model.pt"
    torch.save(model if saved == "module" else {"model": model, "epoch": 3}, path)
    assert isinstance(torch.load(path, weights_only=False)["model"] if saved == "nested" else torch.load(
        path, weights_only=False), torch.nn.Sequential)
    for command in (["inspect", path], ["convert", path, "-o", out]):
        assert_refused(run(*command, "--unsafe-pickle"), "a whole pickled module (torch.nn.modules.container.Sequential",
                       "model.state_dict()")


def test_blocked_modules_cannot_be_allowed_by_name(tmp_path, out):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(3), "x": Marker(tmp_path / "pwned")}, path)
    assert_refused(run("convert", path, "-o", out, "--allow-global", "posix.system"), "posix.system")


def test_allow_global_admits_a_namespace(tmp_path):
    path, copy = tmp_path / "lightning.pt", tmp_path / "copy.pt"
    hparams = argparse.Namespace(lr=0.01, layers=3)
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": hparams}, path)
    assert_refused(run("inspect", path), "argparse.Namespace", "--allow-global argparse.Namespace")
    assert run("convert", path, "-o", copy, "--allow-global", "argparse.Namespace").exit_code == 0
    assert torch.load(copy, weights_only=False)["hparams"] == hparams


def test_no_traceback_from_a_real_process(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(b"PK\x03\x04" + os.urandom(100))
    result = run_process("inspect", path)
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1 and b"Traceback" not in result.stderr
    assert b"Traceback" in run_process("inspect", path, "--debug").stderr


def test_usage_errors_are_one_line(resnet_pt):
    assert_refused(run("inspect", resnet_pt, "--no-such-flag"), "--no-such-flag")
    assert_refused(run("inspect", resnet_pt, "--regex", "("), "--regex")
    assert_refused(run("inspect", resnet_pt, "--kind", "lstm"), "lstm", "conv")
    assert_refused(run("convert", resnet_pt, "--max-shard-size", "lots", "-o", "x"), "--max-shard-size")


DEPTH = 100_000  # far deeper than Python recurses


def safetensors_with_header(path, header: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_json_nested_deeper_than_python_recurses_is_refused(tmp_path, out):
    """json's parser recurses: a header, the ties in its metadata, or a shard index nested 100,000 deep
    is a corrupt file (exit 2), not an internal error."""
    deep = b"[" * DEPTH + b"]" * DEPTH
    safetensors_with_header(tmp_path / "header.safetensors", b'{"a":' + deep + b"}")
    assert_refused(run("convert", tmp_path / "header.safetensors", "-o", out), "header.safetensors", "not valid JSON")
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, tmp_path / "ties.safetensors", metadata={"paramsurgeon.ties": deep.decode()})
    assert_refused(run("convert", tmp_path / "ties.safetensors", "-o", out), "paramsurgeon.ties", "not valid JSON")
    shards = tmp_path / "sharded"
    shards.mkdir()
    (shards / "model.safetensors.index.json").write_bytes(b'{"weight_map":' + deep + b"}")
    assert_refused(run("convert", shards, "-o", out), "index", "not valid JSON")


def test_a_recipe_nested_deeper_than_python_recurses_is_refused(tmp_path, out, resnet_pt):
    """tomllib recurses too: a recipe nesting arrays 100,000 deep is not valid TOML (exit 2)."""
    recipe = tmp_path / "deep.toml"
    recipe.write_text("seed = " + "[" * DEPTH + "]" * DEPTH + "\n")
    assert_refused(run("apply", resnet_pt, recipe, "-o", out), "deep.toml", "not valid TOML")


def test_an_operations_history_that_is_no_list_is_kept(tmp_path):
    """Another tool's value under paramsurgeon.operations does not stop surgery: it becomes the
    history's first entry."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for foreign in ("not json", '{"a": 1}', "[" * DEPTH):
        save_file({"a": torch.ones(2)}, tmp_path / "in.safetensors", metadata={"paramsurgeon.operations": foreign})
        result = run("zero", tmp_path / "in.safetensors", "-p", "a", "-o", tmp_path / "out.safetensors")
        assert result.exit_code == 0, result.stderr
        with safe_open(tmp_path / "out.safetensors", "np") as f:
            assert json.loads(f.metadata()["paramsurgeon.operations"]) == [foreign, "zero: a"]
            assert (f.get_tensor("a") == 0).all()


def torch_file_with_deep_list(path, innermost: int) -> None:
    """A torch zip whose entry 'x' is a list nested DEPTH deep around ``innermost`` (pickle opcodes
    written by hand: Python's pickler cannot nest that deep)."""
    torch.save({"a": torch.ones(2), "x": 7}, path)
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in files if n.endswith("data.pkl"))
    at = files[name].index(b"K\x07")  # BININT1 7
    files[name] = files[name][:at] + b"]" * DEPTH + bytes([ord("K"), innermost]) + b"a" * DEPTH + files[name][at + 2:]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def test_diff_of_entries_nested_deeper_than_python_recurses(tmp_path):
    torch_file_with_deep_list(tmp_path / "seven.pt", 7)
    torch_file_with_deep_list(tmp_path / "eight.pt", 8)
    same = run("diff", tmp_path / "seven.pt", tmp_path / "seven.pt")
    assert same.exit_code == 0 and "rest of the file: 1 identical" in same.stdout, same.stderr
    different = run("diff", tmp_path / "seven.pt", tmp_path / "eight.pt")
    assert different.exit_code == 1 and different.stderr == "", different.stderr
    [line] = [line for line in different.stdout.splitlines() if line.startswith("  x.")]
    first, *indices = line.strip().split(":")[0].split(".")  # the path stops growing some levels down
    assert line.endswith(": 7 -> 8") and first == "x" and set(indices) == {"0"} and 32 <= len(indices) <= 100
