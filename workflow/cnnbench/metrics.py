"""The metrics.json contract: its JSON Schema ships in ``workflow/schemas/metrics.schema.json``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "metrics.schema.json"


class MetricsError(ValueError):
    """A metrics file that does not follow the schema; the message names the file and the field."""


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@lru_cache(maxsize=1)
def validator():
    """The schema's validator, built once (the trainers build it before they train: training.preflight).
    ImportError without jsonschema; MetricsError for a schema file that is missing or no JSON Schema."""
    import jsonschema

    try:
        document = schema()
        jsonschema.Draft202012Validator.check_schema(document)
    except (OSError, json.JSONDecodeError, jsonschema.SchemaError) as err:
        raise MetricsError(f"the metrics schema {SCHEMA_PATH} cannot be used ({str(err).splitlines()[0]}): "
                           "restore it from the repository (git checkout -- workflow/schemas)") from err
    return jsonschema.Draft202012Validator(document)


def validate_metrics(metrics: dict, source: str = "metrics") -> None:
    errors = sorted(validator().iter_errors(metrics), key=lambda e: list(e.path))
    if errors:
        details = "; ".join(f"{'/'.join(map(str, e.path)) or '(top level)'}: {e.message}" for e in errors[:5])
        raise MetricsError(f"{source} does not match the metrics schema v{SCHEMA_VERSION}: {details}")
    check_energy_total(metrics, source)


def check_energy_total(metrics: dict, source: str = "metrics") -> None:
    """The run's ``energy.joules`` is its epochs' ``energy_joules`` summed (what no JSON Schema can say)."""
    figures = [epoch["energy_joules"] for epoch in metrics["history"]]
    total = metrics["energy"]["joules"]
    if total is None:
        return  # not measured, or not in every epoch
    if None in figures or abs(total - sum(figures)) > 1e-6 * max(1.0, abs(total)):
        raise MetricsError(f"{source}: energy/joules ({total}) is not the sum of history/*/energy_joules "
                           f"({figures}); the file was edited or written by another version: rerun its training.")


def load_metrics(path: str | Path) -> dict:
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MetricsError(f"{path} is not valid JSON ({err}); delete it and rerun its training.") from err
    validate_metrics(metrics, str(path))
    return metrics
