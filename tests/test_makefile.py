"""The Makefile's own checks (make demo / make test create the venv)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO, outside_make, require_tool


def test_make_says_to_install_python3_venv_where_python_cannot_create_one(tmp_path):
    require_tool("make")
    shadow = tmp_path / "shadow"  # a Python without ensurepip, as Debian's without python3-venv
    shadow.mkdir()
    (shadow / "ensurepip.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n")
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "-C", str(REPO), "venv", f"PYTHON={sys.executable}", f"VENV={venv}"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(shadow)})
    assert result.returncode != 0
    assert "sudo apt-get install python3-venv" in result.stderr, result.stderr
    assert not venv.exists()  # stopped before creating a venv without pip


# What `nvidia-smi -L` prints on a host with two GPUs, and on one with a driver but no GPU.
TWO_GPUS = ('echo "GPU 0: NVIDIA H200 (UUID: GPU-5f2e0000-0000-0000-0000-000000000000)"\n'
            'echo "GPU 1: NVIDIA H200 (UUID: GPU-5f2e0000-0000-0000-0000-000000000001)"')
NO_GPU = 'echo "No devices were found"; exit 6'


def path_with_nvidia_smi(directory, script: str | None) -> str:
    """PATH without any real nvidia-smi; with ``script``, a stand-in nvidia-smi running it comes first."""
    path = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    if script is None:
        return os.pathsep.join(path)
    bindir = directory / "stand-in-bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
    (bindir / "nvidia-smi").chmod(0o755)
    return os.pathsep.join([str(bindir), *path])


def make_dry_run(directory, *args, nvidia_smi: str | None = None) -> list[str]:
    """The commands `make -n` would run in a copy of the Makefile without a venv, on a host whose
    `nvidia-smi` runs ``nvidia_smi`` (None: a host without nvidia-smi)."""
    require_tool("make")
    for name in ("Makefile", "requirements.txt", "requirements-gpu.txt"):
        shutil.copy(REPO / name, directory / name)
    result = subprocess.run(["make", "-n", *args], cwd=directory, capture_output=True, text=True, timeout=60,
                            env={**outside_make(), "PATH": path_with_nvidia_smi(directory, nvidia_smi)})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


GPU_VENV = [
    "python3 -m venv .venv",
    ".venv/bin/python -m pip install --quiet --upgrade pip",
    ".venv/bin/python -m pip uninstall --quiet --yes tensorflow-cpu tensorflow",
    "TORCH_CUDA=cu130 .venv/bin/python -m pip install --quiet -r requirements-gpu.txt",
    "touch .venv/bin/snakemake .venv/.requirements-gpu-cu130"]
CPU_VENV = [
    "python3 -m venv .venv",
    ".venv/bin/python -m pip install --quiet --upgrade pip",
    ".venv/bin/python -m pip install --quiet -r requirements.txt",
    "touch .venv/bin/snakemake"]


def test_make_venv_gpu_installs_cuda_builds_of_the_frameworks(tmp_path):
    commands = make_dry_run(tmp_path, "venv", "GPU=1")
    assert commands[0] == ('echo "make venv: GPU=1: installing the CUDA builds of torch (cu130) and TensorFlow, '
                           'requirements-gpu.txt"')
    assert commands[2:] == GPU_VENV  # [1]: the python3-venv check
    assert "TORCH_CUDA=cu126 .venv/bin/python -m pip install --quiet -r requirements-gpu.txt" in make_dry_run(
        tmp_path, "venv", "GPU=1", "TORCH_CUDA=cu126")
    assert make_dry_run(tmp_path, "venv", "GPU=1", nvidia_smi=NO_GPU)[2:] == GPU_VENV  # forced, whatever the host


def test_make_venv_without_gpu_is_the_cpu_route(tmp_path):
    for host in (None, NO_GPU):  # no nvidia-smi; nvidia-smi without a GPU
        assert make_dry_run(tmp_path, "venv", nvidia_smi=host)[1:] == CPU_VENV
    assert make_dry_run(tmp_path, "venv", "GPU=0", nvidia_smi=TWO_GPUS)[1:] == CPU_VENV  # the opt-out


def test_make_venv_where_nvidia_smi_lists_a_gpu_installs_the_cuda_builds_and_says_so(tmp_path):
    said = ('echo "make venv: nvidia-smi lists 2 GPU(s): installing the CUDA builds of torch (cu130) and '
            'TensorFlow, requirements-gpu.txt (GPU=0 for the CPU ones)"')
    commands = make_dry_run(tmp_path, "venv", nvidia_smi=TWO_GPUS)
    assert commands[0] == said and commands[2:] == GPU_VENV
    for target in ("demo", "test"):  # both make the venv first
        commands = make_dry_run(tmp_path, target, nvidia_smi=TWO_GPUS)
        assert commands[0] == said and commands[2:7] == GPU_VENV, commands


def requirement_lines(name: str) -> dict[str, str]:
    lines = [line for line in (REPO / name).read_text().splitlines() if line and not line.startswith("#")]
    return {re.split(r"[\[=;]", line, maxsplit=1)[0]: line for line in lines}


def test_gpu_requirements_are_the_cpu_ones_with_cuda_frameworks():
    cpu, gpu = requirement_lines("requirements.txt"), requirement_lines("requirements-gpu.txt")
    assert gpu.pop("tensorflow") == 'tensorflow[and-cuda]==2.21.0 ; platform_machine == "x86_64"'
    assert cpu.pop("tensorflow-cpu") == 'tensorflow-cpu==2.21.0 ; platform_machine == "x86_64"'
    assert gpu.pop("--extra-index-url https://download.pytorch.org/whl/${TORCH_CUDA}") is not None
    for name in ("torch", "torchvision"):  # the same version, the wheel of TORCH_CUDA's variant
        assert gpu.pop(name) == cpu.pop(name) + "+${TORCH_CUDA}"
    assert gpu == cpu
