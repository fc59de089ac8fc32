"""Config schema, defaults, per-variant hyperparameters and the errors a user sees."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from conftest import REPO
from cnnbench.config import VALID_VARIANTS, ConfigError, parse_variant, resolve_hparams

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")


def load(name):
    return yaml.safe_load((REPO / "config" / name).read_text())


def test_default_config_is_the_reference_experiment():
    config = load("config.yaml")
    validate(config, SCHEMA)
    assert config["variants"] == ["torch-alexnet-scratch", "keras-alexnet-scratch",
                                  "torch-alexnet-pretrained", "keras-vgg16-pretrained"]
    train = config["train"]
    assert (train["epochs"], train["batch_size"], train["optimizer"], train["image_size"]) == (10, 64, "sgd", 224)
    assert train["momentum"] > 0
    assert train["mean"] == [0.485, 0.456, 0.406] and train["std"] == [0.229, 0.224, 0.225]
    assert resolve_hparams(config, "torch-alexnet-pretrained")["lr"] < resolve_hparams(config, "torch-alexnet-scratch")["lr"]
    assert config["data"]["val_size"] == 5000 and config["weights"] == "imagenet"


def test_schema_fills_every_default():
    config = {}
    validate(config, SCHEMA)
    assert config["train"]["epochs"] == 10 and config["train"]["lr"] == 0.01
    assert config["data"]["source"] == "cifar10"
    assert config["data"]["cifar10"]["md5"] == "c58f30108f718f92721af3b95e74349a"
    assert config["init_overrides"] == {"pretrained": {"lr": 0.001}}
    assert config["seeds"] == [0] and len(config["variants"]) == 4


def test_demo_overlay():
    config = load("config.yaml")
    demo = load("demo.yaml")
    # Snakemake merges --configfile over the default config the same way (nested update).
    merged = copy.deepcopy(config)
    for key, value in demo.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    validate(merged, SCHEMA)
    assert merged["data"]["source"] == "synthetic" and merged["weights"] == "standin"
    assert merged["train"]["epochs"] == 2 and merged["train"]["image_size"] == 64


def test_layers_of_hyperparameters():
    config = {"train": {"lr": 0.01, "batch_size": 64}, "init_overrides": {"pretrained": {"lr": 0.001}},
              "variant_overrides": {"keras-vgg16-pretrained": {"batch_size": 32}}}
    assert resolve_hparams(config, "torch-alexnet-scratch") == {"lr": 0.01, "batch_size": 64}
    assert resolve_hparams(config, "torch-alexnet-pretrained") == {"lr": 0.001, "batch_size": 64}
    assert resolve_hparams(config, "keras-vgg16-pretrained") == {"lr": 0.001, "batch_size": 32}
    assert config["train"] == {"lr": 0.01, "batch_size": 64}  # not modified


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="torch-alexnet-scratch, torch-alexnet-pretrained"):
        parse_variant("torch-resnet-scratch")
    with pytest.raises(ConfigError, match="variant_overrides names unknown variant"):
        resolve_hparams({"train": {}, "variant_overrides": {"jax-alexnet-scratch": {}}}, "torch-alexnet-scratch")
    assert len(VALID_VARIANTS) == 8


@pytest.mark.parametrize("bad", [{"train": {"epochs": "ten"}}, {"train": {"lr": -1}},
                                 {"train": {"learning_rate": 0.1}}, {"weights": "random"},
                                 {"variant_overrides": {"torch-alexnet-scratch": {"batch_size": 0.5}}}])
def test_wrong_types_are_rejected(bad):
    with pytest.raises(WorkflowError):
        validate(bad, SCHEMA)


def dry_run(*config_args):
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--configfile",
         str(REPO / "config" / "demo.yaml"), "--config", *config_args],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    return result.returncode, result.stdout + result.stderr


def test_workflow_reports_config_errors_clearly():
    code, output = dry_run("variants=[torch-resnet-scratch]")
    assert code != 0
    assert "unknown variant 'torch-resnet-scratch'" in output
    assert "keras-vgg16-pretrained" in output  # the valid ones are listed

    code, output = dry_run("train={epochs: ten}")
    assert code != 0
    assert "'ten' is not of type 'integer'" in output
