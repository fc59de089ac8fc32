"""The Keras trainer's loop: one `fit` per epoch (compiled multi-step executions), a warm-up that
compiles every batch shape and changes nothing, the SIGTERM bound, and bf16's float32 parts.

Keras runs in subprocesses (one framework per process)."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest

from conftest import DEFAULT_HPARAMS, package_env, run_python
from test_reliability import start_paused, stop, trainer_command
from test_trainers import train

def with_values(code: str, **values) -> str:
    """``code`` after assignments of ``values`` (reprs), e.g. BACKEND = 'jax'."""
    return "".join(f"{name} = {value!r}\n" for name, value in values.items()) + code


# A small network with every kind of state the real ones have: weights, BatchNorm statistics
# (TorchBatchNormalization, as in ResNet-50), a dropout seed state; the trainer's preprocessing and head.
# Needs BACKEND and HP.
TINY_MODEL = """
import os
os.environ["KERAS_BACKEND"] = BACKEND
import json
import keras
import numpy as np
from keras import layers
from cnnbench import keras_trainer
from cnnbench.keras_models import HEAD, TorchBatchNormalization, preprocessing


def tiny_model():
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    x = preprocessing(inputs, 16, HP["mean"], HP["std"])
    x = layers.Conv2D(4, 3, strides=2, name="conv")(x)
    x = TorchBatchNormalization(momentum=0.9, epsilon=1e-5, name="bn")(x)
    x = layers.Flatten()(layers.ReLU()(x))
    x = layers.Dropout(0.5)(x)
    return keras.Model(inputs, layers.Dense(10, name=HEAD, dtype="float32")(x))


rng = np.random.default_rng(0)
x_train = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
y_train = rng.integers(0, 10, 40)
x_val = rng.integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)
"""

# Prints, for a fresh model and one after a trained epoch, whether warm_up left each model and
# optimizer variable exactly as it was, and whether it reset the metrics.
WARM_UP_CHECK = TINY_MODEL + """


class NoStop:
    def after_step(self, steps=1):
        return False


def state(model):
    return {v.path: np.array(v) for v in [*model.variables, *model.optimizer.variables]}


keras.utils.set_random_seed(0)
model = tiny_model()
keras_trainer.compile_model(model, HP, steps_per_epoch=3)
before = {v.path: np.array(v) for v in model.variables}
keras_trainer.warm_up(model, x_train, y_train, 40, [x_val], HP)
after = state(model)
out = {"fresh_model": {path: bool(np.array_equal(after[path], value)) for path, value in before.items()},
       # the optimizer is built in warm-up: its variables as a fresh one's, momentum zero, iterations 0
       "fresh_optimizer": {v.path: bool(not np.any(np.array(v)) or v.path.endswith("learning_rate"))
                           for v in model.optimizer.variables}}
keras_trainer.train_one_epoch(model, x_train, y_train, np.arange(40)[::-1], HP, NoStop(), "epoch")
before = state(model)
keras_trainer.warm_up(model, x_train, y_train, 40, [x_val], HP)
after = state(model)
out["trained"] = {path: bool(np.array_equal(after[path], value)) for path, value in before.items()}
out["iterations"] = int(np.array(model.optimizer.iterations))
out["metrics_reset"] = all(not np.any(np.array(v)) for v in model.metrics_variables)
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_warm_up_leaves_every_variable_exactly_as_it_was(backend):
    hp = {**DEFAULT_HPARAMS, "lr_schedule": "cosine", "epochs": 2}
    out = run_python(with_values(WARM_UP_CHECK, BACKEND=backend, HP=hp))
    assert out["fresh_model"] and all(out["fresh_model"].values()), out["fresh_model"]
    kinds = " ".join(out["fresh_model"])
    assert "moving_variance" in kinds and "seed_generator_state" in kinds and "kernel" in kinds
    assert any("momentum" in path for path in out["fresh_optimizer"]) and all(out["fresh_optimizer"].values())
    assert out["trained"] and all(out["trained"].values()), out["trained"]
    assert any("momentum" in path for path in out["trained"]) and out["iterations"] == 3  # the epoch's 3 steps
    assert out["metrics_reset"]


