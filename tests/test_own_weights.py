"""Fine-tuning from your own weights (config `weights: file`) and from the workflow's own pretraining
(`weights: pretrain`): what loads, what a file that does not fit says, what the metrics record, and the
class split the pretraining trains on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnnbench.config import ConfigError, check_weights, pretrain_hparams
from cnnbench.data import DataError, load_prepared, prepare, split_classes
from cnnbench.fileio import file_digest
from conftest import run_module, run_python
from test_trainers import MODEL_SUFFIX, train, unchanged_layers

ALEXNET_CONVS = {"torch": ["features.0", "features.3", "features.6", "features.8", "features.10"],
                 "keras": ["conv1", "conv2", "conv3", "conv4", "conv5"]}
ALEXNET_FCS = {"torch": ["classifier.1", "classifier.4"], "keras": ["fc1", "fc2"]}


@pytest.fixture(scope="module")
def trained_torch_alexnet(tiny_dataset, tmp_path_factory):
    """A torch scratch run's model.pt (a 10-class state_dict): the kind of file a user fine-tunes from."""
    run_dir = tmp_path_factory.mktemp("source-run")
    train("torch", "torch-alexnet-scratch", tiny_dataset, run_dir)
    return run_dir / "model.pt"


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_a_runs_model_pt_starts_both_frameworks_from_identical_weights(framework, trained_torch_alexnet, tiny_dataset,
                                                                      tmp_path):
    """A frozen run from a run's model.pt (Keras: from its port) keeps every conv layer bit-identical to the
    file, trains the classifier, and records the file, its sha256 and, for Keras, the torch file it came from."""
    weights = trained_torch_alexnet
    if framework == "keras":
        weights = tmp_path / "alexnet.keras.npz"
        run_module("torch_models", "port", "--model", "alexnet", "--weights", trained_torch_alexnet, "--out", weights)
    run_dir = tmp_path / "run"
    train(framework, f"{framework}-alexnet-frozen", tiny_dataset, run_dir, {"lr": 0.05},
          extra=("--weights", weights, "--weights-source", "file"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["weights"] == {"source": "file", "sha256": file_digest(weights),
                                  "origin_sha256": file_digest(trained_torch_alexnet), "path": str(weights),
                                  "classes": None}
    unchanged = unchanged_layers(framework, run_dir / MODEL_SUFFIX[framework], weights)
    assert unchanged == {**dict.fromkeys(ALEXNET_CONVS[framework], True), **dict.fromkeys(ALEXNET_FCS[framework], False)}


def test_a_keras_runs_model_keras_starts_a_keras_variant(tiny_dataset, tmp_path):
    """keras-alexnet-pretrained from a Keras run's model.keras: every layer but the head loads (checked on the
    model built from it before any step), and the run records the file."""
    source_run = tmp_path / "source"
    train("keras", "keras-alexnet-scratch", tiny_dataset, source_run)
    saved = source_run / "model.keras"
    same = run_python(f"""
import json, keras, numpy as np
from cnnbench.keras_models import _layers_by_name, build_model
saved = _layers_by_name(keras.saving.load_model({str(saved)!r}, compile=False))
fresh = _layers_by_name(build_model("alexnet", 4, 64, [0.5] * 3, [0.25] * 3, weights={str(saved)!r}))
print(json.dumps({{name: all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), saved[name].get_weights()))
                   for name, layer in fresh.items() if layer.weights}}))
""")
    assert same == {**dict.fromkeys(["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2"], True), "head": False}
    run_dir = tmp_path / "run"
    train("keras", "keras-alexnet-pretrained", tiny_dataset, run_dir, extra=("--weights", saved, "--weights-source", "file"))
    weights = json.loads((run_dir / "metrics.json").read_text())["weights"]
    assert weights == {"source": "file", "sha256": file_digest(saved), "origin_sha256": file_digest(saved),
                       "path": str(saved), "classes": None}


def test_a_file_of_another_model_stops_naming_the_first_mismatch(tiny_dataset, tmp_path):
    vgg16 = tmp_path / "vgg16.pth"
    run_module("torch_models", "standin", "--model", "vgg16", "--out", vgg16)
    result = train("torch", "torch-alexnet-pretrained", tiny_dataset, tmp_path / "run", check=False,
                   extra=("--weights", vgg16, "--weights-source", "file"))
    assert result.returncode == 1, result.stderr
    assert (f"error: {vgg16} does not fit torchvision alexnet: features.0.weight has shape (64, 3, 3, 3) in the file, "
            "(64, 3, 11, 11) in the model") in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "metrics.json").exists()


def test_a_ported_file_whose_layer_has_another_shape_stops_keras_naming_it(trained_torch_alexnet, tiny_dataset,
                                                                            tmp_path):
    """The port checks names only; a conv of another width reaches Keras, which names it before training."""
    changed = tmp_path / "wider.pt"
    run_python(f"""
import json, torch
state = torch.load({str(trained_torch_alexnet)!r}, weights_only=True)
state["features.3.weight"] = torch.zeros(192, 64, 3, 3)
torch.save(state, {str(changed)!r})
print(json.dumps(None))
""")
    ported = tmp_path / "wider.keras.npz"
    run_module("torch_models", "port", "--model", "alexnet", "--weights", changed, "--out", ported)
    result = train("keras", "keras-alexnet-pretrained", tiny_dataset, tmp_path / "run", check=False,
                   extra=("--weights", ported, "--weights-source", "file"))
    assert result.returncode == 1, result.stderr
    assert (f"error: {ported} does not fit Keras alexnet_cifar: conv2/kernel has shape (3, 3, 64, 192) in the file, "
            "(5, 5, 64, 192) in the model") in result.stderr


def test_a_file_of_missing_layers_is_not_ported(tmp_path):
    partial = tmp_path / "partial.pt"
    run_python(f"""
import json, torch, torchvision
state = torchvision.models.alexnet().state_dict()
del state["features.8.bias"]
torch.save(state, {str(partial)!r})
print(json.dumps(None))
""")
    result = run_module("torch_models", "port", "--model", "alexnet", "--weights", partial, "--out",
                        tmp_path / "out.npz", check=False)
    assert result.returncode == 1
    assert "not a torchvision alexnet state_dict: features.8.bias is not in the file (1 missing, 0 unexpected)" in result.stderr
    assert not (tmp_path / "out.npz").exists()


# ---------------------------------------------------------------------------------- the class split
@pytest.fixture
def prepared(tmp_path):
    path = tmp_path / "prepared.npz"
    prepare({"source": "synthetic", "val_size": 40, "split_seed": 0,
             "synthetic": {"train_per_class": 12, "test_per_class": 3, "image_size": 8, "num_classes": 6}}, path)
    return path


def test_split_classes_keeps_each_split_of_its_classes_relabelled(prepared, tmp_path):
    source, target = tmp_path / "source.npz", tmp_path / "target.npz"
    names = split_classes(prepared, ["class4", 1, "class0"], source, target)
    assert names == (["class0", "class1", "class4"], ["class2", "class3", "class5"])
    whole = load_prepared(prepared)
    for path, classes in ((source, [0, 1, 4]), (target, [2, 3, 5])):
        part = load_prepared(path)
        assert part["class_names"] == tuple(f"class{c}" for c in classes)
        for split in ("train", "val", "test"):
            keep = np.isin(whole[f"y_{split}"], classes)
            assert np.array_equal(part[f"x_{split}"], whole[f"x_{split}"][keep])
            assert np.array_equal(np.asarray(classes)[part[f"y_{split}"]], whole[f"y_{split}"][keep])
        # Train sizes still cut nested, stratified subsets of the part, the same images as of the whole.
        small, whole_small = load_prepared(path, 2), load_prepared(prepared, 2)
        assert np.bincount(small["y_train"]).tolist() == [2, 2, 2]
        assert np.array_equal(small["x_train"], whole_small["x_train"][np.isin(whole_small["y_train"], classes)])


@pytest.mark.parametrize("chosen, message", [
    (["class9"], "pretrain.source_classes names 'class9', which is not a class of the data; its classes are: class0"),
    ([7], "class index 7 is out of range: the data has 6 classes"),
    ([f"class{i}" for i in range(6)], "lists every class of the data: leave some for the target task"),
    ([f"class{i}" for i in range(5)], "leaves fewer than 2 target classes"),
])
def test_split_classes_refuses_what_leaves_no_task(prepared, tmp_path, chosen, message):
    with pytest.raises(DataError, match=message):
        split_classes(prepared, chosen, tmp_path / "s.npz", tmp_path / "t.npz")
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "t.npz").exists()


