"""Keras 3 AlexNet, VGG16 and ResNet-50 in torchvision's layout and initialisation; stand-in weights.

The initialisation is torchvision's (``init_rule="torchvision"``) or Keras' own defaults
(``"framework"``: Glorot-uniform kernels, zero biases), see ``config.scratch_init``.

The networks take uint8 images and do the conversion, resize and normalisation inside the
model, so the whole input pipeline runs on the device in the backend's own ops. Before the
first dense layer the feature map is flattened in channels-first order, like torchvision, so
that weights can be ported between the frameworks by a plain transpose.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import keras
from keras import layers

from .config import SCRATCH_INITS, is_keras_weights_file
from .fileio import atomic_path
from .weights import WeightsError, first_mismatch, input_transform, mismatch_error

# (filters, convs) per VGG16 block, with keras.applications' layer names block{b}_conv{c}.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
ALEXNET_FEATURES = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
                    (256, 3, 1, 1, False), (256, 3, 1, 1, True))  # filters, kernel, stride, pad, pool after
# torchvision's ResNet-50 (v1.5): per stage (layer1..layer4) the bottleneck width, blocks and stride.
RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
RESNET50_EXPANSION = 4
# The backbone of every model is the sub-model (vgg16, resnet50) or the layers before the head;
# the head, the last dense layer that fine-tuning replaces, is the layer named HEAD.
HEAD = "head"
# Each network's backbone: the layers (by name) that the `frozen` init keeps as loaded, the same part
# as torch_models.BACKBONE; the classifier (fc1, fc2, head) trains.
BACKBONE = {"alexnet": tuple(f"conv{index}" for index in range(1, len(ALEXNET_FEATURES) + 1)),
            "vgg16": ("vgg16",), "resnet50": ("resnet50",)}


@keras.saving.register_keras_serializable(package="cnnbench")
class AdaptiveAveragePooling(layers.Layer):
    """torch.nn.AdaptiveAvgPool2d for channels-last maps, as two fixed averaging matrices.

    Bin i of n over an input of m covers [floor(i*m/n), ceil((i+1)*m/n)), exactly torch's rule,
    for any sizes, upsampling too (a 1x1 map at 64x64 input becomes 6x6); keras' own layer
    fails on TensorFlow when the output is larger than the input.
    """

    def __init__(self, output_size, **kwargs):
        super().__init__(**kwargs)
        self.output_size = tuple(output_size)

    @staticmethod
    def _matrix(in_size: int, out_size: int):
        import numpy as np

        matrix = np.zeros((out_size, in_size), dtype="float32")
        for i in range(out_size):
            start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
            matrix[i, start:end] = 1.0 / (end - start)
        return matrix

    def build(self, input_shape):
        self.rows = self._matrix(input_shape[1], self.output_size[0])
        self.cols = self._matrix(input_shape[2], self.output_size[1])

    def call(self, inputs):
        rows = keras.ops.cast(self.rows, inputs.dtype)
        cols = keras.ops.cast(self.cols, inputs.dtype)
        return keras.ops.einsum("oh,bhwc,pw->bopc", rows, inputs, cols)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.output_size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "output_size": self.output_size}


def _torch_default_init(fan_in: int):
    """PyTorch's default Conv/Linear init: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return (keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
            keras.initializers.RandomUniform(-bound, bound))


def _kaiming_fan_out():
    """torchvision's conv init (VGG, ResNet): kaiming_normal_(mode="fan_out", nonlinearity="relu")."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def _initializers(rule: str, kernel, bias="zeros") -> dict:
    """A Conv2D's or Dense's initializer arguments: torchvision's ``kernel`` and ``bias`` under the rule
    ``torchvision``; none under ``framework``, so that Keras' own defaults apply (glorot_uniform, zeros)."""
    return {} if rule == "framework" else {"kernel_initializer": kernel, "bias_initializer": bias}


