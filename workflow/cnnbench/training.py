"""Framework-neutral parts of a training run: CLI, seeds, progress, checks and metrics assembly.

Each framework's trainer (``torch_trainer``, ``keras_trainer``) imports this module and adds
only what is framework-specific: the model, the step, the checkpoint format.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from . import __version__, gpu_slot
from .config import DEFAULT_SCRATCH_INIT, ConfigError, loads_weights, parse_variant, scratch_init
from .data import DataError, load_prepared
from .fileio import file_digest, write_json_atomic, write_text_atomic
from .metrics import SCHEMA_VERSION, MetricsError, validate_metrics, validator
from .weights import WEIGHTS_SOURCES, WeightsError, ported_from, published_spec, resolve_preprocessing
from .weights import verify as verify_weights

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a job killed by SIGTERM
# Test hook: pause after this training step of the process (1 = the first), write
# ``paused-at-step-N`` (holding the pid) into the run directory and wait until asked to stop.
PAUSE_AT_STEP_ENV = "CNNBENCH_TEST_PAUSE_AT_STEP"
PARENT_POLL_SECONDS = 0.5


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what to do."""


class Preempted(Exception):
    """Stop asked for (SIGTERM, or the job that started the trainer is gone): checkpoint kept."""


def now_iso() -> str:
    """The current time, ISO 8601 with the local time zone's offset."""
    return datetime.now().astimezone().isoformat()


@dataclass
class RunArgs:
    variant: str
    seed: int
    data: Path
    hparams: dict
    run_dir: Path
    metrics: Path
    model_out: Path
    weights: Path | None
    weights_source: str
    container: str | None
    keras_backend: str | None = None
    weights_sha256: str | None = None  # of the weights file, hashed once in parse_args
    weights_origin_sha256: str | None = None  # of the torch file a ported .npz came from; else weights_sha256
    weights_classes: list[str] | None = None  # the classes in-workflow pretraining trained on (pretrain)
    started_at: str = field(default_factory=now_iso)  # when the trainer started
    framework: str = field(init=False)
    model: str = field(init=False)
    init: str = field(init=False)

    def __post_init__(self):
        self.framework, self.model, self.init = parse_variant(self.variant)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"


