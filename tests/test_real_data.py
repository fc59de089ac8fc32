"""Opt-in: on real images, fine-tuning a backbone pretrained on other classes beats training from
scratch, in both frameworks at every seed, and conclusions.md says so with its interval.

A reduced config/transfer-cifar10.yaml through the real workflow: AlexNet at 64x64 pretrained for one
epoch on five CIFAR-10 classes (the JPEG copy), then trained from scratch and fine-tuned on the other
five at 10 images per class, both frameworks, three seeds. Runs when CNNBENCH_REAL_DATA names the
archive (.ci/run sets it when ../shared/data has it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cnnbench.metrics import load_metrics
from conftest import REPO, run_dir, skip_or_fail
from test_report import assert_statistics_recomputed
from test_workflow import snakemake

TRANSFER_CONFIG = REPO / "config" / "transfer-cifar10.yaml"
SEEDS = [0, 1, 2]
INITS = ("scratch", "pretrained")  # the frozen backbone: in the committed study
SIZE = 10
LR = {"scratch": 0.01, "pretrained": 0.01}
REDUCED = {
    "variants": [f"{framework}-alexnet-{init}" for framework in ("torch", "keras") for init in INITS],
    "seeds": SEEDS,
    "train_sizes": [SIZE],
    "sweep": {init: {"lr": [lr]} for init, lr in LR.items()},
    "pretrain": {"train": {"epochs": 1}},
    # 100 validation and 500 test images of the target classes: validation runs after each of the 20
    # epochs that 40 steps on 50 images take, and it outweighed the training at the full config's 500
    "data": {"val_size": 200, "test_limit": 1000},
}
# Measured on 2 cores (2026-12-02; 617 s alone), test accuracy on the 500 target test images, seeds 0/1/2
# (chance 0.20):
#   scratch     torch 0.200 0.200 0.242   keras 0.216 0.200 0.200
#   fine-tuned  torch 0.476 0.464 0.498   keras 0.462 0.478 0.490
# (an earlier run with the frozen variants too: fine-tuned torch 0.478 0.460 0.474, frozen ~0.50 in both).
# The smallest gain is 0.246 (Keras, seed 0); every seed must clear MIN_GAIN, in both frameworks. (Before
# the new head got a seed of its own, training.head_seed, torch's seed-0 runs started from the seed-0
# pretraining's own head and fine-tuning stayed near chance.)
MIN_GAIN = 0.10


def test_pretraining_beats_scratch_on_real_images(tmp_path):
    archive = os.environ.get("CNNBENCH_REAL_DATA")
    if not archive:
        skip_or_fail("set CNNBENCH_REAL_DATA to cifar10-jpeg.tar.xz to run the real-data test")
    if not Path(archive).exists():
        pytest.fail(f"CNNBENCH_REAL_DATA={archive} does not exist")
    overlay = {**REDUCED, "data": {**REDUCED["data"], "imagefolder": {"path": archive}}}
    (tmp_path / "reduced.yaml").write_text(yaml.safe_dump(overlay))
    # two one-thread trainings at a time: the pretraining (first: it has priority) beside scratch runs
    snakemake(tmp_path, "--configfile", str(TRANSFER_CONFIG), str(tmp_path / "reduced.yaml"),
              "--resources", "gpu=2", configfile=TRANSFER_CONFIG)
    results = tmp_path / "results"

    pretraining = load_metrics(results / "pretrain" / "alexnet" / "metrics.json")
    assert list(pretraining["test"]["per_class_accuracy"]) == ["airplane", "automobile", "bird", "cat", "deer"]
    accuracy = {}
    for framework in ("torch", "keras"):
        for init in INITS:
            for seed in SEEDS:
                metrics = load_metrics(run_dir(results, f"{framework}-alexnet-{init}", seed, SIZE, LR[init])
                                       / "metrics.json")
                assert list(metrics["test"]["per_class_accuracy"]) == ["dog", "frog", "horse", "ship", "truck"]
                assert metrics["data"]["train_size"] == 5 * SIZE and metrics["data"]["test_size"] == 500
                accuracy[framework, init, seed] = metrics["test"]["accuracy"]
    print({key: round(value, 3) for key, value in accuracy.items()})
    for framework in ("torch", "keras"):
        gains = [accuracy[framework, "pretrained", seed] - accuracy[framework, "scratch", seed] for seed in SEEDS]
        assert min(gains) >= MIN_GAIN, (framework, gains)

    assert_statistics_recomputed(results)  # means, stds and t-intervals over the 3 seeds, against scipy.stats
    differences = pd.read_csv(results / "paired_differences.csv")
    conclusions = (results / "conclusions.md").read_text()
    for framework in ("torch", "keras"):
        row = differences[differences["comparison"] == f"pretrained - scratch ({framework} alexnet)"].iloc[0]
        assert row["paired_seeds"] == len(SEEDS) and row["test_accuracy_diff_ci_low"] > 0, row.to_dict()
        claim = (f"At {SIZE} images per class, fine-tuning minus scratch is {row['test_accuracy_diff_mean']:.4f} "
                 f"[{row['test_accuracy_diff_ci_low']:.4f}, {row['test_accuracy_diff_ci_high']:.4f}] test "
                 f"accuracy over 3 seeds: fine-tuning beats scratch.")
        section = conclusions.split(f"**{framework} alexnet**", 1)[1].split("**", 1)[0]
        assert claim in section, (claim, conclusions)
