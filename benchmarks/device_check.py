"""The JSON side of benchmarks/device-check.sh: GPU facts, the figures of its short trainer runs,
the epochs the GPU run can afford, and the summary. One framework per process.

    python benchmarks/device_check.py imports --wheels .whl
    python benchmarks/device_check.py facts torch --require-gpu --variants torch-alexnet-pretrained
    python benchmarks/device_check.py facts keras --require-gpu        # Keras on KERAS_BACKEND (jax)
    python benchmarks/device_check.py epochs --work WORK --left 300 --variants torch-alexnet-pretrained
    python benchmarks/device_check.py summary --work WORK --out OUT/device-check.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import xml.etree.ElementTree as ElementTree
from datetime import date
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHORT_RUNS = {"torch": "torch-alexnet-scratch", "keras": "keras-alexnet-scratch"}  # the short run's variant
# What the trainers, the report and the tests import (module: distribution), found without importing:
# TensorFlow (absent there) and torch never share a process.
MODULES = {"torch": "torch", "torchvision": "torchvision", "jax": "jax", "keras": "keras", "jsonschema": "jsonschema",
           "numpy": "numpy", "yaml": "PyYAML", "tqdm": "tqdm", "PIL": "pillow", "pandas": "pandas", "scipy": "scipy",
           "matplotlib": "matplotlib", "tabulate": "tabulate", "h5py": "h5py", "pynvml": "nvidia-ml-py",
           "pytest": "pytest"}
GPU_SH_FIXED_SECONDS = 40  # gpu.sh's own work besides training: stand-in weights, report, summary
PLAN_MARGIN = 1.15  # the GPU run is sized from estimates; past its time limit it would leave no summary


def version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def imports(args) -> int:
    """Where each module the check needs comes from (and its version); exit 1 naming the missing."""
    from importlib.util import find_spec

    found = {module: {"origin": getattr(find_spec(module), "origin", None), "version": version(distribution)}
             for module, distribution in MODULES.items()}
    missing = [module for module, where in found.items() if where["origin"] is None]
    wheels = sorted(path.name for path in args.wheels.glob("*.whl")) if args.wheels else []
    print(json.dumps({"python": sys.executable, "wheels": wheels, "modules": found, "missing": missing}, indent=2))
    if missing:
        print(f"device_check: {sys.executable} cannot import {', '.join(missing)}: add their wheels to the wheel "
              "folder (benchmarks/device-wheels.sh)", file=sys.stderr)
        return 1
    return 0


def torch_facts(image_size: int, variants: list[str]) -> dict:
    import torch

    from cnnbench import gpu
    from gpu_summary import training_flops_per_image

    facts = {"framework": "torch", "python": sys.executable, "torch": torch.__version__,
             "torchvision": version("torchvision"), "triton": version("triton"), "cuda_build": torch.version.cuda,
             "cudnn": gpu.cudnn_version_string(torch.backends.cudnn.version()),
             "driver": gpu.host_gpus().driver_version, "gpu": torch.cuda.is_available(), "image_size": image_size,
             "training_flops_per_image": {variant: training_flops_per_image(variant.split("-")[1], image_size,
                                                                            variant.split("-")[2])
                                          for variant in {*variants, *SHORT_RUNS.values()}}}
    if facts["gpu"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                     multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory,
                     device_count=torch.cuda.device_count())
    return facts


def keras_facts() -> dict:
    from cnnbench import gpu, keras_trainer

    backend = os.environ.get("KERAS_BACKEND", "jax")
    keras = keras_trainer.import_keras(backend)
    devices = keras_trainer.gpu_devices(backend)
    cuda, cudnn = keras_trainer.cuda_build(backend)
    facts = {"framework": "keras", "python": sys.executable, "keras": keras.__version__, "backend": backend,
             "backend_version": keras_trainer.backend_version(backend), "jaxlib": version("jaxlib"),
             "cuda_build": cuda, "cudnn": cudnn, "driver": gpu.host_gpus().driver_version, "gpu": bool(devices),
             "jax_platforms": os.environ.get("JAX_PLATFORMS")}
    if devices:
        facts.update(device_name=keras_trainer.gpu_name(backend, devices), device_count=len(devices))
    return facts


def facts(args) -> int:
    found = torch_facts(args.image_size, args.variants) if args.framework == "torch" else keras_facts()
    print(json.dumps(found, indent=2))
    if args.require_gpu and not found["gpu"]:
        print(f"device_check: {args.framework} sees no GPU, and this check requires one: run it on the lent GPU "
              "machine, or rehearse it on the CPU with REHEARSAL=cpu", file=sys.stderr)
        return 1
    return 0


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def short_run(work: Path, framework: str) -> tuple[dict | None, dict | None]:
    """The short run's metrics and its step record (seconds, status)."""
    metrics = read_json(work / f"short-{framework}" / "runs" / SHORT_RUNS[framework] / "seed0" / "metrics.json")
    return metrics, read_json(work / "steps" / f"train-{framework}.json")


def trainer_figures(work: Path, framework: str) -> dict | None:
    """What the short run of ``framework`` says: compile seconds, its images/s over compute-only's,
    memory peak and energy (train_seconds and energy exclude the compile)."""
    metrics, _ = short_run(work, framework)
    if metrics is None:
        return None
    last = metrics["history"][-1]
    compute = read_json(work / "results" / f"compute-{framework}.json")
    compute_rate = compute["images_per_second"] if compute else None
    joules = metrics["energy"]["joules"]
    return {"variant": metrics["variant"], "compile_seconds": metrics.get("compile_seconds"),
            "train_seconds": metrics["train_seconds"], "images_per_second": last["images_per_second"],
            "compute_only_images_per_second": compute_rate,
            "trainer_over_compute_only": last["images_per_second"] / compute_rate if compute_rate else None,
            "peak_memory_bytes": (metrics["environment"].get("gpu") or {}).get("peak_memory_bytes"),
            "precision": metrics["environment"].get("precision"), "device": metrics["environment"]["device_name"],
            "energy_method": metrics["energy"]["method"], "energy_joules": joules,
            "watts": joules / metrics["train_seconds"] if joules else None}


