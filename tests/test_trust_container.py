"""Which part of a nested file is the model: a well-known name, else the mapping holding most
of the file's parameters; loose scalars beside it (best_acc1, step) are the rest of the file."""

import json

import pytest
import torch

from helpers import assert_same_state, load_torch, register_input, run
from models import ResNet


@pytest.fixture
def imagenet_pt(request, tmp_path, resnet):
    """The layout of pytorch/examples' ImageNet training script (main.py, save_checkpoint)."""
    optimizer = torch.optim.SGD(resnet.parameters(), lr=0.1, momentum=0.9)
    resnet(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 7, "arch": "resnet18", "state_dict": resnet.state_dict(),
                "best_acc1": torch.tensor(0.71), "optimizer": optimizer.state_dict(),
                "scheduler": {"last_epoch": 7}}, path)
    return register_input(request, path)


def test_imagenet_layout_is_the_whole_model(imagenet_pt, resnet, tmp_path):
    state = resnet.state_dict()
    document = json.loads(run("inspect", imagenet_pt, "--json").stdout)
    assert document["key"] == "state_dict"
    assert [t["name"] for t in document["tensors"]] == list(state)
    zeroed = tmp_path / "zeroed.pt"
    result = run("zero", imagenet_pt, "-p", "fc.*", "-o", zeroed)
    assert result.exit_code == 0, result.stderr
    before, after = load_torch(imagenet_pt), load_torch(zeroed)
    expected = {n: torch.zeros_like(v) if n.startswith("fc.") else v for n, v in state.items()}
    assert_same_state(after["state_dict"], expected)
    assert torch.equal(after["best_acc1"], before["best_acc1"]) and after["arch"] == "resnet18"
    assert after["epoch"] == 7 and after["scheduler"] == {"last_epoch": 7}
    for index, moments in before["optimizer"]["state"].items():
        assert torch.equal(after["optimizer"]["state"][index]["momentum_buffer"], moments["momentum_buffer"])
    tensors = tmp_path / "tensors.pt"
    result = run("convert", imagenet_pt, "--tensors-only", "-o", tensors)
    assert result.exit_code == 0, result.stderr
    assert_same_state(load_torch(tensors), state)
    torch.manual_seed(3)
    fresh = ResNet()
    fresh.load_state_dict(load_torch(tensors))  # strict: every key of the model, nothing else


def test_dcp_with_a_step_counter_is_the_whole_model(tmp_path, resnet):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    state = resnet.state_dict()
    dcp.save({"model": state, "step": torch.tensor(3)}, checkpoint_id=str(folder))
    document = json.loads(run("inspect", folder, "--json", "--no-stats").stdout)
    assert document["key"] == "model" and [t["name"] for t in document["tensors"]] == list(state)
    out = tmp_path / "out.pt"
    result = run("zero", folder, "-p", "fc.*", "-o", out)
    assert result.exit_code == 0, result.stderr
    written = load_torch(out)
    assert_same_state(written["model"], {n: torch.zeros_like(v) if n.startswith("fc.") else v for n, v in state.items()})
    assert torch.equal(written["step"], torch.tensor(3))
    tensors = tmp_path / "tensors.safetensors"
    assert run("convert", folder, "--tensors-only", "-o", tensors).exit_code == 0
    from safetensors.torch import load_file

    assert_same_state(load_file(tensors), state)


def test_lightning_layout_keeps_working(tmp_path, resnet):
    state = {f"model.{n}": v for n, v in resnet.state_dict().items()}
    optimizer = torch.optim.Adam(resnet.parameters())
    resnet(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
                "optimizer_states": [optimizer.state_dict()], "lr_schedulers": []}, path)
    document = json.loads(run("inspect", path, "--json", "--no-stats").stdout)
    assert document["key"] == "state_dict" and [t["name"] for t in document["tensors"]] == list(state)
    out = tmp_path / "out.ckpt"
    assert run("zero", path, "-p", "model.fc.*", "-o", out).exit_code == 0
    written = load_torch(out)
    assert_same_state(written["state_dict"], {n: torch.zeros_like(v) if ".fc." in n else v for n, v in state.items()})
    assert written["global_step"] == 120 and len(written["optimizer_states"]) == 1


def test_without_a_known_name_the_biggest_mapping_is_the_model(tmp_path, resnet):
    state = resnet.state_dict()
    path = tmp_path / "custom.pt"
    torch.save({"iteration": torch.tensor(500), "lr": torch.tensor(0.1), "weights_ema_free": state,
                "probe": {"w": torch.ones(3)}}, path)
    result = run("inspect", path, "--json", "--no-stats")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["key"] == "weights_ema_free"
    assert "note: using 'weights_ema_free'" in result.stderr and "probe" in result.stderr


def test_two_models_of_similar_size_are_ambiguous(tmp_path, resnet):
    path = tmp_path / "pair.pt"
    torch.save({"step": torch.tensor(1), "student": resnet.state_dict(),
                "teacher": ResNet(widths=(8, 16, 24, 40)).state_dict()}, path)
    result = run("inspect", path)
    assert result.exit_code == 2
    assert "several entries hold tensors" in result.stderr and "student" in result.stderr
    assert "teacher" in result.stderr and "--key" in result.stderr
    named = tmp_path / "named.pt"
    torch.save({"model": resnet.state_dict(), "state_dict": resnet.state_dict(), "step": torch.tensor(1)}, named)
    both = run("inspect", named)
    assert both.exit_code == 2 and "several entries hold tensors (model, state_dict)" in both.stderr


def test_key_dot_picks_the_root(imagenet_pt):
    result = run("inspect", imagenet_pt, "--key", ".", "--json", "--no-stats")
    assert result.exit_code == 0, result.stderr
    assert [t["name"] for t in json.loads(result.stdout)["tensors"]] == ["best_acc1"]


def test_a_key_through_a_list(tmp_path):
    """--key may walk through a list (an EMA list of state dicts, hyper-parameters): inspect lists the
    tensors there and the list's other items as the rest of the file, and a change writes back the
    list, as torch reads it, everything else kept."""
    torch.manual_seed(0)
    path, out = tmp_path / "listed.pt", tmp_path / "changed.pt"
    saved = {"model": {"w": torch.randn(4)}, "emas": [{"w": torch.randn(4)}, {"w": torch.randn(4), "b": torch.ones(2)}],
             "epoch": 3}
    torch.save(saved, path)
    document = json.loads(run("inspect", path, "--key", "emas.1", "--json").stdout)
    assert [(t["name"], t["stats"]["max"]) for t in document["tensors"]] == \
        [(n, pytest.approx(t.max().item())) for n, t in saved["emas"][1].items()]
    assert {e["path"] for e in document["extras"]} == {"model", "emas.0", "epoch"}
    assert run("zero", path, "--key", "emas.1", "-p", "w", "-o", out).exit_code == 0
    changed = load_torch(out)
    assert isinstance(changed["emas"], list) and torch.equal(changed["emas"][1]["w"], torch.zeros(4))
    assert_same_state(changed["emas"][0], saved["emas"][0])
    assert torch.equal(changed["emas"][1]["b"], saved["emas"][1]["b"]) and changed["epoch"] == 3
