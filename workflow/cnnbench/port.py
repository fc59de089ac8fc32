"""Port torchvision AlexNet/VGG16/ResNet-50 weights to the Keras models of ``keras_models`` (numpy only).

Layouts: a torch conv kernel is (out, in, kh, kw), Keras' is (kh, kw, in, out); a torch linear
weight is (out, in), Keras' dense kernel is (in, out). The first dense layer needs no reordering
of its inputs because the Keras models flatten their last feature map channels-first, as torch
does (``keras_models.classifier``); ResNet's is global-average-pooled. BatchNorm's weight, bias,
running mean and running variance become Keras' gamma, beta, moving_mean and moving_variance
(torch's ``num_batches_tracked`` counts steps only). The result is an ``.npz`` keyed
``{layer}/{variable}`` by Keras layer and variable name (``kernel``, ``bias``, ``gamma``, ...).
"""

from __future__ import annotations

import numpy as np

VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONV_NAMES = tuple(f"block{b}_conv{c}" for b, convs in enumerate((2, 2, 3, 3, 3), start=1)
                         for c in range(1, convs + 1))

RESNET50_BLOCKS = (3, 4, 6, 3)  # bottlenecks per stage, layer1..layer4


def resnet50_modules() -> dict[str, str]:
    """torchvision ResNet-50's conv, BatchNorm and linear modules -> kind (conv, bn, linear)."""
    modules = {"conv1": "conv", "bn1": "bn"}
    for stage, blocks in enumerate(RESNET50_BLOCKS, start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            for index in (1, 2, 3):
                modules[f"{prefix}.conv{index}"], modules[f"{prefix}.bn{index}"] = "conv", "bn"
            if block == 0:
                modules[f"{prefix}.downsample.0"], modules[f"{prefix}.downsample.1"] = "conv", "bn"
    modules["fc"] = "linear"
    return modules


def keras_layer_name(torch_module: str) -> str:
    """The Keras ResNet-50's layer for a torchvision module: dots become underscores, fc the head."""
    return "head" if torch_module == "fc" else torch_module.replace(".", "_")


# torch parameter -> Keras variable, by module kind; torchvision's convs in ResNet have no bias.
VARIABLES = {
    "conv": {"weight": "kernel"},
    "conv_bias": {"weight": "kernel", "bias": "bias"},
    "linear": {"weight": "kernel", "bias": "bias"},
    "bn": {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"},
}
IGNORED = ("num_batches_tracked",)

# torch module prefix -> Keras layer name
TORCH_TO_KERAS = {
    "alexnet": {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3", "features.8": "conv4",
                "features.10": "conv5", "classifier.1": "fc1", "classifier.4": "fc2", "classifier.6": "head"},
    "vgg16": {**{f"features.{i}": name for i, name in zip(VGG16_CONV_INDICES, VGG16_CONV_NAMES)},
              "classifier.0": "fc1", "classifier.3": "fc2", "classifier.6": "head"},
}


def layout(model: str) -> dict[str, tuple[str, dict[str, str]]]:
    """torch module -> (Keras layer, {torch parameter: Keras variable}) for every weighted module."""
    if model == "resnet50":
        return {module: (keras_layer_name(module), VARIABLES[kind]) for module, kind in resnet50_modules().items()}
    return {module: (layer, VARIABLES["conv_bias"]) for module, layer in TORCH_TO_KERAS[model].items()}


def torch_to_keras(model: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keras-layout arrays for every layer of torchvision ``model``'s ``state`` (a state_dict as numpy)."""
    modules = layout(model)
    expected = {f"{module}.{parameter}" for module, (_, variables) in modules.items() for parameter in variables}
    given = {key for key in state if key.rsplit(".", 1)[-1] not in IGNORED}
    missing, unexpected = expected - given, given - expected
    if missing or unexpected:
        first = (f"{sorted(missing)[0]} is not in the file" if missing
                 else f"the file has {sorted(unexpected)[0]}, which the model lacks")
        raise ValueError(f"not a torchvision {model} state_dict: {first} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected)")
    ported = {}
    for module, (layer, variables) in modules.items():
        for parameter, variable in variables.items():
            value = np.asarray(state[f"{module}.{parameter}"], dtype=np.float32)
            if variable == "kernel":
                value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
            ported[f"{layer}/{variable}"] = np.ascontiguousarray(value)
    return ported
