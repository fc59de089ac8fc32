"""With identical weights, both frameworks' models give the same logits for the same images.

The torchvision weights are ported to Keras (cnnbench.port); each framework runs in its own
process; inputs go through each framework's own device-side preprocessing (uint8 -> resize ->
normalise, imagenet or caffe), so the whole path from the prepared images to the logits is compared.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_module, run_python

MAX_ABS_DIFF = 1e-4
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def assert_same_logits(directory, label: str) -> None:
    """torch.npy and keras.npy in ``directory``: four images' 1000-class logits, the same within MAX_ABS_DIFF.
    Stand-in weights give logits of ~0.03, so a fixed floor guards nothing: the difference is also weighed
    against the logits' own spread, overall and across the images (the input must reach the logits)."""
    torch_logits, keras_logits = np.load(directory / "torch.npy"), np.load(directory / "keras.npy")
    assert torch_logits.shape == keras_logits.shape == (4, 1000)
    difference = np.abs(torch_logits - keras_logits).max()
    spread, across_images = torch_logits.std(), torch_logits.std(axis=0).mean()
    print(f"{label}: max |logit difference| {difference:.2e}, logits' std {spread:.2e}, "
          f"mean std across images {across_images:.2e}")
    assert difference < MAX_ABS_DIFF
    assert difference < 1e-3 * spread
    assert difference < 1e-3 * across_images


