"""Keras 3 trainer: one variant, one seed, on the backend named by ``--keras-backend``.

Like the torch trainer, the uint8 training images become a backend tensor once, each step gathers
its batch from it by index (``keras.ops.take``), and the model resizes/normalises the batch itself
(see ``keras_models``): the upscaled images exist only on the device. (TensorFlow has no GPU kernel
to gather uint8, so there it gathers in host memory and moves only the batch.)
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

from . import gpu, precision, training
from .config import freezes_backbone
from .energy import EnergyMeter
from .fileio import atomic_path, write_json_atomic
from .training import EXIT_PREEMPTED, Preempted, StopRequested, TrainingError


def import_keras(backend: str):
    """Import Keras on ``backend``; Keras reads KERAS_BACKEND once, at its first import."""
    os.environ["KERAS_BACKEND"] = backend
    try:
        import keras
    except ImportError as err:
        raise TrainingError(f"Keras cannot start on the {backend} backend ({err}): install {backend} where the "
                            "Keras trainer runs (the tensorflow image holds TensorFlow only), or set "
                            "keras_backend: tensorflow in the config.") from err

    if keras.backend.backend() != backend:
        raise TrainingError(f"Keras is already running on {keras.backend.backend()}, not {backend}")
    return keras


def gpu_devices(backend: str) -> list:
    """The GPUs the backend sees (its own device objects)."""
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.config.list_physical_devices("GPU")
    if backend == "jax":
        import jax

        return [d for d in jax.devices() if d.platform == "gpu"]
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def gpu_name(backend: str, devices: list) -> str:
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.get_device_details(devices[0]).get("device_name", "gpu")
    if backend == "jax":
        return devices[0].device_kind
    import torch

    return torch.cuda.get_device_name(0)


def installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def jax_cuda_versions() -> tuple[str | None, str | None]:
    """CUDA and cuDNN of JAX's CUDA plugin (jax-cuda12-plugin, ...), or (None, None) without one."""
    plugins = [name for name in ("jax-cuda13-plugin", "jax-cuda12-plugin") if installed(name)]
    if not plugins:
        return None, None
    cuda, cudnn = plugins[0].split("-")[1].removeprefix("cuda"), None
    try:  # the exact versions, where this jaxlib exposes them
        from jax._src.lib import cuda_versions

        runtime = cuda_versions.cuda_runtime_get_version()
        cuda = f"{runtime // 1000}.{runtime % 1000 // 10}"
        cudnn = gpu.cudnn_version_string(cuda_versions.cudnn_get_version())
    except Exception:  # noqa: BLE001 - private API: the plugin's major version is enough
        pass
    return cuda, cudnn


def cuda_build(backend: str) -> tuple[str | None, str | None]:
    """The CUDA and cuDNN versions the backend was built for; (None, None) for a CPU-only build."""
    if backend == "tensorflow":
        import tensorflow as tf

        info = tf.sysconfig.get_build_info()
        if not info.get("is_cuda_build"):
            return None, None
        return info.get("cuda_version"), info.get("cudnn_version")
    if backend == "jax":
        return jax_cuda_versions()
    import torch

    return torch.version.cuda, gpu.cudnn_version_string(torch.backends.cudnn.version()) if torch.version.cuda else None


def framework_build(keras, backend: str) -> gpu.FrameworkBuild:
    name = f"Keras {keras.__version__} on {backend} {backend_version(backend)}"
    cuda = cuda_build(backend)[0]
    if backend == "tensorflow":
        evidence = ("the tensorflow-cpu package is installed" if installed("tensorflow-cpu")
                    else "tf.sysconfig.get_build_info() says is_cuda_build False")
        return gpu.FrameworkBuild(name, cuda, evidence, "install tensorflow[and-cuda] instead of tensorflow-cpu "
                                  "(make venv GPU=1), or run in the tensorflow image built without --tf-cpu")
    if backend == "jax":
        return gpu.FrameworkBuild(name, cuda, "no jax-cuda12-plugin or jax-cuda13-plugin is installed",
                                  f"install jax[cuda12]=={backend_version('jax')} (or jax[cuda13])")
    return gpu.FrameworkBuild(name, cuda, "torch.version.cuda is None",
                              "install torch's CUDA wheels (make venv GPU=1)")


