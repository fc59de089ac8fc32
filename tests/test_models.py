"""Model shapes and stand-in weights in both frameworks, each in its own process."""

from __future__ import annotations

import h5py
import pytest

from conftest import run_module, run_python

TORCH_SHAPES = """
import json, torch
from cnnbench.torch_models import BACKBONE, build_model, trainable_parameters
out = {}
for name in ("alexnet", "vgg16"):
    model = build_model(name, num_classes=10).eval()
    with torch.no_grad():
        out[name] = list(model(torch.zeros(2, 3, 64, 64)).shape)
    out[name + "_params"] = sum(p.numel() for p in model.parameters())
    frozen = build_model(name, num_classes=10, freeze_backbone=True)
    frozen.eval()
    frozen.train()  # what every epoch calls: the backbone must stay in inference mode
    backbone = [getattr(frozen, child) for child in BACKBONE[name]]
    features = frozen.features(torch.zeros(2, 3, 64, 64))
    out[name + "_frozen"] = {
        "trainable": sum(p.numel() for p in trainable_parameters(frozen)),
        "backbone_training": any(m.training for part in backbone for m in part.modules()),
        "classifier_training": all(m.training for m in frozen.classifier.modules()),
        "backbone_gradient": any(p.requires_grad for part in backbone for p in part.parameters()),
        "graph_through_backbone": features.requires_grad or features.grad_fn is not None,
    }
frozen = build_model("resnet50", num_classes=10, freeze_backbone=True)
frozen.train()
before = frozen.bn1.running_mean.clone()
frozen(torch.rand(2, 3, 64, 64)).sum().backward()  # a training step's forward and backward
out["resnet50_frozen"] = {
    "trainable": sum(p.numel() for p in trainable_parameters(frozen)),
    "backbone_training": any(m.training for child in BACKBONE["resnet50"] for m in getattr(frozen, child).modules()),
    "running_statistics_kept": bool(torch.equal(before, frozen.bn1.running_mean)),
    "fc_gradient": frozen.fc.weight.grad is not None,
}
print(json.dumps(out))
"""

KERAS_SHAPES = """
import json, numpy as np, keras
from cnnbench.keras_models import build_model
out = {}
for name in ("alexnet", "vgg16"):
    model = build_model(name, 10, image_size=64, mean=[0.5] * 3, std=[0.25] * 3)
    out[name] = list(model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0).shape)
    out[name + "_params"] = int(model.count_params())
    frozen = build_model(name, 10, image_size=64, mean=[0.5] * 3, std=[0.25] * 3, freeze_backbone=True)
    out[name + "_frozen"] = {
        "trainable": int(sum(np.prod(v.shape) for v in frozen.trainable_variables)),
        "trainable_layers": sorted({v.path.split("/")[0] for v in frozen.trainable_variables}),
    }
frozen = build_model("resnet50", 10, image_size=64, mean=[0.5] * 3, std=[0.25] * 3, freeze_backbone=True)
bn1 = frozen.get_layer("resnet50").get_layer("bn1")
before = np.array(bn1.moving_mean)
frozen(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("uint8"), training=True)
out["resnet50_frozen"] = {
    "trainable": int(sum(np.prod(v.shape) for v in frozen.trainable_variables)),
    "trainable_layers": sorted({v.path.split("/")[0] for v in frozen.trainable_variables}),
    "running_statistics_kept": bool(np.array_equal(before, np.array(bn1.moving_mean))),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def torch_out():
    return run_python(TORCH_SHAPES)


@pytest.fixture(scope="module")
def keras_out():
    return run_python(KERAS_SHAPES)


def test_torch_output_shapes(torch_out):
    assert torch_out["alexnet"] == [2, 10] and torch_out["vgg16"] == [2, 10]


def test_keras_output_shapes_and_same_size_as_torch(keras_out, torch_out):
    assert keras_out["alexnet"] == [2, 10] and keras_out["vgg16"] == [2, 10]
    # Same architecture in both frameworks: the same number of parameters, layer for layer.
    assert keras_out["alexnet_params"] == torch_out["alexnet_params"] == 57_044_810
    assert keras_out["vgg16_params"] == torch_out["vgg16_params"]


def test_frozen_backbone_trains_only_the_classifier_in_both_frameworks(torch_out, keras_out):
    """The `frozen` init: the same parameters trainable in both frameworks (the classifier's three
    Linear/Dense layers), torch's backbone without gradient and in inference mode after train()."""
    # classifier: 9216 (AlexNet, 256x6x6) or 25088 (VGG16, 512x7x7) -> 4096 -> 4096 -> 10, with biases
    for name, flat in (("alexnet", 256 * 6 * 6), ("vgg16", 512 * 7 * 7)):
        classifier = (flat + 1) * 4096 + (4096 + 1) * 4096 + (4096 + 1) * 10
        assert torch_out[f"{name}_frozen"] == {"trainable": classifier, "backbone_training": False,
                                               "classifier_training": True, "backbone_gradient": False,
                                               "graph_through_backbone": False}, name
        assert keras_out[f"{name}_frozen"] == {"trainable": classifier, "trainable_layers": ["fc1", "fc2", "head"]}
    # ResNet-50: only the new fc (2048 -> 10) trains; BatchNorm keeps its loaded statistics in a training step.
    assert torch_out["resnet50_frozen"] == {"trainable": 2048 * 10 + 10, "backbone_training": False,
                                            "running_statistics_kept": True, "fc_gradient": True}
    assert keras_out["resnet50_frozen"] == {"trainable": 2048 * 10 + 10, "trainable_layers": ["head"],
                                            "running_statistics_kept": True}


