"""GPU slots for local runs (cnnbench.gpu_slot): which GPUs make the pool, the launcher that gives
each training one of them, and, in a `snakemake` run on a one-GPU stand-in pool, a SIGKILLed
training's slot going to the next one. (The full grid's run in tests/test_full_grid.py checks
concurrent trainings on a two-GPU stand-in pool.)"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnbench.gpu_slot import EXCLUSIVE_ENV, POOL_ENV, apply_gpu_defaults, export_pool, resolve_pool, slot_file
from cnnbench.metrics import load_metrics
from cnnbench.training import environment
from conftest import NO_DEMO_MIN_STEPS, REPO, package_env, run_dir
from test_reliability import process_state, stop, wait_for_file
from test_trainers import train

# What decides how a training uses its GPU's memory and how CUDA numbers GPUs.
GPU_ENV = (EXCLUSIVE_ENV, "TF_FORCE_GPU_ALLOW_GROWTH", "XLA_PYTHON_CLIENT_PREALLOCATE", "CUDA_DEVICE_ORDER")
SHARED = {EXCLUSIVE_ENV: None, "TF_FORCE_GPU_ALLOW_GROWTH": "true", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
          "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
EXCLUSIVE = {EXCLUSIVE_ENV: "1", "TF_FORCE_GPU_ALLOW_GROWTH": None, "XLA_PYTHON_CLIENT_PREALLOCATE": None,
             "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def fake_nvidia_smi(directory: Path, indices: str) -> Path:
    """An `nvidia-smi` that lists ``indices`` (one per line) as the real one does for --query-gpu=index."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n[ \"$1\" = --query-gpu=index ] || exit 9\nprintf '{indices}'\n")
    script.chmod(0o755)
    return directory


# ----------------------------------------------------------------------------- the pool
def test_pool_from_the_config_list_wins_over_the_environment():
    pool, source = resolve_pool([0, "GPU-8d2c5e1a-uuid", 3], {"CUDA_VISIBLE_DEVICES": "5"},
                                query=lambda: pytest.fail("nvidia-smi asked despite a list"))
    assert pool == ["0", "GPU-8d2c5e1a-uuid", "3"] and source == "config `gpus`"


def test_pool_auto_is_the_users_cuda_visible_devices_else_nvidia_smi(tmp_path, monkeypatch):
    assert resolve_pool("auto", {"CUDA_VISIBLE_DEVICES": "2, 3"}, query=lambda: ["0"]) == (
        ["2", "3"], "CUDA_VISIBLE_DEVICES")
    assert resolve_pool("auto", {"CUDA_VISIBLE_DEVICES": ""}, query=lambda: ["0"])[0] == []  # the user hid all GPUs
    two_gpus = fake_nvidia_smi(tmp_path / "bin", r"0\n1\n")
    monkeypatch.setenv("PATH", f"{two_gpus}:{os.environ['PATH']}")
    assert resolve_pool("auto", {}) == (["0", "1"], "nvidia-smi")


def test_no_nvidia_smi_no_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no nvidia-smi
    assert resolve_pool("auto", {})[0] == []


def test_inside_a_slurm_job_the_pool_is_empty():
    pool, source = resolve_pool([0, 1], {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "1"})
    assert pool == [] and "SLURM" in source


