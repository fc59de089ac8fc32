"""Keras 3 trainer: one variant, one seed, on the backend named by ``--keras-backend``.

Each epoch is one ``model.fit`` call, Keras' own compiled multi-step loop (``STEPS_PER_EXECUTION``),
on that epoch's images gathered once, in its order, on the host: the uint8 batches stream through
Keras' data adapter (tf.data with prefetch on TensorFlow, a batch-ahead device transfer on JAX), and
the model converts, resizes and normalises each batch on the device itself (see ``keras_models``),
so the upscaled images exist only there. (TensorFlow has no GPU kernel to gather uint8: gathering
on the host also keeps the whole set off GPU:0.) Every batch shape the run uses is compiled before
the first timed step (``warm_up``).
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

from . import gpu, precision, training
from .config import freezes_backbone, scratch_init
from .energy import EnergyMeter
from .fileio import atomic_path, write_json_atomic
from .training import EXIT_PREEMPTED, Preempted, StopRequested, TrainingError
from .weights import WeightsError


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


# Training steps per compiled execution (model.compile(steps_per_execution=...)): TensorFlow runs them as
# one tf.while_loop call, JAX as a Python loop over its jitted step; the host looks at the run (progress
# bar, SIGTERM) once per execution, so a stop takes effect within this many steps. 16 lets one call
# amortise the per-call overhead: on 2 CPU cores a one-call-per-step loop (train_on_batch) ran at
# 0.52x (TensorFlow) and 0.62x (JAX) the images/s of fit with 16 (issue 19). Keras' torch backend
# accepts only 1 (keras/src/backend/torch/trainer.py), and then the host looks after every step.
STEPS_PER_EXECUTION = 16
JIT_COMPILE = {"auto": "auto", "on": True, "off": False}  # config train.compile -> compile(jit_compile=...)


def steps_per_execution(backend: str) -> int:
    return 1 if backend == "torch" else STEPS_PER_EXECUTION


def compile_model(model, hp: dict, steps_per_epoch: int, optimizer=None) -> None:
    """Compile ``model`` the way the trainer trains it: ``optimizer`` (default: a new ``make_optimizer``;
    a resumed model passes its own, whose state it keeps), the loss on logits, accuracy, the config's
    ``compile`` as ``jit_compile`` and ``steps_per_execution`` for the running backend."""
    import keras

    from .keras_models import make_optimizer

    if optimizer is None:
        optimizer = make_optimizer(hp, steps_per_epoch=steps_per_epoch)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile=JIT_COMPILE[hp["compile"]],
                  steps_per_execution=steps_per_execution(keras.backend.backend()))


def host_inputs(x: np.ndarray, y: np.ndarray, index) -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8, as stored) and int32 labels at ``index``: what ``fit`` gets, in warm-up too."""
    return x[index], y[index].astype(np.int32)


