"""The demo workflow end to end in a temporary directory, and a target-file rerun."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cnnbench.config import resolve_hparams
from cnnbench.metrics import load_metrics
from cnnbench.training import training_budget
from conftest import REPO, demo_config, linked_checkout, removed_unless_failed, run_dir

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


def demo_epochs(variant: str, train_size: int) -> int:
    """The epochs config/demo.yaml gives a variant: 2, or more where its min_steps asks (scratch)."""
    return training_budget(resolve_hparams(demo_config(), variant), train_size)[0]


def test_demo_produces_every_output(demo_run):
    workdir, output = demo_run
    results = workdir / "results"
    for variant in DEMO_VARIANTS:
        run = run_dir(results, variant)
        metrics = load_metrics(run / "metrics.json")  # validates against the schema
        epochs = demo_epochs(variant, metrics["data"]["train_size"])
        assert metrics["variant"] == variant and len(metrics["history"]) == epochs
        assert metrics["config"]["image_size"] == 64 and metrics["data"]["source"] == "synthetic"
        expected_weights = "standin" if variant.endswith("pretrained") else "none"
        assert metrics["weights"]["source"] == expected_weights
        # Every fp32 weight of the trained network is in the saved model (tests/test_saved_models.py
        # reloads one and reproduces its test accuracy).
        assert (run / MODEL_FILE[metrics["framework"]]).stat().st_size > 4 * PARAMETERS[metrics["model"]]
        log = (run / "train.log").read_text()
        assert re.search(rf"^epoch {epochs}/{epochs}: 100%\|#{{10}}\|", log, re.M)
        assert f"epoch {epochs}/{epochs}: train loss" in log
    table = pd.read_csv(results / "summary.csv")
    assert sorted(table["variant"]) == sorted(DEMO_VARIANTS)
    assert table["test_accuracy"].between(0, 1).all() and (table["train_seconds"] > 0).all()
    assert "keras-vgg16-pretrained" in (results / "summary.md").read_text()
    assert (results / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert job_counts(output) == {"prepare_data": 1, "standin_weights_torch": 1, "standin_weights_keras": 1,
                                  "train_torch": 2, "train_keras": 2, "summarize": 1, "all": 1}


def test_demo_scratch_variants_learn(demo_run):
    """A newcomer's `make demo` shows training work: both from-scratch AlexNets end well above chance
    (0.1) on the synthetic classes. (The pretrained ones start from stand-in, random, weights.)"""
    results = demo_run[0] / "results"
    for variant in ("torch-alexnet-scratch", "keras-alexnet-scratch"):
        metrics = load_metrics(run_dir(results, variant) / "metrics.json")
        assert metrics["config"]["min_steps"] == 100 and metrics["config"]["lr"] == 0.02
        assert metrics["test"]["accuracy"] >= 0.5, (variant, [e["val_accuracy"] for e in metrics["history"]])


def private_copy(checkout: Path, directory: Path) -> Path:
    """The demo's results, its stand-in weights and Snakemake's records of them, copied (timestamps
    kept) into a linked checkout of this test's own: the shared demo stays as `make demo` left it."""
    copy = linked_checkout(directory)
    for name in ("results", ".snakemake", "resources"):  # resources/: the demo's stand-in weights
        subprocess.run(["cp", "-a", "--reflink=auto", str(checkout / name), str(copy / name)], check=True,
                       timeout=600)
    shutil.rmtree(copy / ".snakemake" / "locks", ignore_errors=True)
    return copy


RERUN = "torch-alexnet-pretrained"  # the cheapest demo training (2 epochs; scratch trains 100 steps)


def test_missing_metrics_reruns_that_training_alone(demo_run, tmp_path):
    workdir = private_copy(demo_run[0], tmp_path / "cnnbench")
    results = workdir / "results"
    target = run_dir(results, RERUN) / "metrics.json"
    others = {v: (run_dir(results, v) / "metrics.json").stat().st_mtime_ns for v in DEMO_VARIANTS if v != RERUN}
    target.unlink()

    output = snakemake(workdir, str(target.relative_to(workdir)))
    assert job_counts(output) == {"train_torch": 1}
    assert load_metrics(target)["variant"] == RERUN
    assert {v: (run_dir(results, v) / "metrics.json").stat().st_mtime_ns for v in others} == others

    # Asking for everything again only re-aggregates: nothing else trains.
    output = snakemake(workdir)
    assert job_counts(output) == {"summarize": 1, "all": 1}

    # As the README says: delete a run's directory and the plain command retrains it, and only it.
    others = {v: (run_dir(results, v) / "metrics.json").stat().st_mtime_ns for v in DEMO_VARIANTS if v != RERUN}
    shutil.rmtree(target.parent)
    output = snakemake(workdir)
    assert job_counts(output) == {"train_torch": 1, "summarize": 1, "all": 1}
    assert load_metrics(target)["variant"] == RERUN
    assert {v: (run_dir(results, v) / "metrics.json").stat().st_mtime_ns for v in others} == others


STUDY_DEMO = REPO / "config" / "study-demo.yaml"  # the README's study on demo data: what the study's axes write


