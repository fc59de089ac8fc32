"""Aggregation of hand-made metrics files: tables, statistics over seeds, paired differences, plots."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from cnnbench import report
from factories import make_metrics, write_metrics


@pytest.fixture
def metrics_files(tmp_path):
    return [
        write_metrics(tmp_path, make_metrics("torch-alexnet-scratch", val_accuracies=(0.2, 0.4, 0.35),
                                             test_accuracy=0.38, train_seconds_per_epoch=5.0)),
        write_metrics(tmp_path, make_metrics("keras-vgg16-pretrained", test_accuracy=0.61)),
        write_metrics(tmp_path, make_metrics("torch-vgg16-scratch", test_accuracy=0.2)),  # not in the reference
    ]


@pytest.fixture
def seeded_files(tmp_path):
    """Three seeds of a pretrained/scratch pair and a torch/keras pair, with known numbers."""
    files = []
    for seed, (scratch, pretrained, keras_scratch) in enumerate([(0.40, 0.60, 0.30), (0.50, 0.65, 0.45),
                                                                 (0.60, 0.85, 0.45)]):
        files.append(write_metrics(tmp_path, make_metrics("torch-alexnet-scratch", seed, test_accuracy=scratch,
                                                          train_seconds_per_epoch=10 + seed)))
        files.append(write_metrics(tmp_path, make_metrics("torch-alexnet-pretrained", seed,
                                                          test_accuracy=pretrained)))
        files.append(write_metrics(tmp_path, make_metrics("keras-alexnet-scratch", seed,
                                                          test_accuracy=keras_scratch)))
    return files


def expected_statistics(values) -> dict:
    """Mean, sample standard deviation and 95% t-interval, computed here with scipy.stats' own
    functions rather than the report's."""
    values = np.asarray(values, dtype=float)
    if np.ptp(values) == 0:  # all seeds equal (the factories' fixed times): scipy's t takes no zero scale
        return {"mean": values[0], "std": 0.0, "ci_low": values[0], "ci_high": values[0]}
    mean = scipy_stats.tmean(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=mean, scale=scipy_stats.sem(values))
    return {"mean": mean, "std": scipy_stats.tstd(values), "ci_low": low, "ci_high": high}


def assert_statistics_recomputed(out_dir) -> None:
    """variant_stats.csv and paired_differences.csv agree to 1e-9 with statistics recomputed from
    summary.csv's per-run rows (variants with two seeds or more)."""
    runs = pd.read_csv(out_dir / "summary.csv")
    stats = pd.read_csv(out_dir / "variant_stats.csv").set_index("variant")
    assert sorted(stats.index) == sorted(runs["variant"].unique())
    for variant, group in runs.groupby("variant"):
        assert stats.loc[variant, "seeds"] == len(group)
        for column in ("test_accuracy", "train_seconds"):
            for key, value in expected_statistics(group[column]).items():
                assert stats.loc[variant, f"{column}_{key}"] == pytest.approx(value, rel=0, abs=1e-9), (variant, key)
    differences = pd.read_csv(out_dir / "paired_differences.csv")
    for row in differences.itertuples():
        a = runs[runs.variant == row.a].set_index("seed")
        b = runs[runs.variant == row.b].set_index("seed")
        seeds = a.index.intersection(b.index)
        assert row.paired_seeds == len(seeds)
        for column in ("test_accuracy", "train_seconds"):
            expected = expected_statistics(a.loc[seeds, column] - b.loc[seeds, column])
            for key, value in expected.items():
                actual = getattr(row, f"{column}_diff_{key}")
                assert actual == pytest.approx(value, rel=0, abs=1e-9), (row.comparison, column, key)


def run_report(tmp_path, files):
    out_dir = tmp_path / "out"
    code = report.main([*map(str, files), "--out-dir", str(out_dir)])
    return code, out_dir


