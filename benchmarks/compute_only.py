"""Images/s of a compute-only training loop: same model, batch and precision as the trainer, one
batch already on the device, no data loading. One framework per process.

    python benchmarks/compute_only.py --framework torch --model alexnet --image-size 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workflow"))

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def torch_loop(model_name, image_size, batch_size, steps, warmup, precision, compile_mode):
    import torch
    import torch.nn.functional as F

    from cnnbench.torch_models import build_model
    from cnnbench.torch_trainer import autocast, use_compile

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=5e-4)
    if use_compile({"compile": compile_mode}, device):
        model = torch.compile(model)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        with autocast(device, precision):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start), device.type


def keras_loop(model_name, image_size, batch_size, steps, warmup, precision, compile_mode, backend):
    os.environ["KERAS_BACKEND"] = backend
    import keras
    import numpy as np

    from cnnbench.keras_models import build_model, make_optimizer
    from cnnbench.keras_trainer import gpu_devices

    on_gpu = bool(gpu_devices(backend))
    if on_gpu and precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    model = build_model(model_name, 10, image_size, MEAN, STD)
    hp = {"lr": 0.001, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "lr_schedule": "constant",
          "epochs": 1}
    model.compile(optimizer=make_optimizer(hp, 1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile={"auto": "auto", "on": True, "off": False}[compile_mode])
    rng = np.random.default_rng(0)
    images = keras.ops.convert_to_tensor(rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8))
    labels = keras.ops.convert_to_tensor(rng.integers(0, 10, batch_size))
    for _ in range(warmup):
        model.train_on_batch(images, labels)
    start = time.perf_counter()
    for _ in range(steps - 1):
        model.train_on_batch(images, labels)
    float(model.train_on_batch(images, labels))  # the last loss forces every step to finish
    return steps * batch_size / (time.perf_counter() - start), "gpu" if on_gpu else "cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=["torch", "keras"], required=True)
    parser.add_argument("--model", choices=["alexnet", "vgg16", "resnet50"], required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--keras-backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    args = parser.parse_args()
    common = (args.model, args.image_size, args.batch_size, args.steps, args.warmup, args.precision, args.compile)
    if args.framework == "torch":
        rate, device = torch_loop(*common)
    else:
        rate, device = keras_loop(*common, args.keras_backend)
    print(json.dumps({"images_per_second": rate, "device": device}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
