"""DCP directories read by offset: chunks written by several ranks reassembled as torch does,
the rest of the file kept, .metadata read once, a hostile .metadata refused. Counted, not timed."""

import os
import pickle
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import assert_same_state, load_torch, register_input, run
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata


HELPER = os.path.join(os.path.dirname(__file__), "dcp_four_ranks.py")


@pytest.fixture(scope="module")
def four_ranks_dir(tmp_path_factory):
    """A DCP directory written by four processes with uneven chunks (see dcp_four_ranks.py)."""
    folder = tmp_path_factory.mktemp("four") / "dcp"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([sys.executable, HELPER, str(folder), str(port)], check=True, capture_output=True, timeout=300)
    return folder


@pytest.fixture
def four_ranks(request, four_ranks_dir):
    return register_input(request, four_ranks_dir)


def torch_reading(folder, scratch) -> dict:
    """What torch makes of a DCP directory: dcp_to_torch_save, then torch.load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(folder, scratch)
    return torch.load(scratch, weights_only=True)


def assert_same_file(ours, theirs, path="") -> None:
    """Same entries in the same order, tensors bit-identical with their dtypes, everything else equal."""
    assert type(ours) is type(theirs), path
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), path
        for key, value in theirs.items():
            assert_same_file(ours[key], value, f"{path}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), path
        for i, (mine, value) in enumerate(zip(ours, theirs)):
            assert_same_file(mine, value, f"{path}.{i}")
    elif isinstance(theirs, torch.Tensor):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), path
    else:
        assert ours == theirs, path


def test_dcp_written_by_four_ranks_with_uneven_chunks_reads_as_torch_does(tmp_path, four_ranks):
    from dcp_four_ranks import EXTRAS, FULL

    result = run("convert", four_ranks, "-o", tmp_path / "whole.pt")
    assert result.exit_code == 0, result.stderr
    ours, theirs = load_torch(tmp_path / "whole.pt"), torch_reading(four_ranks, tmp_path / "torch.pt")
    assert_same_file(ours, theirs)
    assert_same_state(ours["model"], FULL)
    assert ours["step"] == EXTRAS["step"] and ours["config"] == EXTRAS["config"]
    assert torch.equal(ours["optim"]["moments"]["rows"], FULL["rows"] * 2)


def test_one_whole_chunk_is_a_span_of_its_file_and_several_are_assembled_on_demand(four_ranks):
    import paramsurgeon as ps

    model = ps.load(str(four_ranks)).tensors
    assert model["bias"].storage.file.name.endswith(".distcp")  # replicated: one chunk covers it all
    assert all(model[n].storage.file is None and model[n].storage.loader is not None for n in ("rows", "pair", "grid"))


def test_header_only_commands_read_no_tensor_data(four_ranks):
    """inspect --no-stats neither imports torch nor reassembles a chunk (which needs torch)."""
    code = ("import sys\nfrom paramsurgeon.cli import main\nsys.argv = ['paramsurgeon', 'inspect', '--no-stats', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code, str(four_ranks)], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().endswith("NO-TORCH"), result.stderr
    assert "dcp, 4 tensors, 128 parameters + 6 in buffers" in result.stdout


def test_nested_dicts_lists_and_non_tensor_entries_read_as_torch_does(request, tmp_path):
    folder = tmp_path / "dcp"
    state = {"model": {"fc.weight": torch.randn(3, 4), "fc.bias": torch.zeros(3, dtype=torch.bfloat16)},
             "buffers": [torch.arange(4), torch.ones(2, 2)], "epoch": 7,
             "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.full((3, 4), 0.5)}},
                           "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
             "meta": {"name": "run-1", "tags": ("a", "b"), "empty": {}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder))
    register_input(request, folder)
    result = run("convert", folder, "-o", tmp_path / "whole.pt")
    assert result.exit_code == 0, result.stderr
    ours, theirs = load_torch(tmp_path / "whole.pt"), torch_reading(folder, tmp_path / "torch.pt")
    # torch's reading leaves the optimizer's parameter ids as DCP stores them, strings; they are read
    # back as the integers optimizer.load_state_dict matches (test_dcp.py), and nothing else differs
    assert list(theirs["optimizer"]["state"]) == ["0"]
    theirs["optimizer"]["state"] = {0: theirs["optimizer"]["state"]["0"]}
    assert_same_file(ours, theirs)
    assert ours["epoch"] == 7 and ours["meta"]["tags"] == ("a", "b")


class _Opens:
    """Files opened (builtins.open and os.open) while counting; an audit hook cannot be removed,
    so one is installed for the session and switched on and off."""

    paths: list | None = None

    @classmethod
    def hook(cls, event, args):
        if event == "open" and cls.paths is not None and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.paths.append(os.fsdecode(args[0]))


sys.addaudithook(_Opens.hook)


def test_reading_a_dcp_of_1000_tensors_reads_metadata_once(tmp_path):
    folder = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({f"layers.{i}.weight": torch.full((4, 4), float(i)) for i in range(1000)}, checkpoint_id=str(folder))
    _Opens.paths = []
    try:
        result = run("convert", folder, "-o", tmp_path / "whole.pt")
    finally:
        opened, _Opens.paths = _Opens.paths, None
    assert result.exit_code == 0, result.stderr
    assert sum(p.endswith(".metadata") for p in opened) == 1
    assert sorted(os.path.basename(p) for p in opened if p.endswith(".distcp")) == ["__0_0.distcp"]
    assert load_torch(tmp_path / "whole.pt")["layers.999.weight"][0, 0] == 999


def _rewrite(folder, change) -> None:
    """Apply ``change`` to the directory's Metadata (unpickled here by torch: a file we made)."""
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    change(metadata)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _location(metadata, fqn, row):
    return next(v for k, v in metadata.storage_data.items() if k.fqn == fqn and k.offset is not None
                and k.offset[0] == row)