def test_per_run_table(tmp_path, metrics_files):
    code, out = run_report(tmp_path, metrics_files)
    assert code == 0
    table = pd.read_csv(out / "summary.csv")
    assert list(table["variant"]) == ["keras-vgg16-pretrained", "torch-alexnet-scratch", "torch-vgg16-scratch"]
    row = table.set_index("variant").loc["torch-alexnet-scratch"]
    assert row["epochs"] == 3
    assert row["best_val_accuracy"] == pytest.approx(0.4)
    assert row["test_accuracy"] == pytest.approx(0.38)
    assert row["train_seconds"] == pytest.approx(15.0)
    assert row["images_per_second"] == pytest.approx(3 * 1000 / 15.0)
    assert row["reference_test_accuracy"] == pytest.approx(0.8278)
    assert row["reference_train_seconds"] == pytest.approx(438.89)
    assert pd.isna(table.set_index("variant").loc["torch-vgg16-scratch", "reference_test_accuracy"])
    # One seed: no interval, and no pair of variants answers a question here.
    stats = pd.read_csv(out / "variant_stats.csv").set_index("variant")
    assert stats.loc["torch-alexnet-scratch", "seeds"] == 1
    assert pd.isna(stats.loc["torch-alexnet-scratch", "test_accuracy_ci_low"])
    assert len(pd.read_csv(out / "paired_differences.csv")) == 0


def test_statistics_over_seeds(tmp_path, seeded_files):
    code, out = run_report(tmp_path, seeded_files)
    assert code == 0
    stats = pd.read_csv(out / "variant_stats.csv").set_index("variant")
    scratch = stats.loc["torch-alexnet-scratch"]
    assert scratch["seeds"] == 3
    assert scratch["test_accuracy_mean"] == pytest.approx(0.5)
    assert scratch["test_accuracy_std"] == pytest.approx(0.1)
    half_width = 4.302652729749464 * 0.1 / 3 ** 0.5  # t(0.975, df=2)
    assert scratch["test_accuracy_ci_low"] == pytest.approx(0.5 - half_width)
    assert scratch["test_accuracy_ci_high"] == pytest.approx(0.5 + half_width)
    assert scratch["train_seconds_mean"] == pytest.approx(2 * 11)

    differences = pd.read_csv(out / "paired_differences.csv").set_index("comparison")
    assert set(differences.index) == {"pretrained - scratch (torch alexnet)", "torch - keras (alexnet scratch)"}
    gain = differences.loc["pretrained - scratch (torch alexnet)"]
    assert (gain["a"], gain["b"], gain["paired_seeds"]) == ("torch-alexnet-pretrained", "torch-alexnet-scratch", 3)
    assert gain["test_accuracy_diff_mean"] == pytest.approx((0.2 + 0.15 + 0.25) / 3)
    assert gain["test_accuracy_diff_std"] == pytest.approx(0.05)
    framework = differences.loc["torch - keras (alexnet scratch)"]
    assert framework["test_accuracy_diff_mean"] == pytest.approx((0.1 + 0.05 + 0.15) / 3)
    assert_statistics_recomputed(out)

    markdown = (out / "summary.md").read_text()
    assert "## Per variant" in markdown and "## Paired differences" in markdown and "## Per run" in markdown
    assert f"0.5000 [{0.5 - half_width:.4f}, {0.5 + half_width:.4f}]" in markdown


def test_frozen_runs_are_summarized_and_compared_beside_pretrained(tmp_path):
    """frozen - scratch sits beside pretrained - scratch (same framework and model), and torch - keras
    compares the frozen pair too; a frozen run's weights count as pretrained weights in the facts."""
    files = []
    for seed, (scratch, pretrained, frozen, keras_frozen) in enumerate([(0.40, 0.60, 0.55, 0.50),
                                                                        (0.50, 0.65, 0.50, 0.40)]):
        for variant, accuracy in (("torch-vgg16-scratch", scratch), ("torch-vgg16-pretrained", pretrained),
                                  ("torch-vgg16-frozen", frozen), ("keras-vgg16-frozen", keras_frozen)):
            files.append(write_metrics(tmp_path, make_metrics(variant, seed, test_accuracy=accuracy)))
    code, out = run_report(tmp_path, files)
    assert code == 0
    assert (pd.read_csv(out / "variant_stats.csv").set_index("variant").loc["torch-vgg16-frozen", "seeds"]) == 2
    differences = pd.read_csv(out / "paired_differences.csv")
    assert list(differences["comparison"]) == ["pretrained - scratch (torch vgg16)", "frozen - scratch (torch vgg16)",
                                               "torch - keras (vgg16 frozen)"]
    frozen_gain = differences.set_index("comparison").loc["frozen - scratch (torch vgg16)"]
    assert (frozen_gain["a"], frozen_gain["b"]) == ("torch-vgg16-frozen", "torch-vgg16-scratch")
    assert frozen_gain["test_accuracy_diff_mean"] == pytest.approx((0.15 + 0.0) / 2)
    assert_statistics_recomputed(out)
    markdown = (out / "summary.md").read_text()
    assert "| frozen - scratch (torch vgg16)" in markdown and "| keras-vgg16-frozen" in markdown
    frozen_only = [f for f in files if "frozen" in str(f)]
    facts = report.summary_facts([json.loads(f.read_text()) for f in frozen_only])
    assert facts["weights"] == ["standin (sha256 bbbbbbbb)"]