def parse_args(framework: str, argv: list[str] | None = None) -> RunArgs:
    parser = argparse.ArgumentParser(description=f"Train one {framework} variant on the prepared data.")
    parser.add_argument("--variant", required=True, help="{framework}-{model}-{init}")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared .npz from cnnbench.data")
    parser.add_argument("--hparams", required=True, help="resolved hyperparameters as JSON")
    parser.add_argument("--run-dir", type=Path, required=True, help="directory for checkpoints")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics.json to write")
    parser.add_argument("--model-out", type=Path, required=True, help="trained model file to write")
    parser.add_argument("--weights", type=Path, default=None, help="weights file (pretrained, frozen variants)")
    parser.add_argument("--weights-source", choices=[*WEIGHTS_SOURCES, "none"], default="none",
                        help="what the file is: published ImageNet weights, stand-ins, your own file, or the "
                        "workflow's pretraining (then --pretrain-data names the data it trained on)")
    parser.add_argument("--pretrain-data", type=Path, default=None,
                        help="the prepared source-class data the weights were pretrained on (weights source pretrain)")
    parser.add_argument("--container", help="container image the run uses (recorded in the metrics); "
                        "defaults to the image Apptainer/Singularity reports",
                        default=os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"))
    if framework == "keras":
        parser.add_argument("--keras-backend", choices=["tensorflow", "jax", "torch"],
                            default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    ns = parser.parse_args(argv)
    try:
        hparams = json.loads(ns.hparams)
        args = RunArgs(ns.variant, ns.seed, ns.data, hparams, ns.run_dir, ns.metrics, ns.model_out,
                       ns.weights, ns.weights_source, ns.container, getattr(ns, "keras_backend", None))
    except (ConfigError, json.JSONDecodeError) as err:
        parser.error(str(err))
    if args.framework != framework:
        parser.error(f"variant {args.variant} is not a {framework} variant")
    if loads_weights(args.init) and (args.weights is None or args.weights_source == "none"):
        parser.error(f"a {args.init} variant needs --weights and --weights-source {'|'.join(WEIGHTS_SOURCES)}")
    if not loads_weights(args.init):
        args.weights, args.weights_source = None, "none"
    if args.weights is not None and not args.weights.exists():
        parser.error(f"weights file {args.weights} does not exist: run the workflow's weights rule "
                     "(snakemake resources/weights/...) or set `weights: standin` for offline runs")
    if args.weights is not None:
        args.weights_sha256 = file_digest(args.weights)
        args.weights_origin_sha256 = ported_from(args.weights) or args.weights_sha256
    if args.weights_source == "pretrain":
        if ns.pretrain_data is None or not ns.pretrain_data.exists():
            parser.error("--weights-source pretrain needs --pretrain-data: the prepared source-class data")
        with np.load(ns.pretrain_data, allow_pickle=False) as source:
            args.weights_classes = [str(name) for name in source["class_names"]]
    spec = published_spec(args.weights) if args.weights_source == "imagenet" else None
    if spec is not None:
        try:  # a file put there by hand is checked as strictly as a download
            verify_weights(args.weights, spec, args.weights_sha256 if spec.algorithm == "sha256" else None)
        except WeightsError as err:
            parser.exit(1, f"error: {err}\n")
    # Resolved here, once for both trainers, so metrics["config"] records what the run really used.
    try:
        args.hparams["preprocessing"] = resolve_preprocessing(args.hparams.get("preprocessing", "auto"), args.weights)
        if args.init == "scratch":
            args.hparams.setdefault("scratch_init", DEFAULT_SCRATCH_INIT)
        scratch_init(args.init, args.hparams)  # a value the schema would reject stops here, for every init
    except ValueError as err:
        parser.error(str(err))
    return args


def require_module(module: str, distribution: str, needed_for: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise TrainingError(f"{module} cannot be imported ({err}); the run needs it {needed_for}. Install "
                            f"{distribution} where the trainer runs (requirements.txt and both container images "
                            "have it; rebuild an image that lacks it), then rerun.") from err


def preflight() -> None:
    """What the run needs up to its end, checked first thing in a trainer's main, before any data is
    loaded, so that no run trains for hours to fail at the end: the metrics schema's validator
    (jsonschema and the schema file, used after the last epoch), tqdm, and pynvml where a GPU is
    expected (gpu.expected_because). First of all the GPU environment (gpu_slot.apply_gpu_defaults):
    TensorFlow and JAX read it at their import, CUDA (torch) when it starts, both later than this.
    (The Keras trainer imports its backend next, still before the data: import_keras.)"""
    gpu_slot.apply_gpu_defaults()
    require_module("jsonschema", "jsonschema", "to validate metrics.json after training")
    try:
        validator()
    except MetricsError as err:
        raise TrainingError(str(err)) from err
    require_module("tqdm", "tqdm", "for its progress bars")
    from .gpu import current_host, expected_because  # here: cnnbench.gpu imports this module

    because = expected_because(current_host())
    if because:
        require_module("pynvml", "nvidia-ml-py", f"to measure the GPU's energy (a GPU is expected: {because[0]})")


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed for one epoch's shuffling and dropout: a resumed run replays the same epochs."""
    return (seed * 1_000_003 + epoch) % (2**31 - 1)


def head_seed(args: RunArgs) -> int | None:
    """The seed of the new head of a run that starts from a weights file: its seed and the file's sha256.

    Not the seed alone: a run that trained those weights (the workflow's pretraining, or your own run at
    the same seed) drew its own head from that seed, and a fine-tuning head drawn the same way would be
    the one the backbone grew up with, mapping the new classes onto the old ones. Seen on real images:
    every torch seed-0 fine-tuning from the seed-0 pretraining started at a loss of 2.3 (ln 5 = 1.61)
    and a validation accuracy of 0.06 (docs/models.md#the-new-head). None: no weights, torch's global RNG.
    """
    if args.weights_sha256 is None:
        return None
    return int(hashlib.sha256(f"head:{args.seed}:{args.weights_sha256}".encode()).hexdigest()[:8], 16)


def epoch_order(num_images: int, seed: int, hparams: dict) -> np.ndarray:
    """This epoch's shuffled image order; ``max_steps_per_epoch`` (benchmarks) truncates it."""
    order = np.random.default_rng(seed).permutation(num_images)
    if hparams.get("max_steps_per_epoch"):
        order = order[: hparams["max_steps_per_epoch"] * hparams["batch_size"]]
    return order


def training_budget(hparams: dict, num_train: int) -> tuple[int, int]:
    """(epochs, steps per epoch) of a run on ``num_train`` images: ``epochs``, raised where needed so
    that the run makes at least ``min_steps`` optimizer steps (small training sets); unchanged where
    ``min_steps`` is unset or already met."""
    steps_per_epoch = -(-num_train // hparams["batch_size"])
    if hparams.get("max_steps_per_epoch"):
        steps_per_epoch = min(steps_per_epoch, hparams["max_steps_per_epoch"])
    epochs = hparams["epochs"]
    if hparams.get("min_steps"):
        epochs = max(epochs, -(-hparams["min_steps"] // steps_per_epoch))
    return epochs, steps_per_epoch


def load_data(args: RunArgs) -> dict:
    """The prepared data cut to the run's ``train_size`` (images per class; None: all), and the run's
    epochs resolved for that size (``training_budget``) in ``args.hparams``, which the metrics record."""
    args.hparams.setdefault("train_size", None)
    try:
        data = load_prepared(args.data, args.hparams["train_size"])
    except DataError as err:
        raise TrainingError(str(err)) from err
    data["sha256"] = file_digest(args.data)
    args.hparams["epochs"], _ = training_budget(args.hparams, len(data["y_train"]))
    return data


def check_finite(loss: float, epoch: int, hparams: dict) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"training loss became {loss} in epoch {epoch}: the run diverged. Lower the learning rate "
            f"(lr={hparams['lr']}) for this variant in the config (variant_overrides) and rerun. "
            "No metrics were written."
        )


def lock_run(run_dir: Path):
    """Hold an exclusive lock on ``run_dir/.lock`` for the life of this process (the kernel drops it
    when the process dies, however it dies): one trainer per run, so none overwrites another's
    checkpoint or outputs. Return the open lock file, which must stay referenced."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown pid"
        handle.close()
        raise TrainingError(
            f"another trainer ({holder}) is already training {run_dir}: two trainers on one run would "
            "overwrite each other's checkpoint. Wait for it to finish, or end that process, then rerun."
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


class StopRequested:
    """The run's lock and what the training loop checks after every step: SIGTERM (what SLURM sends
    before a time limit) or the death of the process that started the trainer (an orphan would
    write outputs for a job already declared failed) turn into a flag; the loop then stops."""

    def __init__(self, run_dir: Path):
        self.lock = lock_run(run_dir)
        self.run_dir = run_dir
        self.requested = False
        self.steps = 0
        self.pause_at_step = int(os.environ.get(PAUSE_AT_STEP_ENV) or 0)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self._watch_parent, args=(os.getppid(),), daemon=True).start()

    def request(self, reason: str) -> None:
        self.requested = True
        print(f"{reason}: stopping after this step; the last completed epoch is checkpointed.",
              file=sys.stderr, flush=True)

    def _on_sigterm(self, signum, frame):
        self.request("SIGTERM received")

    def _watch_parent(self, parent: int) -> None:
        while not self.requested:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent:
                self.request(f"the process that started this trainer (pid {parent}) is gone")

    def after_step(self, steps: int = 1) -> bool:
        """Count ``steps`` training steps (a compiled loop reports several at once); True when the loop
        should stop now. The test pause happens at the first report at or past ``pause_at_step``."""
        before, self.steps = self.steps, self.steps + steps
        if before < self.pause_at_step <= self.steps:
            write_text_atomic(self.run_dir / f"paused-at-step-{self.pause_at_step}", f"{os.getpid()}\n")
            while not self.requested:
                time.sleep(0.05)
        return self.requested


def progress(total: int, desc: str):
    """A tqdm bar fit for a log file: plain ASCII, updated at most every few seconds."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, ascii=not interactive,
                mininterval=0.5 if interactive else 5.0, file=sys.stderr, dynamic_ncols=interactive)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(num_classes * labels + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def test_summary(loss: float, labels: np.ndarray, predictions: np.ndarray, class_names) -> dict:
    matrix = confusion_matrix(np.asarray(labels), np.asarray(predictions), len(class_names))
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    return {
        "loss": float(loss),
        "accuracy": float(matrix.diagonal().sum() / matrix.sum()),
        "per_class_accuracy": {name: float(acc) for name, acc in zip(class_names, per_class)},
        "confusion_matrix": matrix.tolist(),
    }


def environment(device: str, device_name: str, framework_version: str, container: str | None,
                started_at: str, **extra) -> dict:
    """Where and when the run trained: ``started_at`` is the trainer's start, ``finished_at`` now;
    ``cuda_visible_devices`` the GPU(s) the job was given (cnnbench.gpu_slot), None when unset."""
    return {
        "device": device,
        "device_name": device_name,
        "framework_version": framework_version,
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "container": container,
        "cnnbench_version": __version__,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "started_at": started_at,
        "finished_at": now_iso(),
        **extra,
    }


def build_metrics(args: RunArgs, data: dict, history: list[dict], test: dict, env: dict, energy: dict,
                  compile_seconds: float) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "variant": args.variant,
        "framework": args.framework,
        "model": args.model,
        "init": args.init,
        "seed": args.seed,
        "config": args.hparams,
        "data": {
            "source": data["source"],
            "train_size": int(len(data["y_train"])),
            "val_size": int(len(data["y_val"])),
            "test_size": int(len(data["y_test"])),
            "sha256": data["sha256"],
        },
        "weights": {
            "source": args.weights_source,
            "sha256": args.weights_sha256,
            "origin_sha256": args.weights_origin_sha256,
            "path": str(args.weights) if args.weights is not None else None,
            "classes": args.weights_classes,
        },
        "history": history,
        "test": test,
        "train_seconds": float(sum(epoch["seconds"] for epoch in history)),
        "compile_seconds": float(compile_seconds),
        "energy": energy,
        "environment": env,
    }


def finish(args: RunArgs, metrics: dict, stop: StopRequested) -> None:
    """Write metrics.json (the run's commit point), then drop the checkpoint it no longer needs;
    nothing once a stop was asked for (the job that wants these outputs may be gone)."""
    validate_metrics(metrics)
    if stop.requested:
        raise Preempted
    write_json_atomic(args.metrics, metrics)
    shutil.rmtree(args.checkpoint_dir, ignore_errors=True)


def epoch_record(epoch: int, train_loss: float, train_acc: float, val_loss: float, val_acc: float,
                 seconds: float, images: int, energy_joules: float | None) -> dict:
    return {
        "epoch": epoch,
        "train_loss": float(train_loss),
        "train_accuracy": float(train_acc),
        "val_loss": float(val_loss),
        "val_accuracy": float(val_acc),
        "seconds": float(seconds),
        "images_per_second": float(images / seconds) if seconds > 0 else 0.0,
        "energy_joules": energy_joules,
    }


def log_epoch(record: dict, epochs: int) -> None:
    print(
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
        f"acc {record['train_accuracy']:.4f} | val loss {record['val_loss']:.4f} "
        f"acc {record['val_accuracy']:.4f} | {record['seconds']:.1f} s, "
        f"{record['images_per_second']:.0f} img/s"
        + (f", {record['energy_joules']:.0f} J" if record["energy_joules"] is not None else ""),
        file=sys.stderr, flush=True,
    )


# Raised when what a checkpoint means changes: 2 = Keras' momentum buffer in torch's formulation,
# 3 = history entries carry energy_joules.
CHECKPOINT_FORMAT = 3


def run_fingerprint(args: RunArgs, data_sha256: str) -> dict:
    """What a checkpoint must match to be resumed (else it is from another configuration): the
    weights file's hash too, so that another file under the same name starts afresh, and the
    checkpoint format, so that one written by an older trainer is not resumed with a new meaning."""
    return {"variant": args.variant, "seed": args.seed, "hparams": args.hparams, "data_sha256": data_sha256,
            "weights_source": args.weights_source, "weights_sha256": args.weights_sha256,
            "checkpoint_format": CHECKPOINT_FORMAT}


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
