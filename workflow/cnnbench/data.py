"""Data preparation: turn a source into one ``.npz`` file that every trainer reads.

The prepared file holds uint8 images (N, H, W, 3), int64 labels and the class names, with a
seeded, stratified validation split carved out of the training set. The test set is only
ever used for the final evaluation. ``train_rank`` gives each training image its place in one
seeded permutation of its class: a run on k images per class trains on those ranked below k
(:func:`train_subset`), so the subsets are stratified and nested, from one file.

Sources:
- ``cifar10``: the official CIFAR-10 python tarball (downloaded and md5-checked if absent);
- ``imagefolder``: a directory or .tar/.tar.gz/.tar.xz archive of ``train/<class>/*`` and
  ``test/<class>/*`` images;
- ``synthetic``: small generated images that a model can learn, for demos and tests.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
import tarfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fileio import atomic_path, file_digest, stream_to_file

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "test")


class DataError(RuntimeError):
    """Bad or unavailable input data; the message says what to do."""


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


# --------------------------------------------------------------------------- cifar10 source

def download(url: str, dest: str | os.PathLike, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` and verify its md5; never leaves a partial file behind."""
    dest = Path(dest)
    try:
        with atomic_path(dest) as tmp:
            actual = stream_to_file(url, tmp, "md5", timeout)
            if actual != md5:
                raise DataError(
                    f"checksum mismatch for {url}: md5 {actual}, expected {md5}. "
                    "The partial download was removed; run the workflow again to retry."
                )
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DataError(
            f"could not download {url} ({err}). If this machine has no internet, download it "
            f"elsewhere and put it at {dest}, or set data.cifar10.path in the config to a local "
            "copy of cifar-10-python.tar.gz."
        ) from err
    return dest


def verify_md5(path: str | os.PathLike, md5: str) -> None:
    actual = file_digest(path, "md5")
    if actual != md5:
        raise DataError(
            f"{path} has md5 {actual}, expected {md5}: the file is corrupt or not the official "
            "CIFAR-10 python tarball. Delete it and run the workflow again to re-download it."
        )


def _unpickle(raw: bytes) -> dict:
    return pickle.loads(raw, encoding="bytes")


def load_cifar10_tarball(path: str | os.PathLike) -> Dataset:
    """Parse the official ``cifar-10-python.tar.gz`` (pickled batches, CHW row-major)."""
    batches: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = Path(member.name).name
                if member.isfile() and (name.startswith("data_batch_") or name in ("test_batch", "batches.meta")):
                    batches[name] = _unpickle(archive.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise DataError(f"{path} is not a readable CIFAR-10 python tarball ({err}). Delete it and re-download.") from err

    train_names = sorted(n for n in batches if n.startswith("data_batch_"))
    missing = [n for n in ("test_batch", "batches.meta") if n not in batches]
    if not train_names:
        missing.insert(0, "data_batch_*")
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: not a complete CIFAR-10 python tarball.")

    def images_labels(names):
        x = np.concatenate([batches[n][b"data"] for n in names]).astype(np.uint8)
        y = np.concatenate([np.asarray(batches[n][b"labels"]) for n in names]).astype(np.int64)
        return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), y

    x_train, y_train = images_labels(train_names)
    x_test, y_test = images_labels(["test_batch"])
    class_names = tuple(n.decode() for n in batches["batches.meta"][b"label_names"])
    return Dataset(x_train, y_train, x_test, y_test, class_names)


# ----------------------------------------------------------------------- imagefolder source

