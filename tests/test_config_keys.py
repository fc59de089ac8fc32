"""Config keys that change how a run trains, set through a config file and the rules (not by calling
a trainer directly): each one reaches the trainer and is recorded in the run's metrics."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cnnbench.metrics import load_metrics
from conftest import REPO, removed_unless_failed, run_dir, saved_kernel_initializers
from test_workflow import job_counts, snakemake

# Tiny: 6 training images per class, one epoch; cosine schedule and Nesterov for every variant,
# torch.compile forced on for the torch one (on the CPU, where `auto` would not compile), Keras on jax
# and from Keras' own default init (scratch_init: framework).
OVERLAY = {
    "variants": ["torch-alexnet-scratch", "keras-alexnet-scratch"],
    "data": {"synthetic": {"train_per_class": 6, "test_per_class": 3}, "val_size": 20},
    "train": {"epochs": 1, "lr_schedule": "cosine", "nesterov": True, "batch_size": 16},
    "init_overrides": {"scratch": {"min_steps": None}},  # one epoch, not make demo's 100 steps
    "variant_overrides": {"torch-alexnet-scratch": {"compile": "on"},
                          "keras-alexnet-scratch": {"scratch_init": "framework"}},
    "keras_backend": "jax",
}


@pytest.fixture(scope="module")
def keyed_run(request, tmp_path_factory):
    with removed_unless_failed(request, tmp_path_factory.mktemp("config-keys")) as workdir:
        overlay = workdir / "overlay.yaml"
        overlay.write_text(json.dumps(OVERLAY))  # JSON is YAML
        output = snakemake(workdir, "--configfile", str(REPO / "config" / "demo.yaml"), str(overlay))
        yield workdir, output


def test_keys_reach_the_trainers_and_the_metrics(keyed_run):
    workdir, output = keyed_run
    assert job_counts(output)["train_torch"] == job_counts(output)["train_keras"] == 1
    results = workdir / "results"
    torch_run = load_metrics(run_dir(results, "torch-alexnet-scratch") / "metrics.json")
    keras_run = load_metrics(run_dir(results, "keras-alexnet-scratch") / "metrics.json")
    for metrics in (torch_run, keras_run):
        assert metrics["config"]["lr_schedule"] == "cosine" and metrics["config"]["nesterov"] is True
        assert metrics["config"]["batch_size"] == 16 and len(metrics["history"]) == 1
    assert torch_run["config"]["compile"] == "on" and keras_run["config"]["compile"] == "auto"
    assert keras_run["environment"]["keras_backend"] == "jax"
    assert ", jax " in keras_run["environment"]["framework_version"]
    torch_log = (run_dir(results, "torch-alexnet-scratch") / "train.log").read_text()
    assert "compiling the model with torch.compile (compile: on)" in torch_log
    assert torch_run["environment"]["compiled"] is True
    assert "warm-up (compiled): each batch shape once" in torch_log and torch_run["compile_seconds"] > 0


def test_scratch_init_reaches_the_keras_model_the_metrics_and_the_summary(keyed_run):
    """keras-alexnet-scratch's variant override scratch_init: framework builds its model with Keras' own
    initializers (the saved model's config names them), is recorded in its metrics and named in the
    summary; torch-alexnet-scratch keeps the default, torchvision."""
    workdir, _ = keyed_run
    results = workdir / "results"
    keras_dir, torch_dir = run_dir(results, "keras-alexnet-scratch"), run_dir(results, "torch-alexnet-scratch")
    assert load_metrics(keras_dir / "metrics.json")["config"]["scratch_init"] == "framework"
    assert load_metrics(torch_dir / "metrics.json")["config"]["scratch_init"] == "torchvision"
    initializers = saved_kernel_initializers(keras_dir / "model.keras")
    assert sorted(initializers) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "head"]
    assert set(initializers.values()) == {"GlorotUniform"}
    summary = pd.read_csv(results / "summary.csv")
    assert dict(zip(summary["variant"], summary["scratch_init"])) == {"keras-alexnet-scratch": "framework",
                                                                     "torch-alexnet-scratch": "torchvision"}
    markdown = (results / "summary.md").read_text()
    assert ("Scratch runs' initialisation (scratch_init): torchvision (torchvision's rules in both frameworks) for "
            "torch-alexnet-scratch; framework (each framework's own defaults") in markdown
    assert "Glorot-uniform kernels and zero biases in Keras) for keras-alexnet-scratch." in markdown
