"""The symmetric grid (every model, init and framework) on the demo data, and the self-contained HTML report."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cnnbench.config import VALID_VARIANTS, parse_variant
from cnnbench.fileio import file_digest
from cnnbench.metrics import load_metrics
from cnnbench.weights import PORTED_SUFFIX
from conftest import NO_DEMO_MIN_STEPS, REPO, removed_unless_failed, run_dir, run_python
from test_gpu_slots import overlap
from test_trainers import MODEL_SUFFIX, is_backbone_layer, unchanged_layers
from test_workflow import job_counts, snakemake

SEEDS = (0,)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The demo's synthetic data and settings under the full grid's variants, cut to one epoch on 10 images
# per class and one seed, so that its 18 trainings (6 VGG16, 6 ResNet-50) fit in CI's time on 2 cores
# (with two seeds they took 1097 s of CI's 55 minutes and 15 GB of disk). Statistics over seeds are
# recomputed against scipy in tests/test_report.py (three hand-made seeds); the study demo of
# tests/test_workflow.py runs two seeds through the workflow. A two-GPU stand-in pool (`gpus: [0, 1]`): each training records the GPU slot it was given.
CI_CUT = ("seeds: [0]\ndata:\n  synthetic:\n    train_per_class: 10\n  val_size: 20\ntrain:\n  epochs: 1\ngpus: [0, 1]\n"
          + NO_DEMO_MIN_STEPS)
# Two one-thread trainings at a time (`--resources gpu=2` on 2 cores: each training gets 2 // 2
# threads), so that one's process start (imports, model build) overlaps the other's compute. With
# both cuts the grid took 414 s on 2 cores, against 659 s with 20 images per class and one
# two-thread training at a time.
TWO_AT_A_TIME = ("--resources", "gpu=2")


def grid(workdir, *args):
    return snakemake(workdir, "--configfile", str(REPO / "config" / "demo.yaml"), str(REPO / "config" / "full.yaml"),
                     str(workdir / "ci-cut.yaml"), *TWO_AT_A_TIME, *args)


@pytest.fixture(scope="module")
def grid_run(request, tmp_path_factory):
    with removed_unless_failed(request, tmp_path_factory.mktemp("grid")) as workdir:
        (workdir / "ci-cut.yaml").write_text(CI_CUT)
        yield workdir, grid(workdir)


def test_every_variant_and_seed_trained(grid_run):
    workdir, output = grid_run
    counts = job_counts(output)
    assert counts["train_torch"] == counts["train_keras"] == 9 * len(SEEDS)  # 3 models x 3 inits
    assert counts["port_torch_weights_to_keras"] == 3  # AlexNet, VGG16 and ResNet-50, once each
    for variant in VALID_VARIANTS:
        for seed in SEEDS:
            metrics = load_metrics(run_dir(workdir / "results", variant, seed) / "metrics.json")
            assert (metrics["variant"], metrics["seed"]) == (variant, seed)
            assert metrics["init"] == parse_variant(variant).init


def test_frozen_runs_keep_the_staged_backbone_bit_identical(grid_run):
    """Each *-frozen run loaded the file its pretrained twin loaded, and trained only its classifier:
    its conv layers equal that file's, bit for bit, and the file-loaded fc1/fc2 moved."""
    workdir, _ = grid_run
    weights = workdir / "resources" / "weights" / "standin"
    for framework in ("torch", "keras"):
        for model, stem in (("alexnet", "alexnet-owt-7be5be79"), ("vgg16", "vgg16-397923af")):
            staged = weights / (f"{stem}.pth" if framework == "torch" else f"{stem}{PORTED_SUFFIX}")
            run = run_dir(workdir / "results", f"{framework}-{model}-frozen")
            twin = run_dir(workdir / "results", f"{framework}-{model}-pretrained")
            origin = file_digest(weights / f"{stem}.pth")  # a Keras run's port records the torch file it came from
            assert load_metrics(run / "metrics.json")["weights"] == load_metrics(twin / "metrics.json")["weights"] == {
                "source": "standin", "sha256": file_digest(staged), "origin_sha256": origin,
                "path": str(staged.relative_to(workdir)), "classes": None}
            unchanged = unchanged_layers(framework, run / MODEL_SUFFIX[framework], staged)
            assert unchanged == {layer: is_backbone_layer(layer) for layer in unchanged}
            assert sum(unchanged.values()) == {"alexnet": 5, "vgg16": 13}[model] and len(unchanged) - sum(
                unchanged.values()) == 2, (framework, model)


def test_concurrent_trainings_had_different_gpus(grid_run):
    """The GPU slots on the stand-in pool: trainings that ran at the same time had different GPUs."""
    workdir, _ = grid_run
    runs = {(variant, seed): load_metrics(run_dir(workdir / "results", variant, seed) / "metrics.json")
            ["environment"] for variant in VALID_VARIANTS for seed in SEEDS}
    assert {env["cuda_visible_devices"] for env in runs.values()} == {"0", "1"}
    concurrent = [(a, b) for a, b in itertools.combinations(runs, 2) if overlap(runs[a], runs[b])]
    assert concurrent, "no two trainings ran at once: the slots were not put to the test"
    shared = [(a, b) for a, b in concurrent if runs[a]["cuda_visible_devices"] == runs[b]["cuda_visible_devices"]]
    assert not shared, [(a, b, runs[a], runs[b]) for a, b in shared]
    print(f"{len(concurrent)} pairs of trainings overlapped in time, each pair on two GPUs")


