"""Preemption-safe training and loud failures: kill a real trainer mid-epoch, resume, compare."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnbench.data import prepare
from conftest import DEFAULT_HPARAMS, REPO, package_env, run_module, run_python
from test_trainers import MODEL_SUFFIX, train

# The demo setting: synthetic 32x32 images at 64x64, 2 epochs, batch 64 (a few seconds per epoch).
DEMO_HPARAMS = {"epochs": 2, "batch_size": 64, "image_size": 64}
CHECKPOINT_MARKER = {"torch": "last.pt", "keras": "state.json"}
# Keras on TensorFlow/oneDNN is not bit-reproducible across processes on the CPU (thread-level
# reduction order in its kernels); torch on the CPU is. Accuracies are over 100 images.
TOLERANCE = {"torch": 0.0, "keras": 1e-3}
ACCURACY_TOLERANCE = {"torch": 0.0, "keras": 0.02}


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo-data") / "demo.npz"
    prepare({"source": "synthetic", "val_size": 100, "split_seed": 0,
             "synthetic": {"train_per_class": 50, "test_per_class": 10, "image_size": 32, "seed": 0}}, path)
    return path


def trainer_command(framework, data, run_dir):
    hp = {**DEFAULT_HPARAMS, **DEMO_HPARAMS}
    return [sys.executable, "-m", f"cnnbench.{framework}_trainer", "--variant", f"{framework}-alexnet-scratch",
            "--seed", "0", "--data", str(data), "--hparams", json.dumps(hp), "--run-dir", str(run_dir),
            "--metrics", str(run_dir / "metrics.json"), "--model-out", str(run_dir / MODEL_SUFFIX[framework])]


def interrupt_in_epoch_two(framework, data, run_dir, sig) -> subprocess.CompletedProcess:
    """Start a training, wait until epoch 1 is checkpointed and epoch 2 is under way, send ``sig``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "interrupted.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(trainer_command(framework, data, run_dir), stderr=stderr, env=package_env())
        marker = run_dir / "checkpoint" / CHECKPOINT_MARKER[framework]
        deadline = time.monotonic() + 600
        while not (marker.exists() and "epoch 2/2:" in log.read_text()):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "epoch 1 never finished"
            time.sleep(0.05)
        time.sleep(1.0)  # inside epoch 2's steps
        assert proc.poll() is None, "the training finished before it could be interrupted"
        proc.send_signal(sig)
        proc.wait(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text())


def comparable(history):
    return [{k: v for k, v in epoch.items() if k not in ("seconds", "images_per_second")} for epoch in history]


def assert_same_run(framework, resumed, reference):
    assert [e["epoch"] for e in resumed["history"]] == [1, 2]  # each epoch exactly once
    for got, want in zip(comparable(resumed["history"]), comparable(reference["history"])):
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=TOLERANCE[framework]), (key, got, want)
    assert resumed["test"]["accuracy"] == pytest.approx(reference["test"]["accuracy"],
                                                        abs=ACCURACY_TOLERANCE[framework])


@pytest.fixture(scope="module")
def reference_runs(demo_dataset, tmp_path_factory):
    """One uninterrupted run per framework, the yardstick for the resumed ones."""
    runs = {}
    for framework in ("torch", "keras"):
        run_dir = tmp_path_factory.mktemp(f"reference-{framework}")
        subprocess.run(trainer_command(framework, demo_dataset, run_dir), check=True, capture_output=True,
                       env=package_env())
        runs[framework] = json.loads((run_dir / "metrics.json").read_text())
        shutil.rmtree(run_dir)  # only the metrics are compared
    return runs