def _chunks(metadata, fqn):
    return metadata.state_dict_metadata[fqn].chunks


def _set(obj, **values):
    for name, value in values.items():
        object.__setattr__(obj, name, value)


HOSTILE = {
    "offset past the file": (lambda m: _set(_location(m, "model.rows", 3), offset=1 << 40), "outside the file"),
    "negative length": (lambda m: _set(_location(m, "model.rows", 3), length=-5), "outside the file"),
    "path with ..": (lambda m: _set(_location(m, "model.rows", 3), relative_path="../../etc/passwd"),
                     "outside the checkpoint directory"),
    "absolute path": (lambda m: _set(_location(m, "model.rows", 0), relative_path="/etc/passwd"),
                      "outside the checkpoint directory"),
    "missing file": (lambda m: _set(_location(m, "model.rows", 0), relative_path="__9_0.distcp"),
                     "the checkpoint is incomplete"),
    "negative size": (lambda m: _chunks(m, "model.rows").__setitem__(
        0, ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([-3, 7]))), "outside the shape"),
    "chunk past the shape": (lambda m: _chunks(m, "model.rows").__setitem__(
        3, ChunkStorageMetadata(torch.Size([9, 0]), torch.Size([4, 7]))), "outside the shape"),
    "overlapping chunks": (lambda m: _chunks(m, "model.rows").__setitem__(
        1, ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([3, 7]))), "overlap"),
    "missing chunk": (lambda m: _chunks(m, "model.rows").pop(), "cover 63 of its 70 elements"),
    "chunk without a location": (lambda m: m.storage_data.pop(next(k for k in m.storage_data if k.fqn == "model.grid")),
                                 "no storage location for 'model.grid'"),
    "chunk holding another shape": (lambda m: _set(_location(m, "model.rows", 9),
                                                   **vars(_location(m, "model.rows", 6))),
                                    "should hold float32 values of shape [1, 7]"),
    "not an archive": (lambda m: _set(_location(m, "model.rows", 3), offset=7), "not a torch.save archive"),
    "compressed": (lambda m: _set(_location(m, "model.rows", 3), transform_descriptors=["zstd"]),
                   "stored transformed"),
}


@pytest.mark.parametrize("damage", list(HOSTILE))
def test_hostile_metadata_is_a_corrupt_checkpoint(tmp_path, four_ranks_dir, damage):
    import shutil

    folder = tmp_path / "dcp"
    shutil.copytree(four_ranks_dir, folder)
    change, message = HOSTILE[damage]
    _rewrite(folder, change)
    for command in (["inspect", "--no-stats", folder], ["convert", folder, "-o", tmp_path / "out.pt"]):
        result = run(*command)
        assert result.exit_code == 2 and message in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.pt").exists()


