"""The metrics.json schema that every trainer's output is validated against."""

from __future__ import annotations

import copy
import json

import pytest

from cnnbench.metrics import SCHEMA_PATH, MetricsError, load_metrics, validate_metrics
from factories import make_metrics


def test_schema_file_is_valid_json_schema():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text()))


def test_hand_made_metrics_validate():
    validate_metrics(make_metrics("keras-vgg16-pretrained"))


@pytest.mark.parametrize("key", ["schema_version", "variant", "config", "data", "weights", "history", "test",
                                 "train_seconds", "environment"])
def test_missing_top_level_key_is_named(key):
    metrics = make_metrics("torch-alexnet-scratch")
    del metrics[key]
    with pytest.raises(MetricsError, match=f"'{key}' is a required property"):
        validate_metrics(metrics)


@pytest.mark.parametrize("path, value", [
    (("test", "accuracy"), 45.0),  # a percentage instead of a fraction
    (("history", 0, "val_accuracy"), -0.1),
    (("weights", "source"), "random"),
    (("environment", "container"), 3),
    (("data", "sha256"), "not-a-hash"),
])
def test_out_of_range_values_are_rejected(path, value):
    metrics = make_metrics("torch-alexnet-scratch")
    target = metrics
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(MetricsError, match="/".join(map(str, path))):
        validate_metrics(metrics)


def test_load_metrics_names_the_file(tmp_path):
    path = tmp_path / "metrics.json"
    broken = copy.deepcopy(make_metrics("torch-alexnet-scratch"))
    del broken["history"][0]["seconds"]
    path.write_text(json.dumps(broken))
    with pytest.raises(MetricsError, match=f"{path}.*history/0.*'seconds' is a required property"):
        load_metrics(path)
    path.write_text("{not json")
    with pytest.raises(MetricsError, match="not valid JSON"):
        load_metrics(path)
