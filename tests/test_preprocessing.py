"""Each weights file gets the input it was trained on: the `preprocessing` hyperparameter.

The models' device-side transforms are checked against the frameworks' own references:
keras.applications' preprocess_input (caffe and torch modes) and torchvision's normalize, each
after the same bilinear resize, on random uint8 images; each framework in its own process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cnnbench.config import resolve_hparams
from cnnbench.training import parse_args
from cnnbench.weights import PORTED_SUFFIX, PRETRAINED, resolve_preprocessing
from conftest import DEFAULT_HPARAMS, REPO, run_python

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
KERAS_VGG16_FILE = PRETRAINED[("keras", "vgg16")].filename
IMAGE_SIZE = 48
KERAS_MODE = {"caffe": "caffe", "imagenet": "torch"}  # keras.applications' names: "torch" is ImageNet's mean/std


@pytest.fixture()
def images(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8))
    return path


def keras_preprocessing(mode: str, images, out) -> None:
    """The Keras models' preprocessing and keras.applications' preprocess_input on the same resize."""
    run_python(f"""
import json, numpy as np, keras
from keras.applications import imagenet_utils
from cnnbench.keras_models import preprocessing
images = np.load({str(images)!r})
inputs = keras.Input(images.shape[1:], dtype="uint8")
ours = keras.Model(inputs, preprocessing(inputs, {IMAGE_SIZE}, {MEAN}, {STD}, {mode!r})).predict(images, verbose=0)
resized = np.asarray(keras.layers.Resizing({IMAGE_SIZE}, {IMAGE_SIZE}, interpolation="bilinear")(images.astype("float32")))
reference = imagenet_utils.preprocess_input(resized.copy(), mode={KERAS_MODE[mode]!r})
np.savez({str(out)!r}, ours=ours, reference=reference)
print(json.dumps({{}}))
""")


@pytest.mark.parametrize("mode", ["caffe", "imagenet"])
def test_keras_preprocessing_matches_keras_applications(mode, images, tmp_path):
    keras_preprocessing(mode, images, tmp_path / "keras.npz")
    with np.load(tmp_path / "keras.npz") as out:
        ours, reference = out["ours"], out["reference"]
    assert ours.shape == reference.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_allclose(ours, reference, atol=1e-4 if mode == "caffe" else 1e-6)


def torch_preprocessing(mode: str, images, out) -> None:
    run_python(f"""
import json, numpy as np, torch
from torchvision.transforms.v2 import functional as TF
from cnnbench.torch_trainer import Preprocess
images = torch.from_numpy(np.load({str(images)!r}))
ours = Preprocess({IMAGE_SIZE}, {MEAN}, {STD}, torch.device("cpu"), {mode!r})(images)
resized = TF.resize(images.permute(0, 3, 1, 2).float(), [{IMAGE_SIZE}, {IMAGE_SIZE}], antialias=False)
reference = TF.normalize(resized / 255.0, {MEAN}, {STD})
np.savez({str(out)!r}, ours=ours.permute(0, 2, 3, 1).numpy(), reference=reference.permute(0, 2, 3, 1).numpy())
print(json.dumps({{}}))
""")


def test_torch_imagenet_preprocessing_matches_torchvision_normalize(images, tmp_path):
    torch_preprocessing("imagenet", images, tmp_path / "torch.npz")
    with np.load(tmp_path / "torch.npz") as out:
        np.testing.assert_allclose(out["ours"], out["reference"], atol=1e-5)
        assert np.abs(out["ours"]).max() > 1  # normalised values, not zeros


def test_torch_caffe_preprocessing_matches_keras_applications(images, tmp_path):
    torch_preprocessing("caffe", images, tmp_path / "torch.npz")
    keras_preprocessing("caffe", images, tmp_path / "keras.npz")
    with np.load(tmp_path / "torch.npz") as torch_out, np.load(tmp_path / "keras.npz") as keras_out:
        np.testing.assert_allclose(torch_out["ours"], keras_out["reference"], atol=1e-3)


def test_keras_caffe_model_saves_and_loads(images, tmp_path):
    out = run_python(f"""
