import json
import sys
from pathlib import Path

PACKAGE_DIR = Path(workflow.basedir) / "workflow"
sys.path.insert(0, str(PACKAGE_DIR))

from cnnbench.config import ConfigError, parse_variant, resolve_hparams  # noqa: E402
from cnnbench.weights import PRETRAINED, weights_path  # noqa: E402

# Every trainer and helper runs as `python -m cnnbench.<module>` with the package on the path.
PYTHON = f"PYTHONPATH={PACKAGE_DIR} python -m"
DATA = "results/data/dataset.npz"
RUN_DIR = "results/runs/{framework}-{model}-{init}/seed{seed}"
WEIGHTS_DIR = config["weights_dir"]
SUMMARY_FILES = ["results/summary.csv", "results/summary.md", "results/learning_curves.png"]

try:
    for _variant in config["variants"]:
        resolve_hparams(config, _variant)
        if parse_variant(_variant).init == "pretrained":
            weights_path(WEIGHTS_DIR, config["weights"], *parse_variant(_variant)[:2])
except (ConfigError, RuntimeError) as err:
    raise WorkflowError(f"invalid config: {err}")


wildcard_constraints:
    framework="torch|keras",
    model="alexnet|vgg16",
    init="scratch|pretrained",
    seed=r"\d+",


def variant_name(wildcards):
    return f"{wildcards.framework}-{wildcards.model}-{wildcards.init}"


def hparams_json(wildcards):
    return json.dumps(resolve_hparams(config, variant_name(wildcards)), sort_keys=True)


def pretrained_weights(wildcards):
    """The staged weights file of a pretrained variant; nothing for a scratch one."""
    if wildcards.init == "scratch":
        return []
    return str(weights_path(WEIGHTS_DIR, config["weights"], wildcards.framework, wildcards.model))


def weights_args(wildcards, input):
    if wildcards.init == "scratch":
        return ""
    return f"--weights {input.weights} --weights-source {config['weights']}"


def all_metrics():
    return expand("results/runs/{variant}/seed{seed}/metrics.json", variant=config["variants"], seed=config["seeds"])
