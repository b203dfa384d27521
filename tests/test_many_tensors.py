"""A checkpoint of 100,000 small tensors (the per-tensor cost of every stage shows at this count):
every name listed, one tensor zeroed, a round trip through a torch zip; checked with the safetensors
library itself. Counted, not timed (speed is the benchmark's job)."""

import zipfile

import numpy as np
import pytest
from helpers import register_input, run
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

COUNT = 100_000


@pytest.fixture(scope="module")
def many_dir(tmp_path_factory):
    """100,000 tensors: a float32 weight of 3 values and an int64 counter per module, in blocks."""
    folder = tmp_path_factory.mktemp("many")
    values = np.arange(COUNT * 3, dtype=np.float32).reshape(COUNT, 3) - COUNT
    state = {}
    for i in range(COUNT // 2):
        state[f"blocks.{i // 100}.layers.{i % 100}.weight"] = values[i]
        state[f"blocks.{i // 100}.layers.{i % 100}.steps"] = np.array([i], dtype=np.int64)
    save_file(state, str(folder / "many.safetensors"))
    return folder


@pytest.fixture
def many(request, many_dir):
    return register_input(request, many_dir / "many.safetensors")


def test_every_name_is_listed_once_with_its_shape(many):
    with safe_open(str(many), "np") as f:
        expected = {name: f.get_slice(name).get_shape() for name in f.keys()}
    result = run("inspect", "--no-stats", many)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(f"{COUNT:,} tensors, 150,000 parameters + 50,000 in buffers, 1.0 MB")
    rows = [line.split() for line in lines[3:3 + COUNT]]
    assert len(rows) == COUNT and {r[0] for r in rows} == set(expected)
    assert all(r[2] == "x".join(map(str, expected[r[0]])) for r in rows)
    assert all(r[1] == "unknown" for r in rows)  # a lone 1-D weight under 'layers.N' is no known layer


def same_arrays(a: dict, b: dict) -> bool:
    """Same names in the same order, dtypes, shapes and bytes (one comparison over all of them)."""
    return list(a) == list(b) and all(x.dtype == y.dtype and x.shape == y.shape for x, y in zip(a.values(), b.values())) \
        and b"".join(x.tobytes() for x in a.values()) == b"".join(y.tobytes() for y in b.values())


def test_zero_one_tensor_keeps_the_other_99999_bit_identical(tmp_path, many):
    out = tmp_path / "zeroed.safetensors"
    result = run("zero", many, "-p", "blocks.321.layers.7.weight", "-o", out)
    assert result.exit_code == 0, result.stderr
    before, after = load_file(str(many)), load_file(str(out))
    assert np.array_equal(after.pop("blocks.321.layers.7.weight"), np.zeros(3, dtype=np.float32))
    assert before.pop("blocks.321.layers.7.weight").any()
    assert same_arrays(after, before)


def test_round_trip_through_torch_is_bit_identical(tmp_path, many):
    """safetensors -> torch zip -> safetensors, read back by safetensors (torch.load of 100,000
    records alone takes many seconds; small torch files are loaded by torch elsewhere)."""
    pt, back = tmp_path / "many.pt", tmp_path / "back.safetensors"
    assert run("convert", many, "-o", pt).exit_code == 0
    with zipfile.ZipFile(pt) as archive:
        records = [n for n in archive.namelist() if "/data/" in n]
    assert len(records) == COUNT  # one storage record per tensor, as torch.save writes them
    assert run("convert", pt, "-o", back).exit_code == 0
    assert same_arrays(load_file(str(back)), load_file(str(many)))
