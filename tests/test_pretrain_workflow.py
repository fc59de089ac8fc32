"""`weights: pretrain` through the real workflow: the prepared data is split by class, a torch AlexNet is
pretrained on the source classes (killed once and resumed, as users hit it), and the study's pretrained
and frozen runs of both frameworks start from it on the target classes, saying so in their metrics and
the summary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from cnnbench.data import load_prepared
from cnnbench.fileio import file_digest
from cnnbench.metrics import load_metrics
from conftest import REPO, layered_config, run_dir
from test_reliability import start_paused, stop
from test_workflow import job_counts

SOURCE = ["class0", "class2", "class4"]
TARGET = ["class1", "class3", "class5"]
CONFIG = {
    "variants": ["torch-alexnet-scratch", "torch-alexnet-pretrained", "keras-alexnet-frozen"],
    "seeds": [0],
    "data": {"source": "synthetic", "val_size": 24, "synthetic": {"train_per_class": 12, "test_per_class": 4,
                                                                  "image_size": 32, "num_classes": 6}},
    "weights": "pretrain",
    "pretrain": {"source_classes": SOURCE, "train": {"epochs": 2, "batch_size": 8}},
    "train": {"epochs": 1, "batch_size": 16, "image_size": 64, "eval_batch_size": 64, "require_gpu": False},
}
PRETRAIN_DIR = Path("results/pretrain/alexnet")


def snakemake_command(workdir: Path, configfile: Path, *targets: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(configfile), "--cores", "2", *targets]


def test_pretraining_in_the_workflow_resumes_and_starts_both_frameworks(tmp_path):
    configfile = tmp_path / "pretrain.yaml"
    configfile.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    # Pause the pretraining 2 steps into its epoch 2 (30 source images, 24 after validation... batch 8), kill it.
    split = subprocess.run(snakemake_command(tmp_path, configfile, "results/data/source.npz"), capture_output=True,
                           text=True, env=env, timeout=600)
    assert split.returncode == 0, split.stdout[-3000:] + split.stderr[-3000:]
    source = load_prepared(tmp_path / "results" / "data" / "source.npz")
    assert source["class_names"] == tuple(SOURCE)
    steps_per_epoch = -(-len(source["y_train"]) // CONFIG["pretrain"]["train"]["batch_size"])
    pretrain_dir = tmp_path / PRETRAIN_DIR
    step = steps_per_epoch + 2
    snakemake = start_paused(snakemake_command(tmp_path, configfile, str(PRETRAIN_DIR / "model.pt")), pretrain_dir,
                             step, tmp_path / "killed.log", env=env)
    try:
        os.kill(int((pretrain_dir / f"paused-at-step-{step}").read_text()), signal.SIGKILL)
        snakemake.wait(timeout=300)
    finally:
        stop(snakemake)
    assert snakemake.returncode != 0 and (pretrain_dir / "checkpoint" / "last.pt").exists()

    result = subprocess.run(snakemake_command(tmp_path, configfile), capture_output=True, text=True, env=env,
                            timeout=1500)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    log = (pretrain_dir / "train.log").read_text()
    assert "resuming from" in log and "after epoch 1" in log and "epoch 1/2: train loss" not in log, log
    pretrained = load_metrics(pretrain_dir / "metrics.json")
    assert pretrained["variant"] == "torch-alexnet-scratch" and len(pretrained["history"]) == 2
    assert list(pretrained["test"]["per_class_accuracy"]) == SOURCE
    assert job_counts(result.stdout + result.stderr) == {
        "pretrain_torch": 1, "port_pretrained_weights": 1, "train_torch": 2, "train_keras": 1, "summarize": 1, "all": 1}

    origin = file_digest(pretrain_dir / "model.pt")
    results = tmp_path / "results"
    config = layered_config(CONFIG)
    for variant in CONFIG["variants"]:
        metrics = load_metrics(run_dir(results, variant, config=config) / "metrics.json")
        assert list(metrics["test"]["per_class_accuracy"]) == TARGET  # every run of the study: the target task
        if variant.endswith("scratch"):
            assert metrics["weights"]["source"] == "none"
            continue
        loaded = PRETRAIN_DIR / ("model.pt" if variant.startswith("torch") else "model.keras.npz")
        assert metrics["weights"] == {"source": "pretrain", "sha256": file_digest(tmp_path / loaded),
                                      "origin_sha256": origin, "path": str(loaded), "classes": SOURCE}
    label = f"pretrained here on {', '.join(SOURCE)} (sha256 {origin[:8]})"
    summary = pd.read_csv(results / "summary.csv")
    assert set(summary.loc[summary["variant"] != "torch-alexnet-scratch", "weights"]) == {label}
    assert f"pretrained weights: {label}" in (results / "summary.md").read_text()
