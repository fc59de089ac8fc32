"""Pipeline overhead: the real trainer's images/s over a compute-only loop's, side by side.

For each variant: the trainer (cnnbench.*_trainer, data on the device, batches gathered, resized
and normalised per step) trains 2 short epochs on generated data; its second epoch's images/s is
divided by compute_only.py's (same model, batch, precision; one batch already on the device).
Target: at least 0.90. Writes benchmarks/results/pipeline_overhead-<date>-<device>.json.

    python benchmarks/pipeline_overhead.py                      # CPU here: 64x64
    python benchmarks/pipeline_overhead.py --image-size 224     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))
VARIANTS = ["torch-alexnet-scratch", "keras-alexnet-scratch", "torch-alexnet-pretrained", "keras-vgg16-pretrained"]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if shutil.which("nvidia-smi") else ""
    return f"{os.cpu_count()} cores {cpu}" + (f", GPU {gpu}" if gpu else ", no GPU")


def run_json(cmd, env):
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{result.stderr[-3000:]}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="training steps per measured epoch")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--keras-backend", default="tensorflow")
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from cnnbench.data import prepare

    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    hp = {"epochs": 2, "batch_size": args.batch_size, "eval_batch_size": 256, "optimizer": "sgd", "lr": 0.001,
          "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "lr_schedule": "constant", "dropout": 0.5,
          "image_size": args.image_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
          "precision": args.precision, "require_gpu": False, "compile": "auto",
          "max_steps_per_epoch": args.steps}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_class = -(-args.steps * args.batch_size // 10)
        prepare({"source": "synthetic", "val_size": 100, "split_seed": 0,
                 "synthetic": {"train_per_class": per_class + 10, "test_per_class": 10}}, tmp / "data.npz")
        for variant in args.variants:
            framework, model, init = variant.split("-")
            run_dir = tmp / variant
            cmd = [sys.executable, "-m", f"cnnbench.{framework}_trainer", "--variant", variant, "--seed", "0",
                   "--data", tmp / "data.npz", "--hparams", json.dumps(hp), "--run-dir", run_dir,
                   "--metrics", run_dir / "metrics.json",
                   "--model-out", run_dir / ("model.pt" if framework == "torch" else "model.keras")]
            if framework == "keras":
                cmd += ["--keras-backend", args.keras_backend]
            if init == "pretrained":
                weights = tmp / f"{variant}.weights" / ("w.pth" if framework == "torch" else "w.h5")
                run_json([sys.executable, "-m", f"cnnbench.{framework}_models", "standin", "--model", model,
                          "--out", weights], env)
                cmd += ["--weights", weights, "--weights-source", "standin"]
            run_json(cmd, env)
            trainer = json.loads((run_dir / "metrics.json").read_text())["history"][-1]["images_per_second"]
            compute = json.loads(run_json(
                [sys.executable, str(ROOT / "benchmarks" / "compute_only.py"), "--framework", framework, "--model",
                 model, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--steps",
                 str(args.steps), "--precision", args.precision, "--keras-backend", args.keras_backend],
                env).stdout.strip().splitlines()[-1])
            results[variant] = {"trainer_images_per_second": trainer,
                                "compute_only_images_per_second": compute["images_per_second"],
                                "pipeline_ratio": trainer / compute["images_per_second"], "device": compute["device"]}
            print(f"{variant}: trainer {trainer:.1f} img/s, compute-only {compute['images_per_second']:.1f} img/s, "
                  f"ratio {results[variant]['pipeline_ratio']:.3f}", flush=True)
    device = next(iter(results.values()))["device"]
    report = {"benchmark": "pipeline_overhead", "date": date.today().isoformat(), "machine": machine(),
              "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
              "precision": args.precision, "keras_backend": args.keras_backend, "target": 0.90,
              "pipeline_ratio": {v: r["pipeline_ratio"] for v, r in results.items()}, "variants": results,
              "command": shlex.join(["python", *sys.argv])}
    out = args.out or ROOT / "benchmarks" / "results" / f"pipeline_overhead-{report['date']}-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