@keras.saving.register_keras_serializable(package="cnnbench")
class ReverseChannels(layers.Layer):
    """RGB -> BGR (and back): the channel order Keras' published VGG16 weights were trained on."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-1)


@keras.saving.register_keras_serializable(package="cnnbench")
class TorchBatchNormalization(layers.BatchNormalization):
    """torch.nn.BatchNorm2d in Keras: in training, normalise by the batch's biased variance (both do),
    but move the running variance towards the unbiased one (n / (n - 1) times it, n values per
    channel), as torch does and Keras' own layer does not. Build it with ``momentum=0.9`` for
    torch's 0.1 (Keras weighs the old value) and ``epsilon=1e-5``."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        ops = keras.ops
        inputs = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = self._moments(inputs, None)
        count = ops.cast(ops.size(inputs), inputs.dtype) / ops.cast(ops.size(mean), inputs.dtype)
        unbiased = variance * count / ops.maximum(count - 1.0, 1.0)
        momentum = self.momentum
        self.moving_mean.assign(ops.cast(self.moving_mean, inputs.dtype) * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            ops.cast(self.moving_variance, inputs.dtype) * momentum + unbiased * (1.0 - momentum))
        gamma = ops.cast(self.gamma, inputs.dtype) if self.scale else None
        beta = ops.cast(self.beta, inputs.dtype) if self.center else None
        outputs = ops.batch_normalization(inputs, mean, variance, axis=self.axis, offset=beta, scale=gamma,
                                          epsilon=self.epsilon)
        return ops.cast(outputs, self.compute_dtype)


def preprocessing(inputs, image_size: int, mean, std, mode: str = "imagenet"):
    """uint8 RGB -> float32 resized (bilinear, half-pixel like torch), then transformed as ``mode`` says:
    ``imagenet`` (/255, ``mean``/``std``) or ``caffe`` (BGR, minus Keras' VGG16 means), see
    ``weights.input_transform``."""
    reverse_channels, scale, offset = input_transform(mode, mean, std)
    x = layers.Rescaling(1.0, dtype="float32", name="to_float")(inputs)
    x = layers.Resizing(image_size, image_size, interpolation="bilinear", dtype="float32", name="resize")(x)
    if reverse_channels:
        x = ReverseChannels(dtype="float32", name="rgb_to_bgr")(x)
    return layers.Rescaling(scale, offset, dtype="float32", name="normalize")(x)


def alexnet_features(x, init_rule: str = "torchvision"):
    channels = 3
    for index, (filters, kernel, stride, pad, pool) in enumerate(ALEXNET_FEATURES, start=1):
        x = layers.ZeroPadding2D(pad, name=f"pad{index}")(x)
        x = layers.Conv2D(filters, kernel, strides=stride, activation="relu", name=f"conv{index}",
                          **_initializers(init_rule, *_torch_default_init(channels * kernel * kernel)))(x)
        if pool:
            x = layers.MaxPooling2D(3, strides=2, name=f"pool{index}")(x)
        channels = filters
    return AdaptiveAveragePooling((6, 6), name="avgpool")(x)


def vgg16_base(input_shape, init_rule: str = "torchvision") -> keras.Model:
    """VGG16's convolutional part, named and ordered like keras.applications.VGG16(include_top=False)."""
    inputs = keras.Input(input_shape, name="features_input")
    x = inputs
    for block, (filters, convs) in enumerate(VGG16_BLOCKS, start=1):
        for conv in range(1, convs + 1):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv{conv}",
                              **_initializers(init_rule, _kaiming_fan_out()))(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="vgg16")


def _resnet_conv(x, filters: int, kernel: int, stride: int, name: str, init_rule: str):
    """A bias-free conv padded like torch's (kernel // 2 on every side): a strided conv gets explicit
    zero padding, since Keras' 'same' pads only the bottom/right of an even-sized map."""
    padding = "same" if kernel > 1 else "valid"
    if kernel > 1 and stride > 1:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    return layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False, name=name,
                         **_initializers(init_rule, _kaiming_fan_out()))(x)


