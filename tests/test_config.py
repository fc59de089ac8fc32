"""Config schema, defaults, per-variant hyperparameters and the errors a user sees."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from conftest import REPO, demo_config
from cnnbench.config import (VALID_VARIANTS, ConfigError, check_known_keys, coerce_command_line, parse_variant,
                              resolve_hparams, run_hparams, scratch_init)

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
    # Only the classifier trains, its head new: a higher rate than fine-tuning (config.yaml says why).
    assert resolve_hparams(config, "keras-vgg16-frozen")["lr"] > resolve_hparams(config, "keras-vgg16-pretrained")["lr"]
    assert config["init_overrides"] == {"pretrained": {"lr": 0.001}, "frozen": {"lr": 0.01}}  # the schema's default
    assert config["data"]["val_size"] == 5000 and config["weights"] == "imagenet"


def test_schema_fills_every_default():
    config = {}
    validate(config, SCHEMA)
    assert config["train"]["epochs"] == 10 and config["train"]["lr"] == 0.01
    assert config["data"]["source"] == "cifar10"
    assert config["data"]["cifar10"]["md5"] == "c58f30108f718f92721af3b95e74349a"
    assert config["init_overrides"] == {"pretrained": {"lr": 0.001}, "frozen": {"lr": 0.01}}
    assert config["seeds"] == [0] and len(config["variants"]) == 4
    assert config["train"]["scratch_init"] == "torchvision" == load("config.yaml")["train"]["scratch_init"]


def test_demo_overlay():
    merged = demo_config()  # config.yaml with demo.yaml over it, nested, as Snakemake merges them
    validate(merged, SCHEMA)
    assert merged["data"]["source"] == "synthetic" and merged["weights"] == "standin"
    assert merged["train"]["epochs"] == 2 and merged["train"]["image_size"] == 64
    assert merged["train"]["require_gpu"] is False  # the demo trains wherever it runs
    # Scratch variants get the steps they need to learn; the other inits keep config.yaml's rates.
    assert resolve_hparams(merged, "torch-alexnet-scratch")["min_steps"] == 100
    assert resolve_hparams(merged, "keras-alexnet-scratch")["lr"] == 0.02
    assert resolve_hparams(merged, "torch-alexnet-pretrained")["lr"] == 0.001
    assert resolve_hparams(merged, "keras-vgg16-pretrained")["min_steps"] is None


def test_require_gpu_is_auto_by_default():
    assert load("config.yaml")["train"]["require_gpu"] == "auto"
    config = {}
    validate(config, SCHEMA)
    assert config["train"]["require_gpu"] == "auto"


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
    assert len(VALID_VARIANTS) == 18 and {"keras-alexnet-frozen", "torch-resnet50-frozen"} <= set(VALID_VARIANTS)


@pytest.mark.parametrize("bad", [{"train": {"epochs": "ten"}}, {"train": {"lr": -1}},
                                 {"train": {"learning_rate": 0.1}}, {"weights": "random"},
                                 {"variant_overrides": {"torch-alexnet-scratch": {"batch_size": 0.5}}},
                                 {"train": {"require_gpu": "yes"}}, {"train": {"require_gpu": "true"}},
                                 {"train": {"scratch_init": "keras"}},
                                 {"variant_overrides": {"keras-alexnet-scratch": {"scratch_init": "glorot"}}}])
def test_wrong_types_are_rejected(bad):
    with pytest.raises(WorkflowError):
        validate(bad, SCHEMA)


def test_scratch_init_is_a_per_variant_key_of_scratch_runs():
    """`scratch_init` resolves like every train key (a variant can have its own); it is the run's only for
    a scratch run, torchvision for metrics from before the key, and an unknown value is refused."""
    config = {"train": {"scratch_init": "torchvision"},
              "variant_overrides": {"keras-alexnet-scratch": {"scratch_init": "framework"}}}
    validate(config, SCHEMA)
    assert resolve_hparams(config, "keras-alexnet-scratch")["scratch_init"] == "framework"
    assert resolve_hparams(config, "torch-alexnet-scratch")["scratch_init"] == "torchvision"
    assert scratch_init("scratch", resolve_hparams(config, "keras-alexnet-scratch")) == "framework"
    # A run that loads weights does not get it: changing it reruns scratch runs only.
    assert run_hparams(config, "keras-alexnet-scratch", None, 0.01)["scratch_init"] == "framework"
    assert "scratch_init" not in run_hparams(config, "keras-alexnet-pretrained", None, 0.01)
    assert "scratch_init" not in run_hparams(config, "torch-vgg16-frozen", None, 0.01)
    assert scratch_init("pretrained", {"scratch_init": "framework"}) is None  # its new head: torchvision's
    assert scratch_init("scratch", {}) == "torchvision"
    with pytest.raises(ConfigError, match="scratch_init is 'glorot'; use one of torchvision, framework"):
        scratch_init("frozen", {"scratch_init": "glorot"})


def dry_run(*config_args, directory=None):
    """A dry run of the demo with `--config` arguments; -p prints each job's command (its config)."""
    where = ["--directory", str(directory)] if directory else []
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "-s", str(REPO / "Snakefile"), *where, "--configfile",
         str(REPO / "config" / "demo.yaml"), "--config", *config_args],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    return result.returncode, result.stdout + result.stderr


