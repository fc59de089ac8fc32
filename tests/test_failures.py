"""Failures that cannot be produced for real on a CI machine, injected where they would happen."""

from __future__ import annotations

import json
import time

import pytest

from cnnbench import metrics
from conftest import package_env, run_python
from test_trainers import train

# What each Keras backend raises when the GPU runs out of memory in a training step, with the
# message it carries there.
OUT_OF_MEMORY = {
    "tensorflow": "import tensorflow as tf\nerror = tf.errors.ResourceExhaustedError(None, None, 'OOM when "
                  "allocating tensor with shape[24,4096] and type float on /job:localhost/replica:0/task:0/"
                  "device:GPU:0 by allocator GPU_0_bfc')",
    "jax": "from jax.errors import JaxRuntimeError\nerror = JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory "
           "while trying to allocate 2147483648 bytes.')",
    "torch": "import torch\nerror = torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB. "
             "GPU 0 has a total capacity of 79.11 GiB of which 1.06 GiB is free.')",
}

# Run before the Keras trainer (which then finds Keras already on this backend): every way Keras
# trains a batch raises the backend's out-of-memory error, whichever the trainer's loop uses. The
# network is a one-layer stand-in: it never trains, and building AlexNet costs JAX ~10 s of compiling.
RAISE_IN_TRAINING = """
import os
os.environ["KERAS_BACKEND"] = {backend!r}
import keras
from cnnbench import keras_models
{make_error}

def out_of_memory(*args, **kwargs):
    print("injected out-of-memory error raised", flush=True)
    raise error

def one_layer_model(name, num_classes, *args, **kwargs):
    return keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(num_classes)])

keras.Model.fit = keras.Model.train_on_batch = out_of_memory
keras_models.build_model = one_layer_model
"""


@pytest.mark.parametrize("backend", sorted(OUT_OF_MEMORY))
def test_keras_out_of_memory_names_the_batch_size(backend, tiny_dataset, tmp_path):
    prelude = RAISE_IN_TRAINING.format(backend=backend, make_error=OUT_OF_MEMORY[backend])
    result = train("keras", "keras-alexnet-scratch", tiny_dataset, tmp_path, {"batch_size": 24, "eval_batch_size": 48},
                   extra=("--keras-backend", backend), check=False, prelude=prelude)
    assert "injected out-of-memory error raised" in result.stdout, result.stderr
    assert result.returncode == 1, result.stderr
    assert ("error: the GPU ran out of memory with batch_size=24 (eval_batch_size=48) at image_size=64: lower them "
            "for this variant in the config (variant_overrides)") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model.keras").exists()


def hiding(directory, module: str) -> dict:
    """A trainer's environment in which ``module`` cannot be imported, as if it were not installed."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(f"raise ModuleNotFoundError({f'No module named {module!r}'!r}, "
                                            f"name={module!r})\n")
    return {"PYTHONPATH": f"{directory}:{package_env()['PYTHONPATH']}"}


# Run before a trainer: says when the run starts to load its data.
LOAD_DATA_SAYS_SO = """
from cnnbench import training
load_data = training.load_data

def loud_load_data(args):
    print("loading the data", flush=True)
    return load_data(args)

training.load_data = loud_load_data
"""


@pytest.mark.parametrize("framework, module, backend, visible, message", [
    ("torch", "jsonschema", None, None,
     "error: jsonschema cannot be imported (No module named 'jsonschema'); the run needs it to validate metrics.json "
     "after training. Install jsonschema where the trainer runs"),
    ("keras", "jsonschema", "tensorflow", None, "error: jsonschema cannot be imported (No module named 'jsonschema')"),
    ("keras", "tqdm", "tensorflow", None, "error: tqdm cannot be imported (No module named 'tqdm')"),
    ("torch", "pynvml", None, "0",
     "error: pynvml cannot be imported (No module named 'pynvml'); the run needs it to measure the GPU's energy "
     "(a GPU is expected: CUDA_VISIBLE_DEVICES=0). Install nvidia-ml-py where the trainer runs"),
    ("keras", "jax", "jax", None, "error: Keras cannot start on the jax backend (No module named 'jax')"),
])
def test_a_missing_module_stops_the_run_before_it_loads_data(framework, module, backend, visible, message,
                                                              tiny_dataset, tmp_path):
    env = hiding(tmp_path / "hidden", module)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    started = time.monotonic()
    result = train(framework, f"{framework}-alexnet-scratch", tiny_dataset, tmp_path / "run", check=False, env=env,
                   extra=("--keras-backend", backend) if backend else (), prelude=LOAD_DATA_SAYS_SO)
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "loading the data" not in result.stdout and "epoch 1/" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert seconds < 60, seconds  # the interpreter's and torch's start; no training


def test_without_a_gpu_no_pynvml_is_needed(tmp_path):
    """Energy is then not measured (null, tests/test_energy.py), so the run may go on."""
    code = "from cnnbench import training\ntraining.preflight()\nprint('{\"started\": true}')"
    env = {**hiding(tmp_path, "pynvml"), "CUDA_VISIBLE_DEVICES": ""}  # "": every GPU hidden
    assert run_python(code, env=env) == {"started": True}


@pytest.fixture
def fresh_schema(monkeypatch):
    """cnnbench.metrics reading its schema afresh, and again after the test."""
    def clear():
        metrics.schema.cache_clear()
        metrics.validator.cache_clear()

    clear()
    yield monkeypatch
    monkeypatch.undo()
    clear()


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"type": "no such type"})])
def test_an_unusable_schema_file_is_named_with_what_to_do(content, fresh_schema, tmp_path):
    path = tmp_path / "metrics.schema.json"
    if content is not None:
        path.write_text(content)
    fresh_schema.setattr(metrics, "SCHEMA_PATH", path)
    with pytest.raises(metrics.MetricsError, match=rf"the metrics schema {path} cannot be used \(.+\): restore it"):
        metrics.validator()
