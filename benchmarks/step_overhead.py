"""Step overhead: each trainer's own epoch loop against its framework's fastest idiomatic loop.

On an overhead-bound model (a tiny convnet at 32x32, batch 64: conv-relu-pool x2 + dense) the time
of a step is mostly the loop around it, so the ratio shows what the trainer's loop costs:

- torch: ``torch_trainer.train_one_epoch`` against a plain loop over the device-resident data
  (index, preprocess, forward, loss, backward, step; no ``.item()`` per step);
- Keras (on TensorFlow, on JAX): ``keras_trainer.train_one_epoch`` against ``model.fit`` with
  ``steps_per_execution`` on the same arrays.

Both sides gather the uint8 batch by index and preprocess it (the Keras model does it inside), train
the same model with the same optimizer and precision; each framework runs in its own process, one
after the other. Per loop: one warm-up epoch (compiling), then ``--repeats`` timed epochs,
alternating trainer and idiomatic loop; the medians are compared. Target: >= 0.90 each. Writes
benchmarks/results/step_overhead-[<label>-]<date>-<device>.json with the machine, the command line
and the commit.

    python benchmarks/step_overhead.py                          # torch, keras-tensorflow, keras-jax
    python benchmarks/step_overhead.py --label before           # named as a figure before a change
    python benchmarks/step_overhead.py --trainers torch keras-jax --precision bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TRAINERS = ["torch", "keras-tensorflow", "keras-jax"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
IMAGE_SIZE, CHANNELS, NUM_CLASSES = 32, (16, 32), 10
TARGET = 0.90


def hparams(args) -> dict:
    """The trainers' hyperparameters for this benchmark (constant lr: the schedule is not measured)."""
    return {"epochs": 1, "batch_size": args.batch_size, "eval_batch_size": 256, "optimizer": "sgd", "lr": 0.01,
            "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "lr_schedule": "constant", "dropout": 0.0,
            "image_size": IMAGE_SIZE, "preprocessing": "imagenet", "mean": MEAN, "std": STD,
            "precision": args.precision, "require_gpu": False, "compile": args.compile,
            "steps_per_execution": args.steps_per_execution}


