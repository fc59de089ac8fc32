"""benchmarks/results/gpu-<date>.json from gpu.sh's runs: time, accuracy, images/s and the share of
the GPU's bf16 peak each variant used (training FLOPs per image = 3 x forward, counted by torch), and its
GPU energy (cnnbench.energy; null without NVML)."""

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


def training_flops_per_image(model: str, image_size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cnnbench.torch_models import build_model

    net = build_model(model, 10).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, image_size, image_size))
    return 3.0 * counter.get_total_flops()  # forward + backward (about twice the forward)


def main() -> int:
    from pipeline_overhead import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--wall-seconds", type=float, required=True)
    args = parser.parse_args()
    host = machine()
    peak = next((value for name, value in BF16_PEAK.items() if name in host), None)
    variants = {}
    for path in sorted(args.runs.glob("*/seed0/metrics.json")):
        metrics = json.loads(path.read_text())
        images = sum(e["images_per_second"] * e["seconds"] for e in metrics["history"])
        rate = images / metrics["train_seconds"]
        flops = training_flops_per_image(metrics["model"], metrics["config"]["image_size"])
        reference = REFERENCE_SECONDS.get(metrics["variant"])
        variants[metrics["variant"]] = {
            "train_seconds": metrics["train_seconds"], "test_accuracy": metrics["test"]["accuracy"],
            "images_per_second": rate, "epochs": len(metrics["history"]),
            "training_flops_per_image": flops,
            "share_of_bf16_peak": rate * flops / peak if peak else None,
            "speedup_vs_reference": reference / metrics["train_seconds"] if reference else None,
            "device": metrics["environment"]["device_name"], "precision": metrics["config"]["precision"],
            "keras_backend": metrics["environment"].get("keras_backend"),
            "energy_joules": metrics["energy"]["joules"], "energy_method": metrics["energy"]["method"],
        }
        print(f"{metrics['variant']}: {metrics['train_seconds']:.1f} s, test acc {metrics['test']['accuracy']:.4f}, "
              f"{rate:.0f} img/s" + (f", {variants[metrics['variant']]['share_of_bf16_peak']:.1%} of bf16 peak"
                                    if peak else ""))
    report = {"benchmark": "gpu", "date": date.today().isoformat(), "machine": host, "bf16_peak_flops": peak,
              "wall_seconds": args.wall_seconds, "data": "CIFAR-10 JPEG copy (quality 75), not the pickled batches",
              "targets": {"speedup_vs_reference": 8, "alexnet_scratch_test_accuracy": 0.75},
              "variants": variants}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"gpu-{report['date']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
