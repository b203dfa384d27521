"""The safetensors header of a large file is checked in bulk, and parsed without a duplicate-key
hook when counting shows no key was given twice: every disguise of a duplicate key is still
refused, headers that the count cannot vouch for still read, and a wrong entry among
thousands is named. Ground truth: the safetensors library's own reading, and headers written
here by hand."""

import json
import struct

import numpy as np
import pytest
from helpers import run
from safetensors import safe_open
from safetensors.numpy import save_file

COUNT = 2000


def write(path, header: str, data: bytes) -> None:
    raw = header.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def entries(names: list[str], dtype: str = "F32", size: int = 8) -> tuple[list[str], bytes]:
    """Valid entries (JSON text each) for ``names``, 2 float32 values each, in file order."""
    texts = [f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":[2],"data_offsets":[{i * size},{(i + 1) * size}]}}'
             for i, name in enumerate(names)]
    return texts, np.arange(2 * len(names), dtype=np.float32).tobytes()


def refused(path, *words):
    result = run("inspect", "--no-stats", path)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.parametrize("case", ["same entry twice", "a key inside an entry twice", "in metadata",
                                  "beside a name with a colon", "beside an escaped colon", "last of many"])
def test_a_key_given_twice_is_refused_in_every_disguise(tmp_path, case):
    names = [f"layers.{i}.weight" for i in range(COUNT)]
    texts, data = entries(names)
    metadata = '"__metadata__":{"format":"pt"},'
    if case == "same entry twice":
        texts.insert(COUNT // 2, texts[COUNT // 2])  # same offsets: the buffer is still covered
    elif case == "a key inside an entry twice":
        texts[7] = texts[7].replace('"dtype":"F32"', '"dtype":"F16","dtype":"F32"')
    elif case == "in metadata":
        metadata = '"__metadata__":{"format":"pt","format":"np"},'
    elif case.startswith("beside"):  # one pair fewer kept, one colon more in a kept string
        texts[7] = texts[7].replace('"dtype":"F32"', '"dtype":"F16","dtype":"F32"')
        colon = ":" if case == "beside a name with a colon" else "\\u003a"  # the escape: a colon the text hides
        texts[0] = texts[0].replace('"layers.0.weight"', f'"layers{colon}0.weight"')
    else:
        texts.append(texts[-1])
    path = tmp_path / "twice.safetensors"
    write(path, "{" + metadata + ",".join(texts) + "}", data)
    refused(path, "duplicate key")


def test_headers_the_count_cannot_vouch_for_still_read(tmp_path):
    """Colons and escapes in names and metadata, an extra key in an entry: read as safetensors reads them."""
    names = ["plain", "with:colon", "esc\u00e9aped", 'quote"d', "a\\b", "colon\u003aescaped"] \
        + [f"n.{i}" for i in range(COUNT)]
    values = {name: np.full(3, i, dtype=np.float32) for i, name in enumerate(names)}
    path = tmp_path / "odd.safetensors"
    save_file(values, str(path), metadata={"url": "https://example.org/a:b", "format": "pt"})
    header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + header_length])
    header["n.5"]["extra"] = [1, 2]  # unknown keys are ignored, as safetensors ignores them
    escaped = tmp_path / "escaped.safetensors"
    write(escaped, json.dumps(header), path.read_bytes()[8 + header_length:])  # ensure_ascii: \u escapes
    for file in (path, escaped):
        with safe_open(str(file), "np") as f:
            expected = {name: f.get_slice(name).get_shape() for name in f.keys()}
        result = run("inspect", "--no-stats", "--json", file)
        assert result.exit_code == 0, result.stderr
        rows = json.loads(result.stdout)["tensors"]
        assert {r["name"]: r["shape"] for r in rows} == expected