def logits_of(framework: str, model: str, weights: Path, images: Path) -> np.ndarray:
    """1000-class ImageNet logits of ``weights`` on ``images`` (uint8), in ``framework``'s own process."""
    out = images.parent / f"{framework}-{model}-logits.npy"
    if framework == "torch":
        code = f"""
import torch, torchvision
from cnnbench.torch_trainer import Preprocess
model = getattr(torchvision.models, {model!r})()
model.load_state_dict(torch.load({str(weights)!r}, weights_only=True))
with torch.no_grad():
    x = Preprocess(64, {MEAN}, {STD}, torch.device("cpu"))(torch.from_numpy(np.load({str(images)!r})))
    np.save({str(out)!r}, model.eval()(x).numpy())
"""
    else:
        code = f"""
from cnnbench.keras_models import build_model
model = build_model({model!r}, 1000, 64, {MEAN}, {STD}, weights={str(weights)!r})
np.save({str(out)!r}, model.predict(np.load({str(images)!r}), verbose=0))
"""
    run_python("import json, numpy as np\n" + code + "print(json.dumps(None))")
    return np.load(out)


def test_keras_runs_start_from_the_torch_runs_weights(grid_run, tmp_path):
    """Each keras-*-pretrained run loaded the port of the very file its torch twin loaded (by the
    sha256 both runs recorded), and that port gives the torch file's logits in Keras."""
    workdir, _ = grid_run
    weights = workdir / "resources" / "weights" / "standin"
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8))
    for model, stem in (("alexnet", "alexnet-owt-7be5be79"), ("vgg16", "vgg16-397923af"),
                        ("resnet50", "resnet50-11ad3fa6")):
        torch_file, keras_file = weights / f"{stem}.pth", weights / f"{stem}{PORTED_SUFFIX}"
        for seed in SEEDS:
            runs = {fw: load_metrics(run_dir(workdir / "results", f"{fw}-{model}-pretrained", seed) / "metrics.json")
                    for fw in ("torch", "keras")}
            origin = file_digest(torch_file)  # both runs name the torch file: Keras' port records it
            assert runs["torch"]["weights"] == {"source": "standin", "sha256": origin, "origin_sha256": origin,
                                                "path": str(torch_file.relative_to(workdir)), "classes": None}
            assert runs["keras"]["weights"] == {"source": "standin", "sha256": file_digest(keras_file),
                                                "origin_sha256": origin, "path": str(keras_file.relative_to(workdir)),
                                                "classes": None}
        torch_logits = logits_of("torch", model, torch_file, images)
        keras_logits = logits_of("keras", model, keras_file, images)
        assert np.abs(torch_logits - keras_logits).max() < 1e-4 * max(1.0, np.abs(torch_logits).max()), model
        assert torch_logits.std() > 0 and np.ptp(torch_logits, axis=0).max() > 0  # not a constant output


def test_statistics_and_paired_differences(grid_run):
    workdir, _ = grid_run
    stats = pd.read_csv(workdir / "results" / "variant_stats.csv")
    assert sorted(stats["variant"]) == sorted(VALID_VARIANTS)
    assert (stats["seeds"] == len(SEEDS)).all()
    # one seed: the mean is the run's value, and no std or interval exists (tests/test_report.py
    # recomputes them over several seeds)
    runs = pd.read_csv(workdir / "results" / "summary.csv").set_index("variant")
    stats = stats.set_index("variant")
    assert (stats["test_accuracy_mean"] == runs.loc[stats.index, "test_accuracy"]).all()
    assert stats[["test_accuracy_std", "test_accuracy_ci_low", "test_accuracy_ci_high"]].isna().all().all()
    differences = pd.read_csv(workdir / "results" / "paired_differences.csv")
    # pretrained - scratch and frozen - scratch per framework and model (12), torch - keras per model and init (9)
    assert len(differences) == 21 and (differences["paired_seeds"] == len(SEEDS)).all()
    assert {"frozen - scratch (keras vgg16)", "torch - keras (alexnet frozen)", "frozen - scratch (torch resnet50)"} <= set(differences["comparison"])
    for name in ("learning_curves.png", "per_class_accuracy.png", "confusion_matrices.png"):
        assert (workdir / "results" / name).stat().st_size > 10_000


def test_html_report_is_self_contained_with_captions(grid_run):
    workdir, _ = grid_run
    grid(workdir, "--report", "results/report.html")
    html = (workdir / "results" / "report.html").read_text()
    assert len(html) > 100_000
    for caption in ("over the seeds both variants ran", "confusion matrix of each variant",
                    "one line per variant", "Test accuracy per class"):
        assert caption in html, caption
    assert "synthetic" in html  # captions name the data
    assert not re.search(r'src="(?!data:)[^"]+\.png"', html)  # images are embedded, not linked