def schema():
    return yaml.safe_load(Path(SCHEMA).read_text())


def test_command_line_values_are_typed_by_the_schema():
    # What Snakemake's --config parser hands over for `train={epochs: 3, compile: on}` etc.
    parsed = {"train": {"epochs": "3", "compile": "on", "mean": ["0.5", "0.5", "0.5"]}, "seeds": ["0", "1"],
              "data": {"train_limit": "null", "val_size": "50"}, "weights": "standin",
              "variant_overrides": {"keras-vgg16-pretrained": {"batch_size": "32", "nesterov": "true"}}}
    assert coerce_command_line(parsed, schema()) == {
        "train": {"epochs": 3, "compile": "on", "mean": [0.5, 0.5, 0.5]}, "seeds": [0, 1],
        "data": {"train_limit": None, "val_size": 50}, "weights": "standin",
        "variant_overrides": {"keras-vgg16-pretrained": {"batch_size": 32, "nesterov": True}}}
    # A value that is still wrong stays as it was, for the schema to reject with its own message.
    assert coerce_command_line({"train": {"epochs": "ten"}}, schema()) == {"train": {"epochs": "ten"}}
    # require_gpu takes a string (auto) or a boolean: the string "true" becomes the boolean its enum lists.
    for given, typed in (("true", True), ("false", False), ("auto", "auto"), ("yes", True), ("maybe", "maybe")):
        assert coerce_command_line({"train": {"require_gpu": given}}, schema()) == {"train": {"require_gpu": typed}}


@pytest.mark.parametrize("config, key, valid, hint", [
    ({"epochs": 3}, "`epochs`", "at the top level are: containers, data,", "did you mean `train.epochs`"),
    ({"data": {"synthetic": {"size": 8}}}, "`data.synthetic.size`", "in `data.synthetic` are: image_size,", None),
    ({"variant_overrides": {"torch-alexnet-scratch": {"epoch": 1}}},
     "`variant_overrides.torch-alexnet-scratch.epoch`", "are: batch_size, compile,", None),
    ({"containers": {"tf": "x.sif"}}, "`containers.tf`", "in `containers` are: tensorflow, torch", None),
])
def test_unknown_keys_are_rejected_naming_the_valid_ones(config, key, valid, hint):
    with pytest.raises(ConfigError) as error:
        check_known_keys(config, schema())
    message = str(error.value)
    assert f"unknown config key {key}" in message and valid in message
    assert hint is None or hint in message
    with pytest.raises(WorkflowError, match="Additional properties are not allowed"):
        validate(config, SCHEMA)  # the schema itself says so too


def test_every_shipped_config_has_only_known_keys():
    for name in sorted(path.name for path in (REPO / "config").glob("*.yaml")):
        check_known_keys(load(name), schema())


def test_config_forms_the_readme_documents(tmp_path):
    # (momentum, not the README's lr: the demo's init_overrides set every demo variant's lr)
    code, output = dry_run("seeds=[0,1]", "weights=standin", "train={epochs: 3, momentum: 0.8, compile: on}",
                           "data={val_size: 50}", directory=tmp_path)
    assert code == 0, output[-3000:]
    assert '"epochs": 3,' in output and '"momentum": 0.8,' in output  # typed, not strings
    assert '"compile": "on"' in output  # a string where the schema wants one
    assert '"val_size": 50' in output and '"source": "synthetic"' in output  # merged into demo's `data`
    assert "--variant torch-alexnet-scratch --seed 1" in output

    code, output = dry_run("data.val_size=50", directory=tmp_path)
    assert code != 0 and "Config entry must start with a valid identifier" in output

    code, output = dry_run("epochs=3", directory=tmp_path)
    assert code != 0
    assert "unknown config key `epochs`" in output and "did you mean `train.epochs`" in output


