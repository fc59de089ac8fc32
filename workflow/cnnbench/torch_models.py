"""torchvision AlexNet, VGG16 and ResNet-50 with a new classification head; stand-in weights."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

from .fileio import atomic_path, file_digest
from .weights import ORIGIN_KEY, WeightsError, first_mismatch, mismatch_error

# ResNet-50 is torchvision's v1.5 (the 3x3 conv of a bottleneck strides); it has no dropout.
ARCHITECTURES = {"alexnet": torchvision.models.alexnet, "vgg16": torchvision.models.vgg16,
                 "resnet50": torchvision.models.resnet50}
# The module path of each network's last linear layer, the head a fine-tuning run replaces;
# the rest of the network.
HEADS = {"alexnet": "classifier.6", "vgg16": "classifier.6", "resnet50": "fc"}
# Each network's backbone: the child modules that the `frozen` init keeps as loaded (the convolutional
# feature extractor); the rest trains. keras_models.BACKBONE names the same part.
BACKBONE = {"alexnet": ("features",), "vgg16": ("features",),
            "resnet50": ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")}


def architecture(name: str, dropout: float = 0.5) -> nn.Module:
    if name == "resnet50":
        return ARCHITECTURES[name](weights=None)
    return ARCHITECTURES[name](weights=None, dropout=dropout)


def build_model(name: str, num_classes: int, dropout: float = 0.5, weights: str | Path | None = None,
                freeze_backbone: bool = False, head_seed: int | None = None) -> nn.Module:
    """torchvision's ``name``, optionally loaded with ``weights``, with a ``num_classes`` head.

    ``weights`` is a state_dict of the network: ImageNet's (1000 classes), a stand-in, or your own (such
    as a run's model.pt, with any number of classes). Every layer but the last linear one (``HEADS``)
    loads; the head is new, so fine-tuning keeps every pretrained layer but the head.
    With ``freeze_backbone`` the backbone is frozen (see ``freeze``). ``head_seed`` draws the head from a
    generator of its own (``training.head_seed``) instead of torch's global one.
    """
    model = architecture(name, dropout)
    if weights is not None:
        load_backbone(model, name, weights)
    old_head = model.get_submodule(HEADS[name])
    generator = torch.Generator().manual_seed(head_seed) if head_seed is not None else None
    model.set_submodule(HEADS[name], new_head(name, old_head.in_features, num_classes, generator))
    if freeze_backbone:
        freeze(model, [getattr(model, child) for child in BACKBONE[name]])
    return model


def load_backbone(model: nn.Module, name: str, weights: str | Path) -> None:
    """Load every weight and buffer of ``weights`` but the head's into ``model``; a file that does not fit
    stops with a WeightsError naming the first mismatch."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip or format errors: all mean "not a state_dict file"
        raise WeightsError(f"{weights} is not a torch state_dict file ({err}); give a .pt/.pth saved with "
                           "torch.save(model.state_dict(), path), such as a run's model.pt") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{weights} holds a {type(state).__name__}, not a state_dict (names to tensors): "
                           "save it with torch.save(model.state_dict(), path)")
    head = f"{HEADS[name]}."
    backbone = {key: value for key, value in model.state_dict().items() if not key.startswith(head)}
    given = {key: value for key, value in state.items() if not key.startswith(head)}
    mismatch = first_mismatch({k: v.shape for k, v in backbone.items()}, {k: v.shape for k, v in given.items()})
    if mismatch:
        raise mismatch_error(weights, f"torchvision {name}", mismatch)
    model.load_state_dict(given, strict=False)


def freeze(model: nn.Module, backbone: list[nn.Module]) -> None:
    """Keep ``backbone`` as it is: its parameters need no gradient (so autograd records nothing
    through it, and ``trainable_parameters`` leaves them out of the optimizer and its weight decay),
    and it stays in inference mode (BatchNorm uses and keeps its running statistics) even when
    ``model.train()`` is called, as every epoch does."""
    for module in backbone:
        module.requires_grad_(False)
    set_mode = model.train

    def train(mode: bool = True) -> nn.Module:
        set_mode(mode)
        for module in backbone:
            module.eval()
        return model

    model.train = train
    train(model.training)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer updates (and decays): every parameter outside a frozen backbone."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


class Float32Linear(nn.Linear):
    """The classification head: it computes in float32 even under bf16 autocast, on its input cast to
    float32 (as Keras' head layer, dtype float32, under mixed_bfloat16), so the logits and the loss on
    them are float32. A subclass of nn.Linear: state_dict keys, saved models and ports stay the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.amp.is_autocast_available(x.device.type):  # e.g. the meta device (FLOP counting)
            return super().forward(x.float())
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def new_head(name: str, in_features: int, num_classes: int,
             generator: torch.Generator | None = None) -> Float32Linear:
    """The new last layer, initialised by torchvision's rule for ``name`` (Keras' models use the same):
    VGG's ``_initialize_weights`` draws Linear weights from N(0, 0.01) with zero bias; AlexNet and
    ResNet have no rule of their own for it, so nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    stays. With ``generator`` the same rule draws from it (the global RNG advances as without it)."""
    head = Float32Linear(in_features, num_classes)
    with torch.no_grad():
        if name == "vgg16":
            head.weight.normal_(0.0, 0.01, generator=generator)
            head.bias.zero_()
        elif generator is not None:
            bound = 1 / math.sqrt(in_features)  # nn.Linear's kaiming_uniform_(a=sqrt(5)) and bias bound
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
    return head


def write_standin_weights(name: str, out: str | Path, seed: int = 0) -> None:
    """Randomly initialised ImageNet-shaped weights, saved exactly like torchvision's files."""
    torch.manual_seed(seed)
    state = architecture(name).state_dict()
    with atomic_path(out) as tmp:
        torch.save(state, tmp)


def port_to_keras(name: str, weights: str | Path, out: str | Path) -> None:
    """Write torchvision ``weights`` in the Keras models' layout (see ``port``), as an .npz."""
    import numpy as np

    from .port import torch_to_keras

    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        ported = torch_to_keras(name, {key: value.numpy() for key, value in state.items()})
    except ValueError as err:
        raise WeightsError(f"cannot port {weights} to Keras: {err}") from err
    ported[ORIGIN_KEY] = np.asarray(file_digest(weights))  # so Keras runs record the file they started from
    with atomic_path(out) as tmp:
        np.savez(tmp, **ported)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stand-in weights in torchvision's format; porting to Keras.")
    commands = parser.add_subparsers(dest="command", required=True)
    standin = commands.add_parser("standin", help="write random weights in torchvision's file format")
    standin.add_argument("--model", required=True, choices=sorted(ARCHITECTURES))
    standin.add_argument("--out", required=True, type=Path)
    port = commands.add_parser("port", help="convert a torchvision .pth into the Keras models' layout (.npz)")
    port.add_argument("--model", required=True, choices=sorted(ARCHITECTURES))
    port.add_argument("--weights", required=True, type=Path)
    port.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "standin":
        write_standin_weights(args.model, args.out)
        print(f"wrote stand-in {args.model} weights to {args.out}")
    else:
        try:
            port_to_keras(args.model, args.weights, args.out)
        except WeightsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"ported {args.weights} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
