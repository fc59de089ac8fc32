"""Peak resident memory of one trainer process on the full CIFAR-10 JPEG archive at 224x224.

Prepares ../shared/data/cifar10-jpeg.tar.xz (all 60,000 images; cached in --work), then runs the
torch trainer (or --framework keras) for --steps steps at 224x224 and reads the child's peak RSS.
Target: under 4 GB. Writes benchmarks/results/memory-<date>-<framework>.json, with the command line.
The committed results came from:

    python benchmarks/memory.py --steps 50
    python benchmarks/memory.py --steps 50 --framework keras
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    from pipeline_overhead import machine

    from cnnbench.data import prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnbench-memory"))
    parser.add_argument("--framework", choices=["torch", "keras"], default="torch")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    data = args.work / "cifar10-jpeg.npz"
    if not data.exists():
        prepare({"source": "imagefolder", "imagefolder": {"path": str(args.archive)}, "val_size": 5000,
                 "split_seed": 0}, data)
    hp = {"epochs": 1, "batch_size": 64, "eval_batch_size": 256, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
          "nesterov": False, "weight_decay": 5e-4, "lr_schedule": "constant", "dropout": 0.5,
          "image_size": args.image_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
          "precision": "fp32", "require_gpu": False, "compile": "auto", "max_steps_per_epoch": args.steps}
    run_dir = args.work / f"run-{args.framework}"
    variant = f"{args.framework}-alexnet-scratch"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"cnnbench.{args.framework}_trainer", "--variant", variant, "--seed", "0",
                    "--data", str(data), "--hparams", json.dumps(hp), "--run-dir", str(run_dir),
                    "--metrics", str(run_dir / "metrics.json"),
                    "--model-out", str(run_dir / ("model.pt" if args.framework == "torch" else "model.keras"))],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "TF_CPP_MIN_LOG_LEVEL": "2"})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = {"benchmark": "memory", "date": date.today().isoformat(), "machine": machine(),
              "variant": variant, "image_size": args.image_size, "steps": args.steps,
              "train_images": metrics["data"]["train_size"], "peak_rss_bytes": peak, "target_bytes": 4 * 10**9,
              "wall_seconds": time.perf_counter() - start, "device": metrics["environment"]["device"],
              "command": shlex.join(["python", *sys.argv])}
    out = args.out or ROOT / "benchmarks" / "results" / f"memory-{report['date']}-{args.framework}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{variant}: peak RSS {peak / 1e9:.2f} GB over {args.steps} steps on {report['train_images']} "
          f"training images at {args.image_size}x{args.image_size}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
