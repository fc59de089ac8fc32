"""Resume as users hit it: the Python trainer of a `snakemake` run is SIGKILLed inside epoch 2, the
same command is run again, and the run continues after epoch 1 to the history of an uninterrupted
run (the demo's own run of that variant, same config, seed and cores)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cnnbench.config import resolve_hparams
from cnnbench.data import load_prepared
from cnnbench.metrics import load_metrics
from cnnbench.training import training_budget
from conftest import REPO, demo_config
from conftest import run_dir as workflow_run_dir
from test_reliability import comparable, start_paused, stop

VARIANT = "torch-alexnet-scratch"


def snakemake_command(workdir: Path, target: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(REPO / "config" / "demo.yaml"), "--cores", "all", target]


def test_trainer_killed_in_a_workflow_run_resumes_on_the_same_command(demo_checkout, tmp_path):
    checkout, _ = demo_checkout
    run_dir = workflow_run_dir(tmp_path / "results", VARIANT)
    target = str((run_dir / "metrics.json").relative_to(tmp_path))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    # Prepare the data first, to know the number of steps per epoch, and pause 3 steps into epoch 2.
    prepared = subprocess.run(snakemake_command(tmp_path, "results/data/dataset.npz"), capture_output=True,
                              text=True, env=env, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    num_train = len(load_prepared(tmp_path / "results" / "data" / "dataset.npz")["y_train"])
    steps_per_epoch = training_budget(resolve_hparams(demo_config(), VARIANT), num_train)[1]
    step = steps_per_epoch + 3
    snakemake = start_paused(snakemake_command(tmp_path, target), run_dir, step, tmp_path / "killed-run.log", env=env)
    try:
        trainer = int((run_dir / f"paused-at-step-{step}").read_text())
        assert trainer != snakemake.pid
        os.kill(trainer, signal.SIGKILL)  # the Python trainer itself, not Snakemake
        snakemake.wait(timeout=300)
    finally:
        stop(snakemake)
    killed_output = (tmp_path / "killed-run.log").read_text()
    assert snakemake.returncode != 0 and "Error in rule train_torch" in killed_output, killed_output[-3000:]
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoint" / "last.pt").exists()

    rerun = subprocess.run(snakemake_command(tmp_path, target), capture_output=True, text=True, env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "resuming from" in log and "after epoch 1" in log, log
    resumed = load_metrics(run_dir / "metrics.json")
    uninterrupted = load_metrics(workflow_run_dir(checkout / "results", VARIANT) / "metrics.json")
    epochs = len(uninterrupted["history"])
    assert f"epoch 1/{epochs}: train loss" not in log and f"epoch 2/{epochs}: train loss" in log  # not trained again
    assert [e["epoch"] for e in resumed["history"]] == list(range(1, epochs + 1))
    assert comparable(resumed["history"]) == comparable(uninterrupted["history"])  # torch on the CPU: exact
    assert resumed["test"] == uninterrupted["test"]
