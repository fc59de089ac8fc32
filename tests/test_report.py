"""Aggregation of hand-made metrics files into the summary table, markdown and plot."""

from __future__ import annotations

import json

import pandas as pd
import pytest

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


def run_report(tmp_path, files):
    outputs = {"csv": tmp_path / "out" / "summary.csv", "markdown": tmp_path / "out" / "summary.md",
               "plot": tmp_path / "out" / "learning_curves.png"}
    code = report.main([*map(str, files), *[arg for k, v in outputs.items() for arg in (f"--{k}", str(v))]])
    return code, outputs


def test_summary_values(tmp_path, metrics_files):
    code, out = run_report(tmp_path, metrics_files)
    assert code == 0
    table = pd.read_csv(out["csv"])
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


def test_markdown_and_plot(tmp_path, metrics_files):
    _, out = run_report(tmp_path, metrics_files)
    markdown = out["markdown"].read_text()
    assert "| keras-vgg16-pretrained" in markdown and "0.8796" in markdown and "377.2" in markdown
    for header in ("variant", "epochs", "best val acc", "test acc", "train s", "images/s", "device",
                   "reference test acc", "reference train s"):
        assert header in markdown
    png = out["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_has_one_labelled_line_per_run(tmp_path, metrics_files, monkeypatch):
    import matplotlib.pyplot as plt

    captured = {}
    original = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        captured["axes"] = fig.axes
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    run_report(tmp_path, metrics_files)
    train_ax, val_ax = captured["axes"]
    labels = [line.get_label() for line in val_ax.get_lines()]
    assert labels == ["keras-vgg16-pretrained (seed 0)", "torch-alexnet-scratch (seed 0)",
                      "torch-vgg16-scratch (seed 0)"]
    assert [len(line.get_xdata()) for line in train_ax.get_lines()] == [2, 3, 2]


def test_bad_metrics_file_writes_nothing(tmp_path, metrics_files, capsys):
    broken = json.loads(metrics_files[0].read_text())
    del broken["test"]
    metrics_files[0].write_text(json.dumps(broken))
    code, out = run_report(tmp_path, metrics_files)
    assert code == 1
    assert "'test' is a required property" in capsys.readouterr().err
    assert not any(path.exists() for path in out.values())
