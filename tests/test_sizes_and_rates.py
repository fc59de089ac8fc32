"""The study's axes without training: run paths, training budget per size, the learning-rate sweep
and its selection on validation figures, time to accuracy (no framework imported)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from snakemake.utils import validate

from cnnbench import report
from cnnbench.config import (ConfigError, configured_runs, format_lr, learning_rates, parse_size, run_hparams,
                             run_name)
from cnnbench.training import training_budget
from conftest import REPO
from factories import make_metrics, write_metrics

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")


def default_config(**overrides) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(overrides)
    validate(config, SCHEMA)
    return config


# ------------------------------------------------------------------------------ run paths

def test_run_path_layout():
    assert run_name("torch-alexnet-scratch", None, 0.01, 0) == "torch-alexnet-scratch/nall-lr0.01/seed0"
    assert run_name("keras-vgg16-pretrained", 100, 1e-05, 2) == "keras-vgg16-pretrained/n100-lr1e-05/seed2"
    assert parse_size("all") is None and parse_size("100") == 100


@pytest.mark.parametrize("lr", [0.1, 0.03, 0.01, 0.001, 3e-4, 1e-05, 1 / 3, 2.5e-7, 1, 0.1 + 0.2])
def test_learning_rate_in_a_path_is_lossless_and_path_safe(lr):
    text = format_lr(lr)
    assert float(text) == lr
    assert set(text) <= set("0123456789.e+-") and text[0].isdigit()


def test_configured_runs_cover_sizes_rates_and_seeds():
    config = default_config(variants=["torch-alexnet-scratch", "torch-alexnet-pretrained"], seeds=[0, 1],
                            train_sizes=[10, None], sweep={"scratch": {"lr": [0.1, 0.01]}})
    runs = configured_runs(config)
    assert len(runs) == 2 * 2 * 2 + 1 * 2 * 2  # scratch: 2 sizes x 2 lrs x 2 seeds; pretrained: its one lr
    assert ("torch-alexnet-scratch", 10, 0.1, 1) in runs
    assert ("torch-alexnet-pretrained", None, 0.001, 0) in runs  # init_overrides' lr without a sweep
    assert run_hparams(config, "torch-alexnet-scratch", 10, 0.1) == {
        **config["train"], "lr": 0.1, "train_size": 10}


def test_default_config_runs_are_todays_runs():
    config = default_config()
    assert config["train_sizes"] == [None] and config["sweep"] == {} and config["target_val_accuracy"] is None
    assert [run_name(*run) for run in configured_runs(config)] == [
        "torch-alexnet-scratch/nall-lr0.01/seed0", "keras-alexnet-scratch/nall-lr0.01/seed0",
        "torch-alexnet-pretrained/nall-lr0.001/seed0", "keras-vgg16-pretrained/nall-lr0.001/seed0"]


def test_sweep_and_a_variant_lr_override_conflict_with_what_to_do():
    config = default_config(sweep={"pretrained": {"lr": [0.01, 0.001]}},
                            variant_overrides={"keras-vgg16-pretrained": {"lr": 0.005}})
    assert learning_rates(config, "torch-alexnet-pretrained") == [0.01, 0.001]
    with pytest.raises(ConfigError, match=r"variant_overrides.keras-vgg16-pretrained.lr and sweep.pretrained.lr "
                                          r"both set the learning rate of keras-vgg16-pretrained: remove one"):
        learning_rates(config, "keras-vgg16-pretrained")


@pytest.mark.parametrize("bad", [{"sweep": {"scratch": {"lr": []}}}, {"sweep": {"scratch": {"lr": [0]}}},
                                 {"sweep": {"scratch": {"lr": [0.1, 0.1]}}}, {"sweep": {"fine-tuned": {"lr": [0.1]}}},
                                 {"sweep": {"scratch": {"momentum": [0.9]}}}, {"train_sizes": [0]},
                                 {"train_sizes": [10, 10]}, {"target_val_accuracy": 1.5}])
def test_schema_rejects_bad_axes(bad):
    from snakemake.exceptions import WorkflowError

    config = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    config.update(bad)
    with pytest.raises(WorkflowError):
        validate(config, SCHEMA)


# ------------------------------------------------------------------------- training budget

def test_reference_budget_is_unchanged():
    """All of CIFAR-10's 45,000 training images (after the 5,000 validation images), 10 epochs, batch
    64: 704 steps per epoch, 10 epochs, with min_steps unset (the default) or already met."""
    config = default_config()
    hparams = run_hparams(config, "torch-alexnet-scratch", None, 0.01)
    assert hparams["min_steps"] is None
    assert training_budget(hparams, 45_000) == (10, 704)
    assert training_budget({**hparams, "min_steps": 7040}, 45_000) == (10, 704)


def test_small_training_sets_get_min_steps():
    hparams = {"epochs": 10, "batch_size": 64, "min_steps": 2000}
    assert training_budget(hparams, 100) == (1000, 2)  # 10 per class: 2 steps per epoch
    assert training_budget(hparams, 1000) == (125, 16)
    assert training_budget(hparams, 10_000) == (13, 157)  # ceil(2000 / 157)
    assert training_budget({**hparams, "max_steps_per_epoch": 1}, 10_000) == (2000, 1)


# ----------------------------------------------------------------------- time to accuracy

def test_time_to_accuracy():
    history = [{"epoch": i + 1, "val_accuracy": acc, "seconds": s}
               for i, (acc, s) in enumerate([(0.3, 5.0), (0.55, 6.0), (0.5, 7.0), (0.7, 8.0)])]
    assert report.time_to_accuracy(history, 0.55) == (2, 11.0)  # reached exactly: counts
    assert report.time_to_accuracy(history, 0.6) == (4, 26.0)
    assert report.time_to_accuracy(history, 0.2) == (1, 5.0)
    assert report.time_to_accuracy(history, 0.71) == (None, None)
    assert report.time_to_accuracy(history, None) == (None, None)


# ------------------------------------------------------------------------ lr selection

def sweep_runs(rng=None):
    """Two variants, two sizes, three learning rates, three seeds, with known final val accuracies."""
    runs = []
    for variant in ("torch-alexnet-scratch", "torch-alexnet-pretrained"):
        for size, base in ((10, 0.2), (None, 0.5)):
            for lr, bonus in ((0.1, 0.0), (0.01, 0.1), (0.001, 0.05)):
                for seed in range(3):
                    val = base + bonus + 0.01 * seed + (0.02 if variant.endswith("pretrained") and size else 0)
                    test = rng.uniform(0, 1) if rng is not None else val - 0.03
                    runs.append(make_metrics(variant, seed, val_accuracies=(0.1, val), test_accuracy=test, lr=lr,
                                             per_class=size))
    return runs


def test_selection_picks_the_best_mean_validation_accuracy(tmp_path):
    runs = report.summarize(sweep_runs())
    selection = report.select_learning_rates(runs[report.SELECTION_COLUMNS])
    assert len(selection) == 2 * 2 * 3 and selection["selected"].sum() == 4
    assert set(selection.loc[selection["selected"], "lr"]) == {0.01}
    row = selection[(selection.variant == "torch-alexnet-scratch") & (selection.train_size == "10")
                    & (selection.lr == 0.001)].iloc[0]
    assert row["seeds"] == 3 and row["val_accuracy_mean"] == pytest.approx(0.26)
    assert row["val_accuracy_std"] == pytest.approx(0.01)
    assert list(selection["train_size"].drop_duplicates()) == ["10", "all"]  # by size, all last


def test_a_tie_selects_the_smallest_learning_rate():
    sweep = pd.DataFrame({"variant": ["torch-alexnet-scratch"] * 3, "train_size": ["all"] * 3,
                          "lr": [0.1, 0.001, 0.01], "seed": [0, 0, 0], "val_accuracy": [0.5, 0.5, 0.4]})
    selection = report.select_learning_rates(sweep)
    assert list(selection.loc[selection["selected"], "lr"]) == [0.001]


def test_test_accuracies_cannot_change_a_selection():
    """Property: with validation figures fixed, any test accuracies give the same selection (200
    random draws, including draws where the test figures rank the learning rates the other way)."""
    baseline = report.select_learning_rates(report.summarize(sweep_runs())[report.SELECTION_COLUMNS])
    rng = np.random.default_rng(0)
    for _ in range(200):
        runs = report.summarize(sweep_runs(rng))
        runs["test_loss"] = rng.uniform(0, 5, len(runs))
        pd.testing.assert_frame_equal(report.select_learning_rates(runs), baseline)


def test_report_outputs_use_the_selected_runs_only(tmp_path):
    files = [write_metrics(tmp_path, metrics) for metrics in sweep_runs()]
    out = tmp_path / "out"
    assert report.main([*map(str, files), "--out-dir", str(out), "--target-val-accuracy", "0.61"]) == 0
    selection = pd.read_csv(out / "lr_selection.csv", dtype={"train_size": str})
    assert len(selection) == 12 and set(selection.loc[selection.selected, "lr"]) == {0.01}
    assert "test_accuracy" not in " ".join(selection.columns)
    summary = pd.read_csv(out / "summary.csv", dtype={"train_size": str})
    assert len(summary) == 2 * 2 * 3 and set(summary["lr"]) == {0.01}
    assert list(summary.columns[:4]) == ["variant", "train_size", "lr", "seed"]
    # Time to accuracy: only the full-size runs at lr 0.01 reach 0.61 (0.6 + 0.01 * seed), in epoch 2.
    full = summary[summary.train_size == "all"].set_index(["variant", "seed"])
    assert full.loc["torch-alexnet-scratch", "epochs_to_target"].isna().tolist() == [True, False, False]
    assert full.loc[("torch-alexnet-scratch", 1), "epochs_to_target"] == 2
    assert full.loc[("torch-alexnet-scratch", 1), "seconds_to_target"] == pytest.approx(20.0)
    assert summary.loc[summary.train_size == "10", "epochs_to_target"].isna().all()
    # The reference's figures sit beside full-size runs only.
    assert summary.loc[summary.train_size == "10", "reference_test_accuracy"].isna().all()
    assert (summary.loc[(summary.train_size == "all") & (summary.variant == "torch-alexnet-scratch"),
                        "reference_test_accuracy"] == 0.8278).all()
    stats = pd.read_csv(out / "variant_stats.csv", dtype={"train_size": str})
    assert len(stats) == 4 and set(stats["lr"]) == {0.01} and (stats["seeds"] == 3).all()
    differences = pd.read_csv(out / "paired_differences.csv", dtype={"train_size": str})
    assert list(differences["train_size"]) == ["10", "all"]
    small = differences.set_index("train_size").loc["10"]
    assert small["comparison"] == "pretrained - scratch (torch alexnet)" and small["paired_seeds"] == 3
    assert small["test_accuracy_diff_mean"] == pytest.approx(0.02, abs=0.011)  # rounded to 1/100 by the factory
    markdown = (out / "summary.md").read_text()
    assert "## Learning-rate selection (validation)" in markdown and "reached 0.61" in markdown
    facts = json.loads((out / "summary_facts.json").read_text())
    assert facts["train_sizes"] == ["10", "all"] and facts["target_val_accuracy"] == 0.61
    assert len(facts["runs"]) == 36 and "torch-alexnet-scratch/n10-lr0.1/seed2" in facts["runs"]


def test_a_run_path_outside_the_config_says_which_runs_it_has(tmp_path):
    import subprocess
    import sys

    target = "results/runs/torch-alexnet-scratch/n10-lr0.05/seed0/metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config" / "demo.yaml"), "--config", "train_sizes=[10, 20]",
         "--cores", "1", "-n", target], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert ("results/runs/torch-alexnet-scratch/n10-lr0.05/seed0 is not a run of this config: its sizes are n10, n20 "
            "(train_sizes) and torch-alexnet-scratch's learning rates lr0.02") in result.stdout + result.stderr
