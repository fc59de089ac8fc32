"""Both trainers end to end on a tiny prepared dataset, each as its own process."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from importlib import metadata
from pathlib import Path

import pytest

from cnnbench.fileio import file_digest
from cnnbench.gpu import GPU_COUNT_VARIABLES, GPU_INDEX_VARIABLES
from cnnbench.metrics import validate_metrics
from conftest import DEFAULT_HPARAMS, REPO, package_env, run_module, run_python, saved_kernel_initializers

MODEL_SUFFIX = {"torch": "model.pt", "keras": "model.keras"}
FAKE_NVML_DIR = REPO / "tests" / "fake_nvml"


def with_fake_nvml(**settings) -> dict:
    """A trainer's environment with tests/fake_nvml's pynvml first on the path, set by ``settings``."""
    return {"PYTHONPATH": f"{FAKE_NVML_DIR}:{package_env()['PYTHONPATH']}", **settings}


def train(framework, variant, data, run_dir, hparams=None, extra=(), check=True, prelude=None, env=None):
    hp = {**DEFAULT_HPARAMS, **(hparams or {})}
    return run_module(
        f"{framework}_trainer", "--variant", variant, "--seed", 0, "--data", data, "--hparams", json.dumps(hp),
        "--run-dir", run_dir, "--metrics", run_dir / "metrics.json", "--model-out", run_dir / MODEL_SUFFIX[framework],
        *extra, check=check, prelude=prelude, env=env)


# Run before a trainer: nothing in its environment says the job was given a GPU.
WITHOUT_GPU_VARIABLES = f"""
import os
for name in {[*GPU_INDEX_VARIABLES, *GPU_COUNT_VARIABLES]!r}:
    os.environ.pop(name, None)
"""


def torch_cuda_build() -> str | None:
    """torch.version.cuda, read from torch's version.py (importing torch here would put it in this process)."""
    version_py = Path(importlib.util.find_spec("torch").submodule_search_locations[0]) / "version.py"
    found = re.search(r"^cuda(?:: [^=]+)? = '([^']+)'", version_py.read_text(), re.M)
    return found.group(1) if found else None


