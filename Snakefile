"""CIFAR-10: fine-tuning ImageNet-pretrained CNNs vs. training from scratch, PyTorch vs. Keras.

    snakemake --cores all                                      # everything, no containers
    snakemake --use-singularity --cores 1 --resources gpu=1    # each trainer in its image
    snakemake --configfile config/demo.yaml --cores all        # small synthetic demo
    snakemake --cores 1 preflight                              # will the trainings see the GPU? (seconds)
"""

import os
import sys

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, update_config, validate

min_version("9.0")

sys.path.insert(0, os.path.join(workflow.basedir, "workflow"))
from cnnbench.config import ConfigError, check_known_keys, coerce_command_line  # noqa: E402


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


CONFIG_SCHEMA = os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")
with open(CONFIG_SCHEMA) as schema_file:
    schema = yaml.safe_load(schema_file)
update_config(config, coerce_command_line(dict(workflow.config_settings.config), schema))
try:
    check_known_keys(config, schema)
except ConfigError as err:
    raise WorkflowError(f"invalid config: {err}")
validate(config, CONFIG_SCHEMA)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/targets.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/preflight.smk"


# The metrics files are inputs of `all` too: Snakemake reruns a job with a missing output only when
# a job that needs it runs, so a deleted metrics.json retrains only if `all` itself asks for it.
rule all:
    default_target: True
    input:
        all_metrics(),
        SUMMARY_FILES,
