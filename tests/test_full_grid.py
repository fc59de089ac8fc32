"""The symmetric grid with three seeds on the demo data, and the self-contained HTML report."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from cnnbench.config import VALID_VARIANTS
from cnnbench.metrics import load_metrics
from conftest import REPO, removed_unless_failed, run_python
from test_report import assert_statistics_recomputed
from test_workflow import job_counts, snakemake

SEEDS = (0, 1, 2)
# The demo's synthetic data and settings under the full grid's variants and seeds, cut to one epoch
# on 10 images per class so that 24 trainings (12 of them VGG16) fit in CI's time on 2 cores.
CI_CUT = "data:\n  synthetic:\n    train_per_class: 10\n  val_size: 20\ntrain:\n  epochs: 1\n"
# Two one-thread trainings at a time, so that one's process start (imports, model build) overlaps
# the other's compute. With both cuts the grid took 414 s on 2 cores, against 659 s with 20 images
# per class and one two-thread training at a time.
TWO_AT_A_TIME = ("--set-threads", "train_torch=1", "train_keras=1")


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
    assert counts["train_torch"] == counts["train_keras"] == 4 * len(SEEDS)
    assert counts["port_torch_weights_to_keras"] == 2  # AlexNet and VGG16, once each
    for variant in VALID_VARIANTS:
        for seed in SEEDS:
            metrics = load_metrics(workdir / "results" / "runs" / variant / f"seed{seed}" / "metrics.json")
            assert (metrics["variant"], metrics["seed"]) == (variant, seed)


def test_identical_starting_weights_across_frameworks(grid_run):
    workdir, _ = grid_run
    weights = workdir / "resources" / "weights" / "standin"
    for model, stem in (("alexnet", "alexnet-owt-7be5be79"), ("vgg16", "vgg16-397923af")):
        runs = {fw: load_metrics(workdir / "results" / "runs" / f"{fw}-{model}-pretrained" / "seed0" / "metrics.json")
                for fw in ("torch", "keras")}
        assert runs["torch"]["weights"]["source"] == runs["keras"]["weights"]["source"] == "standin"
        # The Keras variant loads the torch variant's file, ported: every layer but the head matches.
        same = run_python(f"""
import json, numpy as np, torch
from cnnbench.port import torch_to_keras
state = {{k: v.numpy() for k, v in torch.load({str(weights / (stem + ".pth"))!r}, weights_only=True).items()}}
ported = np.load({str(weights / (stem + ".keras.npz"))!r})
expected = torch_to_keras({model!r}, state)
print(json.dumps(all(np.array_equal(ported[k], v) for k, v in expected.items()) and len(ported.files) == len(expected)))
""")
        assert same is True


def test_statistics_and_paired_differences(grid_run):
    workdir, _ = grid_run
    stats = pd.read_csv(workdir / "results" / "variant_stats.csv")
    assert sorted(stats["variant"]) == sorted(VALID_VARIANTS)
    assert (stats["seeds"] == 3).all()
    assert_statistics_recomputed(workdir / "results")  # means, stds, t-intervals against scipy.stats
    differences = pd.read_csv(workdir / "results" / "paired_differences.csv")
    assert len(differences) == 8 and (differences["paired_seeds"] == 3).all()
    assert differences["test_accuracy_diff_ci_low"].notna().all()
    for name in ("learning_curves.png", "per_class_accuracy.png", "confusion_matrices.png"):
        assert (workdir / "results" / name).stat().st_size > 10_000


def test_html_report_is_self_contained_with_captions(grid_run):
    workdir, _ = grid_run
    grid(workdir, "--report", "results/report.html")
    html = (workdir / "results" / "report.html").read_text()
    assert len(html) > 100_000
    for caption in ("paired differences over the seeds", "confusion matrix of each variant",
                    "one line per variant", "Test accuracy per class"):
        assert caption in html, caption
    assert "synthetic" in html  # captions name the data
    assert not re.search(r'src="(?!data:)[^"]+\.png"', html)  # images are embedded, not linked