def test_dcp_output_has_dcp_saves_metadata_and_is_reproducible(tmp_path, training_pt):
    """Our .metadata lays the checkpoint out as dcp.save does for one process; two writes are identical."""
    ours, again, theirs = tmp_path / "ours", tmp_path / "again", tmp_path / "theirs"
    assert run("convert", training_pt, "-o", ours, "--format", "dcp").exit_code == 0
    assert run("convert", training_pt, "-o", again, "--format", "dcp").exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(load_torch(training_pt), checkpoint_id=str(theirs))
    mine, reference = (pickle.loads((folder / ".metadata").read_bytes()) for folder in (ours, theirs))
    assert mine.state_dict_metadata == reference.state_dict_metadata and mine.planner_data == reference.planner_data
    assert set(mine.storage_data) == set(reference.storage_data)
    assert all((ours / n).read_bytes() == (again / n).read_bytes() for n in (".metadata", "__0_0.distcp"))
    assert_same_file(torch_reading(ours, tmp_path / "a.pt"), torch_reading(theirs, tmp_path / "b.pt"))


def test_dcp_writer_holds_one_computed_tensor_at_a_time(tmp_path):
    """Values computed on demand (a lazy change, a reassembled chunk) are made one by one and let go."""
    import weakref

    import paramsurgeon as ps
    from paramsurgeon import formats
    from paramsurgeon.checkpoint import Storage, Tensor

    torch.save({f"w{i}": torch.zeros(8, 8) for i in range(20)}, tmp_path / "in.pt")
    ckpt, alive, most = ps.load(str(tmp_path / "in.pt")), set(), [0]

    def compute(i):
        values = torch.full((8, 8), float(i))
        alive.add(id(values))
        weakref.finalize(values, alive.discard, id(values))
        most[0] = max(most[0], len(alive))
        return values

    for i, (name, tensor) in enumerate(list(ckpt.tensors.items())):
        ckpt[name] = Tensor(Storage(tensor.nbytes, loader=lambda i=i: compute(i)), tensor.dtype, tensor.shape)
    formats.save(ckpt, formats.resolve_target(ckpt, str(tmp_path / "out"), "dcp", False))
    assert most[0] == 1
    written = torch_reading(tmp_path / "out", tmp_path / "back.pt")
    assert all(torch.equal(written[f"w{i}"], torch.full((8, 8), float(i))) for i in range(20))


@pytest.mark.parametrize("source_format", ["pt", "dcp"])
def test_values_changed_tensor_by_tensor_are_right_in_a_dcp_output(tmp_path, training_pt, source_format):
    """init --all and scale --all into DCP (each value computed when written): dcp.load reads what
    torch computes, and the rest of the file (optimizer state, epoch) is untouched."""
    plain = tmp_path / "in-dcp"  # as DCP stores the file unchanged (its optimizer state keys become strings)
    assert run("convert", training_pt, "-o", plain, "--format", "dcp").exit_code == 0
    source = plain if source_format == "dcp" else training_pt
    original, reference = load_torch(training_pt), torch_reading(plain, tmp_path / "plain.pt")
    model = original["state_dict"]
    for args, expected in ((["init", "--const", "3"], {k: torch.full_like(v, 3) for k, v in model.items()}),
                           (["scale", "--by", "-2"], {k: v * -2 for k, v in model.items()})):
        out = tmp_path / f"{args[0]}-out"
        result = run(args[0], source, "--all", *args[1:], "-o", out, "--format", "dcp")
        assert result.exit_code == 0, result.stderr
        state = {"state_dict": {k: torch.empty_like(v) for k, v in model.items()}, "epoch": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(out), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        assert state["epoch"] == 7
        assert_same_state(state["state_dict"], expected)
        whole = torch_reading(out, tmp_path / f"{args[0]}.pt")
        assert_same_file(whole["optimizer"], reference["optimizer"])
        assert whole["hyper_parameters"] == original["hyper_parameters"] and list(whole) == list(reference)
