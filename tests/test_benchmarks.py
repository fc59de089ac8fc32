"""benchmarks/gpu.sh rehearsed on the CPU in a tiny setting, as it runs on the lent GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from conftest import REPO


def tiny_imagefolder_archive(path: Path, train_per_class: int = 6, test_per_class: int = 3) -> Path:
    """A CIFAR-10-like .tar.xz of train/<class>/*.png and test/<class>/*.png (10 classes, 32x32)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = path.parent / "images"
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    with tarfile.open(path, "w:xz") as archive:
        archive.add(root, arcname="cifar10")
    return path


def test_gpu_script_runs_in_its_tiny_setting(tmp_path):
    archive = tiny_imagefolder_archive(tmp_path / "cifar10-tiny.tar.xz")
    out_dir = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "EPOCHS": "1",
           "IMAGE_SIZE": "64", "VAL_SIZE": "20", "KERAS_BACKEND": "jax", "WORK": str(tmp_path / "work"),
           "OUT_DIR": str(out_dir)}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), str(archive)], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu.sh: done in" in result.stdout
    [summary_file] = out_dir.glob("gpu-*.json")
    summary = json.loads(summary_file.read_text())
    assert set(summary["variants"]) == {"torch-alexnet-scratch", "keras-alexnet-scratch",
                                        "torch-alexnet-pretrained", "keras-vgg16-pretrained"}
    for variant, figures in summary["variants"].items():
        assert figures["epochs"] == 1 and figures["train_seconds"] > 0, variant
        assert 0 <= figures["test_accuracy"] <= 1 and figures["training_flops_per_image"] > 1e8, variant
        assert figures["keras_backend"] == ("jax" if variant.startswith("keras") else None), variant
        assert figures["device"] == "cpu" and figures["share_of_bf16_peak"] is None, variant
        assert figures["energy_joules"] is None and figures["energy_method"] is None, variant  # no NVML here
    assert "keras-vgg16-pretrained" in (out_dir / "gpu-summary.md").read_text()