def dataset(steps: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` batches of random uint8 NHWC images and labels."""
    rng = np.random.default_rng(0)
    count = steps * batch_size
    return (rng.integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            rng.integers(0, NUM_CLASSES, count).astype(np.int64))


def timed(epoch, repeats: int, images: int) -> list[float]:
    """images/s of ``repeats`` calls of ``epoch(seed)``, each of which returns once its work is done."""
    rates = []
    for repeat in range(repeats):
        start = time.perf_counter()
        epoch(repeat + 1)
        rates.append(images / (time.perf_counter() - start))
    return rates


def compare(trainer_epoch, idiomatic_epoch, repeats: int, images: int) -> dict:
    """One warm-up epoch of each, then timed epochs alternating the two (so drift hits both alike)."""
    trainer_epoch(0)
    idiomatic_epoch(0)
    trainer, idiomatic = [], []
    for _ in range(repeats):
        trainer += timed(trainer_epoch, 1, images)
        idiomatic += timed(idiomatic_epoch, 1, images)
    return {"trainer_images_per_second": statistics.median(trainer),
            "idiomatic_images_per_second": statistics.median(idiomatic),
            "ratio": statistics.median(trainer) / statistics.median(idiomatic),
            "repeats": {"trainer": trainer, "idiomatic": idiomatic}}


def torch_worker(args, run_dir: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from cnnbench import precision
    from cnnbench.torch_trainer import Preprocess, autocast, make_scheduler, train_one_epoch, use_compile
    from cnnbench.training import StopRequested

    hp = hparams(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ran, _ = precision.apply("torch", hp["precision"], device.type == "cuda")
    images, labels = dataset(args.steps, args.batch_size)
    x, y = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    preprocess = Preprocess(IMAGE_SIZE, MEAN, STD, device, "imagenet")

    def build():
        torch.manual_seed(0)
        width = CHANNELS[1] * (IMAGE_SIZE // 4) ** 2
        model = nn.Sequential(nn.Conv2d(3, CHANNELS[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(CHANNELS[0], CHANNELS[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(width, NUM_CLASSES))
        model = model.to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                                    weight_decay=hp["weight_decay"])
        return (torch.compile(model) if use_compile(hp, device) else model), optimizer

    model, optimizer = build()
    scheduler = make_scheduler(optimizer, hp, args.steps)
    stop = StopRequested(run_dir)

    def trainer_epoch(seed):
        train_one_epoch(model, optimizer, scheduler, x, y, preprocess, hp, device, ran, seed, stop, "trainer")

    plain_model, plain_optimizer = build()

    def idiomatic_epoch(seed):
        plain_model.train()
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels))).to(device)
        for start in range(0, len(labels), args.batch_size):
            index = order[start:start + args.batch_size]
            with autocast(device, hp["precision"]):
                loss = F.cross_entropy(plain_model(preprocess(x[index])), y[index])
            plain_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            plain_optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    figures = compare(trainer_epoch, idiomatic_epoch, args.repeats, len(labels))
    return {**figures, "device": device.type, "precision": ran, "compiled": use_compile(hp, device),
            "framework_version": f"torch {torch.__version__}",
            "trainer_loop": "torch_trainer.train_one_epoch",
            "idiomatic_loop": "plain loop over device-resident batches, no .item() per step"}


def keras_tiny_convnet(keras):
    from cnnbench.keras_models import preprocessing

    layers = keras.layers
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8", name="images")
    x = preprocessing(inputs, IMAGE_SIZE, MEAN, STD)
    for filters in CHANNELS:
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    outputs = layers.Dense(NUM_CLASSES, dtype="float32")(layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def keras_worker(args, run_dir: Path, backend: str) -> dict:
    from cnnbench import keras_trainer, precision, training
    from cnnbench.training import StopRequested

    keras = keras_trainer.import_keras(backend)
    from cnnbench.keras_models import make_optimizer

    hp = hparams(args)
    on_gpu = bool(keras_trainer.gpu_devices(backend))
    ran, _ = precision.apply(backend, hp["precision"], on_gpu)
    if ran == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    images, labels = dataset(args.steps, args.batch_size)
    keras.utils.set_random_seed(0)
    model = keras_tiny_convnet(keras)
    keras_trainer.compile_model(model, hp, args.steps)
    x, y = images, labels  # the trainer's fit takes host arrays and gathers each epoch's order itself
    stop = StopRequested(run_dir)

    def trainer_epoch(seed):
        keras_trainer.train_one_epoch(model, x, y, training.epoch_order(len(labels), seed, hp), hp, stop, "trainer")

    keras.utils.set_random_seed(0)
    fit_model = keras_tiny_convnet(keras)
    fit_model.compile(optimizer=make_optimizer(hp, steps_per_epoch=args.steps),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile={"auto": "auto", "on": True, "off": False}[hp["compile"]],
                      steps_per_execution=keras_trainer.steps_per_execution(backend))

    def idiomatic_epoch(seed):
        keras.utils.set_random_seed(seed)
        fit_model.fit(images, labels, batch_size=args.batch_size, epochs=1, shuffle=True, verbose=0)

    figures = compare(trainer_epoch, idiomatic_epoch, args.repeats, len(labels))
    return {**figures, "device": "gpu" if on_gpu else "cpu", "precision": ran,
            "framework_version": f"keras {keras.__version__}, {backend} {keras_trainer.backend_version(backend)}",
            "trainer_loop": "keras_trainer.train_one_epoch",
            "idiomatic_loop": f"model.fit, steps_per_execution={keras_trainer.steps_per_execution(backend)}"}


def run_worker(args) -> int:
    with tempfile.TemporaryDirectory() as run_dir:
        if args.worker == "torch":
            figures = torch_worker(args, Path(run_dir))
        else:
            figures = keras_worker(args, Path(run_dir), args.worker.removeprefix("keras-"))
    print(json.dumps(figures))
    return 0


def machine_facts() -> dict:
    from pipeline_overhead import machine

    return {"description": machine(), "cores": os.cpu_count(), "load_average": list(os.getloadavg())}


def git_commit() -> dict:
    """The commit the code ran at, and whether the trainers' code (workflow/) had changes beyond it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None,
            "workflow_changed": bool(git("status", "--porcelain", "workflow"))}


def worker_command(args, trainer: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", trainer, "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--precision", args.precision,
            "--compile", args.compile, "--steps-per-execution", str(args.steps_per_execution)]


def run_all(args) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    before = machine_facts()
    results = {}
    for trainer in args.trainers:
        result = subprocess.run(worker_command(args, trainer), capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit(f"step_overhead: {trainer} failed:\n{result.stderr[-3000:]}")
        results[trainer] = json.loads(result.stdout.strip().splitlines()[-1])
        figures = results[trainer]
        print(f"{trainer}: trainer {figures['trainer_images_per_second']:.0f} img/s, idiomatic "
              f"{figures['idiomatic_images_per_second']:.0f} img/s, ratio {figures['ratio']:.3f}", flush=True)
    after = machine_facts()
    device = next(iter(results.values()))["device"]
    report = {"benchmark": "step_overhead", "date": date.today().isoformat(), "label": args.label,
              "machine": {**before, "load_average_after": after["load_average"]},
              "command": shlex.join(["python", *sys.argv]), **git_commit(), "note": args.note,
              "model": f"tiny convnet: (conv3x3-relu-maxpool) x2 ({CHANNELS[0]}, {CHANNELS[1]} filters) + dense, "
                       f"{IMAGE_SIZE}x{IMAGE_SIZE} uint8 input",
              "batch_size": args.batch_size, "steps_per_epoch": args.steps, "repeats": args.repeats,
              "precision": args.precision, "target": TARGET,
              "ratio": {trainer: figures["ratio"] for trainer, figures in results.items()}, "trainers": results}
    name = "-".join(filter(None, ["step_overhead", args.label, report["date"], device]))
    out = args.out or ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=TRAINERS)
    parser.add_argument("--steps", type=int, default=100, help="training steps per timed epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per loop (the median counts)")
    parser.add_argument("--steps-per-execution", type=int, default=25, help="model.fit's, for the idiomatic loop")
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--label", help="a word in the file name, e.g. before (a figure before a change)")
    parser.add_argument("--note", help="recorded in the result, e.g. which trainer loop ran")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run_worker(args) if args.worker else run_all(args)


if __name__ == "__main__":
    sys.exit(main())