@pytest.mark.parametrize("lie, words", [
    (lambda t: t.replace('"dtype":"F32"', '"dtype":"Q7"', 1), ["'layers.1234.weight'", "unknown dtype"]),
    (lambda t: t.replace('"shape":[2]', '"shape":[3]', 1), ["'layers.1234.weight'", "needs 12 bytes"]),
    (lambda t: t.replace('"shape":[2]', '"shape":[-2]', 1), ["'layers.1234.weight'", "malformed shape"]),
    (lambda t: t.replace('"shape":[2]', '"shape":[true]', 1), ["'layers.1234.weight'", "malformed shape"]),
    (lambda t: t.replace("[9872,9880]", "[9860,9868]", 1), ["'layers.1234.weight'", "overlaps"]),
    # JSON that orjson refuses and json takes: parsed again by json, and named
    (lambda t: t.replace('"shape":[2]', '"shape":[NaN]', 1), ["'layers.1234.weight'", "malformed shape"]),
    (lambda t: t.replace("[9872,9880]", f"[9872,{2**70}]", 1), ["'layers.1234.weight'", "needs 8 bytes"]),
])
def test_one_wrong_entry_among_thousands_is_named(tmp_path, lie, words):
    names = [f"layers.{i}.weight" for i in range(COUNT)]
    texts, data = entries(names)
    texts[1234] = lie(texts[1234])
    path = tmp_path / "lie.safetensors"
    write(path, "{" + ",".join(texts) + "}", data)
    refused(path, *words)


def test_entries_out_of_file_order_read(tmp_path):
    """A header whose offsets do not follow its order (any writer may lay the data out so)."""
    names = [f"t{i}" for i in range(COUNT)]
    texts, data = entries(names)
    path = tmp_path / "shuffled.safetensors"
    write(path, "{" + ",".join(texts[1::2] + texts[::2]) + "}", data)
    with safe_open(str(path), "np") as f:
        expected = {name: f.get_tensor(name) for name in f.keys()}
    out = tmp_path / "out.safetensors"
    assert run("zero", path, "-p", "t7", "-o", out).exit_code == 0
    with safe_open(str(out), "np") as f:
        got = {name: f.get_tensor(name) for name in f.keys()}
    assert not got.pop("t7").any() and expected.pop("t7").any()
    assert got.keys() == expected.keys() and all(np.array_equal(got[n], expected[n]) for n in got)


def test_a_tensor_named_like_the_metadata_key_is_refused(tmp_path):
    """safetensors keeps the file's metadata under '__metadata__': such a tensor would overwrite it."""
    import torch

    source = tmp_path / "odd.pt"
    torch.save({"__metadata__": torch.ones(2), "w": torch.zeros(3)}, source)
    out = tmp_path / "odd.safetensors"
    result = run("convert", source, "-o", out)
    assert result.exit_code == 2 and "'__metadata__'" in result.stderr and not out.exists()
    assert run("convert", source, "-o", tmp_path / "fine.pt").exit_code == 0


def test_tensors_read_in_bulk_are_the_tensors_their_init_makes(tmp_path):
    """The bulk reader fills tensors without ``__init__``: every slot of each is what
    ``Tensor(Storage(size, file=..., offset=...), dtype, shape)`` sets, and its values are safetensors'."""
    import paramsurgeon
    from paramsurgeon.checkpoint import Storage, Tensor
    from paramsurgeon.checkpoint.tensor import Tensor as TensorClass

    arrays = {f"layers.{i}.weight": np.arange(i * 6, dtype=np.float32).reshape(i, 2, 3) for i in range(COUNT)}
    arrays["scalar"] = np.array(3.5, dtype=np.float16)
    save_file(arrays, tmp_path / "many.safetensors")
    read = paramsurgeon.load(str(tmp_path / "many.safetensors")).tensors
    with safe_open(tmp_path / "many.safetensors", "np") as f:
        for name, tensor in read.items():
            made = Tensor(Storage(tensor.nbytes, file=tensor.storage.file, offset=tensor.storage.offset), tensor.dtype,
                          tuple(f.get_slice(name).get_shape()))
            assert {s: getattr(tensor, s) for s in TensorClass.__slots__ if s != "storage"} == \
                   {s: getattr(made, s) for s in TensorClass.__slots__ if s != "storage"}
            assert {s: getattr(tensor.storage, s) for s in Storage.__slots__} == \
                   {s: getattr(made.storage, s) for s in Storage.__slots__}
            assert bytes(tensor.contiguous_bytes()) == f.get_tensor(name).tobytes()