def _batch_norm(name: str):
    """torch.nn.BatchNorm2d's defaults (momentum 0.1, eps 1e-5; gamma 1, beta 0 as torchvision sets and as
    Keras starts too, so both init rules share them)."""
    return TorchBatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def _bottleneck(x, planes: int, stride: int, downsample: bool, name: str, init_rule: str):
    """torchvision's Bottleneck (v1.5: the 3x3 conv strides); layers named after its modules."""
    out = x
    for index, (filters, kernel, conv_stride) in enumerate(
            ((planes, 1, 1), (planes, 3, stride), (planes * RESNET50_EXPANSION, 1, 1)), start=1):
        out = _resnet_conv(out, filters, kernel, conv_stride, f"{name}_conv{index}", init_rule)
        out = _batch_norm(f"{name}_bn{index}")(out)
        if index < 3:
            out = layers.ReLU(name=f"{name}_relu{index}")(out)
    identity = x
    if downsample:
        identity = _resnet_conv(x, planes * RESNET50_EXPANSION, 1, stride, f"{name}_downsample_0", init_rule)
        identity = _batch_norm(f"{name}_downsample_1")(identity)
    out = layers.Add(name=f"{name}_add")([out, identity])
    return layers.ReLU(name=f"{name}_out")(out)


def resnet50_base(input_shape, init_rule: str = "torchvision") -> keras.Model:
    """torchvision's ResNet-50 without avgpool and fc, its layer names with "_" for "." (``port``)."""
    inputs = keras.Input(input_shape, name="features_input")
    x = _resnet_conv(inputs, 64, 7, 2, "conv1", init_rule)
    x = _batch_norm("bn1")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.ZeroPadding2D(1, name="maxpool_pad")(x)  # torch pads with -inf; after a ReLU 0 is the same
    x = layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
    for stage, (planes, blocks, stride) in enumerate(RESNET50_STAGES, start=1):
        for block in range(blocks):
            x = _bottleneck(x, planes, stride if block == 0 else 1, block == 0, f"layer{stage}_{block}", init_rule)
    return keras.Model(inputs, x, name="resnet50")


def keras_resnet50_base(input_shape) -> keras.Model:
    """keras.applications.ResNet50 without its top (v1: the first 1x1 conv strides; conv biases),
    the network Keras' published file fits; its BatchNorm momentum set to torch's (0.1)."""
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=tuple(input_shape),
                                       name="resnet50")
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.9
    return base


def _dense_init(model: str, fan_in: int):
    """torchvision's Linear init: VGG's ``_initialize_weights`` draws N(0, 0.01) weights with zero bias;
    AlexNet and ResNet keep nn.Linear's default."""
    if model == "vgg16":
        return keras.initializers.RandomNormal(0.0, 0.01), "zeros"
    return _torch_default_init(fan_in)


def classifier(x, num_classes: int, dropout: float, model: str, init_rule: str = "torchvision"):
    """torchvision's classifier head; the feature map is flattened channels-first like torch."""
    x = layers.Permute((3, 1, 2), name="to_channels_first")(x)
    x = layers.Flatten(name="flatten")(x)
    for index in (1, 2):
        dense = layers.Dense(4096, activation="relu", name=f"fc{index}",
                             **_initializers(init_rule, *_dense_init(model, x.shape[-1])))
        dropout_layer = layers.Dropout(dropout, name=f"dropout{index}")
        # AlexNet: Dropout -> Linear -> ReLU; VGG16: Linear -> ReLU -> Dropout.
        x = dense(dropout_layer(x)) if model == "alexnet" else dropout_layer(dense(x))
    return layers.Dense(num_classes, name=HEAD, dtype="float32",
                        **_initializers(init_rule, *_dense_init(model, x.shape[-1])))(x)


def resnet_head(x, num_classes: int, init_rule: str = "torchvision"):
    """torchvision ResNet's avgpool (to 1x1) and fc, which keeps nn.Linear's default init."""
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    return layers.Dense(num_classes, name=HEAD, dtype="float32",
                        **_initializers(init_rule, *_dense_init("resnet50", x.shape[-1])))(x)


