import json
import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(workflow.basedir) / "workflow"
sys.path.insert(0, str(PACKAGE_DIR))

from cnnbench.config import ConfigError, parse_variant, resolve_hparams  # noqa: E402
from cnnbench.report import OUTPUTS as REPORT_OUTPUTS  # noqa: E402
from cnnbench.weights import PORTED_SUFFIX, PRETRAINED, weights_path  # noqa: E402

# Every job runs `python -m cnnbench.<module>` with the package on the path, in a container too
# (Apptainer mounts the working directory; see profiles/ for other bind paths).
shell.prefix(f"export PYTHONPATH={PACKAGE_DIR}; ")
TORCH_IMAGE = config["containers"]["torch"]
KERAS_IMAGE = config["containers"]["tensorflow"]
DATA = "results/data/dataset.npz"
RUN_DIR = "results/runs/{framework}-{model}-{init}/seed{seed}"
WEIGHTS_DIR = config["weights_dir"]
SUMMARY_FILES = [f"results/{name}" for name in REPORT_OUTPUTS]

try:
    for _variant in config["variants"]:
        resolve_hparams(config, _variant)
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
    return str(weights_path(WEIGHTS_DIR, config["weights"], wildcards.framework, wildcards.model,
                            config["keras_vgg16_weights"]))


def weights_args(wildcards, input):
    if wildcards.init == "scratch":
        return ""
    return f"--weights {input.weights} --weights-source {config['weights']}"


def all_metrics():
    return expand("results/runs/{variant}/seed{seed}/metrics.json", variant=config["variants"], seed=config["seeds"])


# ----------------------------------------------------------------------------- data inputs
DATA_CONFIG = config["data"]
CIFAR10_TARBALL = DATA_CONFIG["cifar10"]["path"]


def data_source(wildcards):
    """What prepare_data reads: the CIFAR-10 tarball, the image folder, or nothing (synthetic)."""
    if DATA_CONFIG["source"] == "cifar10":
        return CIFAR10_TARBALL
    if DATA_CONFIG["source"] == "imagefolder":
        return DATA_CONFIG["imagefolder"]["path"]
    return []


# ------------------------------------------------------------------------- weights files
def weights_filenames(framework=None):
    """Regex of the weights file names published (for ``framework``): a wildcard constraint."""
    return "|".join(spec.filename.replace(".", r"\.") for (fw, _), spec in PRETRAINED.items()
                    if framework in (None, fw))


def weights_owner(filename):
    """(framework, model) of a published weights file name."""
    return next(key for key, spec in PRETRAINED.items() if spec.filename == filename)


def torch_model_of(stem):
    """The model whose torchvision weights file has this stem (for the port rule)."""
    return next(model for (fw, model), spec in PRETRAINED.items()
                if fw == "torch" and spec.filename == f"{stem}.pth")