def test_markdown_and_plots(tmp_path, metrics_files):
    _, out = run_report(tmp_path, metrics_files)
    markdown = (out / "summary.md").read_text()
    assert "| keras-vgg16-pretrained" in markdown and "0.8796" in markdown and "377.2" in markdown
    for header in ("variant", "epochs", "best val acc", "test acc", "train s", "images/s", "device",
                   "reference test acc", "reference train s"):
        assert header in markdown
    for name in ("learning_curves.png", "per_class_accuracy.png", "confusion_matrices.png", "data_efficiency.png",
                 "pretraining_gain.png"):
        png = (out / name).read_bytes()
        # No pretrained/scratch pair here: pretraining_gain.png holds only a line saying so.
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > (10_000 if name != "pretraining_gain.png" else 3_000), name


def test_learning_curves_have_one_labelled_line_per_variant_and_bands(tmp_path, seeded_files, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    original = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        figures.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    run_report(tmp_path, seeded_files)
    train_ax, val_ax, train_loss_ax, val_loss_ax = figures[0].axes
    assert [line.get_label() for line in val_ax.get_lines()] == [
        "keras-alexnet-scratch (3 seeds)", "torch-alexnet-pretrained (3 seeds)", "torch-alexnet-scratch (3 seeds)"]
    assert len(val_ax.collections) == 3  # one spread band per variant
    assert [ax.get_title() for ax in (train_loss_ax, val_loss_ax)] == ["train loss", "validation loss"]
    assert len(val_loss_ax.get_lines()) == 3 and len(val_loss_ax.collections) == 3
    assert len(figures[2].axes) == 3  # a confusion matrix per variant


def test_bad_metrics_file_writes_nothing(tmp_path, metrics_files, capsys):
    broken = json.loads(metrics_files[0].read_text())
    del broken["test"]
    metrics_files[0].write_text(json.dumps(broken))
    code, out = run_report(tmp_path, metrics_files)
    assert code == 1
    assert "'test' is a required property" in capsys.readouterr().err
    assert not out.exists()


def test_comparison_across_devices_is_flagged_in_the_table(tmp_path):
    files = []
    for seed in (0, 1):
        on_gpu = make_metrics("torch-alexnet-scratch", seed, test_accuracy=0.5)
        on_gpu["environment"].update(device="cuda", device_name="NVIDIA H200")
        files.append(write_metrics(tmp_path, on_gpu))
        files.append(write_metrics(tmp_path, make_metrics("keras-alexnet-scratch", seed, test_accuracy=0.4)))
        files.append(write_metrics(tmp_path, make_metrics("keras-alexnet-pretrained", seed, test_accuracy=0.6)))
    code, out = run_report(tmp_path, files)
    assert code == 0
    differences = pd.read_csv(out / "paired_differences.csv").set_index("comparison")
    mixed = differences.loc["torch - keras (alexnet scratch)"]
    assert bool(mixed["mixed_devices"]) and (mixed["devices_a"], mixed["devices_b"]) == ("NVIDIA H200", "cpu")
    same = differences.loc["pretrained - scratch (keras alexnet)"]
    assert not same["mixed_devices"] and same["devices_a"] == same["devices_b"] == "cpu"
    rows = {line.split("|")[1].strip(): line for line in (out / "summary.md").read_text().splitlines()
            if line.startswith("| torch - keras") or line.startswith("| pretrained - scratch")}
    assert "MIXED, not comparable: a on NVIDIA H200, b on cpu" in rows["torch - keras (alexnet scratch)"]
    assert "MIXED" not in rows["pretrained - scratch (keras alexnet)"]


def test_summary_says_what_it_holds_and_which_expected_runs_are_missing(tmp_path, metrics_files):
    expected = ["torch-alexnet-scratch/nall-lr0.01/seed0", "keras-vgg16-pretrained/nall-lr0.01/seed0",
                "torch-vgg16-scratch/nall-lr0.01/seed0", "keras-vgg16-pretrained/nall-lr0.01/seed1"]
    code = report.main([*map(str, metrics_files), "--out-dir", str(tmp_path / "out"), "--expected", *expected])
    assert code == 0
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert ("Summarized runs (3): keras-vgg16-pretrained/nall-lr0.01/seed0, torch-alexnet-scratch/nall-lr0.01/seed0, "
            "torch-vgg16-scratch/nall-lr0.01/seed0. "
            "Data: synthetic (1000 train, 100 validation, 100 test images), input resized to 64x64") in markdown
    assert "pretrained weights: standin (sha256 bbbbbbbb)" in markdown
    assert ("Missing: 1 of the 4 expected runs have no results here: keras-vgg16-pretrained/nall-lr0.01/seed1."
            in markdown)
    facts = json.loads((tmp_path / "out" / "summary_facts.json").read_text())
    assert facts["missing"] == ["keras-vgg16-pretrained/nall-lr0.01/seed1"] and facts["image_size"] == [64]


def test_readme_report_command_over_demo_results_captions_what_it_shows(tmp_path):
    """The README's report command, without --cores, over demo-like results: captions come from the
    metrics (synthetic data, stand-in weights, 64x64), and the config's runs without results are named."""
    import subprocess
    import sys

    from conftest import REPO
    from factories import make_metrics, write_metrics

    for variant in ("torch-alexnet-scratch", "keras-alexnet-scratch", "torch-alexnet-pretrained",
                    "keras-vgg16-pretrained"):  # at the demo's learning rates, so that they are the demo's runs
        write_metrics(tmp_path / "results", make_metrics(variant, lr=0.001 if variant.endswith("pretrained") else 0.02))

    def snakemake(*args):
        result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                                 "--directory", str(tmp_path), *args],
                                capture_output=True, text=True, cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The workflow's own summarize job over these metrics (no training: only summarize may run).
    snakemake("--configfile", str(REPO / "config" / "demo.yaml"), "--cores", "1", "--allowed-rules", "summarize")
    snakemake("--configfile", str(REPO / "config" / "full.yaml"), "--report", "results/report.html")

    html = (tmp_path / "results" / "report.html").read_text()
    assert "Data: synthetic (1000 train, 100 validation, 100 test images), input resized to 64x64" in html
    assert "pretrained weights: standin (sha256 bbbbbbbb)" in html
    assert "initialisation (scratch_init): torchvision (torchvision" in html  # metrics from before the key
    assert "cifar10" not in html.split("Summarized runs", 1)[1].split("Missing", 1)[0]
    assert ("<strong>Missing: 52 of the 54 expected runs have no results here: "
            "keras-alexnet-frozen/nall-lr0.01/seed0") in html
    assert "torch-vgg16-scratch/nall-lr0.01/seed2" in html
    assert "Learning rates per variant and training-set size" in html  # lr_selection.csv's entry
    # conclusions.md's entry holds its sentences (torch AlexNet's single-seed pair: no interval).
    assert ("<li>On the whole training split, fine-tuning minus scratch is 0.0000 [\\u2013] test accuracy from a "
            "single seed: no interval, so no claim.</li>") in html  # rendered, in the report's JSON-escaped data
    assert "Data efficiency: test accuracy against training images per class" in html
    assert "What ImageNet weights buy, per framework and model" in html


