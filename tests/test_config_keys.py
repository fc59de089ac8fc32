"""Config keys that change how a run trains, set through a config file and the rules (not by calling
a trainer directly): each one reaches the trainer and is recorded in the run's metrics."""

from __future__ import annotations

import json

import pytest

from cnnbench.metrics import load_metrics
from conftest import REPO, removed_unless_failed, run_dir
from test_workflow import job_counts, snakemake

# Tiny: 6 training images per class, one epoch; cosine schedule and Nesterov for every variant,
# torch.compile forced on for the torch one (on the CPU, where `auto` would not compile), Keras on jax.
OVERLAY = {
    "variants": ["torch-alexnet-scratch", "keras-alexnet-scratch"],
    "data": {"synthetic": {"train_per_class": 6, "test_per_class": 3}, "val_size": 20},
    "train": {"epochs": 1, "lr_schedule": "cosine", "nesterov": True, "batch_size": 16},
    "init_overrides": {"scratch": {"min_steps": None}},  # one epoch, not make demo's 100 steps
    "variant_overrides": {"torch-alexnet-scratch": {"compile": "on"}},
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
