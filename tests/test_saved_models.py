"""The saved model of a run is the model that was tested: reloaded in a fresh process, it gives the
run's recorded test accuracy, confusion matrix and loss on the prepared test set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import log_softmax

from cnnbench.data import load_prepared
from conftest import run_python
from test_trainers import MODEL_SUFFIX, train

# The trainer's own path: the hyperparameters the run recorded, its Preprocess and evaluate.
TORCH_RELOAD = """
import json, torch
from cnnbench.data import load_prepared
from cnnbench.torch_models import build_model
from cnnbench.torch_trainer import Preprocess, evaluate
metrics = json.load(open({metrics!r}))
hp = metrics["config"]
data = load_prepared({data!r})
model = build_model(metrics["model"], len(data["class_names"]), hp["dropout"])
model.load_state_dict(torch.load({model!r}, map_location="cpu", weights_only=True))
model = model.to(memory_format=torch.channels_last)
device = torch.device("cpu")
x, y = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"]).long()
preprocess = Preprocess(hp["image_size"], hp["mean"], hp["std"], device, hp["preprocessing"])
loss, _, predictions = evaluate(model, x, y, preprocess, hp, device, metrics["environment"]["precision"])
print(json.dumps({{"loss": loss, "predictions": predictions.tolist()}}))
"""

# The .keras file alone (custom layers and optimizer registered by importing cnnbench.keras_models);
# the model takes the uint8 images and preprocesses them itself.
KERAS_RELOAD = """
import json, keras
import cnnbench.keras_models
from cnnbench.data import load_prepared
metrics = json.load(open({metrics!r}))
model = keras.saving.load_model({model!r})
logits = model.predict(load_prepared({data!r})["x_test"], batch_size=metrics["config"]["eval_batch_size"], verbose=0)
print(json.dumps({{"logits": logits.tolist()}}))
"""


def confusion_matrix(labels, predictions, classes: int) -> list[list[int]]:
    matrix = np.zeros((classes, classes), dtype=int)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix.tolist()


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_saved_model_reproduces_the_recorded_test_results(framework, tiny_dataset, tmp_path):
    train(framework, f"{framework}-alexnet-scratch", tiny_dataset, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    labels = load_prepared(tiny_dataset)["y_test"]
    paths = {"metrics": str(tmp_path / "metrics.json"), "data": str(tiny_dataset),
             "model": str(tmp_path / MODEL_SUFFIX[framework])}
    if framework == "torch":
        reloaded = run_python(TORCH_RELOAD.format(**paths), timeout=300)
        predictions, loss = np.asarray(reloaded["predictions"]), reloaded["loss"]
    else:
        reloaded = run_python(KERAS_RELOAD.format(**paths), env={"KERAS_BACKEND": "tensorflow"}, timeout=300)
        logits = np.asarray(reloaded["logits"], dtype=np.float64)
        predictions = logits.argmax(axis=1)
        loss = float(-log_softmax(logits, axis=1)[np.arange(len(logits)), labels].mean())

    accuracy = float((predictions == labels).mean())
    print(f"{framework}: reloaded test accuracy {accuracy:.4f} (recorded {metrics['test']['accuracy']:.4f}), "
          f"loss {loss!r} (recorded {metrics['test']['loss']!r})")
    assert accuracy == metrics["test"]["accuracy"]
    assert confusion_matrix(labels, predictions, 10) == metrics["test"]["confusion_matrix"]
    # After one epoch on 40 images the accuracy is near chance and cannot tell two models apart; the
    # loss can: the reloaded model's matched the recorded one to the last digit (2.30243352254 torch,
    # 2.30251963264 keras), where another model's differs from ln(10) by its own ~1e-4.
    assert loss == pytest.approx(metrics["test"]["loss"], rel=1e-6)