def markdown_table(markdown: str, section: str) -> list[dict]:
    """The rows of the table under ``## {section}`` in summary.md, as dicts of cell text."""
    blocks = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].strip().split("\n\n")
    lines = next(block for block in blocks if block.startswith("|")).splitlines()  # after any prose
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_energy_is_shown_beside_the_time_and_a_dash_where_not_measured(tmp_path):
    files = []
    for seed, joules in enumerate((100.0, 110.0, 120.0)):  # per epoch, 2 epochs each: 200, 220, 240 J
        files.append(write_metrics(tmp_path, make_metrics("torch-alexnet-scratch", seed,
                                                          energy_joules_per_epoch=joules)))
        files.append(write_metrics(tmp_path, make_metrics("keras-alexnet-scratch", seed)))  # no NVML
    files.append(write_metrics(tmp_path, make_metrics("torch-alexnet-pretrained", 0, energy_joules_per_epoch=50.0)))
    files.append(write_metrics(tmp_path, make_metrics("torch-alexnet-pretrained", 1)))  # one seed without
    code, out = run_report(tmp_path, files)
    assert code == 0

    runs = pd.read_csv(out / "summary.csv")
    assert list(runs.columns[runs.columns.get_loc("train_seconds") + 1:][:1]) == ["energy_joules"]
    measured = runs[runs.variant == "torch-alexnet-scratch"]
    assert list(measured["energy_joules"]) == [200.0, 220.0, 240.0]
    assert runs[runs.variant == "keras-alexnet-scratch"]["energy_joules"].isna().all()  # an empty cell
    stats = pd.read_csv(out / "variant_stats.csv").set_index("variant")
    assert stats.loc["torch-alexnet-scratch", "energy_joules_mean"] == pytest.approx(220.0)
    assert pd.isna(stats.loc["keras-alexnet-scratch", "energy_joules_mean"])
    assert pd.isna(stats.loc["torch-alexnet-pretrained", "energy_joules_mean"])  # only if every seed has one

    markdown = (out / "summary.md").read_text()
    per_variant = {row["variant"]: row for row in markdown_table(markdown, "Per variant")}
    headers = list(per_variant["torch-alexnet-scratch"])
    assert headers[headers.index("train s, mean [95% CI]") + 1] == "energy J, mean"
    assert per_variant["torch-alexnet-scratch"]["energy J, mean"] == "220"
    assert per_variant["keras-alexnet-scratch"]["energy J, mean"] == "–"
    assert per_variant["torch-alexnet-pretrained"]["energy J, mean"] == "–"
    per_run = markdown_table(markdown, "Per run")
    headers = list(per_run[0])
    assert headers[headers.index("train s") + 1] == "energy J"
    assert [(r["variant"], r["seed"], r["energy J"]) for r in per_run if r["variant"] != "keras-alexnet-scratch"] == [
        ("torch-alexnet-pretrained", "0", "100"), ("torch-alexnet-pretrained", "1", "–"),
        ("torch-alexnet-scratch", "0", "200"), ("torch-alexnet-scratch", "1", "220"),
        ("torch-alexnet-scratch", "2", "240")]
    assert {r["energy J"] for r in per_run if r["variant"] == "keras-alexnet-scratch"} == {"–"}