@pytest.mark.parametrize("model, image_size, preprocessing", [
    ("alexnet", 224, "imagenet"), ("alexnet", 96, "imagenet"), ("vgg16", 224, "imagenet"), ("vgg16", 64, "imagenet"),
    ("vgg16", 64, "caffe"),
])
def test_same_weights_same_logits(model, image_size, preprocessing, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    pth, npz = tmp_path / f"{model}.pth", tmp_path / f"{model}.keras.npz"
    run_module("torch_models", "standin", "--model", model, "--out", pth)
    run_module("torch_models", "port", "--model", model, "--weights", pth, "--out", npz)

    run_python(f"""
import json, numpy as np, torch, torchvision
from cnnbench.torch_trainer import Preprocess
model = getattr(torchvision.models, {model!r})()
model.load_state_dict(torch.load({str(pth)!r}, weights_only=True))
model.eval()
images = torch.from_numpy(np.load({str(tmp_path / "images.npy")!r}))
with torch.no_grad():
    logits = model(Preprocess({image_size}, {MEAN}, {STD}, torch.device("cpu"), {preprocessing!r})(images))
np.save({str(tmp_path / "torch.npy")!r}, logits.numpy())
print(json.dumps({{}}))
""")
    run_python(f"""
import json, numpy as np
from cnnbench.keras_models import build_model
model = build_model({model!r}, 1000, {image_size}, {MEAN}, {STD}, weights={str(npz)!r},
                    preprocessing_mode={preprocessing!r})
logits = model.predict(np.load({str(tmp_path / "images.npy")!r}), verbose=0)
np.save({str(tmp_path / "keras.npy")!r}, logits)
print(json.dumps({{}}))
""")
    assert_same_logits(tmp_path, f"{model} at {image_size}, {preprocessing}")


def test_port_rejects_a_foreign_state_dict(tmp_path):
    pth = tmp_path / "alexnet.pth"
    run_module("torch_models", "standin", "--model", "alexnet", "--out", pth)
    result = run_module("torch_models", "port", "--model", "vgg16", "--weights", pth, "--out", tmp_path / "x.npz",
                        check=False)
    assert result.returncode != 0 and "not a torchvision vgg16 state_dict" in result.stderr
    assert not (tmp_path / "x.npz").exists()


# ------------------------------------------------------------------------------------ ResNet-50
# Stand-in weights have BatchNorm's initial statistics (mean 0, variance 1), under which a port that
# dropped them would pass; so the weights compared here get statistics of their own first: torch
# runs calibration batches in train mode with a cumulative average (momentum None), and gamma and
# beta are drawn at random, the last BatchNorm of each block's smaller as in trained ResNets (else
# the residual sum grows block by block to logits of ~10, unlike a trained network's).
CALIBRATE_RESNET50 = """
import json, numpy as np, torch, torchvision
from cnnbench.torch_trainer import Preprocess
torch.manual_seed(0)
model = torchvision.models.resnet50()
model.load_state_dict(torch.load({standin!r}, weights_only=True))
with torch.no_grad():
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.weight.uniform_(*((0.1, 0.4) if name.endswith("bn3") else (0.5, 1.5)))
            module.bias.uniform_(-0.2, 0.2)
    model.train()
    preprocess = Preprocess(64, {mean}, {std}, torch.device("cpu"))
    for _ in range(2):
        model(preprocess(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)))
torch.save(model.state_dict(), {out!r})
print(json.dumps(None))
"""


@pytest.fixture(scope="module")
def resnet50_weights(tmp_path_factory):
    """Calibrated torchvision ResNet-50 weights (.pth) and their port to Keras (.npz)."""
    directory = tmp_path_factory.mktemp("resnet50")
    standin, pth, npz = directory / "standin.pth", directory / "resnet50.pth", directory / "resnet50.keras.npz"
    run_module("torch_models", "standin", "--model", "resnet50", "--out", standin)
    run_python(CALIBRATE_RESNET50.format(standin=str(standin), mean=MEAN, std=STD, out=str(pth)))
    run_module("torch_models", "port", "--model", "resnet50", "--weights", pth, "--out", npz)
    return pth, npz


@pytest.mark.parametrize("image_size", [224, 64])
def test_resnet50_same_weights_same_logits(resnet50_weights, image_size, tmp_path):
    pth, npz = resnet50_weights
    images = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    run_python(f"""
import json, numpy as np, torch
from cnnbench.torch_models import build_model
from cnnbench.torch_trainer import Preprocess
model = build_model("resnet50", 1000)
model.load_state_dict(torch.load({str(pth)!r}, weights_only=True))
images = torch.from_numpy(np.load({str(tmp_path / "images.npy")!r}))
with torch.no_grad():
    logits = model.eval()(Preprocess({image_size}, {MEAN}, {STD}, torch.device("cpu"))(images))
np.save({str(tmp_path / "torch.npy")!r}, logits.numpy())
print(json.dumps(None))
""")
    run_python(f"""
import json, numpy as np
from cnnbench.keras_models import build_model
model = build_model("resnet50", 1000, {image_size}, {MEAN}, {STD}, weights={str(npz)!r})
np.save({str(tmp_path / "keras.npy")!r}, model.predict(np.load({str(tmp_path / "images.npy")!r}), verbose=0))
print(json.dumps(None))
""")
    assert_same_logits(tmp_path, f"resnet50 at {image_size}")


# One SGD step (momentum, weight decay) in train mode, BatchNorm on the batch's statistics, from the
# same weights on the same batch; then every variable and the eval-mode logits are compared.
TRAIN_STEP = dict(image_size=64, batch=4, lr=0.05, momentum=0.9, weight_decay=5e-4)
# How far a variable's step may differ between the frameworks, relative to the step (in norm). fp32
# alone moves some steps of this network by 0.7%: torch's own fp32 gradients differ from its fp64
# ones by up to 0.66% (layer2's BN betas, whose gradients are sums that nearly cancel), and the Keras
# step differed from torch's by the same 0.67%, in the same variables. A wrong rule moves a step by
# far more: Keras' own BatchNorm (the biased variance; 16 values per channel in layer4 at 64x64) by
# 6% of a moving variance's step, a Keras momentum of 0.99 instead of 0.9 by 90%.
STEP_RTOL = 0.02


def test_resnet50_one_training_step_agrees(resnet50_weights, tmp_path):
    pth, npz = resnet50_weights
    step = TRAIN_STEP
    rng = np.random.default_rng(2)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, size=(step["batch"], 32, 32, 3), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", rng.integers(0, 1000, size=step["batch"]))
    np.save(tmp_path / "eval.npy", rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8))
    torch_out = run_python(f"""
import json, numpy as np, torch
from cnnbench.torch_models import build_model
from cnnbench.torch_trainer import Preprocess
model = build_model("resnet50", 1000)
model.load_state_dict(torch.load({str(pth)!r}, weights_only=True))
preprocess = Preprocess({step["image_size"]}, {MEAN}, {STD}, torch.device("cpu"))
eval_images = preprocess(torch.from_numpy(np.load({str(tmp_path / "eval.npy")!r})))
with torch.no_grad():
    np.save({str(tmp_path / "torch_logits_before.npy")!r}, model.eval()(eval_images).numpy())
optimizer = torch.optim.SGD(model.parameters(), lr={step["lr"]}, momentum={step["momentum"]},
                            weight_decay={step["weight_decay"]})
model.train()
images = preprocess(torch.from_numpy(np.load({str(tmp_path / "images.npy")!r})))
loss = torch.nn.functional.cross_entropy(model(images), torch.from_numpy(np.load({str(tmp_path / "labels.npy")!r})))
loss.backward()
optimizer.step()
torch.save(model.state_dict(), {str(tmp_path / "after.pth")!r})
with torch.no_grad():
    np.save({str(tmp_path / "torch_logits.npy")!r}, model.eval()(eval_images).numpy())
print(json.dumps({{"loss": loss.item()}}))
""")
    run_module("torch_models", "port", "--model", "resnet50", "--weights", tmp_path / "after.pth",
               "--out", tmp_path / "torch_after.npz")
    keras_out = run_python(f"""
import json, numpy as np, keras
from cnnbench.keras_models import TorchSGD, build_model
model = build_model("resnet50", 1000, {step["image_size"]}, {MEAN}, {STD}, weights={str(npz)!r})
model.compile(optimizer=TorchSGD(l2={step["weight_decay"]}, learning_rate={step["lr"]}, momentum={step["momentum"]}),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
loss = model.train_on_batch(np.load({str(tmp_path / "images.npy")!r}), np.load({str(tmp_path / "labels.npy")!r}))
after = {{}}
for layer in model.get_layer("resnet50").layers + [model.get_layer("head")]:
    for variable in layer.weights:
        after[f"{{layer.name}}/{{variable.name}}"] = np.asarray(variable)
np.savez({str(tmp_path / "keras_after.npz")!r}, **after)
np.save({str(tmp_path / "keras_logits.npy")!r}, model.predict(np.load({str(tmp_path / "eval.npy")!r}), verbose=0))
print(json.dumps({{"loss": float(loss)}}))
""")
    # One fp32 forward pass each, whose eval-mode logits agree to ~4e-6 (above): 1e-5 relative allows
    # that rounding, not a BatchNorm on running statistics instead of the batch's (1e-2 and more).
    assert keras_out["loss"] == pytest.approx(torch_out["loss"], rel=1e-5)
    with np.load(tmp_path / "torch_after.npz") as torch_after, np.load(tmp_path / "keras_after.npz") as keras_after, \
            np.load(npz) as before:
        variables = [key for key in torch_after.files if not key.startswith("_")]  # not the port's _origin/sha256
        assert set(variables) == set(keras_after.files)
        relative = {}
        for key in variables:
            torch_change = torch_after[key] - before[key]
            keras_change = keras_after[key] - before[key]
            assert np.abs(torch_change).max() > 0, key  # every variable moved
            relative[key] = float(np.linalg.norm(torch_change - keras_change) / np.linalg.norm(torch_change))
    worst = sorted(relative.items(), key=lambda item: -item[1])[:8]
    print("largest relative differences of a variable's step:", worst)
    assert max(relative.values()) <= STEP_RTOL, worst
    # Eval-mode logits after the step (the moving statistics in use): they moved by the step, and
    # differ between the frameworks by no more than the steps do, relative to that move.
    torch_logits, keras_logits = np.load(tmp_path / "torch_logits.npy"), np.load(tmp_path / "keras_logits.npy")
    moved = np.abs(torch_logits - np.load(tmp_path / "torch_logits_before.npy")).max()
    assert moved > 0.1
    assert np.abs(torch_logits - keras_logits).max() <= STEP_RTOL * moved


def test_resnet50_port_rejects_another_models_state_dict(tmp_path):
    pth = tmp_path / "vgg16.pth"
    run_module("torch_models", "standin", "--model", "vgg16", "--out", pth)
    result = run_module("torch_models", "port", "--model", "resnet50", "--weights", pth, "--out", tmp_path / "x.npz",
                        check=False)
    assert result.returncode != 0 and "not a torchvision resnet50 state_dict" in result.stderr
