"""The README's GitHub Actions job: its shell steps run here as written."""

import os
import re
import subprocess
import sys

import yaml
from helpers import readme_text, workspace


def workflow_steps() -> list[str]:
    job = yaml.safe_load(re.search(r"```yaml\n(.*?)```", readme_text(), re.S).group(1))
    return [step["run"] for step in job["jobs"]["gate"]["steps"] if "run" in step and "pip install" not in step["run"]]


def test_ci_example_runs_as_written(tmp_path):
    cwd = workspace(tmp_path)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    outputs = []
    for script in workflow_steps():
        result = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, (script, result.stdout, result.stderr)
        outputs.append(result.stdout)
    assert len(outputs) == 2 and "every rule holds" in outputs[0]
    assert "2 tensors changed: layer4.0.bn2.weight, layer4.1.bn2.weight" in outputs[1]


def test_the_gate_fails_on_a_bad_checkpoint(tmp_path):
    cwd = workspace(tmp_path)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    gate = workflow_steps()[0].replace("samples/resnet.pt", "broken.pt")
    subprocess.run(["paramsurgeon", "scale", "samples/resnet.pt", "-p", "fc.bias", "--by", "1e39", "--allow-overflow",
                    "-o", "broken.pt"],
                   cwd=cwd, env=env, check=True, capture_output=True)
    result = subprocess.run(["bash", "-e", "-c", gate], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "FAIL finite" in result.stdout