def test_exported_pool_reaches_containers_even_with_cleanenv():
    environ = {}
    assert export_pool([1, 0], environ) == (["1", "0"], "config `gpus`")
    assert environ[POOL_ENV] == environ[f"APPTAINERENV_{POOL_ENV}"] == "1,0"
    assert environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # indices mean nvidia-smi's numbers
    environ = {"CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    export_pool("auto", environ)
    assert environ[POOL_ENV] == "3" and environ["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


# ------------------------------------------------------------------------ the launcher
# What the launched command reports: its pid, its CUDA_VISIBLE_DEVICES, which slots are locked (by
# itself: the launcher's locked file is inherited across the exec) and its GPU_ENV.
REPORT = f"""
import fcntl, json, os, sys
slots = sys.argv[1]
held = []
for name in sorted(os.listdir(slots)):
    with open(os.path.join(slots, name)) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(name)
print(json.dumps({{"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "held": held, "gpu_env": {{name: os.environ.get(name) for name in {GPU_ENV!r}}}}}))
"""


def launch(slots: Path, *options, env: dict | None = None, **popen):
    command = [sys.executable, "-m", "cnnbench.gpu_slot", "--slots-dir", str(slots), *options, "--",
               sys.executable, "-c", REPORT, str(slots)]
    unset = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", POOL_ENV, *GPU_ENV)
    inherited = {k: v for k, v in package_env().items() if k not in unset}
    return subprocess.Popen(command, env={**inherited, **(env or {})}, text=True, **popen)


def launched(slots: Path, *options, env: dict | None = None) -> dict:
    proc = launch(slots, *options, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["pid"] == proc.pid  # exec'd: the trainer keeps the job's parent
    return report


def test_launcher_gives_the_first_free_gpu_and_the_command_holds_it(tmp_path):
    slots = tmp_path / "slots"
    slots.mkdir()
    with open(slot_file(slots, "0"), "a") as busy:
        fcntl.flock(busy, fcntl.LOCK_EX)
        report = launched(slots, "--pool", "0,1")
    assert report["cuda_visible_devices"] == "1" and report["held"] == ["gpu-0.lock", "gpu-1.lock"]
    assert report["gpu_env"] == EXCLUSIVE  # its GPU to itself: TensorFlow and JAX keep their defaults
    assert launched(slots, "--pool", "0,1")["held"] == ["gpu-0.lock"]  # both freed once their holders ended


def test_launcher_reads_the_pool_the_workflow_exports(tmp_path):
    report = launched(tmp_path, env={POOL_ENV: "GPU-uuid-a"})
    assert report["cuda_visible_devices"] == "GPU-uuid-a" and report["held"] == ["gpu-GPU-uuid-a.lock"]


def test_launcher_keeps_slurms_choice(tmp_path):
    report = launched(tmp_path, "--pool", "0,1", env={"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "3"})
    assert report["cuda_visible_devices"] == "3" and report["held"] == []
    assert report["gpu_env"] == SHARED  # two trainings of a SLURM job may share one of its GPUs


def test_launcher_without_a_pool_gives_no_gpu_and_lets_trainings_share_one(tmp_path):
    report = launched(tmp_path, "--pool", "")
    assert report["cuda_visible_devices"] is None and report["gpu_env"] == SHARED


def test_launcher_keeps_the_users_gpu_settings(tmp_path):
    users = {"TF_FORCE_GPU_ALLOW_GROWTH": "false", "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
             "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    assert launched(tmp_path, "--pool", "", env=users)["gpu_env"] == {EXCLUSIVE_ENV: None, **users}
    # and a training the user says has its GPU to itself keeps the frameworks' defaults
    assert launched(tmp_path, "--pool", "", env={EXCLUSIVE_ENV: "1"})["gpu_env"] == EXCLUSIVE


def test_gpu_defaults_set_only_what_is_unset_and_say_so(capsys):
    environ = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    assert apply_gpu_defaults(environ) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert environ == {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                       "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert capsys.readouterr().err == (
        "GPU environment: CUDA_DEVICE_ORDER=PCI_BUS_ID TF_FORCE_GPU_ALLOW_GROWTH=true (CNNBENCH_GPU_EXCLUSIVE is "
        "not 1: other trainings may share the GPU, TensorFlow and JAX take memory as needed)\n")
    assert apply_gpu_defaults(environ) == {} and capsys.readouterr().err == ""  # again: all set, nothing said
    exclusive = {EXCLUSIVE_ENV: "1"}
    assert apply_gpu_defaults(exclusive) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert exclusive == {EXCLUSIVE_ENV: "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert apply_gpu_defaults({EXCLUSIVE_ENV: "0"}) == {name: value for name, value in SHARED.items() if value}


# Run before a trainer started by hand (no launcher): the environment the user gave (GIVEN), then a
# stand-in for the GPU framework's start that reports GPU_ENV as the framework would read it, and
# stops the run there: TensorFlow's or JAX's import (Keras imports its backend), torch's first CUDA call.
FRAMEWORK_START = """
import json, os, sys
for name in {gpu_env!r}:
    os.environ.pop(name, None)
os.environ.update({given!r})

def report_and_stop():
    print("at the framework's start: " + json.dumps({{name: os.environ.get(name) for name in {gpu_env!r}}}),
          flush=True)
    os._exit(3)

if {start!r} == "torch.cuda":
    import torch
    torch.cuda.is_available = report_and_stop
else:
    class AtImport:
        def find_spec(self, name, path=None, target=None):
            if name == {start!r}:
                report_and_stop()
    sys.meta_path.insert(0, AtImport())
"""


@pytest.mark.parametrize("framework, start, given, expected", [
    ("keras", "tensorflow", {}, SHARED),
    ("keras", "jax", {}, SHARED),
    ("torch", "torch.cuda", {}, SHARED),
    ("keras", "tensorflow", {EXCLUSIVE_ENV: "1"}, EXCLUSIVE),
    ("keras", "jax", {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, {**SHARED, "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}),
])
def test_a_trainer_started_by_hand_sets_the_gpu_environment_before_its_framework_starts(
        framework, start, given, expected, tiny_dataset, tmp_path):
    prelude = FRAMEWORK_START.format(gpu_env=GPU_ENV, given=given, start=start)
    backend = ("--keras-backend", start) if framework == "keras" else ()
    result = train(framework, f"{framework}-alexnet-scratch", tiny_dataset, tmp_path, extra=backend, check=False,
                   prelude=prelude)
    assert result.returncode == 3, result.stdout + result.stderr
    reported = [line for line in result.stdout.splitlines() if line.startswith("at the framework's start: ")]
    assert json.loads(reported[0].partition(": ")[2]) == expected
    assert "GPU environment: CUDA_DEVICE_ORDER=PCI_BUS_ID" in result.stderr  # the trainer's log says what it set


def test_launcher_waits_for_a_taken_slot(tmp_path):
    slots, log = tmp_path / "slots", tmp_path / "launcher.log"
    slots.mkdir()
    with open(slot_file(slots, "7"), "a") as busy:
        fcntl.flock(busy, fcntl.LOCK_EX)
        with open(log, "w") as err:
            proc = launch(slots, "--pool", "7", stdout=subprocess.PIPE, stderr=err)
        try:
            deadline = time.monotonic() + 60
            while "waiting for one to be freed" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            time.sleep(1)  # two polls later it is still waiting, not running the command
            assert proc.poll() is None
        except BaseException:
            stop(proc)
            raise
    out, _ = proc.communicate(timeout=60)  # the slot was freed above
    assert proc.returncode == 0 and json.loads(out)["cuda_visible_devices"] == "7"
    assert "all 1 GPU slots (7) are taken" in log.read_text() and "GPU slot 7 is free after" in log.read_text()


# A stand-in for the job's process: starts the launcher, then dies (as a killed Snakemake would); it
# is the launcher's subreaper, so it can tell how the orphaned launcher exited.
ORPHANING_PARENT = """
import ctypes, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of the middle process come back here
middle = os.fork()
if middle == 0:
    proc = subprocess.Popen(sys.argv[1:])
    time.sleep(2)  # the launcher is waiting for its slot by now
    os._exit(0)
os.waitpid(middle, 0)
pid, status = os.wait()
print(os.waitstatus_to_exitcode(status))
"""


def test_waiting_launcher_gives_up_when_its_job_is_gone(tmp_path):
    slots = tmp_path / "slots"
    slots.mkdir()
    marker = tmp_path / "command-ran"
    with open(slot_file(slots, "0"), "a") as busy:
        fcntl.flock(busy, fcntl.LOCK_EX)
        result = subprocess.run(
            [sys.executable, "-c", ORPHANING_PARENT, sys.executable, "-m", "cnnbench.gpu_slot", "--slots-dir",
             str(slots), "--pool", "0", "--", "touch", str(marker)],
            capture_output=True, text=True, env=package_env(), timeout=120)
    assert result.stdout.strip() == "143", result.stdout + result.stderr
    assert "is gone: not starting the trainer" in result.stderr and not marker.exists()


def test_environment_records_the_gpu_and_the_times(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = environment("cpu", "cpu", "test", None, "2026-12-01T10:00:00+00:00")
    assert env["cuda_visible_devices"] is None and env["started_at"] == "2026-12-01T10:00:00+00:00"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-uuid-a")
    env = environment("cpu", "cpu", "test", None, "2026-12-01T10:00:00+00:00")
    assert env["cuda_visible_devices"] == "GPU-uuid-a"
    assert datetime_of(env["finished_at"]).utcoffset() is not None


def datetime_of(stamp: str):
    from datetime import datetime

    return datetime.fromisoformat(stamp)


def test_trainings_share_the_cores_and_start_through_the_launcher(tmp_path):
    """The README's four-GPU command (here without containers): 32 cores // 4 GPUs = 8 threads each."""
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config" / "full.yaml"), "--cores", "32", "--resources", "gpu=4", "-n", "-p"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OMP_NUM_THREADS=8 exec python -m cnnbench.gpu_slot -- python -m cnnbench.torch_trainer" in result.stdout
    assert "TF_NUM_INTRAOP_THREADS=8 exec python -m cnnbench.gpu_slot -- python -m cnnbench.keras_trainer" in result.stdout


# ------------------------------------------------------- a killed training frees its slot
RUNS = [str(run_dir(Path("results"), "torch-alexnet-scratch", seed)) for seed in (0, 1)]
# Two cheap trainings on the demo's data, cut down, on a one-GPU stand-in pool; `gpu=2` lets Snakemake
# start both at once, so the second waits for the slot the first holds.
ONE_SLOT = ("variants: [torch-alexnet-scratch]\nseeds: [0, 1]\ngpus: [0]\n"
            "data:\n  synthetic:\n    train_per_class: 10\n  val_size: 20\ntrain:\n  epochs: 1\n" + NO_DEMO_MIN_STEPS)


def test_killed_trainings_slot_goes_to_the_next_job(tmp_path):
    (tmp_path / "one-slot.yaml").write_text(ONE_SLOT)
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(REPO / "config" / "demo.yaml"), str(tmp_path / "one-slot.yaml"),
               "--resources", "gpu=2", "--cores", "2"]  # last: a target may follow (not after --resources)
    env = {**package_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    log = tmp_path / "killed-run.log"
    with open(log, "w") as out:
        snakemake = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                     env={**env, "CNNBENCH_TEST_PAUSE_AT_STEP": "1"})
    try:
        first = paused_run(tmp_path, snakemake, log)
        second = next(run for run in RUNS if run != first)
        wait_for_text(tmp_path / second / "train.log", "waiting for one to be freed", snakemake, log)
        holder = int((tmp_path / first / "paused-at-step-1").read_text())
        assert process_state(holder)[1] == snakemake.pid  # launcher and trainer exec'd: no shell between
        os.kill(holder, signal.SIGKILL)
        # The waiting job gets the slot, trains up to the test hook's pause, and is stopped there.
        wait_for_file(tmp_path / second / "paused-at-step-1", snakemake, log)
        second_log = (tmp_path / second / "train.log").read_text()
        assert "GPU slot 0 is free after" in second_log and "CUDA_VISIBLE_DEVICES=0" in second_log, second_log
        os.kill(int((tmp_path / second / "paused-at-step-1").read_text()), signal.SIGTERM)
        snakemake.wait(timeout=300)
    finally:
        stop(snakemake)
    assert snakemake.returncode != 0 and "Error in rule train_torch" in log.read_text()

    # Again for the killed run: the lock files left behind block nothing, it gets the slot at once.
    rerun = subprocess.run([*command, f"{first}/metrics.json"], capture_output=True, text=True, env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert load_metrics(tmp_path / first / "metrics.json")["environment"]["cuda_visible_devices"] == "0"
    assert "waiting" not in (tmp_path / first / "train.log").read_text()


def paused_run(workdir: Path, proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while True:
        paused = [run for run in RUNS if (workdir / run / "paused-at-step-1").exists()]
        if paused:
            assert len(paused) == 1, "two trainings ran at once on a one-GPU pool"
            return paused[0]
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-5000:]}"
        assert time.monotonic() < deadline, "no training paused"
        time.sleep(0.05)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-5000:]}"
        assert time.monotonic() < deadline, f"{path} never said {text!r}"
        time.sleep(0.05)


def overlap(a: dict, b: dict) -> bool:
    """Whether two runs' [started_at, finished_at] spans overlap."""
    return (datetime_of(a["started_at"]) < datetime_of(b["finished_at"])
            and datetime_of(b["started_at"]) < datetime_of(a["finished_at"]))
