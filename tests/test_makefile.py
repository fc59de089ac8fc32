"""The Makefile's own checks (make demo / make test create the venv)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

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


def make_dry_run(directory, *args) -> list[str]:
    """The commands `make -n` would run in a copy of the Makefile without a venv."""
    require_tool("make")
    for name in ("Makefile", "requirements.txt", "requirements-gpu.txt"):
        shutil.copy(REPO / name, directory / name)
    result = subprocess.run(["make", "-n", *args], cwd=directory, capture_output=True, text=True, timeout=60,
                            env=outside_make())
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_make_venv_gpu_installs_cuda_builds_of_the_frameworks(tmp_path):
    commands = make_dry_run(tmp_path, "venv", "GPU=1")
    assert commands[1:] == [
        "python3 -m venv .venv",
        ".venv/bin/python -m pip install --quiet --upgrade pip",
        ".venv/bin/python -m pip uninstall --quiet --yes tensorflow-cpu tensorflow",
        "TORCH_CUDA=cu130 .venv/bin/python -m pip install --quiet -r requirements-gpu.txt",
        "touch .venv/bin/snakemake .venv/.requirements-gpu-cu130"]
    assert "TORCH_CUDA=cu126 .venv/bin/python -m pip install --quiet -r requirements-gpu.txt" in make_dry_run(
        tmp_path, "venv", "GPU=1", "TORCH_CUDA=cu126")


def test_make_venv_without_gpu_is_the_cpu_route(tmp_path):
    assert make_dry_run(tmp_path, "venv")[1:] == [
        "python3 -m venv .venv",
        ".venv/bin/python -m pip install --quiet --upgrade pip",
        ".venv/bin/python -m pip install --quiet -r requirements.txt",
        "touch .venv/bin/snakemake"]


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