# The stand-in NVML's two GPUs draw 100 W and 250 W: torch, given both, measures the one it trains on
# (its device 0, CUDA_VISIBLE_DEVICES' first) through the energy counter, Keras the second one
# (CUDA_VISIBLE_DEVICES=1) by power samples.
FAKE_GPUS = {"torch": ("0,1", "counter", 100.0, "energy_counter"), "keras": ("1", "power", 250.0, "power_samples")}


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_scratch_training_writes_valid_metrics(framework, tiny_dataset, tmp_path):
    # The stand-in NVML's GPUs are given to the job (CUDA_VISIBLE_DEVICES), which require_gpu: auto would
    # refuse on this CPU machine (tests/test_gpu_detection.py): these runs say false.
    visible, fake_method, watts, method = FAKE_GPUS[framework]
    result = train(framework, f"{framework}-alexnet-scratch", tiny_dataset, tmp_path, {"epochs": 2, "require_gpu": False},
                   env=with_fake_nvml(CUDA_VISIBLE_DEVICES=visible, FAKE_NVML_METHOD=fake_method))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    validate_metrics(metrics)
    assert metrics["variant"] == f"{framework}-alexnet-scratch" and metrics["framework"] == framework
    assert [epoch["epoch"] for epoch in metrics["history"]] == [1, 2]
    assert metrics["data"] == {"source": "synthetic", "train_size": 40, "val_size": 20, "test_size": 30,
                               "sha256": file_digest(tiny_dataset)}
    assert metrics["weights"] == {"source": "none", "sha256": None, "origin_sha256": None, "path": None, "classes": None}
    assert metrics["config"]["epochs"] == 2 and metrics["config"]["image_size"] == 64
    assert metrics["config"]["scratch_init"] == "torchvision"  # recorded though DEFAULT_HPARAMS lack it
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == 30
    assert metrics["environment"]["device"] == "cpu" and metrics["environment"]["container"] is None
    assert metrics["environment"]["gpu"] is None  # GPU facts: none on the CPU
    if framework == "keras":
        assert metrics["environment"]["keras_backend"] == "tensorflow"
        assert metrics["environment"]["cuda_build"] is None and metadata.version("tensorflow-cpu")
    else:  # the CUDA build torch reports, even where it runs on the CPU
        assert metrics["environment"]["cuda_build"] == torch_cuda_build()
    assert (tmp_path / MODEL_SUFFIX[framework]).stat().st_size > 1_000_000
    assert not (tmp_path / "checkpoint").exists()  # dropped once the run is complete
    # The progress bar's own lines (tqdm, ASCII in a log), distinct from log_epoch's summary line.
    assert re.search(r"^epoch 2/2: 100%\|#{10}\| 40\.0/40\.0 \[[\d:]+<00:00, +[\d.]+img/s\]$", result.stderr, re.M)
    assert "epoch 2/2: train loss" in result.stderr  # the epoch's summary line
    # Energy: each epoch's over a span that encloses its timed one (the fake counts whole mJ, mW)
    for epoch in metrics["history"]:
        assert watts * epoch["seconds"] - 0.01 <= epoch["energy_joules"] <= watts * (epoch["seconds"] + 0.05), epoch
    first = int(visible.split(",")[0])
    uuids = [f"GPU-{first}aaaaaaa-fake-4000-8000-{first:012d}"]
    assert metrics["energy"] == {"joules": pytest.approx(sum(e["energy_joules"] for e in metrics["history"])),
                                 "method": method, "sample_hz": 5.0 if method == "power_samples" else None,
                                 "gpus": uuids}
    assert result.stderr.count("energy: measuring") == 1 and f"by {method}" in result.stderr


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
    # require_gpu: auto trains on the CPU when nothing says the job was given a GPU; scratch_init is no
    # pretrained run's concern: its new layers keep torchvision's init (checked below for Keras).
    result = train(framework, f"{framework}-{model}-pretrained", tiny_dataset, tmp_path / "run",
                   {"require_gpu": "auto", "scratch_init": "framework"}, extra=("--weights", weights, "--weights-source", "standin"),
                   env=with_fake_nvml(FAKE_NVML_INIT="fail"),  # as without a driver, on any machine
                   prelude=WITHOUT_GPU_VARIABLES)
    assert "no GPU visible: training on the CPU" in result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["energy"] == {"joules": None, "method": None, "sample_hz": None, "gpus": []}
    assert [epoch["energy_joules"] for epoch in metrics["history"]] == [None]
    assert result.stderr.count("energy: not measured (NVML cannot start: NVML Shared Library Not Found)") == 1
    assert metrics["weights"] == {"source": "standin", "sha256": file_digest(weights), "origin_sha256": file_digest(weights),
                                  "path": str(weights), "classes": None}
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
        initializers = saved_kernel_initializers(tmp_path / "run" / "model.keras")
        assert {initializers[name] for name in ("fc1", "fc2", "head")} == {"RandomNormal"}  # VGG's N(0, 0.01)


