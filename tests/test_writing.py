"""Where a checkpoint is written and how a directory is replaced: an output's name and
--format must agree, --in-place keeps the input's format and owner and refuses read-only
files, a sharded directory is replaced whole (other checkpoints in it go, other files
stay), and an in-place rewrite relinks the shards it did not change."""

import json
import os
import shutil
import stat
import zipfile

import pytest
import torch
from helpers import SAMPLES, assert_same_state, file_bytes, load_torch, run
from safetensors.torch import load_file

import paramsurgeon
from paramsurgeon.formats import resolve_target


def sharded_state(folder) -> dict:
    """Every tensor of a sharded directory, read with safetensors or torch through its index."""
    index = next(p for p in os.listdir(folder) if p.endswith(".index.json"))
    weight_map = json.loads((folder / index).read_text())["weight_map"]
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_file(folder / shard) if shard.endswith(".safetensors") else load_torch(folder / shard))
    return state


@pytest.fixture
def sharded(tmp_path):
    """The sample sharded ResNet (three safetensors shards) beside a config.json."""
    folder = tmp_path / "sharded"
    shutil.copytree(os.path.join(SAMPLES, "resnet-sharded"), folder)
    (folder / "config.json").write_text('{"model_type": "resnet"}')
    return folder


@pytest.mark.parametrize("name,fmt", [("out.safetensors", "pt"), ("out.pt", "safetensors"), ("out.bin", "safetensors"),
                                      ("out.ckpt", "dcp")])
def test_output_name_and_format_must_agree(tmp_path, resnet_pt, name, fmt):
    result = run("convert", resnet_pt, "-o", tmp_path / name, "--format", fmt)
    named = "safetensors" if name.endswith(".safetensors") else "torch"
    wanted = {"pt": "torch", "safetensors": "safetensors", "dcp": "dcp"}[fmt]
    fix = "a directory name" if fmt == "dcp" else f"{tmp_path / 'out'}{'.safetensors' if fmt == 'safetensors' else '.pt'}"
    assert result.exit_code == 2
    assert result.stderr == (f"paramsurgeon: error: -o {tmp_path / name} names a {named} file but --format {fmt} asks"
                             f" for {wanted}; drop --format, or name the output {fix}\n")
    assert sorted(os.listdir(tmp_path)) == ["resnet.pt"]


def test_max_shard_size_needs_a_directory(tmp_path, resnet_pt):
    result = run("convert", resnet_pt, "-o", tmp_path / "single.safetensors", "--max-shard-size", "10MB")
    assert result.exit_code == 2
    assert result.stderr == (f"paramsurgeon: error: --max-shard-size writes a directory, but -o"
                             f" {tmp_path / 'single.safetensors'} names a safetensors file; pass a directory"
                             f" (-o {tmp_path / 'single'})\n")
    assert sorted(os.listdir(tmp_path)) == ["resnet.pt"]


@pytest.mark.parametrize("options,message", [
    (["--format", "safetensors"], "--in-place keeps the input's format (torch); --format safetensors would change it;"
                                  " write the safetensors checkpoint elsewhere with -o PATH"),
    (["--max-shard-size", "100KB"], "--in-place keeps the input's format, but --max-shard-size would make {path} a"
                                    " sharded directory; write it elsewhere with -o DIR"),
])
def test_in_place_refuses_a_change_of_format(resnet_pt, options, message):
    result = run("convert", resnet_pt, "--in-place", *options)
    assert result.exit_code == 2
    assert result.stderr == f"paramsurgeon: error: {message.format(path=resnet_pt)}\n"


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_in_place_keeps_the_format(tmp_path, resnet_pt, resnet, name):
    path = tmp_path / name
    assert run("convert", resnet_pt, "-o", path).exit_code == 0
    assert run("zero", path, "-p", "fc.bias", "--in-place").exit_code == 0
    state = load_file(path) if name.endswith(".safetensors") else load_torch(path)
    assert_same_state(state, {**resnet.state_dict(), "fc.bias": torch.zeros(10)}, ordered=False)


def test_in_place_on_a_legacy_file_rewrites_it_as_zip_with_a_note(tmp_path, resnet):
    legacy = tmp_path / "legacy.pt"
    torch.save(resnet.state_dict(), legacy, _use_new_zipfile_serialization=False)
    target = resolve_target(paramsurgeon.load(str(legacy)), None, in_place=True)
    assert target.notes == [f"{legacy} was a legacy (non-zip) torch file; it is rewritten in the zip format"
                            " torch.save has written since PyTorch 1.6"]
    result = run("zero", legacy, "-p", "fc.bias", "--in-place")
    assert result.exit_code == 0 and f"note: {target.notes[0]}\n" in result.stderr
    assert zipfile.is_zipfile(legacy)
    assert_same_state(load_torch(legacy), {**resnet.state_dict(), "fc.bias": torch.zeros(10)})