def test_learning_curves_show_loss_beside_accuracy_on_whole_epochs():
    """Per epoch, the accuracy curves above the loss curves the history records, on integer ticks."""
    runs = [make_metrics("torch-alexnet-scratch", seed, val_accuracies=(0.2, 0.4, 0.35)) for seed in (0, 1)]
    figure = report.learning_curves_figure(runs)
    figure.canvas.draw()
    axes = dict(zip([ax.get_title() for ax in figure.axes], figure.axes))
    assert set(axes) == {"train accuracy", "validation accuracy", "train loss", "validation loss"}
    assert axes["train loss"].get_ylabel() == "cross-entropy loss" and axes["train accuracy"].get_ylabel() == "accuracy"
    for key, title in report.LEARNING_CURVES:
        line, = axes[title].get_lines()
        np.testing.assert_allclose(line.get_xdata(), [1, 2, 3])
        np.testing.assert_allclose(line.get_ydata(), [epoch[key] for epoch in runs[0]["history"]])
        ticks = [tick for tick in axes[title].get_xticks() if 1 <= tick <= 3]
        assert ticks == [1, 2, 3], (title, axes[title].get_xticks())
        assert all(float(tick).is_integer() for tick in axes[title].get_xticks()), title
    import matplotlib.pyplot as plt

    plt.close(figure)


def markdown_tables(markdown: str) -> dict[str, list[dict]]:
    """summary.md's tables by section title: one dict (header -> cell) per row."""
    tables = {}
    for section in markdown.split("\n## ")[1:]:
        title, *lines = section.splitlines()
        rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines
                if line.startswith("|") and not line.startswith("|:")]
        tables[title] = [dict(zip(rows[0], row)) for row in rows[1:]] if rows else []
    return tables


ACCURACY = r"-?[01]\.\d{4}"  # the one format of an accuracy (or accuracy difference): a 4-decimal fraction


