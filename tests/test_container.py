"""The Docker image's files (no Docker engine here: lint and exercise what can run) and shell scripts."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT

BIN = Path(sys.executable).parent


def test_dockerfile_lints_clean_and_pins_the_tested_torch():
    res = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "info", "Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    version, cuda = torch.__version__.split("+")[0], torch.version.cuda
    assert base == f"pytorch/pytorch:{version}-cuda{cuda}-cudnn9-runtime", base
    assert re.search(r"^USER 1000", text, re.M)  # not root
    pins = (ROOT / "docker" / "requirements.txt").read_text()
    assert all("==" in line for line in pins.splitlines() if line and not line.startswith("#"))
    # every runtime requirement of setup.py is pinned in the image (torch/torchvision: the base image)
    required = re.findall(r'^\s*"([A-Za-z0-9_-]+)[><=]', (ROOT / "setup.py").read_text().split("setup(")[0], re.M)
    pinned = {line.split("==")[0] for line in pins.splitlines() if "==" in line}
    assert len(required) > 10 and set(required) - {"torch", "torchvision"} <= pinned, set(required) - pinned


def test_dockerignore_keeps_data_runs_and_weights_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"data", "runs", "pretrained", ".venv", ".git", "*.safetensors", "*.npz"} <= ignored


@pytest.mark.integration
def test_entrypoint_forwards_to_train_or_runs_the_command():
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    helped = subprocess.run(["bash", "docker/entrypoint.sh", "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert helped.returncode == 0 and "--print-run-dir" in helped.stdout and "--config" in helped.stdout
    other = subprocess.run(["bash", "docker/entrypoint.sh", "python", "-c", "print('as given')"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert other.returncode == 0 and other.stdout == "as given\n"
    bad = subprocess.run(["bash", "docker/entrypoint.sh", "--config", "configs/nope.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "configs/nope.yaml" in bad.stderr


def test_shell_scripts_pass_shellcheck():
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "launch" / "slurm").iterdir()) + ["docker/entrypoint.sh"]
    res = subprocess.run([str(BIN / "shellcheck"), "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    assert "launch/slurm/train.sbatch" in scripts and "launch/slurm/sweep.sh" in scripts
