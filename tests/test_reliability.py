"""Preemption-safe training and loud failures: kill a real trainer mid-epoch, resume, compare."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnnbench.data import load_prepared, prepare
from cnnbench.fileio import atomic_path, write_json_atomic
from cnnbench.training import PAUSE_AT_STEP_ENV
from conftest import DEFAULT_HPARAMS, REPO, package_env, run_module, run_python
from conftest import run_dir as workflow_run_dir
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


def wait_for_file(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Wait until ``path`` exists, failing at once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before {path.name} appeared:\n{log.read_text()[-5000:]}"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.05)


def start_paused(command: list[str], run_dir: Path, step: int, log: Path, env: dict | None = None):
    """Start ``command`` with the trainers' test hook: it pauses after training step ``step`` and
    signals that with a file in ``run_dir``; return the process once it is there."""
    env = {**(env or package_env()), PAUSE_AT_STEP_ENV: str(step)}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_file(run_dir / f"paused-at-step-{step}", proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)


def interrupt_in_epoch_two(framework, data, run_dir, sig) -> subprocess.CompletedProcess:
    """Start a training, let it pause at a step inside epoch 2 (epoch 1 checkpointed), send ``sig``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "interrupted.log"
    steps_per_epoch = -(-len(load_prepared(data)["y_train"]) // DEMO_HPARAMS["batch_size"])
    proc = start_paused(trainer_command(framework, data, run_dir), run_dir, steps_per_epoch + 3, log)
    try:
        assert (run_dir / "checkpoint" / CHECKPOINT_MARKER[framework]).exists(), "epoch 1 was not checkpointed"
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text())


def comparable(history):
    return [{k: v for k, v in epoch.items() if k not in ("seconds", "images_per_second", "energy_joules")}
            for epoch in history]  # measurements: they differ from run to run


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
                       env=package_env(), timeout=600)
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
                             env=package_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "after epoch 1" in resumed.stderr
    assert "epoch 1/2:" not in resumed.stderr  # epoch 1 was not trained again
    assert_same_run(framework, json.loads((tmp_path / "metrics.json").read_text()), reference_runs[framework])


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_checkpoint_of_another_configuration_is_ignored(framework, demo_dataset, tmp_path):
    killed = interrupt_in_epoch_two(framework, demo_dataset, tmp_path, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    checkpointed_epoch_one = re.search(r"^epoch 1/2: train loss ([\d.]+)", killed.stderr, re.M).group(1)
    # Same epochs, another learning rate: resuming would skip epoch 1 and keep the checkpoint's record.
    result = train(framework, f"{framework}-alexnet-scratch", demo_dataset, tmp_path, {**DEMO_HPARAMS, "lr": 0.02})
    assert "ignoring checkpoint" in result.stderr and "resuming" not in result.stderr
    assert "epoch 1/2: train loss" in result.stderr  # epoch 1 trained again, at the new rate
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [epoch["epoch"] for epoch in history] == [1, 2]
    assert f"{history[0]['train_loss']:.4f}" != checkpointed_epoch_one


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


def file_states(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_second_trainer_on_a_run_stops_at_once_naming_the_first(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    command = trainer_command("torch", tiny_dataset, run_dir)
    first = start_paused(command, run_dir, 1, tmp_path / "first.log")
    try:
        before = file_states(run_dir)
        started = time.monotonic()
        second = subprocess.run(command, capture_output=True, text=True, env=package_env(), timeout=300)
        print(f"second trainer refused after {time.monotonic() - started:.1f} s")
        assert second.returncode == 1, second.stderr
        assert f"pid {first.pid} on" in second.stderr and "already training" in second.stderr, second.stderr
        assert file_states(run_dir) == before  # it wrote nothing, not even its lock file
    finally:
        stop(first)  # SIGKILL
    with open(run_dir / ".lock") as lock:  # the kernel released the killed trainer's lock
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc; None once it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return None if fields[0] in ("Z", "X") else (fields[0], int(fields[1]))


def test_trainer_stops_when_snakemake_is_killed(tmp_path):
    run_dir = workflow_run_dir(tmp_path / "results", "torch-alexnet-scratch")
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(REPO / "config" / "demo.yaml"), "--cores", "1",
               str((run_dir / "metrics.json").relative_to(tmp_path))]
    snakemake = start_paused(command, run_dir, 1, tmp_path / "snakemake.log",
                             env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    trainer = int((run_dir / "paused-at-step-1").read_text())
    try:
        # The rule execs the trainer: no shell between it and Snakemake to outlive either.
        assert process_state(trainer)[1] == snakemake.pid
        snakemake.send_signal(signal.SIGKILL)
        stop(snakemake)
        killed = time.monotonic()
        while process_state(trainer) is not None:
            assert time.monotonic() - killed < 20, "the orphaned trainer is still running"
            time.sleep(0.05)
        print(f"orphaned trainer stopped {time.monotonic() - killed:.1f} s after Snakemake was killed")
    finally:
        if process_state(trainer) is not None:
            os.kill(trainer, signal.SIGKILL)
    log = (run_dir / "train.log").read_text()
    assert f"the process that started this trainer (pid {snakemake.pid}) is gone" in log, log
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model.pt").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_get_the_mode_a_plain_open_gives(umask, tmp_path):
    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "metrics.json", {"ok": True})
        with atomic_path(tmp_path / "dataset.npz") as tmp:
            np.savez(tmp, x=np.zeros(3))
        (tmp_path / "plain.txt").write_text("")
        assert os.umask(umask) == umask  # the mode lookup put the umask back
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"metrics.json": 0o666 & ~umask, "dataset.npz": 0o666 & ~umask, "plain.txt": 0o666 & ~umask}


@pytest.mark.parametrize("elsewhere", [False, True], ids=["in-repo", "other-directory"])
def test_missing_container_image_names_each_folder_once(elsewhere, tmp_path):
    fake_bin = tmp_path / "bin"  # the check wants `apptainer` on PATH before it looks for the images
    fake_bin.mkdir()
    (fake_bin / "apptainer").write_text("#!/bin/sh\necho apptainer version 1.3.0\n")
    (fake_bin / "apptainer").chmod(0o755)
    configfile = tmp_path / "images.yaml"
    configfile.write_text(json.dumps({"containers": {"torch": "no-such-torch.sif", "tensorflow": "no-such-tf.sif"}}))
    directory = ["--directory", str(tmp_path / "work")] if elsewhere else []
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), *directory, "--use-singularity",
         "--configfile", str(REPO / "config" / "demo.yaml"), str(configfile), "--cores", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    folders = f"{tmp_path / 'work'} or {REPO}" if elsewhere else f"{REPO}:"
    assert f"container image no-such-torch.sif (config `containers: torch:`) does not exist in {folders}" in output, output