def variant_cost(work: Path, variant: str, flops: dict) -> tuple[float, float]:
    """(fixed seconds, seconds per full epoch) of ``variant`` in the GPU run, estimated from its framework's
    short run of AlexNet: its speed scaled by the two variants' training FLOPs (never faster than
    AlexNet's), every training and validation image counted as a training step; fixed = that step's
    time besides training (start, compile, evaluation), doubled for a model of more FLOPs (a larger
    compile), plus the test set at a third of a training image."""
    framework = variant.split("-")[0]
    metrics, record = short_run(work, framework)
    if metrics is None or record is None:
        raise SystemExit(f"device_check: no short {framework} run to size the GPU run from (see its log)")
    scale = max(1.0, flops[variant] / flops[SHORT_RUNS[framework]])
    rate = metrics["history"][-1]["images_per_second"] / scale
    data = metrics["data"]
    fixed = (record["seconds"] - metrics["train_seconds"]) * (2 if scale > 1.5 else 1) + data["test_size"] / rate / 3
    return fixed, (data["train_size"] + data["val_size"]) / rate


def epochs(args) -> int:
    facts = read_json(args.work / "results" / "facts-torch.json") or {}
    flops = facts.get("training_flops_per_image")
    if not flops or not set(args.variants) <= set(flops):
        raise SystemExit("device_check: facts-torch counted no training FLOPs for these variants (see its log)")
    costs = [variant_cost(args.work, variant, flops) for variant in args.variants]
    fixed = PLAN_MARGIN * (GPU_SH_FIXED_SECONDS + sum(cost[0] for cost in costs))
    per_epoch = PLAN_MARGIN * sum(cost[1] for cost in costs)
    affordable = math.floor((args.left - fixed) / per_epoch) if per_epoch > 0 else args.max_epochs
    chosen = max(0, min(args.max_epochs, affordable))
    print(f"device_check: {args.left:.0f} s left, {fixed:.0f} s fixed + {per_epoch:.0f} s per epoch "
          f"({len(args.variants)} variants): {chosen} epoch(s)", file=sys.stderr)
    print(json.dumps({"epochs": chosen, "left_seconds": args.left, "fixed_seconds": fixed,
                      "seconds_per_epoch": per_epoch, "max_epochs": args.max_epochs, "variants": args.variants}))
    return 0


def test_counts(junit: Path) -> dict | None:
    try:
        suites = ElementTree.parse(junit).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def step_result(work: Path, out: Path, name: str) -> dict | None:
    results = work / "results"
    if name.startswith("train-"):
        return trainer_figures(work, name.removeprefix("train-"))
    if name == "test-gpu":
        return test_counts(results / "test-gpu.xml")
    if name == "gpu-sh":
        found = sorted(out.glob("gpu-*.json"))
        return {"file": found[-1].name, "variants": (read_json(found[-1]) or {}).get("variants")} if found else None
    return read_json(results / f"{name}.json")  # what the step printed, where it prints JSON


def summary(args) -> int:
    from pipeline_overhead import machine

    records = sorted((read_json(path) or {"name": path.stem, "status": "unreadable"}
                      for path in (args.work / "steps").glob("*.json")), key=lambda r: r.get("order", 0))
    steps = {}
    for record in records:
        steps[record["name"]] = {**record, "result": step_result(args.work, args.out.parent, record["name"])}
    report = {"benchmark": "device-check", "date": date.today().isoformat(), "machine": machine(),
              "rehearsal": args.rehearsal or None, "deadline_seconds": args.deadline, "wall_seconds": args.wall,
              "all_ok": bool(steps) and all(step["status"] == "ok" for step in steps.values()), "steps": steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    width = max(map(len, steps), default=0)
    for name, step in steps.items():  # the table the device's reply shows
        print(f"{name:<{width}}  {step['status']:<9} {step['seconds']:>4} s  {step.get('note') or ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imports_parser = commands.add_parser("imports", help="print where each needed module comes from as JSON")
    imports_parser.add_argument("--wheels", type=Path, help="the wheel folder installed from, if any")
    facts_parser = commands.add_parser("facts", help="print a framework's GPU facts as JSON")
    facts_parser.add_argument("framework", choices=["torch", "keras"])
    facts_parser.add_argument("--require-gpu", action="store_true", help="exit 1 when it sees no GPU")
    facts_parser.add_argument("--image-size", type=int, default=224, help="torch: count training FLOPs at this size")
    facts_parser.add_argument("--variants", nargs="+", default=[], help="torch: the variants to count FLOPs of")
    epochs_parser = commands.add_parser("epochs", help="print how many epochs of the GPU run fit in --left seconds")
    epochs_parser.add_argument("--work", type=Path, required=True)
    epochs_parser.add_argument("--left", type=float, required=True)
    epochs_parser.add_argument("--max-epochs", type=int, default=10)
    epochs_parser.add_argument("--variants", nargs="+", required=True)
    summary_parser = commands.add_parser("summary", help="write the summary JSON of the steps so far")
    summary_parser.add_argument("--work", type=Path, required=True)
    summary_parser.add_argument("--out", type=Path, required=True)
    summary_parser.add_argument("--deadline", type=float)
    summary_parser.add_argument("--wall", type=float)
    summary_parser.add_argument("--rehearsal")
    args = parser.parse_args(argv)
    return {"imports": imports, "facts": facts, "epochs": epochs, "summary": summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