def test_workflow_reports_config_errors_clearly():
    code, output = dry_run("variants=[torch-resnet-scratch]")
    assert code != 0
    assert "unknown variant 'torch-resnet-scratch'" in output
    assert "keras-vgg16-pretrained" in output  # the valid ones are listed

    code, output = dry_run("train={epochs: ten}")
    assert code != 0
    assert "'ten' is not of type 'integer'" in output

    code, output = dry_run("train={scratch_init: keras}")
    assert code != 0
    assert "'keras' is not one of ['torchvision', 'framework']" in output


def test_frozen_variants_load_the_pretrained_variants_files(tmp_path):
    """The workflow hands a frozen run the very file its pretrained twin gets (Keras VGG16: Keras'
    notop file by default), and the frozen learning rate."""
    code, output = dry_run("variants=[torch-vgg16-frozen,keras-vgg16-frozen,keras-alexnet-frozen]",
                           directory=tmp_path)
    assert code == 0, output[-3000:]
    commands = {match.group(1): match.group(0) for match in re.finditer(r"--variant (\S+) .*", output)}
    weights = "--weights resources/weights/standin/{} --weights-source standin"
    for variant, filename in (("torch-vgg16-frozen", "vgg16-397923af.pth"),
                              ("keras-vgg16-frozen", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                              ("keras-alexnet-frozen", "alexnet-owt-7be5be79.keras.npz")):
        assert weights.format(filename) in commands[variant], commands[variant]
        assert '"lr": 0.01,' in commands[variant]


def test_offline_files_lists_every_download_of_a_config(tmp_path):
    """The README's `offline_files` command for config/full.yaml: each file the workflow would
    download, with its URL and published hash, exactly the download jobs of a dry run."""
    def snakemake(*args):
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
             "--configfile", str(REPO / "config" / "full.yaml"), *args],
            capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    listed = snakemake("--cores", "1", "offline_files")
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in listed.splitlines() if line.count("\t") == 3}
    assert rows.pop("path") == ["url", "algorithm", "digest"]
    kept = (tmp_path / "results" / "logs" / "offline_files.tsv").read_text().splitlines()
    assert {line.split("\t")[0] for line in kept[1:]} == set(rows)
    assert rows == {
        "resources/cifar-10-python.tar.gz": ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "md5",
                                             "c58f30108f718f92721af3b95e74349a"],
        "resources/weights/imagenet/alexnet-owt-7be5be79.pth": [
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "sha256", "7be5be79"],
        "resources/weights/imagenet/vgg16-397923af.pth": [
            "https://download.pytorch.org/models/vgg16-397923af.pth", "sha256", "397923af"],
        "resources/weights/imagenet/resnet50-11ad3fa6.pth": [
            "https://download.pytorch.org/models/resnet50-11ad3fa6.pth", "sha256", "11ad3fa6"],
    }
    # Exactly what the workflow itself would download (keras_{vgg16,resnet50}_weights: torch: no Keras file).
    plan = snakemake("-n")
    downloads = re.findall(r"rule download_\w+:\n(?:    .*\n)*?    output: (\S+)", plan)
    assert sorted(downloads) == sorted(rows)


