"""The benchmarks on the CPU: gpu_summary's FLOP count, step_overhead in a tiny setting, and
benchmarks/device-check.sh (which runs gpu.sh) rehearsed in a tiny setting as it runs on the lent GPU
machine. Each framework runs in its own process."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from test_readme import training_threads
from test_workflow import job_counts


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


FLOPS_TOLERANCE = 0.05  # scratch's backward skips only the first layer's input gradient: a few % of 2x forward
DEVICE_CHECK_STEPS = ["setup", "imports", "prepare", "facts-torch", "facts-keras", "compute-torch", "compute-keras",
                      "train-torch", "train-keras", "test-gpu", "plan-gpu-sh", "gpu-sh"]
# The short runs train the two scratch AlexNets; the GPU run's other two variants are rehearsed here.
GPU_VARIANTS = ["torch-alexnet-pretrained", "keras-vgg16-pretrained"]


def benchmark_env(**extra) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def test_training_flops_count_the_backward_each_variant_runs():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_summary.py"), "flops", "--model",
                             "alexnet", "--init", "scratch", "frozen", "--image-size", "224"], capture_output=True,
                            text=True, timeout=300, env=benchmark_env())
    assert result.returncode == 0, result.stderr[-3000:]
    counted = json.loads(result.stdout)
    scratch, frozen = counted["scratch"], counted["frozen"]
    assert scratch["forward"] == frozen["forward"] > 1e9  # AlexNet at 224: 0.71 G multiply-adds
    assert scratch["training"] == pytest.approx(3 * scratch["forward"], rel=FLOPS_TOLERANCE)
    assert scratch["training"] < 3 * scratch["forward"]  # no gradient for the input images
    # frozen: no backward through the convolutional backbone, only through the classifier
    assert frozen["training"] < 0.5 * scratch["training"] and frozen["training"] < 0.5 * 3 * frozen["forward"]
    assert frozen["training"] > frozen["forward"]


def test_step_overhead_compares_each_trainer_loop_with_the_idiomatic_one(tmp_path):
    out = tmp_path / "step_overhead.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_overhead.py"), "--trainers", "torch",
                             "keras-jax", "--steps", "3", "--repeats", "2", "--steps-per-execution", "3",
                             "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env=benchmark_env(JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["trainers"]) == {"torch", "keras-jax"}
    assert report["machine"]["cores"] == os.cpu_count() and len(report["machine"]["load_average"]) == 3
    assert "--trainers torch keras-jax" in report["command"]
    for trainer, figures in report["trainers"].items():
        assert len(figures["repeats"]["trainer"]) == len(figures["repeats"]["idiomatic"]) == 2, trainer
        assert figures["ratio"] == pytest.approx(
            figures["trainer_images_per_second"] / figures["idiomatic_images_per_second"]), trainer
        assert figures["device"] == "cpu" and figures["precision"] == "fp32", trainer


def probe_wheel(folder: Path) -> Path:
    """A one-module pure-Python wheel, so the rehearsal installs from a wheel folder as the device does."""
    folder.mkdir()
    files = {"cnnbench_probe/__init__.py": "ANSWER = 42\n",
             "cnnbench_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: cnnbench-probe\nVersion: 1.0\n",
             "cnnbench_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for name, text in files.items()]
    files["cnnbench_probe-1.0.dist-info/RECORD"] = "\n".join([*record, "cnnbench_probe-1.0.dist-info/RECORD,,"]) + "\n"
    wheel = folder / "cnnbench_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def without_tensorflow(folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes `import tensorflow` fail, as on the lent GPU machine
    (which has none): Keras on JAX must not need it (keras.utils.set_random_seed imports it where it can)."""
    (folder / "tensorflow").mkdir(parents=True)
    (folder / "tensorflow" / "__init__.py").write_text('raise ImportError("no TensorFlow on the lent GPU machine")\n')
    return folder