@pytest.mark.parametrize("framework", ["torch", "keras"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_training_resumes_after_last_epoch(framework, sig, demo_dataset, reference_runs, tmp_path):
    killed = interrupt_in_epoch_two(framework, demo_dataset, tmp_path, sig)
    if sig == signal.SIGTERM:
        assert killed.returncode == 143, killed.stderr  # a clean, non-zero stop
        assert "SIGTERM received" in killed.stderr
    else:
        assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / MODEL_SUFFIX[framework]).exists()
    assert not list(tmp_path.glob(".*.tmp*"))  # no half-written file left beside the outputs

    resumed = subprocess.run(trainer_command(framework, demo_dataset, tmp_path), capture_output=True, text=True,
                             env=package_env())
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "after epoch 1" in resumed.stderr
    assert "epoch 1/2:" not in resumed.stderr  # epoch 1 was not trained again
    assert_same_run(framework, json.loads((tmp_path / "metrics.json").read_text()), reference_runs[framework])


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_checkpoint_of_another_configuration_is_ignored(framework, demo_dataset, tmp_path):
    killed = interrupt_in_epoch_two(framework, demo_dataset, tmp_path, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    result = train(framework, f"{framework}-alexnet-scratch", demo_dataset, tmp_path,
                   {**DEMO_HPARAMS, "epochs": 1, "lr": 0.02})
    assert "ignoring checkpoint" in result.stderr
    assert len(json.loads((tmp_path / "metrics.json").read_text())["history"]) == 1


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_diverging_loss_stops_without_metrics(framework, tiny_dataset, tmp_path):
    result = train(framework, f"{framework}-alexnet-scratch", tiny_dataset, tmp_path, {"lr": 1e12}, check=False)
    assert result.returncode == 1, result.stderr
    assert "the run diverged" in result.stderr and "Lower the learning rate" in result.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_torch_out_of_memory_names_the_batch_size(tiny_dataset, tmp_path):
    out = run_python(f"""
import json, torch
from cnnbench import torch_trainer, training
def out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
torch_trainer.train_one_epoch = out_of_memory
args = training.parse_args("torch", ["--variant", "torch-alexnet-scratch", "--seed", "0", "--data",
    {str(tiny_dataset)!r}, "--hparams", {json.dumps({**DEFAULT_HPARAMS, "batch_size": 48})!r},
    "--run-dir", {str(tmp_path)!r}, "--metrics", {str(tmp_path / "m.json")!r}, "--model-out", {str(tmp_path / "m.pt")!r}])
try:
    torch_trainer.run(args)
except training.TrainingError as err:
    print(json.dumps({{"message": str(err)}}))
""")
    assert "batch_size=48" in out["message"] and "lower them" in out["message"]


def test_imagenet_weights_with_wrong_hash_are_refused(tiny_dataset, tmp_path):
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    run_module("torch_models", "standin", "--model", "alexnet", "--out", weights)  # right format, wrong bytes
    result = train("torch", "torch-alexnet-pretrained", tiny_dataset, tmp_path / "run", check=False,
                   extra=("--weights", weights, "--weights-source", "imagenet"))
    assert result.returncode == 1
    assert "published as 7be5be79" in result.stderr and "Delete it" in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()

    staged = run_module("weights", "--framework", "torch", "--model", "alexnet", "--out", weights, check=False)
    assert staged.returncode == 1 and "not the published weights" in staged.stderr


def test_corrupt_input_stops_the_workflow_before_training(tmp_path):
    images = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (images / split / cls).mkdir(parents=True)
            from PIL import Image

            for i in range(3):
                Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(images / split / cls / f"{i}.png")
    (images / "train" / "b" / "1.png").write_bytes(b"\x89PNG garbage")
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(json.dumps({"data": {"source": "imagefolder", "imagefolder": {"path": str(images)},
                                               "val_size": 2}, "weights": "standin"}))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config" / "demo.yaml"), str(configfile), "--cores", "1",
         "results/data/dataset.npz"], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    log = (tmp_path / "results" / "logs" / "prepare_data.log").read_text()
    assert "train/b/1.png" in log and "Remove or replace that file" in log
    assert not (tmp_path / "results" / "data" / "dataset.npz").exists()
    assert not (tmp_path / "results" / "runs").exists()
