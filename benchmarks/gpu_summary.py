"""benchmarks/results/gpu-<date>.json from gpu.sh's runs: time, accuracy, images/s and the share of
the GPU's bf16 peak each variant used, and its GPU energy (cnnbench.energy; null without NVML).

Speed is images trained over ``train_seconds``, which excludes the warm-up (``compile_seconds``,
reported beside it). Training FLOPs per image are counted by torch over one real forward and
backward of the variant as it trains (``frozen``: the backbone gets no backward pass), not taken as
3 x the forward; the Keras variants count their torch twins (the same layers).

    python benchmarks/gpu_summary.py --runs RUNS --out-dir DIR --wall-seconds S
    python benchmarks/gpu_summary.py flops --model alexnet --init scratch frozen --image-size 224
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "benchmarks"))

REFERENCE_SECONDS = {"torch-alexnet-scratch": 438.89, "keras-alexnet-scratch": 200.03,
                     "torch-alexnet-pretrained": 473.11, "keras-vgg16-pretrained": 377.25}
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s, data sheets
FLOP_COUNT_BATCH = 2  # BatchNorm in training mode needs more than one value per channel


def _counted_flops(model: str, image_size: int, init: str, backward: bool) -> float:
    """FLOPs per image (a multiply-add counts 2) of a forward, and with ``backward`` of the loss's
    backward too, of ``model`` built as ``init`` trains it; on the meta device: nothing is computed."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from cnnbench.config import freezes_backbone
    from cnnbench.torch_models import build_model

    with torch.device("meta"):
        net = build_model(model, 10, freeze_backbone=freezes_backbone(init)).train()
        images = torch.zeros(FLOP_COUNT_BATCH, 3, image_size, image_size)
        labels = torch.zeros(FLOP_COUNT_BATCH, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        loss = F.cross_entropy(net(images), labels)
        if backward:
            loss.backward()
    return counter.get_total_flops() / FLOP_COUNT_BATCH


def training_flops_per_image(model: str, image_size: int, init: str) -> float:
    """One training step's FLOPs per image: forward, plus the backward that ``init`` really runs
    (no input gradient for the first layer; for ``frozen``, none through the backbone)."""
    return _counted_flops(model, image_size, init, backward=True)


def forward_flops_per_image(model: str, image_size: int) -> float:
    return _counted_flops(model, image_size, "scratch", backward=False)


def variant_figures(metrics: dict, peak: float | None) -> dict:
    images = sum(e["images_per_second"] * e["seconds"] for e in metrics["history"])
    rate = images / metrics["train_seconds"]
    flops = training_flops_per_image(metrics["model"], metrics["config"]["image_size"], metrics["init"])
    compile_seconds = metrics.get("compile_seconds")
    reference = REFERENCE_SECONDS.get(metrics["variant"])
    with_compile = metrics["train_seconds"] + (compile_seconds or 0.0)
    return {
        "train_seconds": metrics["train_seconds"], "compile_seconds": compile_seconds,
        "test_accuracy": metrics["test"]["accuracy"], "images_per_second": rate, "epochs": len(metrics["history"]),
        "training_flops_per_image": flops,
        "share_of_bf16_peak": rate * flops / peak if peak else None,
        "speedup_vs_reference": reference / metrics["train_seconds"] if reference else None,
        "speedup_vs_reference_including_compile": reference / with_compile if reference else None,
        "device": metrics["environment"]["device_name"], "precision": metrics["config"]["precision"],
        "precision_ran": metrics["environment"].get("precision"),
        "keras_backend": metrics["environment"].get("keras_backend"),
        "peak_memory_bytes": (metrics["environment"].get("gpu") or {}).get("peak_memory_bytes"),
        "energy_joules": metrics["energy"]["joules"], "energy_method": metrics["energy"]["method"],
        "watts": metrics["energy"]["joules"] / metrics["train_seconds"] if metrics["energy"]["joules"] else None,
    }


def summarize(args) -> int:
    from pipeline_overhead import machine

    host = machine()
    peak = next((value for name, value in BF16_PEAK.items() if name in host), None)
    variants = {}
    for path in sorted(args.runs.glob("*/seed0/metrics.json")):
        metrics = json.loads(path.read_text())
        figures = variants[metrics["variant"]] = variant_figures(metrics, peak)
        print(f"{metrics['variant']}: {figures['train_seconds']:.1f} s (+ {figures['compile_seconds'] or 0:.1f} s "
              f"compile), test acc {figures['test_accuracy']:.4f}, {figures['images_per_second']:.0f} img/s"
              + (f", {figures['share_of_bf16_peak']:.1%} of bf16 peak" if peak else ""))
    report = {"benchmark": "gpu", "date": date.today().isoformat(), "machine": host, "bf16_peak_flops": peak,
              "wall_seconds": args.wall_seconds, "data": "CIFAR-10 JPEG copy (quality 75), not the pickled batches",
              "targets": {"speedup_vs_reference": 8, "alexnet_scratch_test_accuracy": 0.75},
              "variants": variants}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"gpu-{report['date']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def print_flops(args) -> int:
    forward = forward_flops_per_image(args.model, args.image_size)
    print(json.dumps({init: {"training": training_flops_per_image(args.model, args.image_size, init),
                             "forward": forward} for init in args.init}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    flops = commands.add_parser("flops", help="print training and forward FLOPs per image of a model as JSON, "
                                "per initialisation")
    flops.add_argument("--model", choices=["alexnet", "vgg16", "resnet50"], required=True)
    flops.add_argument("--init", nargs="+", choices=["scratch", "pretrained", "frozen"], required=True)
    flops.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runs", type=Path)
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--wall-seconds", type=float)
    args = parser.parse_args(argv)
    if args.command == "flops":
        return print_flops(args)
    if args.runs is None or args.out_dir is None or args.wall_seconds is None:
        parser.error("the summary needs --runs, --out-dir and --wall-seconds")
    return summarize(args)


if __name__ == "__main__":
    sys.exit(main())