def test_single_seed_shows_a_dash_and_accuracies_one_format(tmp_path, metrics_files):
    """One seed: "–" for the std and intervals (never "nan"); every accuracy a 4-decimal fraction."""
    _, out = run_report(tmp_path, metrics_files)
    markdown = (out / "summary.md").read_text()
    assert "nan" not in markdown.lower()
    tables = markdown_tables(markdown)
    per_variant = {row["variant"]: row for row in tables["Per variant"]}
    assert per_variant["torch-alexnet-scratch"] == {
        "variant": "torch-alexnet-scratch", "train size": "all", "lr": "0.01", "seeds": "1",
        "test acc, mean [95% CI]": "0.3800 [–]", "test acc std": "–", "train s, mean [95% CI]": "15.0 [–]",
        "energy J, mean": "–", "reference test acc": "0.8278", "reference train s": "438.9"}
    assert per_variant["torch-vgg16-scratch"]["reference test acc"] == "–"  # not a variant of the reference
    per_run = {row["variant"]: row for row in tables["Per run"]}
    assert (per_run["torch-alexnet-scratch"]["best val acc"], per_run["torch-alexnet-scratch"]["test acc"]) == (
        "0.4000", "0.3800")
    accuracy_cell = re.compile(rf"^(–|{ACCURACY})( \[(–|{ACCURACY}, {ACCURACY})\])?$")
    for title, rows in tables.items():
        for row in rows:
            for header, cell in row.items():
                if "acc" in header:
                    assert accuracy_cell.match(cell), (title, header, cell)


def test_several_seeds_give_intervals_in_the_same_format(tmp_path, seeded_files):
    _, out = run_report(tmp_path, seeded_files)
    tables = markdown_tables((out / "summary.md").read_text())
    scratch = next(row for row in tables["Per variant"] if row["variant"] == "torch-alexnet-scratch")
    half_width = 4.302652729749464 * 0.1 / 3 ** 0.5  # t(0.975, df=2)
    assert scratch["test acc, mean [95% CI]"] == f"0.5000 [{0.5 - half_width:.4f}, {0.5 + half_width:.4f}]"
    assert scratch["test acc std"] == "0.1000"
    gain = next(row for row in tables["Paired differences (same seeds)"]
                if row["comparison"] == "pretrained - scratch (torch alexnet)")
    assert re.fullmatch(rf"0\.2000 \[{ACCURACY}, {ACCURACY}\]", gain["test acc difference [95% CI]"])


# Test accuracies per (variant, size) for seeds 0, 1, 2: at 10 per class fine-tuning gains clearly,
# frozen's gain straddles 0; at 100 frozen trails scratch clearly; on all data both straddle 0.
GAIN_ACCURACIES = {
    ("torch-alexnet-scratch", 10): (0.20, 0.25, 0.30), ("torch-alexnet-pretrained", 10): (0.40, 0.44, 0.51),
    ("torch-alexnet-frozen", 10): (0.30, 0.20, 0.28),
    ("torch-alexnet-scratch", 100): (0.50, 0.55, 0.60), ("torch-alexnet-pretrained", 100): (0.55, 0.61, 0.68),
    ("torch-alexnet-frozen", 100): (0.40, 0.46, 0.49),
    ("torch-alexnet-scratch", None): (0.80, 0.82, 0.84), ("torch-alexnet-pretrained", None): (0.79, 0.86, 0.83),
    ("torch-alexnet-frozen", None): (0.70, 0.90, 0.75),
}


@pytest.fixture
def gain_report(tmp_path):
    """Three sizes x three seeds of a torch scratch/pretrained/frozen triple, and one seed of a Keras
    scratch/pretrained pair (a comparison without an interval)."""
    files = []
    for (variant, size), accuracies in GAIN_ACCURACIES.items():
        for seed, accuracy in enumerate(accuracies):
            files.append(write_metrics(tmp_path, make_metrics(variant, seed, test_accuracy=accuracy, per_class=size,
                                                              train_size=(size or 4500) * 10)))
    for variant, accuracy in (("keras-vgg16-scratch", 0.3), ("keras-vgg16-pretrained", 0.5)):
        files.append(write_metrics(tmp_path, make_metrics(variant, 0, test_accuracy=accuracy, per_class=10,
                                                          train_size=100)))
    code, out = run_report(tmp_path, files)
    assert code == 0
    return out


def recomputed_gains(out) -> dict:
    """(framework model, init, size) -> (mean, low, high, seeds) of test-accuracy gains over scratch,
    recomputed from summary.csv's runs with scipy (NaN bounds for one seed)."""
    runs = pd.read_csv(out / "summary.csv", dtype={"train_size": str})
    gains = {}
    for (variant, size), group in runs.groupby(["variant", "train_size"]):
        framework, model, init = variant.split("-")
        if init == "scratch":
            continue
        scratch = runs[(runs.variant == f"{framework}-{model}-scratch") & (runs.train_size == size)]
        paired = group.merge(scratch, on="seed", suffixes=("", "_scratch"))
        differences = paired["test_accuracy"] - paired["test_accuracy_scratch"]
        if len(differences) > 1:
            statistics = expected_statistics(differences)
            gains[f"{framework} {model}", init, size] = (statistics["mean"], statistics["ci_low"],
                                                         statistics["ci_high"], len(differences))
        else:
            gains[f"{framework} {model}", init, size] = (differences.iloc[0], np.nan, np.nan, 1)
    return gains