@pytest.fixture(scope="module")
def axes_run(request, tmp_path_factory):
    """config/demo.yaml + config/study-demo.yaml, two trainings at a time (a thread each)."""
    with removed_unless_failed(request, tmp_path_factory.mktemp("axes")) as workdir:
        yield workdir, snakemake(workdir, "--configfile", str(REPO / "config" / "demo.yaml"), str(STUDY_DEMO),
                                 "--resources", "gpu=2")


def study_demo() -> dict:
    import yaml

    return yaml.safe_load(STUDY_DEMO.read_text())


def test_sizes_and_learning_rates_run_and_are_selected_on_validation(axes_run):
    from cnnbench.config import configured_runs, parse_variant
    from cnnbench.report import time_to_accuracy

    workdir, output = axes_run
    results = workdir / "results"
    config = study_demo()
    runs = configured_runs(config)
    assert len(runs) == 20
    counts = job_counts(output)
    assert (counts["train_torch"], counts["train_keras"], counts["summarize"]) == (16, 4, 1)
    val_accuracy, history_of = {}, {}
    for variant, size, lr, seed in runs:
        metrics = load_metrics(run_dir(results, variant, seed, size, lr) / "metrics.json")
        assert (metrics["config"]["train_size"], metrics["config"]["lr"], metrics["seed"]) == (size, lr, seed)
        assert metrics["data"]["train_size"] == (40 if size else 60)  # 8 per class less 20 for validation
        assert (metrics["data"]["val_size"], metrics["data"]["test_size"]) == (20, 20)
        # min_steps 4: 40 images are 3 steps of 16, so 2 epochs; 60 images are 4 steps, so the 1 set.
        assert metrics["config"]["epochs"] == len(metrics["history"]) == (2 if size else 1)
        label = "all" if size is None else str(size)
        val_accuracy[variant, label, lr, seed] = metrics["history"][-1]["val_accuracy"]
        history_of[variant, label, lr, seed] = metrics["history"]

    selection = pd.read_csv(results / "lr_selection.csv", dtype={"train_size": str})
    assert list(selection.columns) == ["variant", "train_size", "lr", "seeds", "val_accuracy_mean",
                                       "val_accuracy_std", "selected"]
    assert len(selection) == 10 and (selection["seeds"] == 2).all()  # scratch: 2 sizes x 2 lrs; others 2 x 1
    chosen = {}
    for (variant, label), rows in selection.groupby(["variant", "train_size"]):
        rates = config["sweep"][parse_variant(variant).init]["lr"]
        means = {lr: (val_accuracy[variant, label, lr, 0] + val_accuracy[variant, label, lr, 1]) / 2 for lr in rates}
        rows = rows.set_index("lr")
        for lr, mean in means.items():
            assert rows.loc[lr, "val_accuracy_mean"] == pytest.approx(mean)
        chosen[variant, label] = min(means, key=lambda lr: (-means[lr], lr))  # best mean, ties: the smaller lr
        assert rows.index[rows["selected"]].tolist() == [chosen[variant, label]]

    summary = pd.read_csv(results / "summary.csv", dtype={"train_size": str})
    assert sorted(zip(summary.variant, summary.train_size, summary.lr, summary.seed)) == sorted(
        (variant, label, lr, seed) for (variant, label), lr in chosen.items() for seed in (0, 1))
    for row in summary.itertuples():  # time to target, from each run's own history
        epoch, seconds = time_to_accuracy(history_of[row.variant, row.train_size, row.lr, row.seed],
                                          config["target_val_accuracy"])
        assert (None if pd.isna(row.epochs_to_target) else row.epochs_to_target) == epoch
        assert (None if pd.isna(row.seconds_to_target) else row.seconds_to_target) == pytest.approx(seconds)
    assert "## Learning-rate selection (validation)" in (results / "summary.md").read_text()


def test_the_study_demo_writes_its_plots_and_conclusions(axes_run):
    from PIL import Image

    workdir, _ = axes_run
    results = workdir / "results"
    differences = pd.read_csv(results / "paired_differences.csv", dtype={"train_size": str})
    gains = differences[differences.comparison.str.contains(" - scratch")]
    assert sorted(set(zip(gains.comparison, gains.train_size))) == sorted(
        (f"{init} - scratch (torch alexnet)", size) for init in ("pretrained", "frozen") for size in ("4", "all"))
    assert (gains["paired_seeds"] == 2).all()
    text = (results / "conclusions.md").read_text()
    for row in gains.itertuples():
        where = "At 4 images per class" if row.train_size == "4" else "On the whole training split"
        who = "fine-tuning" if row.comparison.startswith("pretrained") else "the frozen backbone"
        claim = next(line for line in text.splitlines() if line.startswith(f"- {where}, {who} minus scratch is "))
        assert (f"is {row.test_accuracy_diff_mean:.4f} [{row.test_accuracy_diff_ci_low:.4f}, "
                f"{row.test_accuracy_diff_ci_high:.4f}] test accuracy over 2 seeds") in claim
        includes_zero = row.test_accuracy_diff_ci_low <= 0 <= row.test_accuracy_diff_ci_high
        assert ("the interval includes 0: not supported by these seeds" in claim) == includes_zero, claim
    assert "**torch alexnet**" in text and text.removeprefix("# Conclusions\n\n") in (results / "summary.md").read_text()
    for name in ("data_efficiency.png", "pretraining_gain.png"):
        with Image.open(results / name) as image:
            assert image.format == "PNG" and min(image.size) > 300, name
