"""PyTorch trainer: one variant, one seed, data kept on the device as uint8.

Each step gathers a batch by index from the uint8 tensor already on the device, converts,
resizes and normalises it there: no per-image Python work and no resized copy of the dataset.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import gpu, precision, training
from .energy import EnergyMeter
from .fileio import atomic_path
from .config import freezes_backbone
from .torch_models import build_model, trainable_parameters
from .training import EXIT_PREEMPTED, Preempted, StopRequested, TrainingError
from .weights import WeightsError, input_transform


def framework_build() -> gpu.FrameworkBuild:
    return gpu.FrameworkBuild(f"torch {torch.__version__}", torch.version.cuda, "torch.version.cuda is None",
                              "install torch's CUDA wheels (make venv GPU=1), or run in the torch image")


def select_device(require_gpu) -> torch.device:
    """The GPU when torch sees one; else the CPU, unless ``require_gpu`` (true, or auto with a GPU
    expected: gpu.check_gpu) stops the run first."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    gpu.check_gpu(require_gpu, False, framework_build())
    return torch.device("cpu")


def gpu_environment(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    return gpu.gpu_facts(torch.cuda.get_device_name(device), torch.cuda.device_count(), torch.version.cuda,
                         gpu.cudnn_version_string(torch.backends.cudnn.version()),
                         torch.cuda.max_memory_allocated(device))


class Preprocess:
    """uint8 NHWC RGB batch on the device -> float NCHW (channels_last) at ``image_size``, transformed
    as ``preprocessing`` says (``weights.input_transform``: imagenet or caffe)."""

    def __init__(self, image_size: int, mean, std, device: torch.device, preprocessing: str = "imagenet"):
        self.size = image_size
        self.reverse_channels, scale, offset = input_transform(preprocessing, mean, std)
        self.scale = torch.tensor(scale, device=device).view(1, 3, 1, 1)
        self.shift = torch.tensor(offset, device=device).view(1, 3, 1, 1)

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.reverse_channels:
            x = x.flip(1)  # RGB -> BGR
        x = x * self.scale + self.shift
        return x.contiguous(memory_format=torch.channels_last)


def use_compile(hp: dict, device: torch.device) -> bool:
    """torch.compile pays on a GPU over a full run; on a CPU its compile time outweighs short runs."""
    return hp["compile"] == "on" or (hp["compile"] == "auto" and device.type == "cuda")


def autocast(device: torch.device, ran_precision: str):
    """bf16 autocast where the run computes in bf16 (``precision.effective``: on a GPU only). Preprocessing
    runs before it; the head (torch_models.Float32Linear) and the loss run in float32. BatchNorm keeps its
    float32 parameters and statistics under it (autocast casts no BatchNorm)."""
    if device.type == "cuda" and ran_precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timer stopped next has it inside."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, scheduler, images, labels, device, ran_precision):
    """One optimizer step on a preprocessed batch; returns its loss and logits."""
    with autocast(device, ran_precision):
        logits = model(images)
    loss = F.cross_entropy(logits, labels)  # on float32 logits
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss, logits


def eval_logits(model, images, device, ran_precision):
    """The logits of a preprocessed batch, as evaluation computes them (call under no_grad, model in eval mode)."""
    with autocast(device, ran_precision):
        return model(images)


def train_one_epoch(model, optimizer, scheduler, x, y, preprocess, hp, device, ran_precision, epoch_seed, stop,
                    desc):
    model.train()  # a frozen backbone stays in inference mode (torch_models.freeze)
    torch.manual_seed(epoch_seed)  # dropout masks of this epoch
    order = torch.from_numpy(training.epoch_order(len(y), epoch_seed, hp)).to(device)
    batch_size = hp["batch_size"]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    with training.progress(len(order), desc) as bar:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            labels = y[index]
            loss, logits = train_step(model, optimizer, scheduler, preprocess(x[index]), labels, device,
                                      ran_precision)
            loss_sum += loss.detach() * len(index)
            correct += (logits.argmax(1) == labels).sum()
            bar.update(len(index))
            if stop.after_step():
                raise Preempted
    return loss_sum.item() / len(order), correct.item() / len(order), len(order)


@torch.no_grad()
def evaluate(model, x, y, preprocess, hp, device, ran_precision):
    model.eval()
    loss_sum = torch.zeros((), device=device)
    predictions = []
    for start in range(0, len(y), hp["eval_batch_size"]):
        images, labels = preprocess(x[start:start + hp["eval_batch_size"]]), y[start:start + hp["eval_batch_size"]]
        logits = eval_logits(model, images, device, ran_precision)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        predictions.append(logits.argmax(1))
    predictions = torch.cat(predictions)
    return loss_sum.item() / len(y), (predictions == y).float().mean().item(), predictions.cpu().numpy()


def batch_sizes(num_images: int, batch_size: int) -> list[int]:
    """The sizes of the batches a pass over ``num_images`` takes: the full one, and the partial last one."""
    return sorted({min(batch_size, num_images), num_images % batch_size} - {0}, reverse=True)


def warm_up_batches(x_train, y_train, eval_sets, hp) -> tuple[list, list]:
    """A batch of real images for each batch shape the run will use: (training (images, labels) pairs,
    evaluation images). An epoch trains on ``training.epoch_order``'s images (``max_steps_per_epoch``
    cuts them); evaluation runs over each of ``eval_sets`` (validation, test)."""
    per_epoch = len(training.epoch_order(len(y_train), 0, hp))
    train = [(x_train[:size], y_train[:size]) for size in batch_sizes(per_epoch, hp["batch_size"])]
    evaluation = {size: x[:size] for x in eval_sets for size in batch_sizes(len(x), hp["eval_batch_size"])}
    return train, list(evaluation.values())


def host_copy(state):
    """A deep copy of a state_dict with its tensors in host memory (a snapshot that takes no GPU memory)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: host_copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(value) for value in state)
    return copy.deepcopy(state)


def random_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def state_kept(network, optimizer, scheduler, device):
    """Put back on exit, after an exception too, all that training steps change: the weights and buffers
    (BatchNorm statistics), the gradients, the optimizer's state (none before its first step), the
    scheduler's, the modules' train/eval mode and the random streams (dropout)."""
    parameters = list(network.parameters())
    saved = host_copy({"model": network.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "grads": [p.grad for p in parameters]})
    modes, rng = [module.training for module in network.modules()], random_state(device)
    try:
        yield
    finally:
        network.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])  # moves its tensors back to their parameters' device
        scheduler.load_state_dict(saved["scheduler"])
        for parameter, grad in zip(parameters, saved["grads"]):
            parameter.grad = None if grad is None else grad.to(parameter.device)
        for module, mode in zip(network.modules(), modes):
            module.training = mode
        set_random_state(rng)


def warm_up(model, network, optimizer, scheduler, preprocess, batches, device, ran_precision) -> float:
    """Run ``model`` through each batch shape of ``batches`` (``warm_up_batches``): a training step on each
    training one, an evaluation forward on each evaluation one. The first call of a shape is where
    torch.compile compiles (again for each new shape), cuDNN picks its algorithms and CUDA loads its
    libraries: here, before the first timed step. The run's state is then as before (``state_kept``;
    ``network``: the plain module, which ``model`` may wrap). Returns the seconds it took."""
    train_batches, eval_batches = batches
    with training.Timer() as timer:
        with state_kept(network, optimizer, scheduler, device):
            model.train()
            for images, labels in train_batches:
                train_step(model, optimizer, scheduler, preprocess(images), labels, device, ran_precision)
            model.eval()
            with torch.no_grad():
                for images in eval_batches:
                    eval_logits(model, preprocess(images), device, ran_precision)
        synchronize(device)
    return timer.seconds


COMPILER_HELP = ("install a C/C++ compiler and the Python headers (e.g. `apt-get install gcc g++ python3-dev`) "
                 "or train in the torch image (containers/torch.def)")


def first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "no message")


def compile_and_warm_up(network, optimizer, scheduler, preprocess, batches, device, ran_precision, hp):
    """(the model to train, whether it is compiled, the seconds before the first timed step): ``network``
    torch.compile'd where ``use_compile`` says so, else itself, warmed up (``warm_up``). torch.compile
    compiles at the first call, so a missing compiler shows in the warm-up: then ``compile: auto``
    trains the plain module, ``compile: on`` stops with what to install."""
    def warm(model) -> float:
        return warm_up(model, network, optimizer, scheduler, preprocess, batches, device, ran_precision)

    if not use_compile(hp, device):
        return network, False, warm(network)
    print(f"compiling the model with torch.compile (compile: {hp['compile']})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    compiled = torch.compile(network)
    try:
        return compiled, True, warm(compiled)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # InvalidCxxCompiler, Triton's "Failed to find C compiler", BackendCompilerFailed
        failure = err
    reason = f"{type(failure).__name__}: {first_line(failure)}"
    torch._dynamo.reset()
    warm(network)  # a fault of the model, not of the compiler, fails here again, as itself
    if hp["compile"] == "on":
        raise TrainingError(f"torch.compile failed ({reason}), and compile: on asks for it: {COMPILER_HELP}; "
                            "or set compile: auto (trains uncompiled where compiling fails) or off.") from failure
    print(f"torch.compile failed ({reason}); the run continues uncompiled (compile: auto). To compile, "
          f"{COMPILER_HELP}.", file=sys.stderr, flush=True)
    return network, False, time.perf_counter() - started


def make_scheduler(optimizer, hp, steps_per_epoch: int):
    """Stepped once per batch (the Keras trainer's schedules count steps too)."""
    if hp["lr_schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp["epochs"] * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def save_checkpoint(path: Path, model, optimizer, scheduler, history, fingerprint) -> None:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "history": history, "fingerprint": fingerprint,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler, fingerprint) -> list[dict]:
    """Restore a matching checkpoint; return the history so far ([] to start afresh)."""
    if not path.exists():
        return []
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        print(f"ignoring checkpoint {path}: it was written by another configuration", file=sys.stderr)
        return []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    print(f"resuming from {path} after epoch {len(state['history'])}", file=sys.stderr, flush=True)
    return state["history"]


def run(args: training.RunArgs) -> dict:
    hp = args.hparams
    stop = StopRequested(args.run_dir)
    device = select_device(hp["require_gpu"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ran_precision, precision_settings = precision.apply("torch", hp["precision"], device.type == "cuda")
    data = training.load_data(args)
    class_names = data["class_names"]

    torch.manual_seed(args.seed)
    # Checkpoints and the saved model hold the plain module's state (network); a compiled one only trains.
    # Either scratch_init is torchvision's init here: torch's users start from torchvision's constructors.
    network = build_model(args.model, len(class_names), hp["dropout"], args.weights,
                          freeze_backbone=freezes_backbone(args.init), head_seed=training.head_seed(args))
    network = network.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(trainable_parameters(network), lr=hp["lr"], momentum=hp["momentum"],
                                weight_decay=hp["weight_decay"], nesterov=hp["nesterov"])
    scheduler = make_scheduler(optimizer, hp, steps_per_epoch=-(-len(data["y_train"]) // hp["batch_size"]))
    fingerprint = training.run_fingerprint(args, data["sha256"])
    checkpoint = args.checkpoint_dir / "last.pt"
    history = load_checkpoint(checkpoint, network, optimizer, scheduler, fingerprint)

    def on_device(name, dtype=None):
        return torch.from_numpy(data[name]).to(device, dtype)

    x_train, y_train = on_device("x_train"), on_device("y_train", torch.long)
    x_val, y_val = on_device("x_val"), on_device("y_val", torch.long)
    x_test, y_test = on_device("x_test"), on_device("y_test", torch.long)
    preprocess = Preprocess(hp["image_size"], hp["mean"], hp["std"], device, hp["preprocessing"])

    batches = warm_up_batches(x_train, y_train, (x_val, x_test), hp)

    device_uuid = torch.cuda.get_device_properties(device).uuid if device.type == "cuda" else None  # NVML's board
    meter = EnergyMeter(device_uuid=device_uuid).start()
    try:
        # Outside the epochs' timers and energy: compile_seconds in the metrics.
        model, compiled, compile_seconds = compile_and_warm_up(network, optimizer, scheduler, preprocess, batches,
                                                               device, ran_precision, hp)
        print(f"warm-up ({'compiled' if compiled else 'uncompiled'}): each batch shape once, "
              f"{compile_seconds:.1f} s before the first timed step", file=sys.stderr, flush=True)
        for epoch in range(len(history) + 1, hp["epochs"] + 1):
            with meter.epoch() as energy, training.Timer() as timer:
                train_loss, train_acc, trained = train_one_epoch(
                    model, optimizer, scheduler, x_train, y_train, preprocess, hp, device, ran_precision,
                    training.epoch_seed(args.seed, epoch), stop, f"epoch {epoch}/{hp['epochs']}")
                synchronize(device)
            training.check_finite(train_loss, epoch, hp)
            val_loss, val_acc, _ = evaluate(model, x_val, y_val, preprocess, hp, device, ran_precision)
            record = training.epoch_record(epoch, train_loss, train_acc, val_loss, val_acc, timer.seconds, trained,
                                           energy.joules)
            history.append(record)
            training.log_epoch(record, hp["epochs"])
            save_checkpoint(checkpoint, network, optimizer, scheduler, history, fingerprint)
    except torch.cuda.OutOfMemoryError as err:
        raise TrainingError(f"CUDA ran out of memory with batch_size={hp['batch_size']} "
                            f"(eval_batch_size={hp['eval_batch_size']}) at image_size={hp['image_size']}: "
                            "lower them for this variant in the config (variant_overrides).") from err
    finally:
        meter.stop()

    test_loss, _, predictions = evaluate(model, x_test, y_test, preprocess, hp, device, ran_precision)
    with atomic_path(args.model_out) as tmp:
        torch.save(network.state_dict(), tmp)
    env = training.environment(
        device.type, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch.__version__, args.container, args.started_at, compiled=compiled, gpu=gpu_environment(device),
        cuda_build=torch.version.cuda, precision=ran_precision, precision_settings=precision_settings)
    metrics = training.build_metrics(args, data, history,
                                     training.test_summary(test_loss, data["y_test"], predictions, class_names),
                                     env, meter.summary(history), compile_seconds=compile_seconds)
    training.finish(args, metrics, stop)
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = training.parse_args("torch", argv)
    try:
        training.preflight()  # before the data is loaded and the framework starts on the GPU
        metrics = run(args)
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
