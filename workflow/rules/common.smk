import json
import os
import shlex
import sys
import uuid
from pathlib import Path

PACKAGE_DIR = Path(workflow.basedir) / "workflow"
sys.path.insert(0, str(PACKAGE_DIR))

from cnnbench.config import (  # noqa: E402
    INITS, MODELS, RUN_LAYOUT, ConfigError, check_weights, configured_runs, format_lr, is_keras_weights_file,
    learning_rates, loads_weights, parse_size, parse_variant, pretrain_hparams, run_hparams, run_name, run_problem,
    run_target_problem, TRAINING_FILES,
)
from cnnbench import preflight  # noqa: E402
from cnnbench.gpu_slot import export_pool  # noqa: E402
from cnnbench.report import OUTPUTS as REPORT_OUTPUTS, caption_facts, conclusions_text  # noqa: E402
from cnnbench.weights import PORTED_SUFFIX, offline_files, offline_table, published_files, RELEASES, weights_path  # noqa: E402


# ------------------------------------------------------------- containers (--use-singularity)
def using_apptainer():
    from snakemake.settings.types import DeploymentMethod

    settings = workflow.deployment_settings
    return settings is not None and DeploymentMethod.APPTAINER in settings.deployment_method


def container_image(path):
    """A relative image path names a file in the working directory or else in the repository
    (where containers/build.sh puts the images)."""
    if "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    in_repo = os.path.join(workflow.basedir, path)
    return in_repo if os.path.exists(in_repo) else path


def keras_needed():
    return any(parse_variant(v).framework == "keras" for v in config["variants"])


def searched_folders():
    """Where a relative image path is looked for (see container_image), each folder once."""
    cwd, basedir = os.getcwd(), workflow.basedir
    return cwd if os.path.realpath(cwd) == os.path.realpath(basedir) else f"{cwd} or {basedir}"


def check_images(images):
    """Fail early, saying what to do, on a missing apptainer, image, or an image of the other
    framework (the `cnnbench.framework` label that containers/*.def set)."""
    import shutil
    import subprocess

    if not (shutil.which("apptainer") or shutil.which("singularity")):
        raise WorkflowError(
            "--use-singularity needs `apptainer` on PATH: install it (Debian/Ubuntu, as root: "
            "containers/install-apptainer.sh; elsewhere https://apptainer.org/docs/admin/main/installation.html), "
            "or run without --use-singularity in an environment with requirements.txt installed"
        )
    for framework, image in images.items():
        key = {"torch": "torch", "keras": "tensorflow"}[framework]
        if image is None or "://" in image:
            continue
        if not os.path.exists(image):
            where = "" if os.path.isabs(image) else f" in {searched_folders()}"
            raise WorkflowError(
                f"container image {image} (config `containers: {key}:`) does not exist{where}: build it "
                f"with `containers/build.sh {key}` in {workflow.basedir}, set `containers: {key}:` "
                "to an existing .sif, or run without --use-singularity"
            )
        try:
            inspect = subprocess.run(
                [shutil.which("apptainer") or "singularity", "inspect", "--json", "--labels", image],
                capture_output=True, text=True, timeout=120,
            )
        except subprocess.TimeoutExpired:
            raise WorkflowError(f"`apptainer inspect {image}` did not answer in 120 s: is its file system "
                                "reachable (a hung network mount)? Check it, or run without --use-singularity")
        try:
            labels = json.loads(inspect.stdout)["data"]["attributes"]["labels"] or {}
        except (ValueError, KeyError, TypeError):
            raise WorkflowError(f"container image {image} is not a readable Apptainer image: {inspect.stderr.strip()}")
        if labels.get("cnnbench.framework", framework) != framework:
            raise WorkflowError(
                f"container image {image} (config `containers: {key}:`) is the "
                f"{labels['cnnbench.framework']} image, not the {framework} one: build "
                f"containers/{key}.sif with `containers/build.sh {key}` or fix `containers:` in the config"
            )


def package_bind():
    return f"--bind {shlex.quote(f'{PACKAGE_DIR}:{PACKAGE_DIR}:ro')}"


