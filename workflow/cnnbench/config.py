"""Variant names and per-variant hyperparameters, shared by the Snakefile and the trainers.

A run is named ``{framework}-{model}-{init}`` plus a seed. Hyperparameters resolve in three
layers: ``train`` (defaults for all) <- ``init_overrides[init]`` <- ``variant_overrides[variant]``.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

FRAMEWORKS = ("torch", "keras")
MODELS = ("alexnet", "vgg16")
INITS = ("scratch", "pretrained")
VALID_VARIANTS = tuple("-".join(parts) for parts in itertools.product(FRAMEWORKS, MODELS, INITS))
REFERENCE_VARIANTS = (
    "torch-alexnet-scratch", "keras-alexnet-scratch",
    "torch-alexnet-pretrained", "keras-vgg16-pretrained",
)


class ConfigError(ValueError):
    """A config value that cannot work; the message lists the valid choices."""


class Variant(NamedTuple):
    framework: str
    model: str
    init: str

    @property
    def name(self) -> str:
        return f"{self.framework}-{self.model}-{self.init}"


def parse_variant(name: str) -> Variant:
    if name not in VALID_VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; valid variants are: {', '.join(VALID_VARIANTS)}")
    return Variant(*name.split("-"))


def resolve_hparams(config: dict, variant: str) -> dict:
    """The hyperparameters one variant trains with (a new dict; ``config`` is not modified)."""
    parsed = parse_variant(variant)
    unknown = sorted(set(config.get("variant_overrides", {})) - set(VALID_VARIANTS))
    if unknown:
        raise ConfigError(f"variant_overrides names unknown variant(s) {', '.join(unknown)}; "
                          f"valid variants are: {', '.join(VALID_VARIANTS)}")
    hparams = dict(config["train"])
    hparams.update(config.get("init_overrides", {}).get(parsed.init, {}))
    hparams.update(config.get("variant_overrides", {}).get(variant, {}))
    return hparams
