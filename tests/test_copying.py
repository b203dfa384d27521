"""Unchanged tensors are copied by the kernel in whole page-cache folios: adjacent spans in one
copy_file_range call, each call after a span's first starting at a multiple of 64 KiB in the
input, and the output laid out at the input's offsets modulo 64 KiB. Checked on the files
themselves (offsets read with zipfile and the safetensors header) and against torch."""

import json
import os
import struct
import zipfile
import zlib

import pytest
import torch
from helpers import register_input, run
from safetensors.torch import load_file

ALIGN = 64 << 10


def safetensors_offsets(path) -> dict[str, int]:
    """Each tensor's absolute offset in the file, from its header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: 8 + n + entry["data_offsets"][0] for name, entry in header.items()}


def zip_payloads(path) -> dict[int, int]:
    """CRC of each data record -> its payload offset (the fixture's tensors hold distinct values; a
    zeroed one has the CRC of blocks.0, which is left out)."""
    payloads = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset + 26)
                name_length, extra_length = struct.unpack("<HH", f.read(4))
                payloads[info.CRC] = info.header_offset + 30 + name_length + extra_length
    payloads.pop(zlib.crc32(bytes(4 << 20)))
    return payloads


def expected(zeroed: str) -> dict[str, torch.Tensor]:
    """The fixture's values (blocks.i.weight is all i), one tensor zeroed."""
    state = {f"blocks.{i}.weight": torch.full((1024, 1024), float(i)) for i in range(96)}
    state[zeroed] = torch.zeros(1024, 1024)
    return state


def test_safetensors_output_keeps_the_input_offsets_modulo_64k(request, tmp_path, large):
    source = register_input(request, large / "large.safetensors")
    out = tmp_path / "out.safetensors"
    assert run("zero", source, "-p", "blocks.3.weight", "-o", out).exit_code == 0
    before, after = safetensors_offsets(source), safetensors_offsets(out)
    assert before[next(iter(before))] % ALIGN != 0  # safetensors' own header does not align its data
    assert {name: after[name] % ALIGN for name in before} == {name: before[name] % ALIGN for name in before}
    assert os.path.getsize(out) - os.path.getsize(source) <= ALIGN  # padding: less than 64 KiB of spaces
    state = load_file(out)
    want = expected("blocks.3.weight")
    assert sorted(state) == sorted(want) and all(torch.equal(state[n], want[n]) for n in want)


def test_torch_output_keeps_each_copied_payload_at_its_offset_modulo_64k(request, tmp_path, large):
    source = register_input(request, large / "large.pt")
    out = tmp_path / "renamed-archive.pt"  # another archive name: every record header changes length
    assert run("zero", source, "-p", "blocks.3.weight", "-o", out).exit_code == 0
    before, after = zip_payloads(source), zip_payloads(out)
    copied = set(before) & set(after)
    assert len(copied) == 94  # 96 records: blocks.3 changed, the two all-zero ones left out
    assert any(before[crc] % ALIGN for crc in copied)  # torch aligns its payloads to 64 bytes only
    assert {crc: after[crc] % ALIGN for crc in copied} == {crc: before[crc] % ALIGN for crc in copied}
    assert all(offset % 64 == 0 for offset in after.values())  # torch's own alignment holds
    assert os.path.getsize(out) < os.path.getsize(source) * (1 + 1 / 64)
    want = expected("blocks.3.weight")
    for mmap in (False, True):
        state = torch.load(out, weights_only=True, mmap=mmap)
        assert list(state) == list(want) and all(torch.equal(state[n], want[n]) for n in want)


def test_small_tensors_are_not_padded(tmp_path, resnet_pt):
    """Padding a payload to 64 KiB costs more than it saves when the payload is small."""
    out = tmp_path / "out.pt"
    assert run("zero", resnet_pt, "-p", "fc.bias", "-o", out).exit_code == 0
    assert os.path.getsize(out) < os.path.getsize(resnet_pt) * 1.02


@pytest.mark.parametrize("source", ["large.safetensors", "large.pt"])
def test_unchanged_spans_are_copied_in_few_aligned_calls(request, tmp_path, large, monkeypatch, source):
    from paramsurgeon.formats import files

    register_input(request, large / source)
    calls = []
    real = os.copy_file_range

    def spy(src, dst, count, offset_src=None, offset_dst=None):
        calls.append((offset_src, os.lseek(dst, 0, os.SEEK_CUR), count))
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(files.os, "copy_file_range", spy)
    out = tmp_path / ("out" + os.path.splitext(source)[1])
    assert run("zero", large / source, "-p", "blocks.3.weight", "-o", out).exit_code == 0
    assert sum(count for _, _, count in calls) == 95 * (4 << 20)
    assert all((write - read) % ALIGN == 0 for read, write, _ in calls)
    heads = [(read, count) for read, _, count in calls if read % ALIGN]
    assert all(count < ALIGN for _, count in heads)  # only a span's head is misaligned, up to 64 KiB
    if source.endswith(".safetensors"):  # 95 adjacent tensors: a few calls, not 95
        assert len(calls) <= 8