# Run with MODEL (a frozen run's model file) and WEIGHTS (the file it loaded): prints {layer: whether
# the trained weights equal the file's}, for every layer the file holds but the 1000-class head.
FROZEN_CHECK = {"torch": """
import json, torch
trained = torch.load(MODEL, weights_only=True)
loaded = torch.load(WEIGHTS, weights_only=True)
head = max((key for key in loaded if key.startswith("classifier.")), key=lambda k: int(k.split(".")[1]))
layers = {key.rsplit(".", 1)[0] for key in loaded} - {head.rsplit(".", 1)[0]}
print(json.dumps({layer: all(torch.equal(trained[f"{layer}.{kind}"], loaded[f"{layer}.{kind}"])
                             for kind in ("weight", "bias")) for layer in sorted(layers)}))
""", "keras": """
import json, keras, numpy as np
import cnnbench.keras_models  # registers the custom layers for loading
from cnnbench.keras_models import _layers_by_name
trained = _layers_by_name(keras.saving.load_model(MODEL))
with np.load(WEIGHTS) as loaded:
    layers = sorted({key.split("/")[0] for key in loaded.files if not key.startswith("_")} - {"head"})
    print(json.dumps({layer: all(np.array_equal(np.asarray(variable), loaded[f"{layer}/{variable.name}"])
                                 for variable in trained[layer].weights) for layer in layers}))
"""}


def unchanged_layers(framework: str, model_file, weights) -> dict[str, bool]:
    return run_python(f"MODEL, WEIGHTS = {str(model_file)!r}, {str(weights)!r}\n" + FROZEN_CHECK[framework])