def bind_package_dir():
    """Jobs import cnnbench from PACKAGE_DIR; Apptainer binds only the working directory, so bind
    the package too when the working directory (--directory) is elsewhere."""
    if PACKAGE_DIR.resolve().is_relative_to(Path.cwd().resolve()):
        return
    if package_bind() not in workflow.deployment_settings.apptainer_args:
        workflow.deployment_settings.apptainer_args += f" {package_bind()}"


def given_apptainer_args():
    """The apptainer args the command line or the profile gave, without bind_package_dir's."""
    return workflow.deployment_settings.apptainer_args.replace(f" {package_bind()}", "").strip()

# Every job runs `python -m cnnbench.<module>` with the package on the path, in a container too
# (Apptainer mounts the working directory; bind_package_dir() binds the package when it lies outside).
shell.prefix(f"export PYTHONPATH={PACKAGE_DIR}; ")
TORCH_IMAGE = container_image(config["containers"]["torch"])
KERAS_IMAGE = container_image(config["containers"]["tensorflow"])
DATA = "results/data/dataset.npz"
# weights: pretrain splits the prepared data by class: the pretraining's source classes, the study's target ones.
SOURCE_DATA, TARGET_DATA = "results/data/source.npz", "results/data/target.npz"
PRETRAINS = config["weights"] == "pretrain"
TRAIN_DATA = TARGET_DATA if PRETRAINS else DATA
PRETRAIN_DIR = "results/pretrain/{model}"
RUN_WILDCARDS = {"variant": "{framework}-{model}-{init}", "size": "{size}", "lr": "{lr}", "seed": "{seed}"}
RUN_DIR = f"results/runs/{RUN_LAYOUT.format(**RUN_WILDCARDS)}"
WEIGHTS_DIR = config["weights_dir"]
SUMMARY_FILES = [f"results/{name}" for name in REPORT_OUTPUTS]

try:
    RUNS = configured_runs(config)
    check_weights(config)
except (ConfigError, RuntimeError) as err:
    raise WorkflowError(f"invalid config: {err}")

if using_apptainer():
    check_images({"torch": TORCH_IMAGE, "keras": KERAS_IMAGE if keras_needed() else None})
    bind_package_dir()


RUN_CONSTRAINTS = {"framework": "torch|keras", "model": "|".join(MODELS), "init": "|".join(INITS),
                   "seed": r"\d+", "size": r"all|\d+", "lr": r"\d[0-9.e+-]*"}


wildcard_constraints:
    framework=RUN_CONSTRAINTS["framework"],
    model=RUN_CONSTRAINTS["model"],
    init=RUN_CONSTRAINTS["init"],
    seed=RUN_CONSTRAINTS["seed"],
    size=RUN_CONSTRAINTS["size"],
    lr=RUN_CONSTRAINTS["lr"],


def variant_name(wildcards):
    return f"{wildcards.framework}-{wildcards.model}-{wildcards.init}"


def hparams_json(wildcards):
    """The run's hyperparameters; it must be a run the config asks for (else it says which it has)."""
    variant = variant_name(wildcards)
    problem = run_problem(config, variant, wildcards.size, wildcards.lr, wildcards.seed)
    if problem:
        raise WorkflowError(problem)
    lrs = {format_lr(lr): lr for lr in learning_rates(config, variant)}
    return json.dumps(run_hparams(config, variant, parse_size(wildcards.size), lrs[wildcards.lr]), sort_keys=True)


def pretrained_weights(wildcards):
    """The weights file a pretrained or frozen variant loads (the same for both inits); nothing for a scratch one.
    Keras variants load a torch file's port (weights_path, the port rules), so both frameworks start alike."""
    if not loads_weights(wildcards.init):
        return []
    keras = wildcards.framework == "keras"
    if config["weights"] == "pretrain":
        return f"{PRETRAIN_DIR.format(model=wildcards.model)}/{'model.keras.npz' if keras else 'model.pt'}"
    if config["weights"] == "file":
        given = config["weights_files"][wildcards.model]
        return f"{WEIGHTS_DIR}/file/{wildcards.model}{PORTED_SUFFIX}" if keras and not is_keras_weights_file(given) else given
    return str(weights_path(WEIGHTS_DIR, config["weights"], wildcards.framework, wildcards.model, config))