CLAIM = re.compile(rf"^- (?:At (\d+) images per class|On the whole training split), (fine-tuning|the frozen backbone) "
                   rf"minus scratch is ({ACCURACY}) \[(?:(–)|({ACCURACY}), ({ACCURACY}))\]")


def test_conclusions_quote_the_paired_differences_and_say_where_an_interval_includes_0(gain_report):
    text = (gain_report / "conclusions.md").read_text()
    gains = recomputed_gains(gain_report)
    differences = pd.read_csv(gain_report / "paired_differences.csv", dtype={"train_size": str})
    for row in differences.itertuples():  # the table agrees with the recomputation...
        framework, model = row.a.split("-")[:2]
        mean, low, high, seeds = gains[f"{framework} {model}", row.a.split("-")[2], row.train_size]
        assert row.test_accuracy_diff_mean == pytest.approx(mean, abs=1e-9) and row.paired_seeds == seeds
        assert (row.test_accuracy_diff_ci_low == pytest.approx(low, abs=1e-9, nan_ok=True)
                and row.test_accuracy_diff_ci_high == pytest.approx(high, abs=1e-9, nan_ok=True))
    claimed, heading = {}, None
    for line in text.splitlines():  # ...and so do the sentences, every one of them
        if line.startswith("**"):
            heading = line.strip("*")
        match = CLAIM.match(line)
        if not match:
            continue
        size, who, mean, dash, low, high = match.groups()
        key = (heading, "pretrained" if who == "fine-tuning" else "frozen", size or "all")
        claimed[key] = line
        expected_mean, expected_low, expected_high, seeds = gains[key]
        assert mean == f"{expected_mean:.4f}", line
        if seeds == 1:
            assert dash == "–" and "single seed: no interval, so no claim" in line, line
            continue
        assert (low, high) == (f"{expected_low:.4f}", f"{expected_high:.4f}"), line
        includes_zero = expected_low <= 0 <= expected_high
        assert ("the interval includes 0: not supported by these seeds" in line) == includes_zero, line
        if not includes_zero:
            verdict = "beats scratch" if expected_mean > 0 else "scratch beats"
            assert verdict in line and f"over {seeds} seeds" in line, line
    assert set(claimed) == set(gains)
    # The designed cases: a clear gain at 10, a clear loss at 100, a straddle at all.
    assert "fine-tuning beats scratch" in claimed["torch alexnet", "pretrained", "10"]
    assert "scratch beats the frozen backbone" in claimed["torch alexnet", "frozen", "100"]
    assert "includes 0" in claimed["torch alexnet", "frozen", "all"]
    assert ("- The smallest training set where fine-tuning's gain over scratch excludes 0: at 10 images per class."
            in text.splitlines())
    assert ("- At no training-set size does the interval of the frozen backbone's gain over scratch exclude 0."
            in text.splitlines())
    assert "- With a single seed there is no interval for fine-tuning's gain: run several ``seeds``." in text
    markdown = (gain_report / "summary.md").read_text()
    assert text.removeprefix("# Conclusions\n\n") in markdown.split("## Conclusions\n\n", 1)[1]
    assert "nan" not in text.lower()