def gpu_environment(backend: str, devices: list) -> dict | None:
    if not devices:
        return None
    cuda, cudnn = cuda_build(backend)
    if backend == "tensorflow":
        import tensorflow as tf

        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    elif backend == "jax":
        peak = (devices[0].memory_stats() or {}).get("peak_bytes_in_use")
    else:
        import torch

        peak = torch.cuda.max_memory_allocated(0)
    return gpu.gpu_facts(gpu_name(backend, devices), len(devices), cuda, cudnn, peak)


def is_out_of_memory(err: Exception) -> bool:
    """Each backend has its own error: TensorFlow's ResourceExhaustedError ("OOM when allocating tensor
    ..."), JAX's JaxRuntimeError ("RESOURCE_EXHAUSTED: Out of memory ..."), torch's OutOfMemoryError."""
    return (type(err).__name__ in ("ResourceExhaustedError", "OutOfMemoryError")
            or "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower())


def log_softmax_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def evaluate(model, x, y, hp):
    logits = model.predict(x, batch_size=hp["eval_batch_size"], verbose=0)
    predictions = logits.argmax(axis=1)
    return log_softmax_loss(logits, y), float((predictions == y).mean()), predictions


def train_one_epoch(model, x, y, order: np.ndarray, hp: dict, stop: StopRequested, desc: str):
    """One epoch the way ``torch_trainer.train_one_epoch`` runs it: the images stay on the device, each
    step gathers its batch there by index; stops after the current step on SIGTERM.

    Returns the loss and accuracy over the epoch's images (``train_on_batch`` gives each batch's means).
    """
    import keras

    order_on_device = keras.ops.convert_to_tensor(order, "int32")
    batch_size = hp["batch_size"]
    loss_sum = correct = 0.0
    with training.progress(len(order), desc) as bar:
        for start in range(0, len(order), batch_size):
            index = order_on_device[start:start + batch_size]
            logs = model.train_on_batch(keras.ops.take(x, index, axis=0), keras.ops.take(y, index, axis=0),
                                        return_dict=True)
            images = min(batch_size, len(order) - start)
            loss_sum += logs["loss"] * images
            correct += logs["accuracy"] * images
            bar.update(images)
            if stop.after_step():
                break
    return loss_sum / len(order), correct / len(order)


def reseed_dropout(model, seed: int) -> None:
    """Start each epoch's dropout streams from ``seed``, so a resumed epoch draws the same masks.

    Keras saves its seed generators' state with the model but does not restore it on load.
    """
    states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    for index, state in enumerate(states):
        state.assign(np.asarray([(seed + 7919 * index) % 2**31, 0], dtype=state.dtype))


class Checkpoint:
    """``epoch{N}.keras`` (model + optimizer state) and ``state.json``, the commit point."""

    def __init__(self, directory: Path, fingerprint: dict):
        self.directory = directory
        self.state_path = directory / "state.json"
        self.fingerprint = fingerprint

    def load(self, keras):
        if not self.state_path.exists():
            return None, []
        state = json.loads(self.state_path.read_text())
        if state["fingerprint"] != self.fingerprint:
            print(f"ignoring checkpoint {self.directory}: it was written by another configuration", file=sys.stderr)
            return None, []
        model = keras.saving.load_model(self.directory / state["model"])
        print(f"resuming from {self.directory} after epoch {len(state['history'])}", file=sys.stderr, flush=True)
        return model, state["history"]

    def save(self, model, history: list[dict]) -> None:
        name = f"epoch{len(history)}.keras"
        with atomic_path(self.directory / name) as tmp:
            model.save(tmp)
        write_json_atomic(self.state_path, {"model": name, "history": history, "fingerprint": self.fingerprint})
        for old in self.directory.glob("epoch*.keras"):
            if old.name != name:
                old.unlink()


def run(args: training.RunArgs, backend: str) -> dict:
    hp = args.hparams  # training.load_data resolves the epochs in it
    stop = StopRequested(args.run_dir)
    keras = import_keras(backend)
    from .keras_models import build_model, make_optimizer  # registers custom objects for loading too

    devices = gpu_devices(backend)
    gpu.check_gpu(hp["require_gpu"], bool(devices), framework_build(keras, backend))
    ran_precision, precision_settings = precision.apply(backend, hp["precision"], bool(devices))
    if ran_precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    data = training.load_data(args)
    class_names = data["class_names"]
    x_train, y_train = data["x_train"], data["y_train"]

    keras.utils.set_random_seed(args.seed)
    fingerprint = training.run_fingerprint(args, data["sha256"])
    checkpoint = Checkpoint(args.checkpoint_dir, fingerprint)
    model, history = checkpoint.load(keras)
    if model is None:
        model = build_model(args.model, len(class_names), hp["image_size"], hp["mean"], hp["std"],
                            hp["dropout"], input_shape=x_train.shape[1:], weights=args.weights,
                            preprocessing_mode=hp["preprocessing"], freeze_backbone=freezes_backbone(args.init))
        model.compile(optimizer=make_optimizer(hp, steps_per_epoch=-(-len(y_train) // hp["batch_size"])),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"],
                      jit_compile={"auto": "auto", "on": True, "off": False}[hp["compile"]])

    meter = EnergyMeter().start()
    try:
        # As in the torch trainer: the uint8 images go to the device once, each step gathers its batch.
        x_train, y_train = keras.ops.convert_to_tensor(x_train), keras.ops.convert_to_tensor(y_train, "int32")
        for epoch in range(len(history) + 1, hp["epochs"] + 1):
            seed = training.epoch_seed(args.seed, epoch)
            with meter.epoch() as energy, training.Timer() as timer:  # the same span as the torch trainer's
                order = training.epoch_order(len(data["y_train"]), seed, hp)
                reseed_dropout(model, seed)
                train_loss, train_acc = train_one_epoch(model, x_train, y_train, order, hp, stop,
                                                        f"epoch {epoch}/{hp['epochs']}")
            if stop.requested:
                raise Preempted
            training.check_finite(train_loss, epoch, hp)
            val_loss, val_acc, _ = evaluate(model, data["x_val"], data["y_val"], hp)
            record = training.epoch_record(epoch, train_loss, train_acc, val_loss, val_acc, timer.seconds,
                                           len(order), energy.joules)
            history.append(record)
            training.log_epoch(record, hp["epochs"])
            checkpoint.save(model, history)
    except Exception as err:
        if is_out_of_memory(err):
            raise TrainingError(f"the GPU ran out of memory with batch_size={hp['batch_size']} "
                                f"(eval_batch_size={hp['eval_batch_size']}) at image_size={hp['image_size']}: "
                                "lower them for this variant in the config (variant_overrides).") from err
        raise
    finally:
        meter.stop()

    test_loss, _, predictions = evaluate(model, data["x_test"], data["y_test"], hp)
    with atomic_path(args.model_out) as tmp:
        model.save(tmp)
    env = training.environment("gpu" if devices else "cpu", gpu_name(backend, devices) if devices else "cpu",
                               f"keras {keras.__version__}, {backend} {backend_version(backend)}",
                               args.container, args.started_at, keras_backend=backend, gpu=gpu_environment(backend, devices),
                               cuda_build=cuda_build(backend)[0], precision=ran_precision,
                               precision_settings=precision_settings, compiled=hp["compile"] != "off")
    metrics = training.build_metrics(args, data, history,
                                     training.test_summary(test_loss, data["y_test"], predictions, class_names),
                                     env, meter.summary(history), compile_seconds=0.0)
    training.finish(args, metrics, stop)
    return metrics


def backend_version(backend: str) -> str:
    module = __import__(backend)
    return module.__version__


def main(argv: list[str] | None = None) -> int:
    args = training.parse_args("keras", argv)
    try:
        training.preflight()  # before the data is loaded and the framework starts on the GPU
        metrics = run(args, args.keras_backend)
    except Preempted:
        return EXIT_PREEMPTED
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.variant} seed {args.seed}: test accuracy {metrics['test']['accuracy']:.4f}, "
          f"{metrics['train_seconds']:.1f} s of training", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
