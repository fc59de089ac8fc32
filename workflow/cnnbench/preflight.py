"""``snakemake --cores 1 preflight``: will each framework's trainings see the GPU, on the route this
command line selects (the current environment, or with --use-singularity each framework's image)?

A probe (``python -m cnnbench.preflight probe``) runs as a job where that framework's trainings run (the
same environment, or the same image with the same apptainer arguments), one framework per process, and
asks the trainer's own functions what a training would find: its build (``framework_build``), whether
it sees a GPU (``torch_trainer.select_device``, ``keras_trainer.gpu_devices``) and the job's host
(``gpu.current_host``). ``report``, in the Snakemake process, judges each probe with ``gpu.diagnose``
at every variant's ``require_gpu`` (the decision a training makes) and names the fix for this route.
No data is read, no model is built: it takes seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from . import gpu, gpu_slot
from .config import FRAMEWORKS, parse_variant, resolve_hparams
from .fileio import write_json_atomic

GPU_VARIABLES = (*gpu.GPU_INDEX_VARIABLES, *gpu.GPU_COUNT_VARIABLES)
# torch's CUDA 12 wheels (make venv TORCH_CUDA=..., containers/build.sh --torch-cuda ...) for a driver too
# old for CUDA 13: CUDA 12.6 runs on every driver CUDA 12 does (gpu.MIN_DRIVER_FOR_CUDA).
TORCH_CUDA_12 = ("cu126", "12.6")


# ------------------------------------------------------------------------------- the probe (a job)
def as_in_a_training(environ=os.environ) -> None:
    """Give this job the GPU a training's launcher (cnnbench.gpu_slot) would: the pool's first, without
    taking its slot (a probe holds no GPU, and must not wait for a running training to free one)."""
    pool = gpu_slot.visible_devices(environ.get(gpu_slot.POOL_ENV, ""))
    if pool and not environ.get("SLURM_JOB_ID"):
        environ["CUDA_VISIBLE_DEVICES"] = pool[0]


def framework_facts(framework: str, keras_backend: str | None) -> tuple[gpu.FrameworkBuild, bool]:
    """The trainer's own build and device check (imports only that framework)."""
    if framework == "torch":
        from . import torch_trainer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "training on the CPU" warning: the verdict says so
            device = torch_trainer.select_device(False)
        return torch_trainer.framework_build(), device.type == "cuda"
    from . import keras_trainer

    keras = keras_trainer.import_keras(keras_backend)
    return keras_trainer.framework_build(keras, keras_backend), bool(keras_trainer.gpu_devices(keras_backend))


def host_facts(host: gpu.Host) -> dict:
    return {"environ": {name: host.environ[name] for name in GPU_VARIABLES if name in host.environ},
            "gpus": dataclasses.asdict(host.gpus), "container": host.container,
            "device_files": list(host.device_files), "libcuda": host.libcuda}


def host_from_facts(facts: dict) -> gpu.Host:
    gpus = facts["gpus"]
    return gpu.Host(environ=facts["environ"], container=facts["container"], libcuda=facts["libcuda"],
                    device_files=tuple(facts["device_files"]),
                    gpus=gpu.HostGpus(tuple(gpus["names"]), gpus["driver_version"], gpus["problem"]))


def probe(framework: str, keras_backend: str | None = None, invocation: str | None = None) -> dict:
    as_in_a_training()
    facts = {"framework": framework, "keras_backend": keras_backend, "invocation": invocation,
             "hostname": socket.gethostname(),
             "python": sys.executable, "build": None, "sees_gpu": False, "error": None}
    try:
        build, facts["sees_gpu"] = framework_facts(framework, keras_backend)
        facts["build"] = dataclasses.asdict(build)
    except Exception as err:  # noqa: BLE001 - a trainer that cannot start here is the finding
        facts["error"] = f"{type(err).__name__}: {err}"
    facts["host"] = host_facts(gpu.current_host())
    return facts


# --------------------------------------------------------------------- the report (Snakemake's process)
@dataclass(frozen=True)
class Route:
    """What the command line selected: containers or not, and Snakemake's apptainer arguments."""
    containers: bool
    apptainer_args: str = ""

    @property
    def passes_nv(self) -> bool:
        return any(arg in ("--nv", "--nvccli") for arg in shlex.split(self.apptainer_args))


@dataclass(frozen=True)
class Row:
    cells: tuple
    stops: bool
    details: str  # what the training would say, where it does not simply train on the GPU


HEADERS = ("framework", "runs in", "build", "CUDA", "needs driver", "driver", "sees GPU", "verdict", "fix")


def take_probes(paths) -> list[dict]:
    """Read the probes' files and remove them: the next preflight probes afresh (also when this one fails)."""
    probes = []
    for path in map(Path, paths):
        try:
            probes.append(json.loads(path.read_text()))
        finally:
            path.unlink(missing_ok=True)
    return probes


def frameworks(config: dict) -> list[str]:
    """The frameworks the config's variants train with (each gets a probe)."""
    used = {parse_variant(variant).framework for variant in config["variants"]}
    return [framework for framework in FRAMEWORKS if framework in used]


def require_gpu_of_variants(config: dict, framework: str) -> dict:
    return {variant: resolve_hparams(config, variant)["require_gpu"] for variant in config["variants"]
            if parse_variant(variant).framework == framework}