def test_device_check_rehearsed_on_the_cpu(tmp_path):
    """benchmarks/device-check.sh as the lent GPU machine runs it, on the CPU at tiny sizes: every step
    leaves its status, the trainers run as gpu.sh runs them (its four variants between the short runs and
    the GPU run), and $OUT holds what the device sends back."""
    archive = tiny_imagefolder_archive(tmp_path / "cifar10-tiny.tar.xz")
    wheel = probe_wheel(tmp_path / "wheels")
    out, work = tmp_path / "out", tmp_path / "work"
    env = benchmark_env(REHEARSAL="cpu", WHEELS=str(wheel.parent), ARCHIVE=str(archive), WORK=str(work),
                        IMAGE_SIZE="64", VAL_SIZE="20", COMPUTE_STEPS="2", COMPUTE_WARMUP="1", SHORT_STEPS="2",
                        MAX_EPOCHS="1", DEADLINE_SECONDS="3600", GPU_VARIANTS=" ".join(GPU_VARIANTS),
                        PYTHONPATH=str(without_tensorflow(tmp_path / "no-tensorflow")))
    began = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "device-check.sh"), str(out)], capture_output=True,
                            text=True, env=env, timeout=1200)
    print(f"device-check rehearsal: {time.monotonic() - began:.0f} s")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    summary = json.loads((out / "device-check.json").read_text())
    steps = summary["steps"]
    assert list(steps) == DEVICE_CHECK_STEPS
    assert {name: step["status"] for name, step in steps.items()} == dict.fromkeys(DEVICE_CHECK_STEPS, "ok")
    assert summary["all_ok"] and summary["rehearsal"] == "cpu"

    # the venv over the current interpreter's packages, the wheel folder installed into it
    imports = steps["imports"]["result"]
    assert imports["python"] == str(work / "venv" / "bin" / "python") and imports["missing"] == []
    assert imports["wheels"] == [wheel.name] and list(work.glob("venv/lib/python*/site-packages/cnnbench_probe"))
    assert steps["facts-torch"]["result"]["gpu"] is False and steps["facts-keras"]["result"]["backend"] == "jax"
    for framework in ("torch", "keras"):
        run = steps[f"train-{framework}"]["result"]
        assert run["variant"] == f"{framework}-alexnet-scratch" and run["compile_seconds"] >= 0, run
        assert run["trainer_over_compute_only"] == pytest.approx(
            run["images_per_second"] / steps[f"compute-{framework}"]["result"]["images_per_second"]), run
        assert run["peak_memory_bytes"] is None and run["energy_method"] is None and run["watts"] is None  # no GPU
    tests = steps["test-gpu"]["result"]
    assert tests["tests"] >= 3 and tests["skipped"] == tests["tests"]  # no GPU here: each skips
    assert steps["plan-gpu-sh"]["result"]["epochs"] == 1

    # gpu.sh's variants, summarised
    variants = steps["gpu-sh"]["result"]["variants"]
    assert set(variants) == set(GPU_VARIANTS)
    for variant, figures in variants.items():
        assert figures["epochs"] == 1 and figures["train_seconds"] > 0, variant
        assert figures["compile_seconds"] >= 0 and figures["speedup_vs_reference_including_compile"] > 0, variant
        assert 0 <= figures["test_accuracy"] <= 1 and figures["training_flops_per_image"] > 1e8, variant
        assert figures["keras_backend"] == ("jax" if variant.startswith("keras") else None), variant
        assert figures["device"] == "cpu" and figures["share_of_bf16_peak"] is None, variant
        assert figures["energy_joules"] is None and figures["energy_method"] is None, variant  # no NVML here
    assert "keras-vgg16-pretrained" in (out / "gpu-summary.md").read_text()

    # what comes back from the device: at most 8 files, at most 2 folders down
    returned = [path for path in out.rglob("*") if path.is_file()]
    assert len(returned) <= 8 and all(len(path.relative_to(out).parts) <= 3 for path in returned), returned
    with tarfile.open(out / "device-check-logs.tar.gz") as logs:
        names = logs.getnames()
    assert all(any(name.endswith(f"logs/{step}.log") for name in names) for step in DEVICE_CHECK_STEPS)
    assert sum(name.endswith("metrics.json") for name in names) == 2 + len(GPU_VARIANTS)


def test_transfer_study_script_runs_the_transfer_config(tmp_path):
    """benchmarks/transfer-cifar10.sh as a dry run: the real-data transfer config's 90 trainings, after
    one pretraining, on the archive it is given, two at a time."""
    archive = tmp_path / "cifar10-jpeg.tar.xz"
    archive.write_bytes(b"")  # a dry run reads nothing
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "transfer-cifar10.sh"), str(archive), str(tmp_path / "work")],
                            capture_output=True, text=True, env=benchmark_env(CNNBENCH_DRY_RUN="1", PYTHON=sys.executable),
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "This was a dry-run" in output
    counts = job_counts(output)
    # per framework: (2 scratch rates + 2 fine-tuning rates + 1 frozen) x 3 sizes x 3 seeds
    assert counts["train_torch"] == counts["train_keras"] == 45 and counts["pretrain_torch"] == 1, counts
    assert f"input: {archive}" in output
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # nproc's cores over two slots
    assert set(training_threads(output)) == {threads}
