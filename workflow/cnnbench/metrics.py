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


def validate_metrics(metrics: dict, source: str = "metrics") -> None:
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(metrics), key=lambda e: list(e.path))
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
