"""The Makefile's own checks (make demo / make test create the venv)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, require_tool


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