# Run before the Keras trainer: train_on_batch fails, and each report of training steps to the stop
# check is printed (one per compiled execution).
COUNT_EXECUTIONS = """
import os
os.environ["KERAS_BACKEND"] = "tensorflow"
import keras
from cnnbench import training

def no_train_on_batch(*args, **kwargs):
    raise AssertionError("train_on_batch called")

keras.Model.train_on_batch = no_train_on_batch
after_step = training.StopRequested.after_step

def reported(self, steps=1):
    print(f"steps reported: {steps}", flush=True)
    return after_step(self, steps)

training.StopRequested.after_step = reported
"""

# Trains, with a plain `model.fit` (one step per call), the model the trainer starts from on the
# trainer's epoch orders and dropout seeds; prints each epoch's loss and accuracy.
PLAIN_FIT = """
import json, keras, numpy as np
from cnnbench import training
from cnnbench.data import load_prepared
from cnnbench.keras_models import build_model, make_optimizer
from cnnbench.keras_trainer import reseed_dropout

hp, data = HP, load_prepared(DATA)
keras.utils.set_random_seed(0)
model = build_model("alexnet", 10, hp["image_size"], hp["mean"], hp["std"], hp["dropout"], input_shape=(32, 32, 3))
model.compile(optimizer=make_optimizer(hp, steps_per_epoch=3), metrics=["accuracy"],
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
epochs = []
for epoch in (1, 2):
    order = training.epoch_order(len(data["y_train"]), training.epoch_seed(0, epoch), hp)
    reseed_dropout(model, training.epoch_seed(0, epoch))
    logs = model.fit(data["x_train"][order], data["y_train"][order], batch_size=hp["batch_size"], shuffle=False,
                     verbose=0).history
    epochs.append([logs["loss"][0], logs["accuracy"][0]])
print(json.dumps(epochs))
"""


def test_trainer_compiles_before_timing_and_trains_like_a_plain_fit(tiny_dataset, tmp_path):
    hp = {"epochs": 2, "lr": 0.05}
    result = train("keras", "keras-alexnet-scratch", tiny_dataset, tmp_path, hp, prelude=COUNT_EXECUTIONS)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["compile_seconds"] > 0 and result.stderr.count("warm-up: compiled") == 1
    assert metrics["train_seconds"] == sum(epoch["seconds"] for epoch in metrics["history"])
    assert metrics["environment"]["compiled"] is False  # jit_compile "auto": TensorFlow skips XLA on a CPU
    # 40 images in batches of 16: each epoch's 3 steps run as one execution, reported once.
    assert result.stdout.count("steps reported: 3") == 2 and result.stdout.count("steps reported") == 2
    plain = run_python(with_values(PLAIN_FIT, HP={**DEFAULT_HPARAMS, **hp}, DATA=str(tiny_dataset)))
    for record, (loss, accuracy) in zip(metrics["history"], plain):
        assert record["train_loss"] == pytest.approx(loss, rel=1e-4), (record, loss)
        assert record["train_accuracy"] == pytest.approx(accuracy, abs=1e-7), (record, accuracy)