def fix_for(cause: gpu.Cause, build: gpu.FrameworkBuild, route: Route, driver: str | None) -> str:
    """What to change on this route, for one of ``gpu.diagnosed_causes``."""
    on_torch = build.name.startswith("torch") or " on torch " in build.name
    if cause.kind == gpu.CPU_ONLY_BUILD:
        if route.containers:
            return ("`make containers` (the torch image without --torch-cuda cpu)" if on_torch else
                    "`make containers` (the tensorflow image without --tf-cpu / --ci)")
        return build.cuda_install if " on jax " in build.name else "`make venv GPU=1`"
    if cause.kind == gpu.DRIVER_TOO_OLD:
        variant, cuda = TORCH_CUDA_12
        if on_torch and int(build.cuda.split(".")[0]) > 12 and driver and not gpu.driver_too_old(driver, cuda):
            return (f'`make containers CONTAINER_BUILD_ARGS="--torch-cuda {variant}"` (containers/build.sh '
                    f'--torch-cuda {variant})' if route.containers else f"`make venv GPU=1 TORCH_CUDA={variant}`")
        return f"update the NVIDIA driver to >= {gpu.min_driver(build.cuda)}"
    if cause.kind == gpu.CONTAINER_WITHOUT_DRIVER:
        if not route.passes_nv:
            return f'add --nv: `--apptainer-args "{" ".join([route.apptainer_args, "--nv"]).strip()}"`'
        return "--nv is given but no driver reached the image: check `apptainer exec --nv IMAGE nvidia-smi`"
    if cause.kind == gpu.NO_DRIVER:
        return "run on a GPU node, or install its NVIDIA driver"
    return "check CUDA_VISIBLE_DEVICES and `nvidia-smi`"


def judge(probe_facts: dict, require_gpus: dict, host_gpus: gpu.HostGpus, route: Route) -> Row:
    """One framework's row: the verdict a training of each of its variants would reach there."""
    job_host = host_from_facts(probe_facts["host"])
    framework = probe_facts["framework"]
    if probe_facts["keras_backend"]:
        framework += f" ({probe_facts['keras_backend']})"
    runs_in = f"{probe_facts['hostname']}: {job_host.container or probe_facts['python']}"
    driver = job_host.gpus.driver_version or host_gpus.driver_version
    driver_cell = driver or (job_host.gpus.problem or host_gpus.problem or "none")
    if probe_facts["error"]:
        return Row((framework, runs_in, "-", "-", "-", driver_cell, "no", "WILL FAIL",
                    "the trainer cannot start here (below)"), True, probe_facts["error"])
    build = gpu.FrameworkBuild(**probe_facts["build"])
    verdicts = {variant: gpu.diagnose(require_gpu, probe_facts["sees_gpu"], build, job_host)
                for variant, require_gpu in require_gpus.items()}
    stopping = [variant for variant, verdict in verdicts.items() if verdict.stops]
    verdict = verdicts[stopping[0]] if stopping else next(iter(verdicts.values()))
    label = verdict.label
    if 0 < len(stopping) < len(verdicts):
        label += f" ({', '.join(stopping)})"
    fixes = details = ""
    if verdict.causes:
        # A job in an image without --nv has no nvidia-smi: the host's tells whether its driver is new enough too.
        fix_host = job_host if job_host.gpus.names else dataclasses.replace(job_host, gpus=host_gpus)
        fixes = "; ".join(dict.fromkeys(fix_for(cause, build, route, driver)
                                        for cause in gpu.diagnosed_causes(build, fix_host)))
        details = verdict.message if verdict.stops else " ".join(cause.text for cause in verdict.causes)
    cells = (framework, runs_in, build.name, build.cuda or "none (CPU-only)",
             gpu.min_driver(build.cuda) if build.cuda else "-", driver_cell,
             "yes" if verdict.sees_gpu else "no", label, fixes or "-")
    return Row(cells, bool(stopping), details)


def report(probes: list[dict], config: dict, route: Route, host_gpus: gpu.HostGpus | None = None):
    """The table and below it what each training would say; and the frameworks whose trainings would stop."""
    host_gpus = host_gpus or gpu.host_gpus()
    rows = [judge(facts, require_gpu_of_variants(config, facts["framework"]), host_gpus, route) for facts in probes]
    where = f"in the images, apptainer args {route.apptainer_args!r}" if route.containers else "in this environment"
    seen = (f"nvidia-smi here lists {len(host_gpus.names)} GPU(s), driver {host_gpus.driver_version}"
            if host_gpus.names else host_gpus.problem)
    grid = tabulate([row.cells for row in rows], HEADERS, tablefmt="github", disable_numparse=True)
    lines = [f"preflight ({where}; {seen}):", grid]
    lines += [f"{row.cells[0]}: {row.details}" for row in rows if row.details]
    return "\n".join(lines), [row.cells[0] for row in rows if row.stops]


class PreflightFailed(RuntimeError):
    """Some framework's trainings would stop on require_gpu (or not start): the table says why."""


def run(probe_paths, log_path, config: dict, route: Route) -> None:
    """``rule preflight``: print and log the report; fail where a training would stop."""
    text, failing = report(take_probes(probe_paths), config, route)
    Path(log_path).write_text(f"{text}\n")
    print(text)
    if failing:
        raise PreflightFailed(f"preflight: the {' and '.join(failing)} trainings would stop: see the table above "
                              "for the fix")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Probe one framework as its trainings would find it (GPU, build).")
    sub = parser.add_subparsers(dest="command", required=True)
    probe_parser = sub.add_parser("probe")
    probe_parser.add_argument("--framework", choices=("torch", "keras"), required=True)
    probe_parser.add_argument("--keras-backend", default=None)
    probe_parser.add_argument("--invocation", default=None, help="the Snakemake run this probe belongs to")
    probe_parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    facts = probe(args.framework, args.keras_backend if args.framework == "keras" else None, args.invocation)
    write_json_atomic(args.out, facts)
    print(json.dumps(facts, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