import json, numpy as np, keras
from cnnbench.keras_models import build_model
images = np.load({str(images)!r})
model = build_model("vgg16", 10, 64, {MEAN}, {STD}, preprocessing_mode="caffe")
model.save({str(tmp_path / "model.keras")!r})
loaded = keras.saving.load_model({str(tmp_path / "model.keras")!r})
same = np.array_equal(model.predict(images, verbose=0), loaded.predict(images, verbose=0))
print(json.dumps({{"same": bool(same), "layers": [layer.name for layer in loaded.layers]}}))
""")
    assert out["same"] and "rgb_to_bgr" in out["layers"]


@pytest.mark.parametrize("requested, weights, expected", [
    ("auto", KERAS_VGG16_FILE, "caffe"),
    ("auto", PRETRAINED[("torch", "vgg16")].filename, "imagenet"),
    ("auto", PRETRAINED[("torch", "alexnet")].filename, "imagenet"),
    ("auto", "vgg16-397923af" + PORTED_SUFFIX, "imagenet"),
    ("auto", None, "imagenet"),
    ("imagenet", KERAS_VGG16_FILE, "imagenet"),
    ("caffe", None, "caffe"),
])
def test_auto_resolves_to_what_the_weights_were_trained_on(requested, weights, expected):
    assert resolve_preprocessing(requested, weights) == expected


def trainer_args(tmp_path, variant, weights_name, preprocessing):
    weights = tmp_path / weights_name
    weights.write_bytes(b"")  # parse_args only needs the file to exist (stand-in source: no hash check)
    return parse_args(variant.split("-")[0], [
        "--variant", variant, "--seed", "0", "--data", str(tmp_path / "data.npz"),
        "--hparams", json.dumps({**DEFAULT_HPARAMS, "preprocessing": preprocessing}),
        "--run-dir", str(tmp_path), "--metrics", str(tmp_path / "m.json"), "--model-out", str(tmp_path / "m"),
        "--weights", str(weights), "--weights-source", "standin"])


def test_trainer_arguments_carry_the_resolved_preprocessing(tmp_path):
    assert trainer_args(tmp_path, "keras-vgg16-pretrained", KERAS_VGG16_FILE, "auto").hparams["preprocessing"] == "caffe"
    assert trainer_args(tmp_path, "keras-vgg16-pretrained", KERAS_VGG16_FILE,
                        "imagenet").hparams["preprocessing"] == "imagenet"
    assert trainer_args(tmp_path, "keras-vgg16-scratch", KERAS_VGG16_FILE, "auto").hparams["preprocessing"] == "imagenet"
    assert trainer_args(tmp_path, "torch-vgg16-pretrained", "vgg16-397923af.pth",
                        "auto").hparams["preprocessing"] == "imagenet"


def test_unknown_preprocessing_is_rejected_with_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        trainer_args(tmp_path, "torch-alexnet-pretrained", "alexnet-owt-7be5be79.pth", "bgr")
    assert "use auto, imagenet or caffe" in capsys.readouterr().err


def test_config_default_is_auto_and_a_variant_can_choose_the_references_imagenet():
    schema = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["variant_overrides"] = {"keras-vgg16-pretrained": {"preprocessing": "imagenet"}}
    validate(config, schema)
    assert resolve_hparams(config, "keras-vgg16-pretrained")["preprocessing"] == "imagenet"
    assert resolve_hparams(config, "torch-alexnet-pretrained")["preprocessing"] == "auto"
    defaults = {}
    validate(defaults, schema)
    assert defaults["train"]["preprocessing"] == "auto"
    with pytest.raises(WorkflowError, match="bgr"):
        validate({"train": {"preprocessing": "bgr"}}, schema)
