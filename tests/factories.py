"""Hand-made, schema-valid metrics for tests of the schema and the aggregation."""

from __future__ import annotations

import json
from pathlib import Path

from cnnbench.config import loads_weights, parse_variant, run_name

CLASS_NAMES = [f"class{i}" for i in range(10)]


def make_metrics(variant: str, seed: int = 0, val_accuracies=(0.3, 0.5), test_accuracy: float = 0.45,
                 train_seconds_per_epoch: float = 10.0, train_size: int = 1000, lr: float = 0.01,
                 per_class: int | None = None, energy_joules_per_epoch: float | None = None) -> dict:
    """``train_size``: training images (data.train_size); ``per_class``: the run's configured subset
    size (config.train_size, None = all)."""
    framework, model, init = parse_variant(variant)
    history = [
        {"epoch": i + 1, "train_loss": 2.0 - 0.3 * i, "train_accuracy": acc - 0.05, "val_loss": 2.1 - 0.3 * i,
         "val_accuracy": acc, "seconds": train_seconds_per_epoch,
         "images_per_second": train_size / train_seconds_per_epoch, "energy_joules": energy_joules_per_epoch}
        for i, acc in enumerate(val_accuracies)
    ]
    correct = round(test_accuracy * 100)
    matrix = [[0] * 10 for _ in range(10)]
    for i in range(10):
        matrix[i][i] = correct // 10 + (1 if i < correct % 10 else 0)
        matrix[i][(i + 1) % 10] = 10 - matrix[i][i]
    return {
        "schema_version": 1, "variant": variant, "framework": framework, "model": model, "init": init,
        "seed": seed,
        "config": {"epochs": len(history), "batch_size": 64, "lr": lr, "train_size": per_class, "momentum": 0.9, "weight_decay": 5e-4,
                   "image_size": 64},
        "data": {"source": "synthetic", "train_size": train_size, "val_size": 100, "test_size": 100,
                 "sha256": "a" * 64},
        "weights": {"source": "standin" if loads_weights(init) else "none",
                    "sha256": "b" * 64 if loads_weights(init) else None,
                    "origin_sha256": "b" * 64 if loads_weights(init) else None,
                    "path": "resources/weights/standin/alexnet-owt-7be5be79.pth" if loads_weights(init) else None,
                    "classes": None},
        "history": history,
        "test": {"loss": 1.5, "accuracy": correct / 100,
                 "per_class_accuracy": {name: matrix[i][i] / 10 for i, name in enumerate(CLASS_NAMES)},
                 "confusion_matrix": matrix},
        "train_seconds": train_seconds_per_epoch * len(history),
        "compile_seconds": 1.0,
        "energy": ({"joules": None, "method": None, "sample_hz": None, "gpus": []}
                   if energy_joules_per_epoch is None else
                   {"joules": energy_joules_per_epoch * len(history), "method": "energy_counter", "sample_hz": None,
                    "gpus": ["GPU-00000000-0000-0000-0000-000000000000"]}),
        "environment": {"device": "cpu", "device_name": "cpu", "framework_version": "test",
                        "python_version": "3.11", "hostname": "test", "container": None,
                        "cuda_visible_devices": None, "started_at": "2026-12-01T10:00:00.000001+01:00",
                        "finished_at": "2026-12-01T10:05:00+01:00", "precision": "fp32",
                        "precision_settings": {}, "compiled": False},
    }


def write_metrics(root: Path, metrics: dict) -> Path:
    config = metrics["config"]
    path = root / "runs" / run_name(metrics["variant"], config.get("train_size"), config["lr"], metrics["seed"]) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return path