# ----------------------------------------------------------------------------------- config checks
def weights_config(**values) -> dict:
    return {"variants": ["torch-alexnet-pretrained", "keras-alexnet-frozen", "torch-vgg16-scratch"],
            "weights": "imagenet", "weights_files": {}, "pretrain": {},
            "train": {"lr": 0.01, "epochs": 3}, **values}


def test_weights_file_needs_a_torch_file_for_each_pretrained_model():
    with pytest.raises(ConfigError, match=r"weights: file needs a file for alexnet in weights_files"):
        check_weights(weights_config(weights="file"))
    with pytest.raises(ConfigError, match=r"torch-alexnet-pretrained cannot start from the Keras file run/model.keras: "
                                          r"give weights_files.alexnet as a torch state_dict"):
        check_weights(weights_config(weights="file", weights_files={"alexnet": "run/model.keras"}))
    check_weights(weights_config(weights="file", weights_files={"alexnet": "run/model.pt"}))
    check_weights(weights_config(variants=["keras-alexnet-frozen"], weights="file",
                                 weights_files={"alexnet": "run/model.keras"}))


def test_weights_pretrain_needs_source_classes_and_has_its_own_hyperparameters():
    with pytest.raises(ConfigError, match=r"weights: pretrain needs pretrain.source_classes"):
        check_weights(weights_config(weights="pretrain"))
    config = weights_config(weights="pretrain", pretrain={"source_classes": ["cat"], "train": {"lr": 0.05}})
    check_weights(config)
    assert pretrain_hparams(config) == {"lr": 0.05, "epochs": 3, "train_size": None}
