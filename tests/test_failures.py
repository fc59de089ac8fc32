"""Failures that cannot be produced for real on a CI machine, injected where they would happen."""

from __future__ import annotations

import pytest

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
