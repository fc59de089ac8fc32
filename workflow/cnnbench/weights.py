"""Pretrained weights: where each file comes from, its published hash, and staging it locally.

Trainers never download: the workflow stages the files into ``resources/weights/`` first
(``imagenet/`` for the published files, ``standin/`` for random weights in the same formats),
so that a GPU node without internet can train.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from .config import loads_weights
from .fileio import atomic_path, file_digest, stream_to_file


class WeightsError(RuntimeError):
    """Missing or corrupt weights; the message says what to do."""


@dataclass(frozen=True)
class WeightsFile:
    filename: str
    url: str
    algorithm: str  # hash algorithm the publisher gives
    digest: str  # published digest, or its published prefix (torchvision puts 8 hex digits in the name)
    preprocessing: str = "imagenet"  # the input the weights were trained on (see resolve_preprocessing)


PRETRAINED = {
    ("torch", "alexnet"): WeightsFile(
        "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "sha256", "7be5be79"),
    ("torch", "vgg16"): WeightsFile(
        "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
        "sha256", "397923af"),
    ("keras", "vgg16"): WeightsFile(
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5", "6d6bbae143d832006294945121d1f1fc", preprocessing="caffe"),
    ("torch", "resnet50"): WeightsFile(  # IMAGENET1K_V2, torchvision's default
        "resnet50-11ad3fa6.pth", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        "sha256", "11ad3fa6"),
    # keras.applications.ResNet50 (v1: stride on the first 1x1 conv), its WEIGHTS_HASHES notop md5.
    ("keras", "resnet50"): WeightsFile(
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "md5", "4d473c1dd8becc155b73f8504c6f6626", preprocessing="caffe"),
}

# Releases selectable by a config key (``torch_resnet50_weights``); PRETRAINED holds each default.
RELEASES = {
    ("torch", "resnet50"): {
        "v2": PRETRAINED[("torch", "resnet50")],
        "v1": WeightsFile(  # IMAGENET1K_V1, the original torchvision ResNet-50
            "resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
            "sha256", "0676ba61"),
    },
}

# Config keys choosing between weights files, with their defaults (the schema's).
WEIGHTS_CHOICES = {"keras_vgg16_weights": "keras", "keras_resnet50_weights": "torch", "torch_resnet50_weights": "v2"}


def published_files() -> list[tuple[tuple[str, str], WeightsFile]]:
    """Every published file as ((framework, model), spec), each release once."""
    files = dict.fromkeys(PRETRAINED.values())
    for releases in RELEASES.values():
        files.update(dict.fromkeys(releases.values()))
    owners = {spec: key for key, releases in RELEASES.items() for spec in releases.values()}
    owners.update({spec: key for key, spec in PRETRAINED.items()})
    return [(owners[spec], spec) for spec in files]

# keras.applications.vgg16.preprocess_input ("caffe" mode): BGR order, these means off 0-255 values.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def weights_file(framework: str, model: str, release: str | None = None) -> WeightsFile:
    """The published file of ``framework``-``model``: its default, or ``release`` where it has several."""
    try:
        spec = PRETRAINED[(framework, model)]
    except KeyError:
        available = ", ".join(f"{f}-{m}" for f, m in PRETRAINED)
        raise WeightsError(f"no pretrained weights are published for {framework}-{model}; "
                           f"pretrained variants exist for: {available}") from None
    if release is None:
        return spec
    releases = RELEASES.get((framework, model), {})
    if release not in releases:
        raise WeightsError(f"{framework}-{model} has no weights release {release!r}; "
                           f"choose one of: {', '.join(releases) or 'none (it has one file)'}")
    return releases[release]


def torch_resnet50_release(choices: dict) -> str:
    return choices.get("torch_resnet50_weights", WEIGHTS_CHOICES["torch_resnet50_weights"])


PORTED_SUFFIX = ".keras.npz"
# Where pretrained and frozen variants start (config `weights`): published ImageNet files, random stand-ins
# in their formats, your own file per model (`weights_files`), or the workflow's own pretraining.
WEIGHTS_SOURCES = ("imagenet", "standin", "file", "pretrain")
# The key of a ported .npz that holds the sha256 of the torch file it was ported from.
ORIGIN_KEY = "_origin/sha256"


def ported_from(path: str | Path) -> str | None:
    """The sha256 of the torch file a ported ``.npz`` was made from (None for another file)."""
    if not str(path).endswith(".npz"):
        return None
    import numpy as np

    with np.load(path, allow_pickle=False) as arrays:
        return str(arrays[ORIGIN_KEY]) if ORIGIN_KEY in arrays.files else None


def first_mismatch(model: dict[str, tuple], given: dict[str, tuple]) -> str | None:
    """The first difference between a model's weights and a file's, both {name: shape}, in the model's
    order (then the file's): a weight the file lacks, one of another shape, or one the model lacks."""
    for name, shape in model.items():
        if name not in given:
            return f"{name} (shape {tuple(shape)}) is not in the file"
        if tuple(given[name]) != tuple(shape):
            return f"{name} has shape {tuple(given[name])} in the file, {tuple(shape)} in the model"
    extra = next((name for name in given if name not in model), None)
    return None if extra is None else f"the file has {extra} (shape {tuple(given[extra])}), which the model lacks"


def mismatch_error(path: str | Path, what: str, mismatch: str) -> WeightsError:
    return WeightsError(f"{path} does not fit {what}: {mismatch}. Every layer but the classification head "
                        "must match: give a file of this model (a run's model.pt, or a state_dict of the "
                        "torchvision model; for Keras also a run's model.keras)")


def weights_path(weights_dir: str | Path, source: str, framework: str, model: str,
                 choices: dict | None = None) -> Path:
    """The staged file a pretrained (or frozen) ``framework``-``model`` variant loads, as the config's
    ``choices`` (the keys of ``WEIGHTS_CHOICES``; missing ones take their defaults) say.

    Keras AlexNet (no published Keras weights) and, with ``keras_vgg16_weights: torch`` or
    ``keras_resnet50_weights: torch``, Keras VGG16 or ResNet-50 load torchvision's file ported to
    the Keras layout (``cnnbench.port``), so both frameworks fine-tune from identical weights.
    ``torch_resnet50_weights`` (v2 or v1) picks torchvision's ResNet-50 release, for both.
    """
    choices = {**WEIGHTS_CHOICES, **(choices or {})}
    release = torch_resnet50_release(choices) if model == "resnet50" else None
    ported = framework == "keras" and (model == "alexnet" or choices.get(f"keras_{model}_weights") == "torch")
    if ported:
        torch_file = Path(weights_file("torch", model, release).filename)
        return Path(weights_dir) / source / (torch_file.stem + PORTED_SUFFIX)
    own_release = release if framework == "torch" else None  # Keras' own file has one release
    return Path(weights_dir) / source / weights_file(framework, model, own_release).filename


def published_spec(path: str | Path) -> WeightsFile | None:
    """The published file ``path`` is a copy of (by name), or None for a derived file."""
    return next((spec for _, spec in published_files() if spec.filename == Path(path).name), None)


def resolve_preprocessing(requested: str, weights: str | Path | None) -> str:
    """The input transform a run uses: ``requested``, or for ``auto`` the one ``weights`` were trained on.

    ``imagenet`` (RGB / 255, normalised by ``mean``/``std``): torchvision's files, files ported from
    them and scratch runs; ``caffe``: Keras' published VGG16 and ResNet-50 files (see ``CAFFE_BGR_MEAN``).
    """
    if requested not in ("auto", "imagenet", "caffe"):
        raise ValueError(f"unknown preprocessing {requested!r}: use auto, imagenet or caffe")
    if requested != "auto":
        return requested
    spec = published_spec(weights) if weights is not None else None
    return spec.preprocessing if spec is not None else "imagenet"


def input_transform(preprocessing: str, mean, std) -> tuple[bool, list[float], list[float]]:
    """``(reverse_channels, scale, offset)``: a resized 0-255 RGB image becomes ``x * scale + offset``
    per channel, after reversing the channel order (RGB -> BGR) where ``reverse_channels``."""
    if preprocessing == "caffe":
        return True, [1.0] * 3, [-m for m in CAFFE_BGR_MEAN]
    if preprocessing == "imagenet":
        return False, [1.0 / (255.0 * s) for s in std], [-m / s for m, s in zip(mean, std)]
    raise ValueError(f"preprocessing {preprocessing!r} is not imagenet or caffe (resolve auto first)")


def published_source(staged: str | Path) -> WeightsFile:
    """The published file a staged weights file is, or is ported from (``cnnbench.port``)."""
    name = Path(staged).name
    if name.endswith(PORTED_SUFFIX):
        name = name.removesuffix(PORTED_SUFFIX) + ".pth"
    return published_spec(name)


def offline_files(config: dict) -> list[tuple[str, str, str, str]]:
    """Every file the workflow downloads for ``config`` (the workflow's merged config): (where it
    goes, URL, hash algorithm, published digest). Put them there and nothing is downloaded."""
    rows = []
    data = config["data"]
    if data["source"] == "cifar10":
        rows.append((data["cifar10"]["path"], data["cifar10"]["url"], "md5", data["cifar10"]["md5"]))
    if config["weights"] == "imagenet":
        specs = {published_source(weights_path("", "imagenet", framework, model, config))
                 for framework, model, init in (variant.split("-") for variant in config["variants"])
                 if loads_weights(init)}
        for spec in sorted(specs, key=lambda spec: spec.filename):
            rows.append((str(Path(config["weights_dir"]) / "imagenet" / spec.filename), spec.url,
                         spec.algorithm, spec.digest))
    return rows


def offline_table(rows: list[tuple[str, str, str, str]]) -> str:
    """The rows as tab-separated lines under a header; a digest of 8 hex digits is the prefix
    torchvision publishes in the file name (the file's digest must start with it)."""
    if not rows:
        return "Nothing is downloaded with this config (synthetic or image-folder data, stand-in weights)."
    lines = ["path\turl\talgorithm\tdigest"] + ["\t".join(row) for row in rows]
    return "\n".join(lines)


def verify(path: str | Path, spec: WeightsFile, actual: str | None = None) -> None:
    """Check ``path`` (or its already computed digest ``actual``) against the published digest."""
    actual = actual or file_digest(path, spec.algorithm)
    if not actual.startswith(spec.digest):
        raise WeightsError(
            f"{path} has {spec.algorithm} {actual}, but {spec.url} is published as {spec.digest}: the "
            f"file is corrupt or not the published weights. Delete it and run the workflow again to "
            f"re-download it."
        )


def fetch(spec: WeightsFile, dest: str | Path, timeout: float = 60.0) -> Path:
    """Download ``spec`` to ``dest`` and verify it; never leaves a partial or unverified file."""
    dest = Path(dest)
    try:
        with atomic_path(dest) as tmp:
            verify(tmp, spec, stream_to_file(spec.url, tmp, spec.algorithm, timeout))
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise WeightsError(
            f"could not download {spec.url} ({err}). On a machine without internet, download that URL "
            f"elsewhere and put the file at {dest}, or set `weights: standin` in the config to train "
            "from random weights in the same format."
        ) from err
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download and verify published ImageNet weights.")
    parser.add_argument("--framework", required=True, choices=["torch", "keras"])
    parser.add_argument("--model", required=True, choices=sorted({model for _, model in PRETRAINED}))
    parser.add_argument("--release", default=None, help="a release where the model has several (resnet50: v2, v1)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        spec = weights_file(args.framework, args.model, args.release)
        if args.out.exists():
            verify(args.out, spec)
        else:
            fetch(spec, args.out)
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {spec.algorithm} matches the published {spec.digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
