"""The demo workflow end to end in a temporary directory, and a target-file rerun."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cnnbench.metrics import load_metrics
from conftest import REPO, linked_checkout, removed_unless_failed, run_dir

DEMO_VARIANTS = ["torch-alexnet-scratch", "keras-alexnet-scratch", "torch-alexnet-pretrained",
                 "keras-vgg16-pretrained"]
MODEL_FILE = {"torch": "model.pt", "keras": "model.keras"}
PARAMETERS = {"alexnet": 57_044_810, "vgg16": 134_301_514}  # with a 10-class head (tests/test_models.py)


def snakemake(workdir: Path, *args, configfile: Path = REPO / "config" / "demo.yaml"):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(configfile), "--cores", "2", *args],
        capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints: rule name -> number of jobs."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.fixture(scope="module")
def demo_run(demo_checkout):
    """The README's `make demo` (conftest.demo_checkout: run once, shared with tests/test_readme.py)."""
    return demo_checkout


def test_demo_produces_every_output(demo_run):
    workdir, output = demo_run
    results = workdir / "results"
    for variant in DEMO_VARIANTS:
        run = run_dir(results, variant)
        metrics = load_metrics(run / "metrics.json")  # validates against the schema
        assert metrics["variant"] == variant and len(metrics["history"]) == 2
        assert metrics["config"]["image_size"] == 64 and metrics["data"]["source"] == "synthetic"
        expected_weights = "standin" if variant.endswith("pretrained") else "none"
        assert metrics["weights"]["source"] == expected_weights
        # Every fp32 weight of the trained network is in the saved model (tests/test_saved_models.py
        # reloads one and reproduces its test accuracy).
        assert (run / MODEL_FILE[metrics["framework"]]).stat().st_size > 4 * PARAMETERS[metrics["model"]]
        log = (run / "train.log").read_text()
        assert re.search(r"^epoch 2/2: 100%\|#{10}\|", log, re.M) and "epoch 2/2: train loss" in log
    table = pd.read_csv(results / "summary.csv")
    assert sorted(table["variant"]) == sorted(DEMO_VARIANTS)
    assert table["test_accuracy"].between(0, 1).all() and (table["train_seconds"] > 0).all()
    assert "keras-vgg16-pretrained" in (results / "summary.md").read_text()
    assert (results / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert job_counts(output) == {"prepare_data": 1, "standin_weights_torch": 1, "standin_weights_keras": 1,
                                  "train_torch": 2, "train_keras": 2, "summarize": 1, "all": 1}


def private_copy(checkout: Path, directory: Path) -> Path:
    """The demo's results and Snakemake's records of them, copied (timestamps kept) into a linked
    checkout of this test's own: the shared demo stays as `make demo` left it for the other tests."""
    copy = linked_checkout(directory)
    for name in ("results", ".snakemake"):
        subprocess.run(["cp", "-a", "--reflink=auto", str(checkout / name), str(copy / name)], check=True,
                       timeout=600)
    shutil.rmtree(copy / ".snakemake" / "locks", ignore_errors=True)
    return copy


def test_missing_metrics_reruns_that_training_alone(demo_run, tmp_path):
    workdir = private_copy(demo_run[0], tmp_path / "cnnbench")
    results = workdir / "results"
    target = run_dir(results, "torch-alexnet-scratch") / "metrics.json"
    others = {v: (run_dir(results, v) / "metrics.json").stat().st_mtime_ns for v in DEMO_VARIANTS[1:]}
    target.unlink()

    output = snakemake(workdir, str(target.relative_to(workdir)))
    assert job_counts(output) == {"train_torch": 1}
    assert load_metrics(target)["variant"] == "torch-alexnet-scratch"
    assert {v: (run_dir(results, v) / "metrics.json").stat().st_mtime_ns for v in others} == others

    # Asking for everything again only re-aggregates: nothing else trains.
    output = snakemake(workdir)
    assert job_counts(output) == {"summarize": 1, "all": 1}

    # As the README says: delete a run's directory and the plain command retrains it, and only it.
    others = {v: (run_dir(results, v) / "metrics.json").stat().st_mtime_ns for v in DEMO_VARIANTS[1:]}
    shutil.rmtree(target.parent)
    output = snakemake(workdir)
    assert job_counts(output) == {"train_torch": 1, "summarize": 1, "all": 1}
    assert load_metrics(target)["variant"] == "torch-alexnet-scratch"
    assert {v: (run_dir(results, v) / "metrics.json").stat().st_mtime_ns for v in others} == others


# Two training-set sizes x two learning rates of one torch variant, one seed, 1 epoch of 32x32 images
# (trained at 64x64: AlexNet needs 63), min_steps 4 and a time-to-accuracy target: what the study's axes write.
AXES_OVERLAY = {
    "variants": ["torch-alexnet-scratch"],
    "seeds": [0],
    "train_sizes": [4, None],
    "sweep": {"scratch": {"lr": [0.02, 0.005]}},
    "target_val_accuracy": 0.0,
    "data": {"synthetic": {"train_per_class": 8, "test_per_class": 2, "image_size": 32}, "val_size": 20},
    "train": {"epochs": 1, "batch_size": 16, "image_size": 64, "min_steps": 4},
}


@pytest.fixture(scope="module")
def axes_run(request, tmp_path_factory):
    with removed_unless_failed(request, tmp_path_factory.mktemp("axes")) as workdir:
        overlay = workdir / "axes.yaml"
        overlay.write_text(json.dumps(AXES_OVERLAY))  # JSON is YAML
        yield workdir, snakemake(workdir, "--configfile", str(REPO / "config" / "demo.yaml"), str(overlay))


def test_sizes_and_learning_rates_run_and_are_selected_on_validation(axes_run):
    workdir, output = axes_run
    results = workdir / "results"
    assert job_counts(output) == {"prepare_data": 1, "train_torch": 4, "summarize": 1, "all": 1}
    val_accuracy, first_epoch_seconds = {}, {}
    for size, lr, seed in itertools.product((4, None), (0.02, 0.005), (0,)):
        metrics = load_metrics(run_dir(results, "torch-alexnet-scratch", seed, size, lr) / "metrics.json")
        assert (metrics["config"]["train_size"], metrics["config"]["lr"], metrics["seed"]) == (size, lr, seed)
        assert metrics["data"]["train_size"] == (40 if size else 60)  # 8 per class less 20 for validation
        assert (metrics["data"]["val_size"], metrics["data"]["test_size"]) == (20, 20)
        # min_steps 4: 40 images are 3 steps of 16, so 2 epochs; 60 images are 4 steps, so the 1 set.
        assert metrics["config"]["epochs"] == len(metrics["history"]) == (2 if size else 1)
        val_accuracy[size, lr, seed] = metrics["history"][-1]["val_accuracy"]
        first_epoch_seconds["all" if size is None else str(size), lr, seed] = metrics["history"][0]["seconds"]

    selection = pd.read_csv(results / "lr_selection.csv", dtype={"train_size": str})
    assert list(selection.columns) == ["variant", "train_size", "lr", "seeds", "val_accuracy_mean",
                                       "val_accuracy_std", "selected"]
    assert len(selection) == 4 and (selection["seeds"] == 1).all() and selection["val_accuracy_std"].isna().all()
    chosen = {}
    for size in (4, None):
        label = "all" if size is None else str(size)
        rows = selection[selection.train_size == label].set_index("lr")
        means = {lr: val_accuracy[size, lr, 0] for lr in (0.02, 0.005)}
        for lr, mean in means.items():
            assert rows.loc[lr, "val_accuracy_mean"] == pytest.approx(mean)
        chosen[label] = min(means, key=lambda lr: (-means[lr], lr))  # best mean, ties: the smaller lr
        assert rows.index[rows["selected"]].tolist() == [chosen[label]]

    summary = pd.read_csv(results / "summary.csv", dtype={"train_size": str})
    assert sorted(zip(summary.train_size, summary.lr, summary.seed)) == sorted(
        (label, chosen[label], 0) for label in ("4", "all"))
    # A target of 0 is reached in the first epoch, after its training seconds.
    assert (summary["epochs_to_target"] == 1).all()
    assert [row.seconds_to_target for row in summary.itertuples()] == pytest.approx(
        [first_epoch_seconds[row.train_size, row.lr, row.seed] for row in summary.itertuples()], rel=1e-12)
    assert "## Learning-rate selection (validation)" in (results / "summary.md").read_text()
