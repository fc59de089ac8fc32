"""Both trainers on a real GPU: bf16, torch.compile, device, memory peak and energy in the metrics.

Runs where a GPU is visible; skips elsewhere, unless CNNBENCH_REQUIRE_GPU is set (to a number: at
least that many GPUs), then it fails. CI has no GPU and sets only CNNBENCH_REQUIRE_TOOLS, so there
these tests skip. On a GPU machine:

    CNNBENCH_REQUIRE_GPU=1 python -m pytest tests/test_gpu.py

The trainers are called directly, as benchmarks/gpu.sh does (no Snakemake, no internet): synthetic
data made here, Keras on the first backend that sees the GPU (tensorflow, jax, torch). The GPUs used
are those CUDA_VISIBLE_DEVICES gives (all when unset): one for each single run, two for the
concurrent runs, each pinned to its own with CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import DEFAULT_HPARAMS, package_env

REQUIRE_GPU = os.environ.get("CNNBENCH_REQUIRE_GPU", "")
REQUIRED_GPUS = int(REQUIRE_GPU) if REQUIRE_GPU.isdigit() else (1 if REQUIRE_GPU else 0)
GPU_HPARAMS = {**DEFAULT_HPARAMS, "epochs": 2, "batch_size": 64, "eval_batch_size": 256, "image_size": 224,
               "precision": "bf16", "require_gpu": True}
# Board power of one GPU while it trains: a figure outside this range is a unit or mapping error.
PLAUSIBLE_WATTS = (10, 1500)
KERAS_BACKENDS = {  # backend: code printing how many GPUs it sees
    "tensorflow": "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))",
    "jax": "import jax; print(sum(d.platform == 'gpu' for d in jax.devices()))",
    "torch": "import torch; print(torch.cuda.device_count())",
}


def probe(code: str) -> tuple[int, str]:
    """Run ``code`` in a fresh interpreter; its printed GPU count (0 if it fails) and its error."""
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                env=package_env())
    except subprocess.TimeoutExpired:
        return 0, "timed out"
    if result.returncode != 0 or not result.stdout.strip():
        return 0, (result.stderr.strip().splitlines() or ["no output"])[-1]
    return int(result.stdout.split()[-1]), ""


@functools.lru_cache(maxsize=1)
def count_gpus() -> tuple[int, str]:
    """GPUs torch sees here (or nvidia-smi, without torch), and how that was found."""
    driver = shutil.which("nvidia-smi") or glob.glob("/dev/nvidia[0-9]*")
    if not driver:
        return 0, "no NVIDIA driver here (no nvidia-smi, no /dev/nvidia*)"
    count, error = probe(KERAS_BACKENDS["torch"])
    if count:
        return count, "torch"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        listed = [line for line in smi.stdout.splitlines() if line.startswith("GPU ")]
        if listed:
            return len(listed), "nvidia-smi"
    return 0, f"torch sees no GPU ({error or 'device_count() is 0'}) and nvidia-smi lists none"


def gpus_or_skip(needed: int) -> list[str]:
    """``needed`` CUDA_VISIBLE_DEVICES entries to pin runs to; skip (or fail, as asked) without them."""
    count, how = count_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",") if e.strip()][:count] if visible else list(map(str, range(count)))
    if len(entries) < needed:
        reason = f"needs {needed} GPU(s), {len(entries)} visible ({how})"
        if REQUIRED_GPUS >= needed:
            pytest.fail(f"{reason}, and CNNBENCH_REQUIRE_GPU={REQUIRE_GPU} asks for them")
        pytest.skip(reason)
    return entries[:needed]


@pytest.fixture(scope="module")
def gpu_dataset(tmp_path_factory):
    """5,000 small synthetic training images: about a second an epoch at 224x224 on one GPU."""
    gpus_or_skip(1)
    from cnnbench.data import prepare

    path = tmp_path_factory.mktemp("gpu-data") / "data.npz"
    prepare({"source": "synthetic", "val_size": 100, "split_seed": 0,
             "synthetic": {"train_per_class": 510, "test_per_class": 10, "image_size": 32, "seed": 0}}, path)
    return path


@pytest.fixture(scope="module")
def keras_backend(gpu_dataset):
    """The first Keras backend that sees a GPU here (the lent machines have JAX and torch, no TensorFlow)."""
    said = {}
    for backend, code in KERAS_BACKENDS.items():
        count, said[backend] = probe(code)
        if count:
            return backend
    pytest.fail(f"a GPU is visible but no Keras backend sees it: {said}; install jax[cuda] or tensorflow[and-cuda]")


def trainer_command(framework: str, data, run_dir, hparams: dict, backend: str | None) -> list[str]:
    extra = ["--keras-backend", backend] if framework == "keras" else []
    return [sys.executable, "-m", f"cnnbench.{framework}_trainer", "--variant", f"{framework}-alexnet-scratch",
            "--seed", "0", "--data", str(data), "--hparams", json.dumps(hparams), "--run-dir", str(run_dir),
            "--metrics", str(run_dir / "metrics.json"),
            "--model-out", str(run_dir / ("model.pt" if framework == "torch" else "model.keras")), *extra]


def start(framework, data, run_dir, gpu: str, backend=None, **hparams) -> subprocess.Popen:
    run_dir.mkdir(parents=True)
    with open(run_dir / "train.log", "w") as log:  # the trainer writes its own copy of the handle
        return subprocess.Popen(trainer_command(framework, data, run_dir, {**GPU_HPARAMS, **hparams}, backend),
                                stdout=log, stderr=subprocess.STDOUT, env=package_env({"CUDA_VISIBLE_DEVICES": gpu}))


def finished(process: subprocess.Popen, run_dir) -> tuple[dict, str]:
    """The run's metrics and log once its trainer has exited (killed after 15 minutes)."""
    try:
        code = process.wait(timeout=900)
    finally:
        stop(process)
    log = (run_dir / "train.log").read_text()
    assert code == 0, log[-5000:]
    return json.loads((run_dir / "metrics.json").read_text()), log


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def uuid_of(entry: str) -> str:
    """The UUID of a CUDA_VISIBLE_DEVICES entry (an NVML index or a UUID)."""
    if not entry.isdigit():
        return entry
    import pynvml

    pynvml.nvmlInit()
    try:
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(int(entry)))
    finally:
        pynvml.nvmlShutdown()
    return uuid.decode() if isinstance(uuid, bytes) else uuid