def execution_callbacks(model, stop: StopRequested, bar, num_images: int, batch_size: int):
    """``fit``'s callbacks for one epoch of ``num_images``: after each execution, count its steps for
    ``stop`` (which may end the epoch there: ``model.stop_training``) and move ``bar``; and History.

    A CallbackList of its own, because Keras' turns each execution's logs into Python floats before it
    calls a callback that is not async-safe (keras/src/callbacks/callback_list.py, _on_train_batch_end),
    which waits for the device; this one reads no logs, so the host waits only at the epoch's end.
    """
    import keras

    total_steps = -(-num_images // batch_size)

    class ExecutionCallbacks(keras.callbacks.CallbackList):
        steps_done = 0

        def on_train_batch_end(self, batch, logs=None):
            # ``batch`` is the execution's last step index: begin + steps_per_execution - 1, also for
            # the epoch's last execution, which may run fewer steps.
            done = min(batch + 1, total_steps)
            steps, self.steps_done = done - self.steps_done, done
            bar.update(min(done * batch_size, num_images) - bar.n)
            if stop.after_step(steps):
                model.stop_training = True

    return ExecutionCallbacks(add_history=True, model=model)


def train_one_epoch(model, x_train: np.ndarray, y_train: np.ndarray, order: np.ndarray, hp: dict,
                    stop: StopRequested, desc: str) -> tuple[float, float]:
    """One epoch over ``x_train[order]`` (host numpy arrays; the images gathered once, here) with
    ``model.fit``, ``steps_per_execution`` steps per call; on SIGTERM it stops at the end of the
    current execution, i.e. within ``steps_per_execution`` steps (the caller then raises Preempted).

    Returns the loss and accuracy over the epoch's images, read once, from fit's History: Keras weights
    each batch's mean loss by its size (the trainers' train_step: ``_loss_tracker.update_state(loss,
    sample_weight=<batch size>)`` in keras/src/backend/{tensorflow,jax,torch}/trainer.py) and
    accuracy is a mean over images, so a short last batch counts per image.
    """
    x_epoch, y_epoch = host_inputs(x_train, y_train, order)
    with training.progress(len(order), desc) as bar:
        callbacks = execution_callbacks(model, stop, bar, len(order), hp["batch_size"])
        history = model.fit(x_epoch, y_epoch, batch_size=hp["batch_size"], epochs=1, shuffle=False, verbose=0,
                            callbacks=callbacks)
    return history.history["loss"][-1], history.history["accuracy"][-1]


def batch_shapes_sample(num_images: int, batch_size: int) -> int:
    """How many leading images make batches of every size an epoch of ``num_images`` uses: one full
    batch (if any) and the short last one (if any)."""
    return (batch_size if num_images >= batch_size else 0) + num_images % batch_size


def warm_up(model, x_train: np.ndarray, y_train: np.ndarray, epoch_images: int, eval_sets, hp: dict) -> float:
    """Trace and compile, before the first timed step, what the run will run: training on a full batch
    and on the epoch's short last batch (``epoch_images`` per epoch), through ``fit`` as an epoch calls
    it (the same steps_per_execution loop: on TensorFlow one tf.while_loop function, XLA-compiled per
    batch shape; on JAX the jitted step per batch shape), and ``predict`` on a full eval batch and
    each set's in ``eval_sets`` short last one. Every model and optimizer variable (weights, BatchNorm
    statistics, dropout seed states, iterations, momentum) gets its value back and the metrics are
    reset: the run trains as if the warm-up had not happened. Returns its seconds."""
    with training.Timer() as timer:
        if not model.optimizer.built:  # its slots must exist to be saved; fit would build it the same way
            model.optimizer.build(model.trainable_variables)
        variables = [*model.variables, *model.optimizer.variables]
        # Copies on the host: JAX donates the state's device buffers to its step; np.asarray may alias them.
        saved = [np.array(variable, copy=True) for variable in variables]
        count = batch_shapes_sample(epoch_images, hp["batch_size"])
        model.fit(*host_inputs(x_train, y_train, slice(count)), batch_size=hp["batch_size"], epochs=1,
                  shuffle=False, verbose=0)
        for x in eval_sets:
            if count := batch_shapes_sample(len(x), hp["eval_batch_size"]):
                model.predict(x[:count], batch_size=hp["eval_batch_size"], verbose=0)
        for variable, value in zip(variables, saved):
            variable.assign(value)
        model.reset_metrics()
    print(f"warm-up: compiled training and evaluation for every batch shape in {timer.seconds:.1f} s "
          f"(jit_compile {model.jit_compile}, steps_per_execution {model.steps_per_execution})",
          file=sys.stderr, flush=True)
    return timer.seconds


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
    from .keras_models import build_model  # registers custom objects for loading too

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
    steps_per_epoch = -(-len(y_train) // hp["batch_size"])
    if model is None:
        model = build_model(args.model, len(class_names), hp["image_size"], hp["mean"], hp["std"],
                            hp["dropout"], input_shape=x_train.shape[1:], weights=args.weights,
                            preprocessing_mode=hp["preprocessing"], freeze_backbone=freezes_backbone(args.init),
                            init_rule=scratch_init(args.init, hp) or "torchvision")  # new heads: torchvision's
        compile_model(model, hp, steps_per_epoch)
    else:  # this trainer's compile settings, on this machine; the checkpoint's optimizer and its state
        compile_model(model, hp, steps_per_epoch, optimizer=model.optimizer)

    meter = EnergyMeter().start()
    try:
        epoch_images = len(training.epoch_order(len(y_train), training.epoch_seed(args.seed, 1), hp))
        compile_seconds = warm_up(model, x_train, y_train, epoch_images, (data["x_val"], data["x_test"]), hp)
        for epoch in range(len(history) + 1, hp["epochs"] + 1):
            seed = training.epoch_seed(args.seed, epoch)
            with meter.epoch() as energy, training.Timer() as timer:  # the same span as the torch trainer's
                order = training.epoch_order(len(y_train), seed, hp)
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
                               precision_settings=precision_settings, compiled=bool(model.jit_compile))
    metrics = training.build_metrics(args, data, history,
                                     training.test_summary(test_loss, data["y_test"], predictions, class_names),
                                     env, meter.summary(history), compile_seconds=compile_seconds)
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
    except (TrainingError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.variant} seed {args.seed}: test accuracy {metrics['test']['accuracy']:.4f}, "
          f"{metrics['train_seconds']:.1f} s of training", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
