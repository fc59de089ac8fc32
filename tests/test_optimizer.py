"""The Keras optimizer steps exactly like the torch trainer's SGD: momentum, Nesterov, coupled weight
decay and the per-step cosine schedule, on every Keras backend and across a save/load.

The same linear least-squares problem is trained in each framework, in its own process, from the
same weights on the same batches; the learning rate each step uses and the final weights are
compared.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_python

STEPS_PER_EPOCH, EPOCHS = 6, 2
STEPS = STEPS_PER_EPOCH * EPOCHS
BASE = {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.05, "lr_schedule": "constant",
        "epochs": EPOCHS}
CASES = {
    "constant": BASE,
    "cosine": {**BASE, "lr_schedule": "cosine"},
    "cosine_nesterov": {**BASE, "lr_schedule": "cosine", "nesterov": True},
    "cosine_no_decay": {**BASE, "lr_schedule": "cosine", "weight_decay": 0.0},
}
# fp32 arithmetic in both frameworks, over 12 steps.
RTOL, ATOL = 1e-5, 1e-6

TORCH_RUN = """
import json, numpy as np, torch
from cnnbench.torch_trainer import make_scheduler
problem = np.load({problem!r})
out = {{}}
for name, hp in json.loads({cases!r}).items():
    layer = torch.nn.Linear(*problem["kernel"].shape)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(problem["kernel"].T))
        layer.bias.copy_(torch.from_numpy(problem["bias"]))
    # As torch_trainer.run builds them.
    optimizer = torch.optim.SGD(layer.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                                weight_decay=hp["weight_decay"], nesterov=hp["nesterov"])
    scheduler = make_scheduler(optimizer, hp, steps_per_epoch={steps_per_epoch})
    lrs = []
    for x, y in zip(problem["x"], problem["y"]):
        lrs.append(optimizer.param_groups[0]["lr"])
        loss = torch.nn.functional.mse_loss(layer(torch.from_numpy(x)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    out[name] = {{"lrs": lrs, "kernel": layer.weight.detach().numpy().T.tolist(),
                 "bias": layer.bias.detach().numpy().tolist()}}
print(json.dumps(out))
"""

KERAS_RUN = """
import json, numpy as np, keras
from cnnbench.keras_models import TorchSGD, make_optimizer
problem = np.load({problem!r})

def train(optimizer, save_as):
    model = keras.Sequential([keras.Input(problem["kernel"].shape[:1]), keras.layers.Dense(problem["kernel"].shape[1])])
    model.set_weights([problem["kernel"], problem["bias"]])
    model.compile(optimizer=optimizer, loss="mse")
    lrs = []
    for step, (x, y) in enumerate(zip(problem["x"], problem["y"])):
        if step == len(problem["x"]) // 2:  # the optimizer's state must survive a checkpoint
            model.save(save_as)
            model = keras.saving.load_model(save_as)
            assert type(model.optimizer) is type(optimizer), type(model.optimizer)
        lrs.append(float(model.optimizer.learning_rate))  # the rate this step's update uses
        model.train_on_batch(x, y)
    kernel, bias = model.get_weights()
    return {{"lrs": lrs, "kernel": kernel.tolist(), "bias": bias.tolist()}}

cases = json.loads({cases!r})
out = {{name: train(make_optimizer(hp, steps_per_epoch={steps_per_epoch}), {tmp!r} + f"/{{name}}.keras")
       for name, hp in cases.items()}}
# Keras' own SGD on the case without weight decay, to show the comparison can tell them apart.
hp = cases["cosine_no_decay"]
schedule = keras.optimizers.schedules.CosineDecay(hp["lr"], decay_steps=hp["epochs"] * {steps_per_epoch})
native = keras.optimizers.SGD(learning_rate=schedule, momentum=hp["momentum"])
out["keras_native_sgd"] = train(native, {tmp!r} + "/native.keras")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("optimizer") / "problem.npz"
    np.savez(path, x=rng.normal(size=(STEPS, 8, 5)).astype("float32"),
             y=rng.normal(size=(STEPS, 8, 3)).astype("float32"),
             kernel=rng.normal(size=(5, 3)).astype("float32"), bias=rng.normal(size=3).astype("float32"))
    return path


@pytest.fixture(scope="module")
def torch_result(problem):
    return run_python(TORCH_RUN.format(problem=str(problem), cases=json.dumps(CASES),
                                       steps_per_epoch=STEPS_PER_EPOCH))


def weights(result):
    return np.concatenate([np.ravel(result["kernel"]), np.ravel(result["bias"])])


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_keras_sgd_steps_like_torch_sgd(backend, problem, torch_result, tmp_path):
    keras_result = run_python(KERAS_RUN.format(problem=str(problem), cases=json.dumps(CASES), tmp=str(tmp_path),
                                               steps_per_epoch=STEPS_PER_EPOCH),
                              env={"KERAS_BACKEND": backend})
    for name in CASES:
        torch_run, keras_run = torch_result[name], keras_result[name]
        # Step k uses the same rate in both: CosineDecay(k) and CosineAnnealingLR after k scheduler steps.
        np.testing.assert_allclose(keras_run["lrs"], torch_run["lrs"], rtol=RTOL, err_msg=name)  # Keras: fp32
        np.testing.assert_allclose(weights(keras_run), weights(torch_run), rtol=RTOL, atol=ATOL, err_msg=name)
        moved = np.abs(weights(torch_run) - weights({"kernel": np.load(problem)["kernel"],
                                                     "bias": np.load(problem)["bias"]})).max()
        assert moved > 0.1, (name, moved)  # the training did something worth comparing
    lrs = torch_result["cosine"]["lrs"]
    assert lrs[0] == BASE["lr"] and 0 < lrs[-1] < 0.02 * BASE["lr"] and lrs == sorted(lrs, reverse=True)
    # Keras' own momentum formulation differs from torch's under a schedule, by far more than the tolerance.
    native = weights(keras_result["keras_native_sgd"]) - weights(torch_result["cosine_no_decay"])
    assert np.abs(native).max() > 100 * ATOL