def assert_trained_on_the_gpu(metrics: dict, log: str, gpu: str, framework: str) -> None:
    from cnnbench.metrics import validate_metrics

    validate_metrics(metrics)
    env = metrics["environment"]
    assert env["device"] == ("cuda" if framework == "torch" else "gpu") and env["device_name"] != "cpu", env
    assert metrics["config"]["precision"] == "bf16"
    assert env["gpu"]["peak_memory_bytes"] > 0, env["gpu"]  # the GPU facts' memory peak
    energy = metrics["energy"]
    assert energy["method"] in ("energy_counter", "power_samples"), energy
    [measured] = energy["gpus"]
    assert measured.startswith(uuid_of(gpu)), (measured, gpu)  # the GPU it was pinned to, no other
    for epoch in metrics["history"]:
        watts = epoch["energy_joules"] / epoch["seconds"]
        assert PLAUSIBLE_WATTS[0] < watts < PLAUSIBLE_WATTS[1], epoch
    assert energy["joules"] == pytest.approx(sum(e["energy_joules"] for e in metrics["history"]))
    assert log.count("energy: measuring 1 GPU(s)") == 1


def test_torch_trainer_on_a_gpu_in_bf16_compiled(gpu_dataset, tmp_path):
    [gpu] = gpus_or_skip(1)
    metrics, log = finished(start("torch", gpu_dataset, tmp_path / "run", gpu, compile="on"), tmp_path / "run")
    assert_trained_on_the_gpu(metrics, log, gpu, "torch")
    assert metrics["environment"]["compiled"] is True and metrics["environment"]["precision"] == "bf16"
    # torch.compile compiles in the warm-up (every batch shape), not in epoch 1: that takes about epoch 2's time.
    first, second = (epoch["seconds"] for epoch in metrics["history"])
    assert metrics["compile_seconds"] > 0 and first < 2 * second + 1.0, (metrics["compile_seconds"], first, second)
    assert "warm-up (compiled)" in log


def test_keras_trainer_on_a_gpu_in_bf16(gpu_dataset, keras_backend, tmp_path):
    [gpu] = gpus_or_skip(1)
    metrics, log = finished(start("keras", gpu_dataset, tmp_path / "run", gpu, keras_backend), tmp_path / "run")
    assert_trained_on_the_gpu(metrics, log, gpu, "keras")
    assert metrics["environment"]["keras_backend"] == keras_backend


def test_two_trainings_at_once_on_two_gpus(gpu_dataset, keras_backend, tmp_path):
    """torch on one GPU and Keras on another, concurrently: each sees and measures only its own."""
    first, second = gpus_or_skip(2)
    runs = []
    try:
        runs.append(start("torch", gpu_dataset, tmp_path / "torch", first, compile="off"))
        runs.append(start("keras", gpu_dataset, tmp_path / "keras", second, keras_backend))
        (torch_metrics, torch_log), (keras_metrics, keras_log) = (
            finished(run, tmp_path / name) for run, name in zip(runs, ("torch", "keras")))
    finally:  # neither outlives the test
        for run in runs:
            stop(run)
    assert_trained_on_the_gpu(torch_metrics, torch_log, first, "torch")
    assert_trained_on_the_gpu(keras_metrics, keras_log, second, "keras")
    assert torch_metrics["energy"]["gpus"] != keras_metrics["energy"]["gpus"]
    assert torch_metrics["environment"]["gpu"]["count"] == keras_metrics["environment"]["gpu"]["count"] == 1
