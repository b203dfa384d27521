"""The README's library examples (Python blocks that import paramsurgeon) run, and each
``print(...)  # text`` prints that text."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if "import paramsurgeon" in b]


def test_library_examples_print_what_they_say(tmp_path):
    blocks = python_blocks()
    assert blocks
    os.symlink(os.path.join(ROOT, "samples"), tmp_path / "samples")
    for code in blocks:
        expected = re.findall(r"^print\(.*\)\s+# (.*)$", code, re.M)
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == expected
