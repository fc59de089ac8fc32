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
    torch_logits, keras_logits = np.load(tmp_path / "torch.npy"), np.load(tmp_path / "keras.npy")
    assert torch_logits.shape == keras_logits.shape == (4, 1000)
    difference = np.abs(torch_logits - keras_logits).max()
    # Stand-in weights give logits of ~0.03, so a fixed floor guards nothing: the difference is weighed
    # against the logits' own spread, overall and across the images (the input must reach the logits).
    spread, across_images = torch_logits.std(), torch_logits.std(axis=0).mean()
    print(f"{model} at {image_size}, {preprocessing}: max |logit difference| {difference:.2e}, "
          f"logits' std {spread:.2e}, mean std across images {across_images:.2e}")
    assert difference < MAX_ABS_DIFF
    assert difference < 1e-3 * spread
    assert difference < 1e-3 * across_images


def test_port_rejects_a_foreign_state_dict(tmp_path):
    pth = tmp_path / "alexnet.pth"
    run_module("torch_models", "standin", "--model", "alexnet", "--out", pth)
    result = run_module("torch_models", "port", "--model", "vgg16", "--weights", pth, "--out", tmp_path / "x.npz",
                        check=False)
    assert result.returncode != 0 and "not a torchvision vgg16 state_dict" in result.stderr
    assert not (tmp_path / "x.npz").exists()