def test_keras_sigterm_stops_within_one_execution_and_the_rerun_resumes(tiny_dataset, tmp_path):
    """Batches of 2: 20 steps per epoch, run as executions of 16 and 4. Asked to stop after step 23
    (epoch 2's third), the trainer stops at the end of that execution: step 36, 32 of epoch 2's 40 images."""
    hp = {**DEFAULT_HPARAMS, "epochs": 2, "batch_size": 2}
    command = trainer_command("keras", tiny_dataset, tmp_path)
    command[command.index("--hparams") + 1] = json.dumps(hp)
    proc = start_paused(command, tmp_path, 23, tmp_path / "interrupted.log")
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    log = (tmp_path / "interrupted.log").read_text()
    assert proc.returncode == 143 and "SIGTERM received" in log, log
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model.keras").exists()
    images = [float(n) for n in re.findall(r"(?:^|\r)epoch 2/2: [^\r\n]*\| ([\d.]+)/40\.0 \[", log, re.M)]
    steps_at_stop = 20 + images[-1] / 2
    assert images[-1] == 32 and 0 <= steps_at_stop - 23 < 16, log  # within STEPS_PER_EXECUTION steps
    assert "epoch 2/2: train loss" not in log

    resumed = subprocess.run(command, capture_output=True, text=True, env=package_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "after epoch 1" in resumed.stderr
    assert "epoch 1/2: train loss" not in resumed.stderr and "warm-up: compiled" in resumed.stderr
    assert [e["epoch"] for e in json.loads((tmp_path / "metrics.json").read_text())["history"]] == [1, 2]


# Under mixed_bfloat16 (needs HP): which layers compute in float32, the loss's dtype, and the BatchNorm
# statistics of bf16 inputs (mean 100, std 0.5: bf16 arithmetic, 8 bits of mantissa, would be ~1e-2 off)
# in the trainer's TorchBatchNormalization and Keras' own layer (in keras_resnet50_base).
BF16_CHECK = """
import os
os.environ["KERAS_BACKEND"] = "tensorflow"
import json, keras, numpy as np
from cnnbench.keras_models import TorchBatchNormalization, build_model
from cnnbench.keras_trainer import compile_model

keras.mixed_precision.set_global_policy("mixed_bfloat16")
model = build_model("alexnet", 10, 64, HP["mean"], HP["std"], input_shape=(32, 32, 3))
compile_model(model, HP, steps_per_epoch=1)
images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
normalized = keras.Model(model.input, model.get_layer("normalize").output)(images)
logits = model(images)
loss = model.compute_loss(x=images, y=np.arange(4), y_pred=logits)
out = {"compute_dtypes": {layer.name: layer.compute_dtype for layer in model.layers},
       "preprocessed": keras.backend.standardize_dtype(normalized.dtype),
       "logits": keras.backend.standardize_dtype(logits.dtype), "loss": keras.backend.standardize_dtype(loss.dtype)}

values = keras.ops.cast(100.0 + 0.5 * np.random.default_rng(1).standard_normal((8, 4, 4, 3)), "bfloat16")
exact = np.asarray(keras.ops.cast(values, "float32"), dtype=np.float64).reshape(-1, 3)
layers = {"torch_batch_norm": (TorchBatchNormalization(momentum=0.0, epsilon=1e-5), exact.var(axis=0, ddof=1)),
          "keras_batch_norm": (keras.layers.BatchNormalization(momentum=0.0), exact.var(axis=0))}
for name, (layer, want) in layers.items():  # momentum 0: the statistics become the batch's
    layer(values, training=True)
    out[name] = {"compute_dtype": layer.compute_dtype, "dtype": layer.moving_variance.dtype,
                 "error": float(np.abs(np.asarray(layer.moving_variance) - want).max() / want.max())}
print(json.dumps(out))
"""


def test_bf16_keeps_preprocessing_head_loss_and_batch_norm_statistics_in_float32():
    out = run_python(with_values(BF16_CHECK, HP=DEFAULT_HPARAMS))
    dtypes = out["compute_dtypes"]
    assert {name: dtypes[name] for name in ("to_float", "resize", "normalize", "head")} == dict.fromkeys(
        ("to_float", "resize", "normalize", "head"), "float32")
    assert dtypes["conv1"] == dtypes["fc1"] == "bfloat16"  # the policy is in force elsewhere
    assert out["preprocessed"] == out["logits"] == out["loss"] == "float32"
    for name in ("torch_batch_norm", "keras_batch_norm"):
        assert out[name]["compute_dtype"] == "bfloat16", out  # its input and output: bf16
        assert out[name]["dtype"] == "float32" and out[name]["error"] < 1e-5, out
