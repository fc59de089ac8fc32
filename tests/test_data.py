"""Data preparation: the three sources, the split, and every bad-input case (no framework imported)."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnbench import data
from cnnbench.data import DataError

CLASSES = ["cat", "dog", "frog"]


# ------------------------------------------------------------------------------- fixtures

def make_cifar_tarball(path: Path, per_batch: int = 20, batches: int = 5) -> dict:
    """A tarball in the official CIFAR-10 python format (pickled dicts, bytes keys, CHW rows)."""
    rng = np.random.default_rng(0)
    truth = {}

    def add(archive, name, obj):
        raw = pickle.dumps(obj, protocol=2)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(raw)
        archive.addfile(info, io.BytesIO(raw))

    with tarfile.open(path, "w:gz") as archive:
        for name in [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]:
            images = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
            labels = list(np.arange(per_batch) % 10)
            truth[name] = (images, labels)
            rows = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
            add(archive, name, {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                                b"filenames": [b"x.png"] * per_batch})
        add(archive, "batches.meta", {b"label_names": [c.encode() for c in data.CIFAR10_CLASSES],
                                      b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return truth


def jpeg_bytes(color, size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_imagefolder(root: Path, per_class=(4, 2), size=(32, 32), prefix: str = "") -> Path:
    for split, count in zip(("train", "test"), per_class):
        for index, cls in enumerate(CLASSES):
            folder = root / prefix / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i:04d}.jpg").write_bytes(jpeg_bytes((80 * index, 10 * i, 200), size))
    return root


def tar_folder(root: Path, archive_path: Path) -> Path:
    mode = {".gz": "w:gz", ".xz": "w:xz"}.get(archive_path.suffix, "w")
    with tarfile.open(archive_path, mode) as archive:
        for child in sorted(root.iterdir()):
            archive.add(child, arcname=child.name)
    return archive_path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- cifar10

def test_cifar10_tarball_is_parsed_in_hwc_order(tmp_path):
    truth = make_cifar_tarball(tmp_path / "cifar.tar.gz")
    dataset = data.load_cifar10_tarball(tmp_path / "cifar.tar.gz")
    assert dataset.x_train.shape == (100, 32, 32, 3) and dataset.x_train.dtype == np.uint8
    assert dataset.x_test.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(dataset.x_train[:20], truth["data_batch_1"][0])
    np.testing.assert_array_equal(dataset.x_train[80:], truth["data_batch_5"][0])
    np.testing.assert_array_equal(dataset.x_test, truth["test_batch"][0])
    assert list(dataset.y_test) == truth["test_batch"][1]
    assert dataset.class_names == data.CIFAR10_CLASSES


def test_cifar10_missing_batch_is_reported(tmp_path):
    path = tmp_path / "cifar.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        raw = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        archive.addfile(info, io.BytesIO(raw))
    with pytest.raises(DataError, match="test_batch, batches.meta"):
        data.load_cifar10_tarball(path)


def test_truncated_tarball_is_a_clear_error(tmp_path):
    path = tmp_path / "cifar.tar.gz"
    make_cifar_tarball(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="not a readable CIFAR-10 python tarball"):
        data.load_cifar10_tarball(path)


def test_download_verifies_md5(tmp_path):
    source = tmp_path / "source.tar.gz"
    make_cifar_tarball(source)
    dest = tmp_path / "resources" / "cifar.tar.gz"
    data.download(source.as_uri(), dest, md5(source))
    assert dest.read_bytes() == source.read_bytes()


def test_download_checksum_mismatch_removes_partial_file(tmp_path):
    source = tmp_path / "source.tar.gz"
    make_cifar_tarball(source)
    dest = tmp_path / "resources" / "cifar.tar.gz"
    with pytest.raises(DataError, match="checksum mismatch.*partial download was removed"):
        data.download(source.as_uri(), dest, "0" * 32)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_download_without_network_says_how_to_use_a_local_copy(tmp_path):
    dest = tmp_path / "cifar.tar.gz"
    with pytest.raises(DataError, match=r"data\.cifar10\.path") as err:
        data.download("http://127.0.0.1:9/cifar-10-python.tar.gz", dest, "0" * 32, timeout=5)
    assert str(dest) in str(err.value)
    assert not dest.exists()


def test_prepare_cifar10_from_local_copy(tmp_path):
    tarball = tmp_path / "cifar.tar.gz"
    make_cifar_tarball(tarball)
    config = {"source": "cifar10", "val_size": 30, "split_seed": 0,
              "cifar10": {"url": "http://127.0.0.1:9/unused", "md5": md5(tarball), "path": str(tarball)}}
    sizes = data.prepare(config, tmp_path / "out.npz")
    assert sizes == {"y_train": 70, "y_val": 30, "y_test": 20}
    prepared = data.load_prepared(tmp_path / "out.npz")
    assert prepared["source"] == "cifar10" and prepared["class_names"] == data.CIFAR10_CLASSES


def test_prepare_rejects_corrupt_local_copy_and_writes_nothing(tmp_path):
    tarball = tmp_path / "cifar.tar.gz"
    make_cifar_tarball(tarball)
    config = {"source": "cifar10", "val_size": 30, "split_seed": 0,
              "cifar10": {"url": "http://127.0.0.1:9/unused", "md5": "f" * 32, "path": str(tarball)}}
    with pytest.raises(DataError, match="Delete it and run the workflow again"):
        data.prepare(config, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


# --------------------------------------------------------------------------- imagefolder

@pytest.mark.parametrize("kind", ["dir", ".tar", ".tar.gz", ".tar.xz", "prefixed.tar.xz"])
def test_imagefolder_sources(tmp_path, kind):
    prefix = "cifar10" if kind.startswith("prefixed") else ""
    root = make_imagefolder(tmp_path / "images", prefix=prefix)
    source = root if kind == "dir" else tar_folder(root, tmp_path / f"images{kind.replace('prefixed', '')}")
    dataset = data.load_imagefolder(source)
    assert dataset.class_names == tuple(CLASSES)
    assert dataset.x_train.shape == (12, 32, 32, 3) and dataset.x_test.shape == (6, 32, 32, 3)
    assert list(np.bincount(dataset.y_train)) == [4, 4, 4]
    # JPEG keeps flat colours close: class 1 is (80, 0..30, 200).
    assert abs(int(dataset.x_train[4, 0, 0, 0]) - 80) <= 3


def test_imagefolder_missing_split(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    for file in (root / "test").rglob("*.jpg"):
        file.unlink()
    for folder in sorted((root / "test").rglob("*"), reverse=True):
        folder.rmdir()
    (root / "test").rmdir()
    with pytest.raises(DataError, match="test split is missing"):
        data.load_imagefolder(tar_folder(root, tmp_path / "images.tar"))


def test_imagefolder_empty_class(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    for file in (root / "train" / "dog").iterdir():
        file.unlink()
    with pytest.raises(DataError, match="dog have no images in the train split"):
        data.load_imagefolder(root)


def test_imagefolder_class_missing_from_test_archive(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    for file in (root / "test" / "frog").iterdir():
        file.unlink()
    (root / "test" / "frog").rmdir()
    with pytest.raises(DataError, match="frog have no images in the test split"):
        data.load_imagefolder(tar_folder(root, tmp_path / "images.tar.gz"))


def test_imagefolder_unreadable_image_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    bad = root / "train" / "cat" / "0002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 garbage that is not a jpeg" * 3)
    with pytest.raises(DataError, match="0002.jpg") as err:
        data.load_imagefolder(tar_folder(root, tmp_path / "images.tar.xz"))
    assert "train/cat/0002.jpg" in str(err.value)


def test_imagefolder_mixed_sizes(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    (root / "test" / "cat" / "0001.jpg").write_bytes(jpeg_bytes((1, 2, 3), size=(40, 32)))
    with pytest.raises(DataError, match="mixed image sizes.*40x32"):
        data.load_imagefolder(root)


def test_imagefolder_missing_path(tmp_path):
    with pytest.raises(DataError, match="data.imagefolder.path"):
        data.load_imagefolder(tmp_path / "nowhere")


def test_truncated_imagefolder_archive(tmp_path):
    archive = tar_folder(make_imagefolder(tmp_path / "images"), tmp_path / "images.tar.xz")
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated or not a tar archive"):
        data.load_imagefolder(archive)


def test_failed_prepare_leaves_no_output(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    (root / "train" / "cat" / "0000.jpg").write_bytes(b"not an image")
    out = tmp_path / "results" / "dataset.npz"
    code = data.main(["prepare", "--out", str(out), "--data-config",
                      f'{{"source": "imagefolder", "imagefolder": {{"path": "{root}"}}, "val_size": 3, "split_seed": 0}}'])
    assert code == 1
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_is_learnable_by_a_nearest_centroid_classifier():
    dataset = data.make_synthetic(train_per_class=50, test_per_class=20, seed=3)
    assert dataset.x_train.shape == (500, 32, 32, 3) and dataset.x_train.dtype == np.uint8
    features = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    centroids = np.stack([features(dataset.x_train[dataset.y_train == c]).mean(0) for c in range(10)])
    distances = ((features(dataset.x_test)[:, None, :] - centroids[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == dataset.y_test).mean()
    assert accuracy > 0.5, accuracy  # chance is 0.1


def test_synthetic_is_seeded():
    a, b = data.make_synthetic(seed=1), data.make_synthetic(seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, data.make_synthetic(seed=2).x_train)


# ---------------------------------------------------------------------------------- split

def test_validation_split_is_stratified_seeded_and_disjoint():
    dataset = data.make_synthetic(train_per_class=30, test_per_class=5)
    arrays = data.split_and_limit(dataset, val_size=50, seed=7)
    assert list(np.bincount(arrays["y_val"])) == [5] * 10
    assert list(np.bincount(arrays["y_train"])) == [25] * 10
    again = data.split_and_limit(dataset, val_size=50, seed=7)
    np.testing.assert_array_equal(arrays["x_val"], again["x_val"])
    train_rows = {row.tobytes() for row in arrays["x_train"]}
    assert not any(row.tobytes() in train_rows for row in arrays["x_val"])
    assert len(arrays["y_test"]) == 50  # the test set is never touched by the split


def test_limits_keep_class_balance():
    dataset = data.make_synthetic(train_per_class=30, test_per_class=10)
    arrays = data.split_and_limit(dataset, val_size=50, seed=0, train_limit=100, test_limit=40)
    assert list(np.bincount(arrays["y_train"])) == [10] * 10
    assert list(np.bincount(arrays["y_test"])) == [4] * 10


def test_impossible_validation_size():
    dataset = data.make_synthetic(train_per_class=2, test_per_class=1)
    with pytest.raises(DataError, match="cannot take 500 of 20"):
        data.split_and_limit(dataset, val_size=500, seed=0)


# ------------------------------------------------------------------- training-set sizes

@pytest.fixture(scope="module")
def unbalanced_prepared(tmp_path_factory) -> Path:
    """A prepared file whose classes have 30, 20 and 12 training images after the validation split."""
    rng = np.random.default_rng(1)
    counts = [36, 24, 15]
    labels = np.repeat(np.arange(3), counts)
    images = rng.integers(0, 256, size=(len(labels), 8, 8, 3), dtype=np.uint8)
    test_labels = np.arange(9) % 3
    dataset = data.Dataset(images, labels, images[:9], test_labels, tuple(CLASSES))
    arrays = data.split_and_limit(dataset, val_size=13, seed=5)
    path = tmp_path_factory.mktemp("sizes") / "prepared.npz"
    np.savez(path, source=np.asarray("synthetic"), **arrays)
    return path


def test_train_sizes_are_stratified_nested_and_share_validation_and_test(unbalanced_prepared):
    full = data.load_prepared(unbalanced_prepared)
    assert list(np.bincount(full["y_train"])) == [30, 20, 12]
    previous = None
    for per_class in (1, 3, 7, 12):
        subset = data.load_prepared(unbalanced_prepared, per_class)
        assert list(np.bincount(subset["y_train"], minlength=3)) == [per_class] * 3  # stratified: k per class
        images = {row.tobytes() for row in subset["x_train"]}
        full_images = {row.tobytes() for row in full["x_train"]}
        assert images <= full_images and len(images) == 3 * per_class
        if previous is not None:
            assert previous <= images  # nested: each smaller subset inside every larger one
        previous = images
        for key in ("x_val", "y_val", "x_test", "y_test"):
            assert np.array_equal(subset[key], full[key]), key  # the same validation and test sets
    # The same seed gives the same subset; the subset is a random draw, not the first images per class.
    again = data.load_prepared(unbalanced_prepared, 3)
    assert np.array_equal(again["x_train"], data.load_prepared(unbalanced_prepared, 3)["x_train"])
    first_three = np.concatenate([np.flatnonzero(full["y_train"] == c)[:3] for c in range(3)])
    assert not np.array_equal(np.sort(first_three), data.train_subset(full["y_train"],
                                                                       np.load(unbalanced_prepared)["train_rank"], 3))


def test_train_size_beyond_a_class_says_what_to_choose(unbalanced_prepared):
    with pytest.raises(DataError, match=r"train size 13 images per class exceeds the 12 training images of class 2"
                                        r".*choose train_sizes up to 12, or null"):
        data.load_prepared(unbalanced_prepared, 13)


def test_train_ranks_follow_the_split_seed(tmp_path):
    dataset = data.make_synthetic(train_per_class=20, test_per_class=2, image_size=8, num_classes=3)
    ranks = {seed: data.split_and_limit(dataset, val_size=6, seed=seed)["train_rank"] for seed in (0, 0, 1)}
    same = data.split_and_limit(dataset, val_size=6, seed=0)["train_rank"]
    assert np.array_equal(ranks[0], same) and not np.array_equal(ranks[0], ranks[1])
    labels = data.split_and_limit(dataset, val_size=6, seed=0)["y_train"]
    for label in range(3):  # a permutation of 0..n-1 within each class
        assert sorted(same[labels == label]) == list(range(int((labels == label).sum())))