def test_offline_files_follow_the_config():
    from cnnbench.weights import offline_files, offline_table

    config = load("config.yaml")
    validate(config, SCHEMA)
    assert [Path(row[0]).name for row in offline_files(config)] == [
        "cifar-10-python.tar.gz", "alexnet-owt-7be5be79.pth", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"]
    config["variants"] = ["torch-alexnet-scratch", "keras-alexnet-pretrained"]  # ported from torch's AlexNet
    config["data"] = {**config["data"], "source": "imagefolder"}
    assert [Path(row[0]).name for row in offline_files(config)] == ["alexnet-owt-7be5be79.pth"]
    config["variants"] = ["keras-vgg16-frozen"]  # the file of keras-vgg16-pretrained
    assert [Path(row[0]).name for row in offline_files(config)] == ["vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"]
    config["weights"] = "standin"
    assert offline_files(config) == [] and "Nothing is downloaded" in offline_table([])


def test_resnet50_weights_follow_the_config_keys():
    """keras_resnet50_weights picks the port of torchvision's file (default) or Keras' own notop file;
    torch_resnet50_weights picks torchvision's release, for torch and for the port alike."""
    from cnnbench.weights import offline_files, weights_path

    config = load("config.yaml")
    config["variants"] = ["torch-resnet50-pretrained", "keras-resnet50-pretrained"]
    validate(config, SCHEMA)  # fills the defaults: keras_resnet50_weights torch, torch_resnet50_weights v2
    assert (config["keras_resnet50_weights"], config["torch_resnet50_weights"]) == ("torch", "v2")
    staged = {framework: weights_path("w", "imagenet", framework, "resnet50", config).name
              for framework in ("torch", "keras")}
    assert staged == {"torch": "resnet50-11ad3fa6.pth", "keras": "resnet50-11ad3fa6.keras.npz"}
    assert [Path(row[0]).name for row in offline_files(config)] == ["cifar-10-python.tar.gz", "resnet50-11ad3fa6.pth"]
    config["torch_resnet50_weights"] = "v1"
    assert weights_path("w", "standin", "keras", "resnet50", config).name == "resnet50-0676ba61.keras.npz"
    assert [row[1] for row in offline_files(config)][1:] == ["https://download.pytorch.org/models/resnet50-0676ba61.pth"]
    config["keras_resnet50_weights"] = "keras"
    rows = offline_files(config)
    assert [(Path(row[0]).name, row[2], row[3]) for row in rows][1:] == [
        ("resnet50-0676ba61.pth", "sha256", "0676ba61"),
        ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5", "4d473c1dd8becc155b73f8504c6f6626")]
    config["torch_resnet50_weights"] = "v3"
    with pytest.raises(WorkflowError):
        validate(config, SCHEMA)


def test_the_study_config_asks_for_every_run_of_its_axes(tmp_path):
    """config/study.yaml: 18 variants x 4 sizes x 3 learning rates x 3 seeds, each run a training job
    of a dry run (nothing needs to exist for it)."""
    import itertools

    from cnnbench.config import run_name

    study = load("study.yaml")
    check_known_keys(study, schema())
    assert sorted(study["variants"]) == sorted(VALID_VARIANTS)
    assert study["train_sizes"] == [10, 100, 1000, None] and study["seeds"] == [0, 1, 2]
    rates = {init: study["sweep"][init]["lr"] for init in ("scratch", "pretrained", "frozen")}
    assert all(len(lrs) == 3 for lrs in rates.values())
    expected = {f"results/runs/{run_name(variant, size, lr, seed)}/metrics.json"
                for variant, size, seed in itertools.product(study["variants"], study["train_sizes"], study["seeds"])
                for lr in rates[parse_variant(variant).init]}
    assert len(expected) == 648
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config" / "study.yaml")], capture_output=True, text=True, cwd=REPO, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert set(re.findall(r"^\s+output: (results/runs/\S+/metrics\.json)", output, re.M)) == expected
    jobs = dict(re.findall(r"^(train_torch|train_keras)\s+(\d+)$", output, re.M))
    assert jobs == {"train_torch": "324", "train_keras": "324"}


def test_the_readme_study_estimate_is_the_arithmetic_on_the_study_config():
    """docs/study.md's GPU-hour estimate: the study's images seen per run (training_budget's epochs at each
    size; validation and test images counted as a third of a training image: forward only), times the
    reference's slowest A100 time per training image."""
    import math

    from cnnbench.report import REFERENCE
    from cnnbench.training import training_budget

    study = load("study.yaml")
    defaults = load("config.yaml")["train"]
    hparams = {**defaults, **study["train"]}
    per_class_all = (50_000 - study["data"]["val_size"]) // 10
    per_run, epochs_at = 0.0, {}
    for size in study["train_sizes"]:
        images = 10 * (size or per_class_all)
        epochs, _ = training_budget(hparams, images)
        epochs_at[size] = epochs
        per_run += epochs * images + (epochs * study["data"]["val_size"] + 10_000) / 3
    assert epochs_at == {10: 250, 100: 32, 1000: 10, None: 10}
    seconds_per_image = max(seconds for _, seconds in REFERENCE.values()) / (10 * 50_000)
    runs = len(study["variants"]) * 3 * len(study["seeds"])  # per size
    hours = per_run * runs * seconds_per_image / 3600
    study_page = " ".join((REPO / "docs" / "study.md").read_text().split())
    assert f"{round(per_run):,} training-image equivalents" in study_page
    assert f"{per_run * runs / 1e6:.0f} million" in study_page
    assert f"about {math.floor(hours + 0.5)} A100 GPU-hours" in study_page


# --------------------------------------------------------------------------------- run targets
DEMO_VARIANTS = "torch-alexnet-scratch, keras-alexnet-scratch, torch-alexnet-pretrained, keras-vgg16-pretrained"


def dry_run_target(target: str, *config_args, directory: Path):
    """`snakemake -n TARGET` on the demo config (with `--config` arguments, if any)."""
    config = ["--config", *config_args] if config_args else []
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory", str(directory),
         "--configfile", str(REPO / "config" / "demo.yaml"), "--cores", "1", target, *config],
        capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


RUN = "results/runs/torch-alexnet-scratch/nall-lr0.02/seed0"  # a run of the demo config


@pytest.mark.parametrize("target, says", [
    ("results/runs/torch-alexnet-scrach/nall-lr0.02/seed0/metrics.json",  # a misspelled variant: no rule matches
     ["results/runs/torch-alexnet-scrach/nall-lr0.02/seed0 is not a run of this config: torch-alexnet-scrach is "
      f"not a variant (did you mean torch-alexnet-scratch?). This config's variants are {DEMO_VARIANTS}; every "
      f"valid one: {', '.join(VALID_VARIANTS)}"]),
    ("results/runs/torch-vgg16-scratch/nall-lr0.02/seed0/metrics.json",  # valid, but not one of the config's
     [f"torch-vgg16-scratch is not one of its variants ({DEMO_VARIANTS}). To train it, add it to the config, e.g. "
      "`snakemake --cores all results/runs/torch-vgg16-scratch/nall-lr0.02/seed0/metrics.json --config "
      f"'variants=[{DEMO_VARIANTS}, torch-vgg16-scratch]'` (--config last"]),
    (f"{RUN.replace('seed0', 'seed3')}/model.pt",
     ["seed3 is not a run of this config: its seeds are 0 (seeds). To train it, add it to the config, e.g. "
      f"`snakemake --cores all {RUN.replace('seed0', 'seed3')}/metrics.json --config 'seeds=[0, 3]'`"]),
    ("results/runs/torch-alexnet-scratch/n10-lr0.02/seed0/metrics.json",
     ["its sizes are nall (train_sizes) and torch-alexnet-scratch's learning rates lr0.02"]),
    ("results/runs/torch-alexnet-scratch/nall-lr0.1/seed0/metrics.json",
     ["its sizes are nall (train_sizes) and torch-alexnet-scratch's learning rates lr0.02"]),
    ("results/runs/torch-alexnet-scratch/nten-lr0.02/seed0/metrics.json", ["its sizes are nall"]),
    (f"{RUN}/model.keras", [f"{RUN}/model.keras is no file the workflow makes: a torch-alexnet-scratch run "
                            "makes metrics.json, model.pt, train.log"]),
    ("results/runs/torch-alexnet-scratch/metrics.json",
     ["results/runs/torch-alexnet-scratch/metrics.json is no file the workflow makes: a run's are "
      f"results/runs/{{variant}}/n{{size}}-lr{{lr}}/seed{{seed}}/metrics.json (and model.pt or model.keras, "
      f"train.log), e.g. {RUN}/metrics.json"]),
])
def test_a_run_target_outside_the_config_is_refused_naming_the_runs_it_has(target, says, tmp_path):
    code, output = dry_run_target(target, directory=tmp_path)
    assert code != 0
    for text in says:
        assert text in output, output[-3000:]
    assert "MissingRuleException" not in output


@pytest.mark.parametrize("target, config_args", [
    ("results/runs/torch-vgg16-scratch/nall-lr0.02/seed0/metrics.json", [f"variants=[{DEMO_VARIANTS}, "
                                                                          "torch-vgg16-scratch]"]),
    (f"{RUN.replace('seed0', 'seed3')}/model.pt", ["seeds=[0, 3]"]),
    (f"{RUN}/metrics.json", []),
    (f"{RUN}/train.log", []),  # a log is a target too: Snakemake runs the job that writes it
])
def test_a_run_of_the_config_is_planned_with_the_config_the_refusal_names(target, config_args, tmp_path):
    code, output = dry_run_target(target, *config_args, directory=tmp_path)
    assert code == 0, output[-3000:]
    assert re.search(r"^train_torch\s+1$", output, re.M) and "no_such_run_file" not in output


def test_a_run_whose_training_cannot_be_scheduled_says_why_not_that_it_is_unknown(tmp_path):
    """The catch-all rule for unknown run files never stands in for a training that lacks an input."""
    missing_images = "data={source: imagefolder, imagefolder: {path: /nonexistent}}"
    code, output = dry_run_target(f"{RUN}/metrics.json", missing_images, directory=tmp_path)
    assert code != 0
    assert "Missing input files for rule prepare_data" in output and "/nonexistent" in output
    assert "no_such_run_file" not in output and "is not a run of this config" not in output