def test_in_place_refuses_a_read_only_file(resnet_pt):
    os.chmod(resnet_pt, 0o444)
    before = file_bytes(resnet_pt)
    result = run("zero", resnet_pt, "-p", "fc.bias", "--in-place")
    assert result.exit_code == 2
    assert result.stderr == (f"paramsurgeon: error: --in-place: '{resnet_pt}' (mode 0444) is read-only; nothing was"
                             " written; make it writable (chmod u+w) or write the result elsewhere with -o\n")
    assert file_bytes(resnet_pt) == before and stat.S_IMODE(os.stat(resnet_pt).st_mode) == 0o444
    assert sorted(os.listdir(resnet_pt.parent)) == ["resnet.pt"]


def test_in_place_refuses_a_read_only_shard(sharded):
    shard = sharded / "model-00002-of-00003.safetensors"
    os.chmod(shard, 0o444)
    result = run("zero", sharded, "-p", "fc.bias", "--in-place")
    assert result.exit_code == 2 and f"'{shard}' (mode 0444) is read-only; nothing was written" in result.stderr


@pytest.mark.rewrites_input
@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_in_place_as_root_keeps_owner_group_and_mode(resnet_pt):
    os.chown(resnet_pt, 4321, 8765)
    os.chmod(resnet_pt, 0o640)
    assert run("zero", resnet_pt, "-p", "fc.bias", "--in-place").exit_code == 0
    status = os.stat(resnet_pt)
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (4321, 8765, 0o640)
    assert load_torch(resnet_pt)["fc.bias"].abs().sum() == 0


def test_in_place_refuses_another_users_file(resnet_pt, monkeypatch):
    """A user other than root cannot give a new file its old owner: the rewrite is refused."""
    owner = os.stat(resnet_pt).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    result = run("zero", resnet_pt, "-p", "fc.bias", "--in-place")
    assert result.exit_code == 2
    assert result.stderr == (f"paramsurgeon: error: --in-place: '{resnet_pt}' (uid {owner}) belongs to another user,"
                             " and a rewrite would make it yours; nothing was written; write the result elsewhere"
                             " with -o\n")


def test_in_place_sharded_rewrite_relinks_unchanged_shards(sharded):
    """Only the shard holding the changed tensor and the index are written; the other shards
    and config.json are the same files (hard links), modes are kept."""
    before = sharded_state(sharded)
    os.chmod(sharded / "model-00003-of-00003.safetensors", 0o640)
    inodes = {p.name: p.stat().st_ino for p in sharded.iterdir()}
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    changed = index["weight_map"]["fc.bias"]
    assert run("zero", sharded, "-p", "fc.bias", "--in-place").exit_code == 0
    assert_same_state(sharded_state(sharded), {**before, "fc.bias": torch.zeros(10)}, ordered=False)
    after = {p.name: p.stat().st_ino for p in sharded.iterdir()}
    assert sorted(after) == sorted(inodes)
    assert [n for n in sorted(after) if after[n] != inodes[n]] == sorted([changed, "model.safetensors.index.json"])
    assert stat.S_IMODE((sharded / "model-00003-of-00003.safetensors").stat().st_mode) == 0o640
    assert json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"] == index["weight_map"]
    assert [p for p in os.listdir(sharded.parent) if ".paramsurgeon-" in p] == []


def test_in_place_through_the_index_path(sharded):
    assert run("zero", sharded / "model.safetensors.index.json", "-p", "fc.bias", "--in-place").exit_code == 0
    assert sharded_state(sharded)["fc.bias"].abs().sum() == 0