def test_data_efficiency_plot_shows_the_summary(gain_report):
    runs = pd.read_csv(gain_report / "summary.csv", dtype={"train_size": str})
    figure = report.data_efficiency_figure(runs)
    ax, = figure.axes
    assert ax.get_xscale() == "log"
    lines = {line.get_label().split(" (")[0]: line for line in ax.get_lines()}
    assert sorted(lines) == sorted(runs["variant"].unique())
    bands = dict(zip([label for label in lines if label.startswith("torch")], ax.collections))
    for variant, line in lines.items():
        group = runs[runs.variant == variant]
        sizes = sorted(group["train_size"].unique(), key=report.size_order)
        per_size = [group[group.train_size == size] for size in sizes]
        np.testing.assert_allclose(line.get_xdata(), [rows["train_images"].iloc[0] / 10 for rows in per_size])
        np.testing.assert_allclose(line.get_ydata(), [rows["test_accuracy"].mean() for rows in per_size])
        if variant in bands:  # three seeds: a band from the lowest seed to the highest
            vertices = bands[variant].get_paths()[0].vertices
            for x, rows in zip(line.get_xdata(), per_size):
                at_x = vertices[np.isclose(vertices[:, 0], x), 1]
                assert at_x.min() == pytest.approx(rows["test_accuracy"].min())
                assert at_x.max() == pytest.approx(rows["test_accuracy"].max())
    assert len(ax.collections) == 3  # none for the single-seed Keras variants
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["10", "100", "all (4500)"]
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_pretraining_gain_plot_shows_the_paired_differences(gain_report):
    differences = pd.read_csv(gain_report / "paired_differences.csv", dtype={"train_size": str})
    figure = report.pretraining_gain_figure(differences)
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_title()}
    assert sorted(panels) == ["keras vgg16", "torch alexnet"]
    drawn = 0
    for title, ax in panels.items():
        framework, model = title.split()
        sizes = [tick.get_text() for tick in ax.get_xticklabels()]
        for container in ax.containers:
            init = container.get_label().split(" - ")[0]
            rows = differences[differences.comparison == f"{init} - scratch ({framework} {model})"]
            rows = rows.set_index("train_size").loc[sorted(rows["train_size"], key=report.size_order)]
            data_line, _, (bars,) = container.lines
            np.testing.assert_allclose(data_line.get_ydata(), rows["test_accuracy_diff_mean"])
            assert [sizes[round(x)] for x in data_line.get_xdata()] == list(rows.index)
            segments = [segment for segment in bars.get_segments() if len(segment)]  # none without an interval
            intervals = rows.dropna(subset=["test_accuracy_diff_ci_low"])
            np.testing.assert_allclose(np.reshape([segment[:, 1] for segment in segments], (-1, 2)),
                                       intervals[["test_accuracy_diff_ci_low", "test_accuracy_diff_ci_high"]])
            drawn += len(rows)
    assert drawn == len(differences[differences.comparison.str.contains(" - scratch")])
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_summary_names_the_scratch_init_of_each_scratch_run(tmp_path):
    """summary.csv has each scratch run's `scratch_init` (empty for a run that loads weights), summary.md
    and summary_facts.json say which variants started from which; a run from before the key is torchvision."""
    keras_scratch = make_metrics("keras-alexnet-scratch")
    keras_scratch["config"]["scratch_init"] = "framework"
    torch_scratch = make_metrics("torch-alexnet-scratch")
    torch_scratch["config"]["scratch_init"] = "framework"
    old_scratch = make_metrics("torch-vgg16-scratch")  # no scratch_init: written before the key existed
    pretrained = make_metrics("torch-alexnet-pretrained")
    pretrained["config"]["scratch_init"] = "framework"  # no effect on a run that loads weights
    files = [write_metrics(tmp_path, m) for m in (keras_scratch, torch_scratch, old_scratch, pretrained)]
    code, out = run_report(tmp_path, files)
    assert code == 0
    runs = pd.read_csv(out / "summary.csv").set_index("variant")
    assert runs.loc["keras-alexnet-scratch", "scratch_init"] == runs.loc["torch-alexnet-scratch", "scratch_init"] \
        == "framework"
    assert runs.loc["torch-vgg16-scratch", "scratch_init"] == "torchvision"
    assert pd.isna(runs.loc["torch-alexnet-pretrained", "scratch_init"])
    facts = json.loads((out / "summary_facts.json").read_text())
    assert facts["scratch_init"] == {"torchvision": ["torch-vgg16-scratch"],
                                     "framework": ["keras-alexnet-scratch", "torch-alexnet-scratch"]}
    markdown = (out / "summary.md").read_text()
    assert ("Scratch runs' initialisation (scratch_init): torchvision (torchvision's rules in both frameworks) for "
            "torch-vgg16-scratch; framework (each framework's own defaults: torchvision's in torch, Glorot-uniform "
            "kernels and zero biases in Keras) for keras-alexnet-scratch, torch-alexnet-scratch.") in markdown


def test_a_metrics_file_with_an_unknown_scratch_init_is_refused(tmp_path, capsys):
    metrics = make_metrics("keras-alexnet-scratch")
    metrics["config"]["scratch_init"] = "glorot"
    code, out = run_report(tmp_path, [write_metrics(tmp_path, metrics)])
    assert code == 1 and not out.exists()
    assert "'glorot' is not one of ['torchvision', 'framework']" in capsys.readouterr().err
