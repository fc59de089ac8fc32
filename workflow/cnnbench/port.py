"""Port torchvision AlexNet/VGG16 weights to the Keras models of ``keras_models`` (numpy only).

Layouts: a torch conv kernel is (out, in, kh, kw), Keras' is (kh, kw, in, out); a torch linear
weight is (out, in), Keras' dense kernel is (in, out). The first dense layer needs no reordering
of its inputs because the Keras models flatten their last feature map channels-first, as torch
does (``keras_models.classifier``). The result is an ``.npz`` keyed ``{layer}/kernel`` and
``{layer}/bias`` by Keras layer name.
"""

from __future__ import annotations

import numpy as np

VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONV_NAMES = tuple(f"block{b}_conv{c}" for b, convs in enumerate((2, 2, 3, 3, 3), start=1)
                         for c in range(1, convs + 1))

# torch module prefix -> Keras layer name
TORCH_TO_KERAS = {
    "alexnet": {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3", "features.8": "conv4",
                "features.10": "conv5", "classifier.1": "fc1", "classifier.4": "fc2", "classifier.6": "head"},
    "vgg16": {**{f"features.{i}": name for i, name in zip(VGG16_CONV_INDICES, VGG16_CONV_NAMES)},
              "classifier.0": "fc1", "classifier.3": "fc2", "classifier.6": "head"},
}


def torch_to_keras(model: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keras-layout arrays for every layer of torchvision ``model``'s ``state`` (a state_dict as numpy)."""
    expected = {f"{prefix}.{kind}" for prefix in TORCH_TO_KERAS[model] for kind in ("weight", "bias")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"not a torchvision {model} state_dict: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    ported = {}
    for prefix, layer in TORCH_TO_KERAS[model].items():
        weight = np.asarray(state[f"{prefix}.weight"], dtype=np.float32)
        kernel = weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T
        ported[f"{layer}/kernel"] = np.ascontiguousarray(kernel)
        ported[f"{layer}/bias"] = np.asarray(state[f"{prefix}.bias"], dtype=np.float32)
    return ported
