"""Broken files, by the hundred: truncations at every structural boundary, bit flips, lying
safetensors headers, damaged zip records and shard indexes. Every case must end in success
or in exit 2 with one clear line: no traceback, no internal error, no output file, no hang.

The counts are fixed (hypothesis runs derandomised), each test's is checked after it runs, and the
README states their sum.
"""

import io
import json
import os
import random
import signal
import struct
import zipfile
from collections import Counter

import pytest
import torch
from helpers import readme_text, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

CASES: Counter = Counter()
EXPECTED = {"truncation": 109, "bit flip": 400, "lying header": 300, "damaged zip": 8, "shard index": 6}
KIND = {"test_truncations_at_every_boundary": "truncation", "test_bit_flips": "bit flip",
        "test_lying_safetensors_headers": "lying header", "test_zip_files_with_missing_or_damaged_records": "damaged zip",
        "test_shard_indexes_that_lie": "shard index"}


@pytest.fixture(autouse=True)
def every_case_ran(request):
    """A test that checks broken inputs ran exactly its EXPECTED number of them, alone or with the others.

    Counted here, after the test, so that the hypothesis tests keep their source (it seeds their examples).
    """
    kind = KIND.get(request.node.originalname)
    before = CASES[kind]
    yield
    if kind is not None:
        assert CASES[kind] - before == EXPECTED[kind], kind


def corpus(folder) -> dict[str, bytes]:
    """Small valid checkpoints with everything a reader walks: views, ints, ties, nested extras."""
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    state = {"w": base, "w_t": base.t(), "b": torch.randn(4).half(), "n": torch.tensor(3),
             "tied": base, "flags": torch.tensor([True, False])}
    files = {}
    torch.save({"state_dict": state, "epoch": 2, "opt": {"state": {0: {"m": torch.ones(2)}}, "param_groups": []}},
               folder / "nested.pt")
    torch.save(state, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in state.items() if k not in ("tied", "w_t")}, folder / "plain.safetensors",
              metadata={"format": "pt"})
    for name in ("nested.pt", "legacy.pt", "plain.safetensors"):
        files[name] = (folder / name).read_bytes()
    return files


def boundaries(name: str, data: bytes) -> list[int]:
    """Offsets where a structure of the format begins or ends."""
    points = {0, 1, 4, 8, len(data) - 1, len(data) // 2}
    if name.endswith(".safetensors"):
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        points |= {8 + n // 2, 8 + n - 1, 8 + n}
        for entry in header.values():
            if "data_offsets" in entry:
                points |= {8 + n + entry["data_offsets"][0], 8 + n + entry["data_offsets"][1] - 1}
    elif data[:2] == b"PK":
        archive = zipfile.ZipFile(io.BytesIO(data))
        for info in archive.infolist():
            points |= {info.header_offset, info.header_offset + 30, info.header_offset + 64}
        end = data.rfind(b"PK\x05\x06")
        points |= {data.find(b"PK\x01\x02"), data.rfind(b"PK\x06\x06"), data.rfind(b"PK\x06\x07"), end, end + 10}
    else:
        points |= {i + 1 for i, byte in enumerate(data[:400]) if byte == ord(".")}  # pickle STOP opcodes
        points |= set(range(0, len(data), max(1, len(data) // 40)))
    return sorted(p for p in points if 0 <= p < len(data))


def check(path, tmp_path, kind: str) -> None:
    """Run the readers on ``path``; success or one clean error line, never a crash."""
    CASES[kind] += 1
    out = tmp_path / "out.safetensors"
    signal.alarm(30)  # a hang fails the test instead of stalling CI
    try:
        converted = run("convert", path, "-o", out, "--tensors-only")
        inspected = run("inspect", path, "--json") if converted.exit_code == 0 else converted
    finally:
        signal.alarm(0)
    for result in (converted, inspected):
        assert result.exit_code in (0, 2), (kind, result.stderr)
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("paramsurgeon: error: "), (kind, result.stderr)
            assert "internal error" not in lines[0], (kind, lines[0])
    if converted.exit_code == 2:
        assert not out.exists()
    else:
        out.unlink()
    assert not [p for p in os.listdir(tmp_path) if ".paramsurgeon-" in p]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return corpus(tmp_path_factory.mktemp("corpus"))


def test_truncations_at_every_boundary(tmp_path, files):
    for name, data in files.items():
        for cut in boundaries(name, data):
            path = tmp_path / f"cut-{name}"
            path.write_bytes(data[:cut])
            check(path, tmp_path, "truncation")


@settings(max_examples=400, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(choice=st.integers(0, 2), position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_bit_flips(tmp_path, files, choice, position, bit):
    name = sorted(files)[choice]
    data = bytearray(files[name])
    data[int(position * len(data))] ^= 1 << bit
    path = tmp_path / f"flip-{name}"
    path.write_bytes(bytes(data))
    check(path, tmp_path, "bit flip")


DTYPES = ["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "Q4", "", "F32 "]
entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=4), st.just("x"), st.lists(st.just(2**40), max_size=2)),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 200), min_size=2, max_size=2), st.lists(st.integers(0, 64), max_size=3),
                              st.just([2**62, 2**63])),
})


@settings(max_examples=300, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tensors=st.dictionaries(st.text(min_size=1, max_size=6), entry, max_size=4),
       metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers()),
                                                     max_size=2)),
       payload=st.integers(0, 256), claim=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_lying_safetensors_headers(tmp_path, tensors, metadata, payload, claim):
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    length = len(text) if claim is None else claim
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", length) + text + os.urandom(payload))
    check(path, tmp_path, "lying header")