def build_model(name: str, num_classes: int, image_size: int, mean, std, dropout: float = 0.5,
                input_shape=(32, 32, 3), weights: str | Path | None = None,
                preprocessing_mode: str = "imagenet", freeze_backbone: bool = False,
                init_rule: str = "torchvision") -> keras.Model:
    """The ``name`` network on uint8 ``input_shape`` images, with ``weights`` loaded where given;
    ``preprocessing_mode`` (imagenet or caffe) is the input transform inside the model. With
    ``freeze_backbone`` the ``BACKBONE`` layers are not trainable: the optimizer never sees their
    variables (no update, no weight decay) and BatchNormalization in them runs in inference mode.
    ``init_rule`` initialises the Conv2D and Dense layers: ``torchvision``'s rules or Keras' own
    defaults (``framework``); layers that ``weights`` load are overwritten either way."""
    if init_rule not in SCRATCH_INITS:
        raise ValueError(f"unknown init_rule {init_rule!r}; use one of {', '.join(SCRATCH_INITS)}")
    weights = Path(weights) if weights is not None else None
    ported = weights is not None and weights.suffix == ".npz"
    own_model = weights is not None and is_keras_weights_file(weights)  # e.g. a run's model.keras
    published = weights is not None and not (ported or own_model)  # Keras' published (or stand-in) .h5
    inputs = keras.Input(input_shape, dtype="uint8", name="images")
    x = preprocessing(inputs, image_size, mean, std, preprocessing_mode)
    if name == "alexnet":
        if published:
            raise ValueError("Keras AlexNet has no published ImageNet weights: port torchvision's "
                             "(python -m cnnbench.torch_models port) and pass the .npz")
        x = alexnet_features(x, init_rule)
    elif name == "vgg16":
        base = vgg16_base((image_size, image_size, 3), init_rule)
        if published:
            base.load_weights(str(weights))  # the published Keras notop file (legacy HDF5)
        x = base(x)
        x = AdaptiveAveragePooling((7, 7), name="avgpool")(x)
    elif name == "resnet50":
        # torchvision's network unless Keras' own published file (keras.applications' layout) is given.
        if published:
            base = keras_resnet50_base((image_size, image_size, 3))
            base.load_weights(str(weights))
        else:
            base = resnet50_base((image_size, image_size, 3), init_rule)
        x = base(x)
    else:
        raise ValueError(f"unknown model {name!r}; use alexnet, vgg16 or resnet50")
    outputs = (resnet_head(x, num_classes, init_rule) if name == "resnet50"
               else classifier(x, num_classes, dropout, name, init_rule))
    model = keras.Model(inputs, outputs, name=f"{name}_cifar")
    if ported:
        load_ported_weights(model, weights, include_head=(num_classes == 1000))
    if own_model:
        load_backbone_from_model(model, weights)
    if freeze_backbone:
        for layer_name in BACKBONE[name]:
            model.get_layer(layer_name).trainable = False
    return model


def _layers_by_name(model) -> dict:
    found = {}
    for layer in model.layers:
        found[layer.name] = layer
        if isinstance(layer, keras.Model):
            found.update(_layers_by_name(layer))
    return found


def load_ported_weights(model: keras.Model, path: str | Path, include_head: bool = False) -> None:
    """Assign weights ported from torchvision (``port.torch_to_keras``) to layers of the same name,
    each variable by its name (kernel, bias, gamma, beta, moving_mean, moving_variance).

    The 1000-class ImageNet head is skipped unless ``include_head`` (fine-tuning gets a new head).
    """
    import numpy as np

    layers_by_name = _layers_by_name(model)
    with np.load(path) as arrays:
        stored: dict[str, dict] = {}
        for key in arrays.files:
            if key.startswith("_"):  # what the port records about its source (weights.ORIGIN_KEY)
                continue
            layer_name, variable = key.split("/")
            stored.setdefault(layer_name, {})[variable] = arrays[key]
    weighted = {name for name, layer in layers_by_name.items()
                if layer.weights and not isinstance(layer, keras.Model) and name != HEAD}
    missing, foreign = weighted - set(stored), set(stored) - set(layers_by_name)
    if missing or foreign:
        raise ValueError(f"{path} does not fit {model.name}: no weights for {sorted(missing)}, weights for "
                         f"unknown layers {sorted(foreign)}; port the torchvision file of this model "
                         "(python -m cnnbench.torch_models port --model ...)")
    shapes = backbone_shapes(model)
    mismatch = first_mismatch(shapes, {f"{name}/{variable}": value.shape for name, variables in stored.items()
                                       if name != HEAD for variable, value in variables.items()})
    if mismatch:
        raise mismatch_error(path, f"Keras {model.name}", mismatch)
    for name, values in stored.items():
        if name == HEAD and not include_head:
            continue
        layer = layers_by_name[name]
        layer.set_weights([values[variable.name] for variable in layer.weights])


