"""A large file replaced by a write is freed by a process of its own, a little later, so that
freeing its blocks and cached pages does not delay the writer; the target holds the new file
at once, and nothing is left beside it."""

import os
import subprocess
import sys
import time

from helpers import run

WRITER = """
import os, sys
from paramsurgeon.formats import atomic
with atomic.atomic_file(sys.argv[1]) as sink:
    sink.write(b"new")
print("written", flush=True)
sys.stdin.read()  # stay alive until the test has looked
"""


def holding(pid: int, inode: int) -> bool:
    """Whether process ``pid`` has a descriptor on the file ``inode`` (device, inode number)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # ended, or not ours to look at
        return False
    for name in names:
        try:
            status = os.stat(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if (status.st_dev, status.st_ino) == inode:
            return True
    return False


def holders(inode: int) -> list[int]:
    """Every process that has a descriptor on the file ``inode``."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and holding(int(p), inode)]


def test_replaced_large_file_is_freed_by_another_process(tmp_path):
    target = tmp_path / "out.bin"
    with open(target, "wb") as f:
        f.truncate(100 << 20)  # sparse: large by size, cheap to make
    status = os.stat(target)
    inode = status.st_dev, status.st_ino
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "written\n"
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    held = holders(inode)  # the old file, held by one process alone: not the writer, nor a child of it
    assert len(held) == 1 and held[0] != writer.pid
    with open(f"/proc/{held[0]}/stat") as f:
        assert int(f.read().rpartition(")")[2].split()[1]) != writer.pid
    writer.communicate("")
    deadline = time.monotonic() + 10
    while holding(held[0], inode) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not holding(held[0], inode)  # and let go


def test_small_replaced_file_is_freed_in_place(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    status = os.stat(target)
    inode = status.st_dev, status.st_ino
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "written\n"
    assert holders(inode) == []  # freed at once, by the writer
    writer.communicate("")
    assert writer.returncode == 0 and target.read_bytes() == b"new"


def test_zero_over_an_existing_output_replaces_it_whole(tmp_path, large):
    out = tmp_path / "out.safetensors"
    assert run("zero", large / "large.safetensors", "-p", "blocks.3.weight", "-o", out).exit_code == 0
    first = os.stat(out).st_ino
    assert run("zero", large / "large.safetensors", "-p", "blocks.4.weight", "-o", out).exit_code == 0
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert f.get_tensor("blocks.4.weight").abs().sum().item() == 0
        assert f.get_tensor("blocks.3.weight").unique().tolist() == [3.0]
    assert os.stat(out).st_ino != first and os.listdir(tmp_path) == ["out.safetensors"]