def test_keras_adaptive_pooling_follows_torch_bins():
    out = run_python("""
import json, numpy as np, keras
from cnnbench.keras_models import AdaptiveAveragePooling
x = np.arange(2 * 13 * 13 * 3, dtype="float32").reshape(2, 13, 13, 3)
y = np.asarray(AdaptiveAveragePooling((6, 6))(x))
up = np.asarray(AdaptiveAveragePooling((6, 6))(np.ones((1, 1, 1, 2), "float32") * 7))
print(json.dumps({"y": y[0, :, :, 0].tolist(), "up": up.tolist()}))
""")
    # torch's bins over 13 -> 6: [0,3), [2,5), [4,7), [6,9), [8,11), [10,13)
    import numpy as np

    x = np.arange(2 * 13 * 13 * 3, dtype="float32").reshape(2, 13, 13, 3)[0, :, :, 0]
    starts = [(i * 13) // 6 for i in range(6)]
    ends = [-(-((i + 1) * 13) // 6) for i in range(6)]
    expected = [[x[a:b, c:d].mean() for c, d in zip(starts, ends)] for a, b in zip(starts, ends)]
    np.testing.assert_allclose(out["y"], expected, rtol=1e-6)
    assert np.asarray(out["up"]).shape == (1, 6, 6, 2) and np.all(np.asarray(out["up"]) == 7)


def test_torch_standin_weights_have_torchvision_layout(tmp_path):
    out = tmp_path / "alexnet-owt-7be5be79.pth"
    run_module("torch_models", "standin", "--model", "alexnet", "--out", out)
    loaded = run_python(f"""
import json, torch, torchvision
from cnnbench.torch_models import build_model
state = torch.load({str(out)!r}, weights_only=True)
torchvision.models.alexnet().load_state_dict(state)  # strict: every key and shape matches
model = build_model("alexnet", 10, weights={str(out)!r})
same = torch.equal(model.features[0].weight, state["features.0.weight"])
print(json.dumps({{"head": list(state["classifier.6.weight"].shape), "loaded": same}}))
""")
    assert loaded == {"head": [1000, 4096], "loaded": True}


def test_keras_standin_weights_have_published_notop_layout(tmp_path):
    out = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    run_module("keras_models", "standin", "--model", "vgg16", "--out", out)
    with h5py.File(out) as handle:
        layer_names = [n.decode() if isinstance(n, bytes) else n for n in handle.attrs["layer_names"]]
        assert "block1_conv1" in layer_names and "block5_conv3" in layer_names
        assert not any(name.startswith(("fc", "predictions")) for name in layer_names)  # no top
    loaded = run_python(f"""
import json, numpy as np, h5py
from cnnbench.keras_models import build_model
model = build_model("vgg16", 10, 64, [0.5] * 3, [0.25] * 3, weights={str(out)!r}, freeze_backbone=True)
kernel = model.get_layer("vgg16").get_layer("block1_conv1").kernel
with h5py.File({str(out)!r}) as f:
    group = f["block1_conv1"]
    stored = np.asarray(group[group.attrs["weight_names"][0]])
trainable = sorted({{v.path.split("/")[0] for v in model.trainable_variables}})
print(json.dumps({{"equal": bool(np.array_equal(np.asarray(kernel), stored)), "trainable": trainable}}))
""")
    # The frozen init loads the same file; every layer it fills stays out of training.
    assert loaded == {"equal": True, "trainable": ["fc1", "fc2", "head"]}


def test_keras_alexnet_has_no_published_weights():
    with pytest.raises(AssertionError, match="no published ImageNet weights"):
        run_python("""
from cnnbench.keras_models import build_model
build_model("alexnet", 10, 64, [0.5] * 3, [0.25] * 3, weights="x.h5")
""")


HEAD_STATISTICS = """
import json, numpy as np
out = {}
for name in ("alexnet", "vgg16"):
    weight, bias = HEAD(name)
    out[name] = {"std": float(weight.std()), "max_abs": float(np.abs(weight).max()), "fan_in": int(FAN_IN(weight)),
                 "bias_max_abs": float(np.abs(bias).max())}
print(json.dumps(out))
"""
TORCH_HEAD = """
import torch
from cnnbench.torch_models import build_model
torch.manual_seed(0)
def HEAD(name):
    head = build_model(name, 10, head_seed=HEAD_SEED).classifier[-1]
    return head.weight.detach().numpy(), head.bias.detach().numpy()
FAN_IN = lambda weight: weight.shape[1]  # torch: (out, in)
"""
KERAS_HEAD = """
import keras
from cnnbench.keras_models import build_model
keras.utils.set_random_seed(0)
def HEAD(name):
    kernel, bias = build_model(name, 10, 64, [0.5] * 3, [0.25] * 3).get_layer("head").get_weights()
    return kernel, bias
FAN_IN = lambda kernel: kernel.shape[0]  # keras: (in, out)
"""


@pytest.mark.parametrize("framework, head_seed", [("torch", None), ("torch", 12345), ("keras", None)])
def test_new_head_follows_torchvisions_init_rule(framework, head_seed):
    """VGG16: N(0, 0.01) weights and zero bias (torchvision's VGG rule); AlexNet: nn.Linear's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both (torchvision's AlexNet has no rule of its own); the
    same rule when torch draws the head from a generator of its own (a run from a weights file)."""
    code = f"HEAD_SEED = {head_seed}\n" + TORCH_HEAD if framework == "torch" else KERAS_HEAD
    heads = run_python(code + HEAD_STATISTICS)
    vgg, alexnet = heads["vgg16"], heads["alexnet"]
    # 40,960 weights: the sample std's relative standard error is 1/sqrt(2n) = 0.35%, so 3% is ~8.5 of them.
    assert vgg["std"] == pytest.approx(0.01, rel=0.03)
    assert vgg["bias_max_abs"] == 0.0
    bound = 1.0 / alexnet["fan_in"] ** 0.5
    assert alexnet["fan_in"] == 4096
    assert 0.99 * bound < alexnet["max_abs"] <= bound  # uniform up to the bound, not beyond
    assert alexnet["std"] == pytest.approx(bound / 3**0.5, rel=0.03)  # a uniform's std
    assert 0.0 < alexnet["bias_max_abs"] <= bound


KERAS_INIT_STATISTICS = """
import json, numpy as np, keras
from cnnbench.keras_models import build_model
out = {}
for rule in ("torchvision", "framework"):
    keras.utils.set_random_seed(0)
    model = build_model("alexnet", 10, 64, [0.5] * 3, [0.25] * 3, init_rule=rule)
    out[rule] = {}
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kernel, bias = (np.asarray(w) for w in layer.get_weights())
            receptive = int(np.prod(kernel.shape[:-2]))  # 1 for a Dense kernel (in, out)
            out[rule][layer.name] = {
                "fan_in": receptive * kernel.shape[-2], "fan_out": receptive * kernel.shape[-1],
                "max_abs": float(np.abs(kernel).max()), "mean_square": float(np.mean(np.square(kernel))),
                "bias_max_abs": float(np.abs(bias).max())}
# The other networks: which initializer every Conv2D and Dense layer (nested ones too) was built with.
def initializers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from initializers(layer)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            config = layer.get_config()
            yield (layer.name, config["kernel_initializer"]["class_name"],
                   config["bias_initializer"]["class_name"] if layer.use_bias else None)
for name in ("vgg16", "resnet50"):
    for rule in ("torchvision", "framework"):
        out[f"{name}_{rule}"] = sorted({(kernel, bias) for _, kernel, bias in
                                        initializers(build_model(name, 10, 64, [0.5] * 3, [0.25] * 3, init_rule=rule))},
                                       key=str)
try:
    build_model("alexnet", 10, 64, [0.5] * 3, [0.25] * 3, init_rule="glorot")
except ValueError as err:
    out["unknown_rule"] = str(err)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def keras_inits():
    return run_python(KERAS_INIT_STATISTICS)


ALEXNET_WEIGHTED = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "head"]
FLOAT32_ROUNDING = 1 + 2**-23  # a float32 draw may round up past a bound that float32 cannot hold exactly


def test_keras_alexnet_torchvision_init_is_torchs_default_in_every_layer(keras_inits):
    """Weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nn.Conv2d's and nn.Linear's default.
    Every layer holds >= 23,232 weights: the max reaches 0.99 of the bound (a miss has probability
    <= 0.99^23232), and the mean square's relative standard error is <= sqrt(0.8 / n) = 0.6%."""
    layers = keras_inits["torchvision"]
    assert sorted(layers) == sorted(ALEXNET_WEIGHTED)
    for name, stats in layers.items():
        bound = stats["fan_in"] ** -0.5
        assert 0.99 * bound < stats["max_abs"] <= bound * FLOAT32_ROUNDING, name
        assert stats["mean_square"] == pytest.approx(bound ** 2 / 3, rel=0.03), name
        assert 0.0 < stats["bias_max_abs"] <= bound * FLOAT32_ROUNDING, name


def test_keras_alexnet_framework_init_is_glorot_uniform_with_zero_biases(keras_inits):
    """scratch_init: framework builds Keras' defaults: kernels ~ U(-b, b), b = sqrt(6 / (fan_in + fan_out)),
    so a variance of 2 / (fan_in + fan_out); biases 0."""
    layers = keras_inits["framework"]
    assert sorted(layers) == sorted(ALEXNET_WEIGHTED)
    for name, stats in layers.items():
        fans = stats["fan_in"] + stats["fan_out"]
        bound = (6 / fans) ** 0.5
        assert 0.99 * bound < stats["max_abs"] <= bound * FLOAT32_ROUNDING, name
        assert stats["mean_square"] == pytest.approx(2 / fans, rel=0.03), name
        assert stats["bias_max_abs"] == 0.0, name
    conv1 = layers["conv1"]
    assert (conv1["fan_in"], conv1["fan_out"]) == (3 * 11 * 11, 64 * 11 * 11)
    # The rules differ: conv1's Glorot bound is sqrt(6 * 363 / 8107) = 0.52 of torch's 1/sqrt(363).
    ratio = layers["conv1"]["max_abs"] / keras_inits["torchvision"]["conv1"]["max_abs"]
    assert ratio == pytest.approx((6 * 363 / 8107) ** 0.5, rel=0.01)


def test_keras_vgg16_and_resnet50_follow_the_init_rule_in_every_layer(keras_inits):
    """torchvision: kaiming-normal convs (VarianceScaling), VGG's N(0, 0.01) Linear and nn.Linear's default
    for ResNet's fc; framework: Keras' GlorotUniform kernels and Zeros biases everywhere."""
    assert keras_inits["vgg16_torchvision"] == [["RandomNormal", "Zeros"], ["VarianceScaling", "Zeros"]]
    assert keras_inits["resnet50_torchvision"] == [["VarianceScaling", "RandomUniform"], ["VarianceScaling", None]]
    assert keras_inits["vgg16_framework"] == [["GlorotUniform", "Zeros"]]
    assert keras_inits["resnet50_framework"] == [["GlorotUniform", "Zeros"], ["GlorotUniform", None]]
    assert "unknown init_rule 'glorot'; use one of torchvision, framework" in keras_inits["unknown_rule"]


HEAD_OF_ITS_OWN = """
import json, types, torch
from cnnbench import training
from cnnbench.fileio import file_digest
from cnnbench.torch_models import build_model
torch.manual_seed(0)  # a run at seed 0 trained these weights (the workflow's pretraining, say)
pretraining = build_model("alexnet", 5)
torch.save(pretraining.state_dict(), WEIGHTS)
run = types.SimpleNamespace(seed=0, weights_sha256=file_digest(WEIGHTS))
heads = {}
for name, head_seed in (("global RNG", None), ("own seed", training.head_seed(run)),
                        ("own seed again", training.head_seed(run)),
                        ("seed 1", training.head_seed(types.SimpleNamespace(seed=1, weights_sha256=run.weights_sha256)))):
    torch.manual_seed(0)  # the fine-tuning run, at the same seed
    heads[name] = build_model("alexnet", 5, weights=WEIGHTS, head_seed=head_seed).classifier[6].weight
same = lambda a, b: bool(torch.equal(a, b))
print(json.dumps({"global RNG repeats the pretraining's head": same(heads["global RNG"], pretraining.classifier[6].weight),
                  "own seed repeats it": same(heads["own seed"], pretraining.classifier[6].weight),
                  "own seed is reproducible": same(heads["own seed"], heads["own seed again"]),
                  "seeds differ": not same(heads["own seed"], heads["seed 1"]),
                  "no weights, no own seed": training.head_seed(types.SimpleNamespace(seed=0, weights_sha256=None))}))
"""


def test_a_run_from_weights_draws_a_head_of_its_own(tmp_path):
    """torch's global RNG at the same seed gives a fine-tuning run the very head the weights' own run
    started from (the head its backbone grew up with); training.head_seed mixes in the weights' sha256."""
    found = run_python(f"WEIGHTS = {str(tmp_path / 'weights.pt')!r}\n" + HEAD_OF_ITS_OWN)
    assert found == {"global RNG repeats the pretraining's head": True, "own seed repeats it": False,
                     "own seed is reproducible": True, "seeds differ": True, "no weights, no own seed": None}