def backbone_shapes(model: keras.Model) -> dict[str, tuple]:
    """{layer/variable: shape} of every weighted layer but the head, nested sub-models' layers included."""
    return {f"{name}/{variable.name}": tuple(variable.shape) for name, layer in _layers_by_name(model).items()
            if layer.weights and not isinstance(layer, keras.Model) and name != HEAD
            for variable in layer.weights}


def load_backbone_from_model(model: keras.Model, path: str | Path) -> None:
    """Copy every layer but the head from the Keras model saved at ``path`` (such as a run's model.keras)
    into ``model``, layer by layer by name; a file that does not fit stops naming the first mismatch."""
    try:
        saved = keras.saving.load_model(path, compile=False)
    except Exception as err:  # a corrupt zip, an unknown layer, ...: all mean "not a model file of ours"
        raise WeightsError(f"{path} is not a Keras model file this workflow can read ({err}); give a run's "
                           "model.keras, or a torch state_dict (.pt) to port") from err
    mismatch = first_mismatch(backbone_shapes(model), backbone_shapes(saved))
    if mismatch:
        raise mismatch_error(path, f"Keras {model.name}", mismatch)
    saved_layers = _layers_by_name(saved)
    for name, layer in _layers_by_name(model).items():
        if layer.weights and not isinstance(layer, keras.Model) and name != HEAD:
            layer.set_weights(saved_layers[name].get_weights())


@keras.saving.register_keras_serializable(package="cnnbench")
class TorchSGD(keras.optimizers.SGD):
    """``torch.optim.SGD`` (dampening 0) in Keras, so that one config trains alike in both frameworks.

    Per step, with g the gradient and lr this step's learning rate::

        g = g + l2 * w                         # coupled weight decay (Keras' own is decoupled)
        buf = momentum * buf + g
        w = w - lr * (g + momentum * buf)      # nesterov
        w = w - lr * buf                       # otherwise

    Keras' SGD keeps ``v = momentum * v - lr * g`` instead: the same at a constant lr, but under a
    schedule it carries past steps at their own lr, where torch rescales the whole buffer by today's.
    """

    def __init__(self, l2: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.l2 = l2

    def update_step(self, gradient, variable, learning_rate):
        ops = keras.ops
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.l2:
            gradient = ops.add(gradient, ops.multiply(ops.cast(self.l2, variable.dtype), variable))
        if self.momentum == 0:
            self.assign_sub(variable, ops.multiply(learning_rate, gradient))
            return
        momentum = ops.cast(self.momentum, variable.dtype)
        buffer = self.momentums[self._get_variable_index(variable)]
        # The new buffer is used from this local value: JAX's stateless update does not read back.
        new_buffer = ops.add(ops.multiply(momentum, buffer), gradient)
        self.assign(buffer, new_buffer)
        step = ops.add(gradient, ops.multiply(momentum, new_buffer)) if self.nesterov else new_buffer
        self.assign_sub(variable, ops.multiply(learning_rate, step))

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


def make_optimizer(hp: dict, steps_per_epoch: int):
    """SGD as the config says; a cosine schedule decays per step, as the torch trainer does."""
    if hp["lr_schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(hp["lr"], decay_steps=hp["epochs"] * steps_per_epoch)
    else:
        lr = hp["lr"]
    return TorchSGD(l2=hp["weight_decay"], learning_rate=lr, momentum=hp["momentum"], nesterov=hp["nesterov"])


def write_standin_weights(name: str, out: str | Path, seed: int = 0) -> None:
    """Random conv weights saved in the legacy HDF5 layout of the published notop file of ``name``."""
    bases = {"vgg16": vgg16_base, "resnet50": keras_resnet50_base}
    if name not in bases:
        raise ValueError(f"stand-in Keras weights exist for {' and '.join(bases)} only (the published Keras files)")
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(seed)
    base = bases[name]((224, 224, 3))
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, base)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stand-in weights in Keras' published format.")
    commands = parser.add_subparsers(dest="command", required=True)
    standin = commands.add_parser("standin", help="write random notop weights in the published HDF5 layout")
    standin.add_argument("--model", required=True, choices=["vgg16", "resnet50"])
    standin.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    write_standin_weights(args.model, args.out)
    print(f"wrote stand-in {args.model} weights to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