def is_backbone_layer(layer: str) -> bool:
    """torchvision's `features.N`, the Keras models' `convN` / `blockB_convC`."""
    return layer.startswith("features.") or "conv" in layer


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_frozen_training_keeps_the_backbone_bit_identical_to_the_weights_file(framework, tiny_dataset, tmp_path):
    """AlexNet from torchvision's file (Keras: its port): after training with weight decay, every conv
    layer equals the file's, bit for bit, while the classifier's file-loaded layers (fc1, fc2) moved."""
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    run_module("torch_models", "standin", "--model", "alexnet", "--out", weights)
    origin = file_digest(weights)  # a Keras run records the torch file its port came from
    if framework == "keras":
        ported = tmp_path / "alexnet-owt-7be5be79.keras.npz"
        run_module("torch_models", "port", "--model", "alexnet", "--weights", weights, "--out", ported)
        weights = ported
    run_dir = tmp_path / "run"
    train(framework, f"{framework}-alexnet-frozen", tiny_dataset, run_dir, {"lr": 0.05},
          extra=("--weights", weights, "--weights-source", "standin"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["init"] == "frozen" and metrics["weights"] == {
        "source": "standin", "sha256": file_digest(weights), "origin_sha256": origin, "path": str(weights),
        "classes": None}
    unchanged = unchanged_layers(framework, run_dir / MODEL_SUFFIX[framework], weights)
    backbone = {"torch": ["features.0", "features.3", "features.6", "features.8", "features.10"],
                "keras": ["conv1", "conv2", "conv3", "conv4", "conv5"]}[framework]
    classifier = {"torch": ["classifier.1", "classifier.4"], "keras": ["fc1", "fc2"]}[framework]
    assert unchanged == {**dict.fromkeys(backbone, True), **dict.fromkeys(classifier, False)}
    assert all(is_backbone_layer(layer) for layer in backbone) and not any(map(is_backbone_layer, classifier))


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_require_gpu_fails_fast_without_one(framework, tiny_dataset, tmp_path):
    result = train(framework, f"{framework}-alexnet-scratch", tiny_dataset, tmp_path, {"require_gpu": True},
                   check=False)
    assert result.returncode == 1
    assert "require_gpu is true" in result.stderr and "set require_gpu: false" in result.stderr
    assert not (tmp_path / "metrics.json").exists()


# What a GPU host whose driver is too old for this venv's CUDA builds would show.
FAKE_NVIDIA_SMI = '#!/bin/sh\necho "NVIDIA H200, 470.57.02"\n'


@pytest.mark.parametrize("signal", ["CUDA_VISIBLE_DEVICES", "nvidia-smi"])
@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_require_gpu_auto_stops_before_loading_data_when_a_gpu_was_expected(framework, signal, tmp_path):
    """The data file does not exist: had the trainer loaded data before the check, it would fail on that."""
    env = {"CUDA_VISIBLE_DEVICES": "0"}
    if signal == "nvidia-smi":
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
        (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
        env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    result = train(framework, f"{framework}-alexnet-scratch", tmp_path / "no-data.npz", tmp_path / "run",
                   {"require_gpu": "auto"}, check=False, env=env,
                   prelude=WITHOUT_GPU_VARIABLES if signal == "nvidia-smi" else None)
    message = result.stderr
    assert result.returncode == 1, message
    expected = ("CUDA_VISIBLE_DEVICES=0" if signal == "CUDA_VISIBLE_DEVICES"
                else "nvidia-smi lists 1 GPU(s): NVIDIA H200, driver 470.57.02")
    assert f"error: a GPU was expected ({expected}) but " in message
    if framework == "keras":  # this venv's TensorFlow is tensorflow-cpu
        assert "is a CPU-only build (the tensorflow-cpu package is installed): install tensorflow[and-cuda]" in message
    elif torch_cuda_build() is None:
        assert "is a CPU-only build (torch.version.cuda is None)" in message
    elif signal == "nvidia-smi":  # a CUDA build (this venv's torch: CUDA 13.0) and the old driver
        assert ("the NVIDIA driver 470.57.02 (nvidia-smi) is too old for torch " in message
                and f"built for CUDA {torch_cuda_build()}, which needs driver >= " in message)
    else:
        assert "no working NVIDIA driver on this machine (nvidia-smi is not installed here" in message
    assert "set require_gpu: false" in message and "no-data.npz" not in message
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / MODEL_SUFFIX[framework]).exists()


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
    # Keras' accuracy metric divides in float32 (0.1 reads back as 0.10000000149).
    assert epoch["train_accuracy"] == pytest.approx(out["accuracy"], abs=1e-7)


# Each ResNet-50 variant through its trainer: one step per epoch at 64x64 keeps it to seconds of compute.
RESNET50_WEIGHTS = {  # weights: how the test makes the file (framework's stand-in, or torch's ported)
    "torch-resnet50-scratch": None,
    "keras-resnet50-scratch": None,
    "torch-resnet50-pretrained": ("torch", "resnet50-11ad3fa6.pth", "imagenet"),
    "keras-resnet50-pretrained": ("ported", "resnet50-11ad3fa6.keras.npz", "imagenet"),
    "keras-resnet50-pretrained-keras-file": ("keras", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "caffe"),
}


@pytest.mark.parametrize("case", sorted(RESNET50_WEIGHTS))
def test_resnet50_variants_train(case, tiny_dataset, tmp_path):
    variant = "-".join(case.split("-")[:3])
    framework = variant.split("-")[0]
    extra, preprocessing = (), "imagenet"
    if RESNET50_WEIGHTS[case] is not None:
        source, name, preprocessing = RESNET50_WEIGHTS[case]
        weights = tmp_path / name
        if source == "ported":
            run_module("torch_models", "standin", "--model", "resnet50", "--out", tmp_path / "resnet50-11ad3fa6.pth")
            run_module("torch_models", "port", "--model", "resnet50", "--weights", tmp_path / "resnet50-11ad3fa6.pth",
                       "--out", weights)
        else:
            run_module(f"{source}_models", "standin", "--model", "resnet50", "--out", weights)
        extra = ("--weights", weights, "--weights-source", "standin")
    train(framework, variant, tiny_dataset, tmp_path / "run", {"max_steps_per_epoch": 1}, extra=extra)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    validate_metrics(metrics)
    assert metrics["variant"] == variant and metrics["config"]["preprocessing"] == preprocessing
    assert len(metrics["history"]) == 1 and sum(map(sum, metrics["test"]["confusion_matrix"])) == 30
    assert metrics["weights"]["sha256"] == (file_digest(extra[1]) if extra else None)
    assert (tmp_path / "run" / MODEL_SUFFIX[framework]).stat().st_size > 50_000_000  # 25.6M parameters in fp32