def _decode_image(raw: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        reason = "not a decodable image" if isinstance(err, UnidentifiedImageError) else str(err)
        raise DataError(f"cannot read image {name} ({reason}). Remove or replace that file.") from err


def _iter_imagefolder(path: Path):
    """Yield (split, class, name, bytes) for every image file in a directory or archive."""
    def classify(relative: str):
        parts = Path(relative).parts
        # Accept an optional top-level folder (e.g. cifar10/train/cat/1.jpg).
        for offset in range(len(parts) - 2):
            if parts[offset] in SPLITS and len(parts) - offset == 3:
                return parts[offset], parts[offset + 1]
        return None

    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file():
                where = classify(str(file.relative_to(path)))
                if where and file.suffix.lower() in IMAGE_SUFFIXES:
                    yield (*where, str(file), file.read_bytes())
        return
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                where = classify(member.name) if member.isfile() else None
                if where and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    yield (*where, f"{path}:{member.name}", archive.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"cannot read archive {path} ({err}): it is truncated or not a tar archive.") from err


def load_imagefolder(path: str | os.PathLike) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise DataError(f"image folder {path} does not exist; set data.imagefolder.path in the config.")
    # Class directories, including empty ones, so that an empty class is reported.
    declared: dict[str, set[str]] = {split: set() for split in SPLITS}
    if path.is_dir():
        for split in SPLITS:
            for candidate in path.glob(f"**/{split}/*"):
                if candidate.is_dir():
                    declared[split].add(candidate.name)

    images: dict[str, dict[str, list]] = {split: {} for split in SPLITS}
    shape = None
    shape_source = None
    for split, cls, name, raw in _iter_imagefolder(path):
        array = _decode_image(raw, name)
        if shape is None:
            shape, shape_source = array.shape, name
        elif array.shape != shape:
            raise DataError(
                f"mixed image sizes: {name} is {array.shape[1]}x{array.shape[0]} but {shape_source} is "
                f"{shape[1]}x{shape[0]}. Resize all images to one size first."
            )
        images[split].setdefault(cls, []).append(array)

    for split in SPLITS:
        if not images[split] and not declared[split]:
            raise DataError(f"{path} has no '{split}/<class>/' images: the {split} split is missing.")
    classes = sorted(set().union(*images.values(), *declared.values()))
    for split in SPLITS:
        empty = [c for c in classes if not images[split].get(c)]
        if empty:
            raise DataError(f"{path}: class(es) {', '.join(empty)} have no images in the {split} split.")

    def stack(split):
        x = np.stack([img for c in classes for img in images[split][c]])
        y = np.concatenate([np.full(len(images[split][c]), i, dtype=np.int64) for i, c in enumerate(classes)])
        return x, y

    x_train, y_train = stack("train")
    x_test, y_test = stack("test")
    return Dataset(x_train, y_train, x_test, y_test, tuple(classes))


# ------------------------------------------------------------------------- synthetic source

def make_synthetic(train_per_class: int = 100, test_per_class: int = 20, image_size: int = 32,
                   num_classes: int = 10, seed: int = 0) -> Dataset:
    """Generated images whose class sets a colour and a stripe orientation, plus noise.

    Learnable (both cues are visible to a small CNN after one epoch) but not trivial: each image
    has a random brightness, phase and Gaussian pixel noise.
    """
    rng = np.random.default_rng(seed)
    coords = np.arange(image_size, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    palette = rng.uniform(40, 215, size=(num_classes, 3)).astype(np.float32)
    angles = np.linspace(0, np.pi, num_classes, endpoint=False)

    def generate(per_class):
        xs, ys = [], []
        for label in range(num_classes):
            phase = rng.uniform(0, 2 * np.pi, size=(per_class, 1, 1))
            direction = np.cos(angles[label]) * xx + np.sin(angles[label]) * yy
            stripes = np.sin(direction[None] * (2 * np.pi / 8.0) + phase)  # period of 8 px
            brightness = rng.uniform(0.8, 1.2, size=(per_class, 1, 1, 1))
            image = palette[label] * brightness + 40.0 * stripes[..., None]
            image += rng.normal(0, 12, size=image.shape)
            xs.append(np.clip(image, 0, 255).astype(np.uint8))
            ys.append(np.full(per_class, label, dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = generate(train_per_class)
    x_test, y_test = generate(test_per_class)
    return Dataset(x_train, y_train, x_test, y_test, tuple(f"class{i}" for i in range(num_classes)))


# ------------------------------------------------------------------------ split and write

def stratified_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of ``size`` items drawn so that every class keeps its share (seeded)."""
    labels = np.asarray(labels)
    if not 0 < size < len(labels):
        raise DataError(f"cannot take {size} of {len(labels)} training images; choose 0 < size < {len(labels)}.")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts * size / len(labels)).astype(int)
    # Hand out what flooring left over to the classes with the largest remainders.
    remainder = counts * size / len(labels) - quotas
    for index in np.argsort(-remainder, kind="stable")[: size - quotas.sum()]:
        quotas[index] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quotas)]
    return np.sort(np.concatenate(chosen))


def class_ranks(labels: np.ndarray, seed: int) -> np.ndarray:
    """Each item's position (0, 1, ...) in one seeded random permutation of its class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    ranks = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        ranks[rng.permutation(members)] = np.arange(len(members))
    return ranks


def train_subset(labels: np.ndarray, ranks: np.ndarray, per_class: int | None) -> np.ndarray:
    """Sorted indices of the first ``per_class`` training images of every class in the prepared file's
    permutation (``train_rank``); all of them for None. A smaller subset lies inside every larger one."""
    labels, ranks = np.asarray(labels), np.asarray(ranks)
    if per_class is None:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    if per_class > counts.min():
        raise DataError(
            f"train size {per_class} images per class exceeds the {counts.min()} training images of class "
            f"{classes[counts.argmin()]} in the prepared data: choose train_sizes up to {counts.min()}, or null "
            "for the whole training split.")
    return np.flatnonzero(ranks < per_class)


def split_and_limit(dataset: Dataset, val_size: int, seed: int,
                    train_limit: int | None = None, test_limit: int | None = None) -> dict[str, np.ndarray]:
    """Carve the validation split from train, then optionally subsample train and test."""
    val_idx = stratified_indices(dataset.y_train, val_size, seed)
    train_mask = np.ones(len(dataset.y_train), dtype=bool)
    train_mask[val_idx] = False
    x_train, y_train = dataset.x_train[train_mask], dataset.y_train[train_mask]
    x_test, y_test = dataset.x_test, dataset.y_test
    if train_limit and train_limit < len(y_train):
        keep = stratified_indices(y_train, train_limit, seed + 1)
        x_train, y_train = x_train[keep], y_train[keep]
    if test_limit and test_limit < len(y_test):
        keep = stratified_indices(y_test, test_limit, seed + 2)
        x_test, y_test = x_test[keep], y_test[keep]
    return {
        "x_train": x_train, "y_train": y_train, "train_rank": class_ranks(y_train, seed + 3),
        "x_val": dataset.x_train[val_idx], "y_val": dataset.y_train[val_idx],
        "x_test": x_test, "y_test": y_test,
        "class_names": np.asarray(dataset.class_names),
    }


def load_source(data_config: dict) -> Dataset:
    source = data_config["source"]
    if source == "cifar10":
        settings = data_config["cifar10"]
        path = Path(settings["path"])
        if not path.exists():
            download(settings["url"], path, settings["md5"])
        verify_md5(path, settings["md5"])
        return load_cifar10_tarball(path)
    if source == "imagefolder":
        return load_imagefolder(data_config["imagefolder"]["path"])
    if source == "synthetic":
        return make_synthetic(**data_config["synthetic"])
    raise DataError(f"unknown data source {source!r}; use one of cifar10, imagefolder, synthetic.")


def prepare(data_config: dict, out: str | os.PathLike) -> dict:
    """Load the configured source, split it and write the prepared ``.npz`` atomically."""
    dataset = load_source(data_config)
    arrays = split_and_limit(
        dataset, data_config["val_size"], data_config["split_seed"],
        data_config.get("train_limit"), data_config.get("test_limit"),
    )
    arrays["source"] = np.asarray(data_config["source"])
    with atomic_path(out) as tmp:
        np.savez(tmp, **arrays)
    return {k: int(len(v)) for k, v in arrays.items() if k.startswith("y_")}


def load_prepared(path: str | os.PathLike, train_size: int | None = None) -> dict:
    """The prepared file's arrays, the training split cut to ``train_size`` images per class (None: all);
    validation and test are the same whatever the size."""
    with np.load(path, allow_pickle=False) as archive:
        data = {key: archive[key] for key in archive.files}
    ranks = data.pop("train_rank", None)
    if train_size is not None:
        if ranks is None:
            raise DataError(f"{path} was prepared by an older cnnbench (no train_rank), so it cannot be cut to "
                            f"{train_size} images per class: delete it and rerun the workflow to prepare it again.")
        keep = train_subset(data["y_train"], ranks, train_size)
        data["x_train"], data["y_train"] = data["x_train"][keep], data["y_train"][keep]
    data["class_names"] = tuple(str(c) for c in data["class_names"])
    data["source"] = str(data["source"])
    return data


def resolve_classes(class_names: tuple[str, ...], chosen: list) -> list[int]:
    """Indices of ``chosen`` (class names, or indices into ``class_names``), in ``class_names`` order."""
    indices = []
    for item in chosen:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit() and item not in class_names):
            index = int(item)
            if not 0 <= index < len(class_names):
                raise DataError(f"class index {index} is out of range: the data has {len(class_names)} classes "
                                f"({', '.join(class_names)})")
        elif item in class_names:
            index = class_names.index(item)
        else:
            raise DataError(f"pretrain.source_classes names {item!r}, which is not a class of the data; its "
                            f"classes are: {', '.join(class_names)}")
        indices.append(index)
    if len(set(indices)) == len(class_names):
        raise DataError("pretrain.source_classes lists every class of the data: leave some for the target task")
    if len(class_names) - len(set(indices)) < 2:
        raise DataError("pretrain.source_classes leaves fewer than 2 target classes: a classifier needs 2 or more")
    return sorted(set(indices))


def class_subset(arrays: dict, classes: list[int]) -> dict:
    """The prepared ``arrays`` restricted to ``classes`` in every split, relabelled 0..len(classes)-1."""
    relabel = np.full(len(arrays["class_names"]), -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    subset = {"class_names": arrays["class_names"][classes], "source": arrays["source"]}
    for split in ("train", "val", "test"):
        keep = np.isin(arrays[f"y_{split}"], classes)
        subset[f"x_{split}"] = arrays[f"x_{split}"][keep]
        subset[f"y_{split}"] = relabel[arrays[f"y_{split}"][keep]]
        if split == "train" and "train_rank" in arrays:
            subset["train_rank"] = arrays["train_rank"][keep]  # ranks are per class: still nested subsets
    return subset


def split_classes(prepared: str | os.PathLike, source_classes: list, source_out: str | os.PathLike,
                  target_out: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Split a prepared file by class: the pretraining's source classes and the target task's others.
    Returns the (source, target) class names."""
    with np.load(prepared, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    names = tuple(str(name) for name in arrays["class_names"])
    source = resolve_classes(names, source_classes)
    target = [index for index in range(len(names)) if index not in source]
    for classes, out in ((source, source_out), (target, target_out)):
        with atomic_path(out) as tmp:
            np.savez(tmp, **class_subset(arrays, classes))
    return [names[i] for i in source], [names[i] for i in target]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the dataset file the trainers read.")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="load the configured source, split it, write the .npz")
    prep.add_argument("--data-config", required=True, help="the config's `data` section as JSON")
    prep.add_argument("--out", required=True, help="prepared .npz to write")
    split = commands.add_parser("split-classes", help="split a prepared file into source and target classes")
    split.add_argument("--data", required=True, help="prepared .npz")
    split.add_argument("--source-classes", required=True, help="JSON list of class names or indices")
    split.add_argument("--source-out", required=True)
    split.add_argument("--target-out", required=True)
    fetch = commands.add_parser("download", help="download the CIFAR-10 python tarball and check its md5")
    fetch.add_argument("--url", required=True)
    fetch.add_argument("--md5", required=True)
    fetch.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download(args.url, args.out, args.md5)
            print(f"downloaded {args.url} to {args.out} (md5 verified)")
        elif args.command == "split-classes":
            source, target = split_classes(args.data, json.loads(args.source_classes), args.source_out,
                                           args.target_out)
            print(f"wrote {args.source_out} (source classes: {', '.join(source)}) and {args.target_out} "
                  f"(target classes: {', '.join(target)})")
        else:
            sizes = prepare(json.loads(args.data_config), args.out)
            print(f"wrote {args.out}: " + ", ".join(f"{k[2:]}={v}" for k, v in sizes.items()))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