def pretrain_source(wildcards):
    """The source-class data a variant's weights were pretrained on (weights: pretrain), for its metrics."""
    return SOURCE_DATA if PRETRAINS and loads_weights(wildcards.init) else []


def weights_args(wildcards, input):
    if not loads_weights(wildcards.init):
        return ""
    source = f" --pretrain-data {input.source}" if PRETRAINS else ""
    return f"--weights {input.weights} --weights-source {config['weights']}{source}"


def pretrain_hparams_json(wildcards):
    return json.dumps(pretrain_hparams(config), sort_keys=True)


def all_metrics():
    return [f"results/runs/{run_name(*run)}/metrics.json" for run in RUNS]


def expected_runs():
    return [run_name(*run) for run in RUNS]


# ------------------------------------------------------------------------------ GPU slots
# The pool the training jobs' launcher (cnnbench.gpu_slot) shares out, one GPU per running
# training, resolved here from the environment Snakemake runs in and handed to the jobs in an
# environment variable: not a param, so another machine's GPUs retrain nothing.
GPU_POOL, GPU_POOL_SOURCE = export_pool(config["gpus"])


def training_threads(wildcards):
    """All cores for one training at a time; with `--resources gpu=N`, N trainings share them."""
    gpus = workflow.global_resources.get("gpu")
    slots = gpus.value if gpus is not None and isinstance(gpus.value, int) else 1
    return max(1, workflow.cores // max(1, slots))


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
    return "|".join(spec.filename.replace(".", r"\.") for (fw, _), spec in published_files()
                    if framework in (None, fw))


def weights_owner(filename):
    """(framework, model) of a published weights file name."""
    return next(key for key, spec in published_files() if spec.filename == filename)


def weights_release(filename):
    """``--release`` for the download of a file that is one of several releases; "" for the others."""
    framework, model = weights_owner(filename)
    releases = RELEASES.get((framework, model), {})
    return next((f"--release {name}" for name, spec in releases.items() if spec.filename == filename), "")


def torch_model_of(stem):
    """The model whose torchvision weights file has this stem (for the port rule)."""
    return next(model for (fw, model), spec in published_files()
                if fw == "torch" and spec.filename == f"{stem}.pth")


# ------------------------------------------------------------------------- run targets
# A target under results/runs/ is either a file a training rule matches (RUN_DIR with RUN_CONSTRAINTS and
# one of TRAINING_FILES), whose params (hparams_json) refuse a run the config does not ask for, or else
# rules/targets.smk's no_such_run_file's: instead of Snakemake's bare MissingRuleException for a misspelled
# variant, size or file name, its input function says what is wrong and which runs the config has. The
# two never match one path, so that rule is never the fallback for a training that cannot be scheduled.
def training_file_pattern(framework):
    parts = {name: f"(?:{pattern})" for name, pattern in RUN_CONSTRAINTS.items()}
    run_dir = RUN_LAYOUT.format(variant=f"{framework}-{parts['model']}-{parts['init']}", size=parts["size"],
                                lr=parts["lr"], seed=parts["seed"])
    return f"{run_dir}/(?:{'|'.join(name.replace('.', r'[.]') for name in TRAINING_FILES[framework])})"


NOT_A_TRAINING_FILE = rf"(?!(?:{'|'.join(map(training_file_pattern, ('torch', 'keras')))})$).+"


def no_such_run_file(wildcards):
    path = f"results/runs/{wildcards.path}"
    raise WorkflowError(run_target_problem(config, path) or f"{path}: no rule makes this file")


# ------------------------------------------------------------------- preflight (rules/preflight.smk)
# A new value each time Snakemake starts: as a param of the probes, it has Snakemake rerun them (its params
# rerun trigger) even where an interrupted preflight left a probe's file behind.
PREFLIGHT_INVOCATION = uuid.uuid4().hex


def preflight_probes(wildcards):
    """One probe per framework the config's variants use, where its trainings run."""
    return [f"results/preflight/{framework}.json" for framework in preflight.frameworks(config)]


def preflight_route():
    """Containers or not (--use-singularity), and the apptainer args given."""
    if not using_apptainer():
        return preflight.Route(containers=False)
    return preflight.Route(containers=True, apptainer_args=given_apptainer_args())