def rezip(data: bytes, drop: str | None = None, corrupt: str | None = None, compress: bool = False) -> bytes:
    """The torch zip ``data`` rewritten by Python's zipfile, one record dropped, damaged or compressed."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if drop and info.filename.endswith(drop):
                continue
            body = source.read(info)
            target.writestr(info.filename, body)
    result = bytearray(out.getvalue())
    if corrupt:
        info = zipfile.ZipFile(io.BytesIO(bytes(result))).getinfo(next(n for n in source.namelist() if n.endswith(corrupt)))
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        result[start + 2] ^= 0xFF
    return bytes(result)


def test_zip_files_with_missing_or_damaged_records(tmp_path, files):
    data = files["nested.pt"]
    variants = [rezip(data), rezip(data, drop="data/0"), rezip(data, drop="data.pkl"), rezip(data, drop="version"),
                rezip(data, corrupt="data.pkl"), rezip(data, corrupt="data/1"), rezip(data, compress=True),
                data.replace(b"data/0", b"data/9", 1)]
    for number, variant in enumerate(variants):
        path = tmp_path / f"zip-{number}.pt"
        path.write_bytes(variant)
        check(path, tmp_path, "damaged zip")
    rezipped = tmp_path / "rezipped.pt"
    rezipped.write_bytes(variants[0])
    assert run("inspect", rezipped, "--no-stats").exit_code == 0  # a valid zip from another writer reads


def test_shard_indexes_that_lie(tmp_path, files):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(files["plain.safetensors"])
    names = ["w", "b", "n", "flags"]
    indexes = [
        {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names} | {"x": "model-00002-of-00002.safetensors"}},
        {"weight_map": {n: "../outside.safetensors" for n in names}},
        {"weight_map": {n: "/etc/passwd" for n in names}},
        {"weight_map": ["w"]},
        {"weight_map": {n: 3 for n in names}},
        {"weight_map": {"w": "model-00001-of-00002.safetensors"}},
    ]
    for number, index in enumerate(indexes):
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        check(folder, tmp_path, "shard index")


def test_the_readme_states_the_number_of_cases():
    assert sorted(KIND.values()) == sorted(EXPECTED)
    assert f"{sum(EXPECTED.values()):,} broken inputs" in readme_text()


def with_pickle_tail(path, tail: bytes, out) -> None:
    """``path`` (a torch zip of {'w': tensor, 'x': []}) with the empty list replaced by ``tail``."""
    source = zipfile.ZipFile(path)
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            body = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert body.endswith(b"]q\x0fu.")  # ... 'x': [] (memoised as 15) }
                body = body[: -len(b"]q\x0fu.")] + tail + b"u."
            target.writestr(info.filename, body)


def test_pickle_nesting_and_cycle_bombs(tmp_path):
    """Deep nesting (100,000 levels: the unpickler does not recurse, and neither may we) and cycles."""
    base = tmp_path / "base.pt"
    torch.save({"w": torch.ones(2), "x": []}, base)
    depth = 100_000
    bombs = {"deep": b"]" * depth + b"a" * (depth - 1),  # a list in a list in a list ...
             "cycle": b"]q\x0fh\x0fa"}  # a list that contains itself
    for name, tail in bombs.items():
        path = tmp_path / f"{name}.pt"
        with_pickle_tail(base, tail, path)
        for args in (["inspect", path], ["convert", path, "-o", tmp_path / f"{name}-out.pt"]):
            result = run(*args)
            assert result.exit_code in (0, 2), (name, result.stderr)
            assert "internal error" not in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)


def test_random_bytes_never_crash(tmp_path):
    rng = random.Random(7)
    for number in range(20):
        prefix = rng.choice([b"", b"PK\x03\x04", b"\x80\x02", b"{\"weight_map\":", struct.pack("<Q", 40) + b"{"])
        path = tmp_path / f"noise{number}"
        path.write_bytes(prefix + rng.randbytes(rng.randint(0, 3000)))
        result = run("inspect", path)
        assert result.exit_code == 2 and "internal error" not in result.stderr, result.stderr
