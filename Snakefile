"""CIFAR-10: fine-tuning ImageNet-pretrained CNNs vs. training from scratch, PyTorch vs. Keras.

    snakemake --cores all                                      # everything, no containers
    snakemake --use-singularity --cores 1 --resources gpu=1    # each trainer in its image
    snakemake --configfile config/demo.yaml --cores all        # small synthetic demo
"""

import os

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


validate(config, os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"))


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        SUMMARY_FILES,
