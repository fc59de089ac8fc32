"""Both trainers end to end on a tiny prepared dataset, each as its own process."""

from __future__ import annotations

import json
import re

import pytest

from cnnbench.fileio import file_digest
from cnnbench.metrics import validate_metrics
from conftest import DEFAULT_HPARAMS, run_module, run_python

MODEL_SUFFIX = {"torch": "model.pt", "keras": "model.keras"}


def train(framework, variant, data, run_dir, hparams=None, extra=(), check=True, prelude=None):
    hp = {**DEFAULT_HPARAMS, **(hparams or {})}
    return run_module(
        f"{framework}_trainer", "--variant", variant, "--seed", 0, "--data", data, "--hparams", json.dumps(hp),
        "--run-dir", run_dir, "--metrics", run_dir / "metrics.json", "--model-out", run_dir / MODEL_SUFFIX[framework],
        *extra, check=check, prelude=prelude)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_scratch_training_writes_valid_metrics(framework, tiny_dataset, tmp_path):
    result = train(framework, f"{framework}-alexnet-scratch", tiny_dataset, tmp_path, {"epochs": 2})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    validate_metrics(metrics)
    assert metrics["variant"] == f"{framework}-alexnet-scratch" and metrics["framework"] == framework
    assert [epoch["epoch"] for epoch in metrics["history"]] == [1, 2]
    assert metrics["data"] == {"source": "synthetic", "train_size": 40, "val_size": 20, "test_size": 30,
                               "sha256": file_digest(tiny_dataset)}
    assert metrics["weights"] == {"source": "none", "sha256": None}
    assert metrics["config"]["epochs"] == 2 and metrics["config"]["image_size"] == 64
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == 30
    assert metrics["environment"]["device"] == "cpu" and metrics["environment"]["container"] is None
    if framework == "keras":
        assert metrics["environment"]["keras_backend"] == "tensorflow"
    assert (tmp_path / MODEL_SUFFIX[framework]).stat().st_size > 1_000_000
    assert not (tmp_path / "checkpoint").exists()  # dropped once the run is complete
    # The progress bar's own lines (tqdm, ASCII in a log), distinct from log_epoch's summary line.
    assert re.search(r"^epoch 2/2: 100%\|#{10}\| 40\.0/40\.0 \[[\d:]+<00:00, +[\d.]+img/s\]$", result.stderr, re.M)
    assert "epoch 2/2: train loss" in result.stderr  # the epoch's summary line


def test_keras_trainer_takes_the_train_size_and_scales_the_epochs(tiny_dataset, tmp_path):
    """The torch trainer's counterpart runs in tests/test_workflow.py (axes_run)."""
    train("keras", "keras-alexnet-scratch", tiny_dataset, tmp_path, {"train_size": 2, "min_steps": 3})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # 2 images per class are 20 images, 2 steps of 16: 3 steps take 2 epochs.
    assert (metrics["data"]["train_size"], metrics["data"]["val_size"], metrics["data"]["test_size"]) == (20, 20, 30)
    assert metrics["config"]["train_size"] == 2 and metrics["config"]["epochs"] == len(metrics["history"]) == 2


# Run before the Keras trainer: TensorFlow unimportable, as on the lent GPU machine, which has JAX and
# torch but no TensorFlow.
WITHOUT_TENSORFLOW = """
import sys

class Without:  # a finder that never finds tensorflow: as if it were not installed
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] == "tensorflow" else self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Without(finder) for finder in sys.meta_path]
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_trainer_runs_on_the_other_backends_without_tensorflow(backend, tiny_dataset, tmp_path):
    result = train("keras", "keras-alexnet-scratch", tiny_dataset, tmp_path, extra=("--keras-backend", backend),
                   prelude=WITHOUT_TENSORFLOW)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    validate_metrics(metrics)
    assert metrics["environment"]["keras_backend"] == backend
    assert f", {backend} " in metrics["environment"]["framework_version"]
    assert len(metrics["history"]) == 1 and sum(map(sum, metrics["test"]["confusion_matrix"])) == 30
    assert (tmp_path / "model.keras").stat().st_size > 1_000_000 and "epoch 1/1" in result.stderr


@pytest.mark.parametrize("framework, model, weights_name, preprocessing", [
    ("torch", "alexnet", "alexnet-owt-7be5be79.pth", "imagenet"),
    ("keras", "vgg16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "caffe"),  # what Keras' file expects
])
def test_pretrained_training_records_the_weights(framework, model, weights_name, preprocessing, tiny_dataset,
                                                 tmp_path):
    weights = tmp_path / weights_name
    run_module(f"{framework}_models", "standin", "--model", model, "--out", weights)
    train(framework, f"{framework}-{model}-pretrained", tiny_dataset, tmp_path / "run",
          extra=("--weights", weights, "--weights-source", "standin"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["weights"] == {"source": "standin", "sha256": file_digest(weights)}
    assert metrics["init"] == "pretrained"
    assert metrics["config"]["preprocessing"] == preprocessing  # DEFAULT_HPARAMS ask for auto
    if framework == "keras":  # the saved model reloads, its input transform included
        layers = run_python(f"""
import json, keras
import cnnbench.keras_models  # registers the custom layers
model = keras.saving.load_model({str(tmp_path / "run" / "model.keras")!r})
print(json.dumps([layer.name for layer in model.layers]))
""")
        assert "rgb_to_bgr" in layers


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_require_gpu_fails_fast_without_one(framework, tiny_dataset, tmp_path):
    result = train(framework, f"{framework}-alexnet-scratch", tiny_dataset, tmp_path, {"require_gpu": True},
                   check=False)
    assert result.returncode == 1
    assert "require_gpu is true" in result.stderr and "set require_gpu: false" in result.stderr
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_missing_weights_file_is_named(framework, tiny_dataset, tmp_path):
    model = "alexnet" if framework == "torch" else "vgg16"
    result = train(framework, f"{framework}-{model}-pretrained", tiny_dataset, tmp_path, check=False,
                   extra=("--weights", tmp_path / "absent.pth", "--weights-source", "imagenet"))
    assert result.returncode == 2
    assert "absent.pth does not exist" in result.stderr and "weights: standin" in result.stderr


def test_keras_epoch_loss_and_accuracy_are_over_the_epochs_images(tiny_dataset, tmp_path):
    """With lr 0 and no dropout the weights stay as saved, so the epoch's training loss and accuracy
    must be those of the saved model over all 40 training images, averaged per image (batches of
    16, 16 and 8: a plain mean of the batch means would differ)."""
    train("keras", "keras-alexnet-scratch", tiny_dataset, tmp_path, {"lr": 0.0, "dropout": 0.0})
    epoch = json.loads((tmp_path / "metrics.json").read_text())["history"][0]
    out = run_python(f"""
import json, keras
from cnnbench.data import load_prepared
from cnnbench.keras_trainer import evaluate
import cnnbench.keras_models  # registers the custom layers for loading
data = load_prepared({str(tiny_dataset)!r})
model = keras.saving.load_model({str(tmp_path / "model.keras")!r})
loss, accuracy, _ = evaluate(model, data["x_train"], data["y_train"], {{"eval_batch_size": 64}})
print(json.dumps({{"loss": loss, "accuracy": accuracy}}))
""")
    assert epoch["train_loss"] == pytest.approx(out["loss"], rel=1e-5)
    assert epoch["train_accuracy"] == pytest.approx(out["accuracy"], abs=1e-9)
