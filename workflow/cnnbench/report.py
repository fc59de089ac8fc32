"""Aggregate metrics.json files into summary.csv, summary.md and learning_curves.png."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .fileio import atomic_path, write_text_atomic
from .metrics import MetricsError, load_metrics

# The reference report: A100, 10 epochs, batch 64, SGD, 32->224, test set used as Keras validation.
REFERENCE = {
    "torch-alexnet-scratch": (0.8278, 438.89),
    "keras-alexnet-scratch": (0.7913, 200.03),
    "torch-alexnet-pretrained": (0.8611, 473.11),
    "keras-vgg16-pretrained": (0.8796, 377.25),
}
COLUMNS = ["variant", "seed", "epochs", "best_val_accuracy", "test_accuracy", "train_seconds",
           "images_per_second", "device", "weights", "data", "reference_test_accuracy", "reference_train_seconds"]


def summary_row(metrics: dict) -> dict:
    history = metrics["history"]
    images = metrics["data"]["train_size"] * len(history)
    reference = REFERENCE.get(metrics["variant"], (None, None))
    return {
        "variant": metrics["variant"],
        "seed": metrics["seed"],
        "epochs": len(history),
        "best_val_accuracy": max(epoch["val_accuracy"] for epoch in history),
        "test_accuracy": metrics["test"]["accuracy"],
        "train_seconds": metrics["train_seconds"],
        "images_per_second": images / metrics["train_seconds"] if metrics["train_seconds"] else 0.0,
        "device": metrics["environment"]["device_name"],
        "weights": metrics["weights"]["source"],
        "data": metrics["data"]["source"],
        "reference_test_accuracy": reference[0],
        "reference_train_seconds": reference[1],
    }


def summarize(metrics_list: list[dict]) -> pd.DataFrame:
    rows = [summary_row(m) for m in metrics_list]
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["variant", "seed"], ignore_index=True)


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["weights", "data"]).rename(columns={
        "best_val_accuracy": "best val acc", "test_accuracy": "test acc", "train_seconds": "train s",
        "images_per_second": "images/s", "reference_test_accuracy": "reference test acc",
        "reference_train_seconds": "reference train s",
    })
    sources = ", ".join(sorted(set(table["data"])))
    weights = ", ".join(sorted(set(table["weights"])))
    note = (f"Data: {sources}. Pretrained weights: {weights}. Reference: the original report "
            "(A100, 10 epochs, batch 64; it validated Keras runs on the test set).\n")
    return "# Results\n\n" + shown.to_markdown(index=False, floatfmt=".4g", missingval="") + "\n\n" + note


def plot_learning_curves(metrics_list: list[dict], out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for metrics in sorted(metrics_list, key=lambda m: (m["variant"], m["seed"])):
        label = f"{metrics['variant']} (seed {metrics['seed']})"
        epochs = [e["epoch"] for e in metrics["history"]]
        line, = ax_train.plot(epochs, [e["train_accuracy"] for e in metrics["history"]], marker="o", label=label)
        ax_val.plot(epochs, [e["val_accuracy"] for e in metrics["history"]], marker="o", label=label,
                    color=line.get_color())
    for ax, title in ((ax_train, "train accuracy"), (ax_val, "validation accuracy")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_train.set_ylabel("accuracy")
    ax_val.legend(fontsize="small", loc="best")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.json files")
    parser.add_argument("--csv", required=True, type=Path)
    parser.add_argument("--markdown", required=True, type=Path)
    parser.add_argument("--plot", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        metrics_list = [load_metrics(path) for path in args.metrics]
    except (MetricsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    table = summarize(metrics_list)
    with atomic_path(args.csv) as tmp:
        table.to_csv(tmp, index=False)
    write_text_atomic(args.markdown, to_markdown(table))
    plot_learning_curves(metrics_list, args.plot)
    print(to_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