def test_in_place_keeps_symlinked_shards_as_symlinks(tmp_path, sharded):
    """A hub cache links each shard to a blob: unchanged shards stay links, no blob is written."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in [p for p in sharded.iterdir() if p.name.startswith("model-")]:
        shard.rename(blobs / shard.name)
        shard.symlink_to(os.path.join("..", "blobs", shard.name))
    digests = {p.name: file_bytes(p) for p in blobs.iterdir()}
    changed = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]["fc.bias"]
    assert run("zero", sharded, "-p", "fc.bias", "--in-place").exit_code == 0
    assert {p.name: file_bytes(p) for p in blobs.iterdir()} == digests
    links = sorted(p.name for p in sharded.iterdir() if p.is_symlink())
    assert links == sorted(n for n in digests if n != changed) and not (sharded / changed).is_symlink()
    assert sharded_state(sharded)["fc.bias"].abs().sum() == 0


@pytest.mark.parametrize("first,second", [("pt", "safetensors"), ("safetensors", "pt")])
def test_sharded_output_replaces_the_other_format_whole(tmp_path, resnet_pt, resnet, first, second):
    folder = tmp_path / "out"
    assert run("convert", resnet_pt, "-o", folder, "--max-shard-size", "100KB", "--format", first).exit_code == 0
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("a model")
    assert run("convert", resnet_pt, "-o", folder, "--max-shard-size", "60KB", "--format", second).exit_code == 0
    suffix, index = (".safetensors", "model.safetensors.index.json") if second == "safetensors" \
        else (".bin", "pytorch_model.bin.index.json")
    names = sorted(os.listdir(folder))
    shards = json.loads((folder / index).read_text())["weight_map"].values()
    assert names == sorted({"README.md", "config.json", index, *shards})
    assert all(n.endswith(suffix) for n in shards)
    assert_same_state(sharded_state(folder), resnet.state_dict(), ordered=False)
    assert run("check", folder).exit_code == 0


def test_sharded_output_replaces_a_single_file_checkpoint_in_the_directory(tmp_path, resnet_pt, resnet):
    folder = tmp_path / "out"
    folder.mkdir()
    assert run("convert", resnet_pt, "-o", folder / "pytorch_model.bin").exit_code == 0
    assert run("convert", resnet_pt, "-o", folder, "--max-shard-size", "100KB", "--format", "safetensors").exit_code == 0
    assert "pytorch_model.bin" not in os.listdir(folder)
    assert_same_state(sharded_state(folder), resnet.state_dict(), ordered=False)


def test_a_directory_with_two_indexes_is_ambiguous(tmp_path, resnet_pt):
    folder = tmp_path / "both"
    assert run("convert", resnet_pt, "-o", folder, "--max-shard-size", "100KB", "--format", "safetensors").exit_code == 0
    other = tmp_path / "bins"
    assert run("convert", resnet_pt, "-o", other, "--max-shard-size", "100KB", "--format", "pt").exit_code == 0
    for name in os.listdir(other):
        shutil.move(other / name, folder / name)
    for command in (["inspect", "--no-stats"], ["check"]):
        result = run(*command, folder)
        assert result.exit_code == 2
        assert result.stderr == (f"paramsurgeon: error: {folder}: a directory with several shard indexes"
                                 " (model.safetensors.index.json, pytorch_model.bin.index.json); pass the one you"
                                 f" mean ({folder / 'model.safetensors.index.json'})\n")
    assert run("inspect", "--no-stats", folder / "pytorch_model.bin.index.json").exit_code == 0


def test_dcp_output_keeps_model_files_beside_the_checkpoint_and_refuses_others(tmp_path, resnet_pt, training_pt):
    folder = tmp_path / "dcp"
    assert run("convert", training_pt, "-o", folder, "--format", "dcp").exit_code == 0
    (folder / "notes.txt").write_text("run 7")
    refused = run("convert", resnet_pt, "-o", folder, "--format", "dcp")
    assert refused.exit_code == 2
    assert refused.stderr == (f"paramsurgeon: error: -o {folder} holds notes.txt, which is not part of a DCP"
                              " checkpoint; nothing was written; pass a new or empty directory\n")
    os.rename(folder / "notes.txt", folder / "config.json")
    assert run("convert", resnet_pt, "-o", folder, "--format", "dcp").exit_code == 0
    assert (folder / "config.json").read_text() == "run 7"
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, tmp_path / "back.pt")
    assert sorted(load_torch(tmp_path / "back.pt")) == sorted(load_torch(resnet_pt))
    assert [p for p in os.listdir(tmp_path) if ".paramsurgeon-" in p] == []


def test_a_directory_output_may_not_swallow_the_input(tmp_path, resnet_pt):
    folder = tmp_path / "model"
    folder.mkdir()
    single = folder / "model.safetensors"
    assert run("convert", resnet_pt, "-o", single).exit_code == 0
    before = file_bytes(single)
    result = run("convert", single, "-o", folder, "--max-shard-size", "100KB")
    assert result.exit_code == 2
    assert result.stderr == (f"paramsurgeon: error: -o {folder} holds the input {single} (the checkpoint); nothing"
                             " was written; write elsewhere\n")
    assert os.listdir(folder) == ["model.safetensors"] and file_bytes(single) == before
