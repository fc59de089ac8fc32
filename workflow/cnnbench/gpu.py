"""Was this job meant to run on a GPU, and why does its framework see none? (``require_gpu``)

Framework-neutral: each trainer passes what its framework reports (``FrameworkBuild``: the CUDA
version it was built for, or None for a CPU-only build); this module reads the job's environment
(CUDA_VISIBLE_DEVICES, SLURM's GPU variables), ``nvidia-smi`` and the container, and decides
(``diagnose``: what the trainings' ``check_gpu`` does and ``snakemake preflight`` reports).
"""

from __future__ import annotations

import ctypes
import glob
import os
import subprocess
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

from .training import TrainingError

# Values that hide every GPU: CUDA's "-1"/"" and what SLURM sets when a job got no device file.
NO_DEVICE = {"", "-1", "nodevfiles", "none", "n/a"}
# Variables that list the job's GPUs by index (so "0" is GPU 0) ...
GPU_INDEX_VARIABLES = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
# ... and SLURM's that count them, possibly per type ("a100:2"), so "0" means none.
GPU_COUNT_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK",
                       "SLURM_GPUS_PER_SOCKET")
# Oldest Linux driver each CUDA major release runs on (minor version compatibility), from the
# "CUDA Toolkit and Minimum Required Driver Version" table of NVIDIA's CUDA Toolkit release notes.
MIN_DRIVER_FOR_CUDA = {11: "450.80.02", 12: "525.60.13", 13: "580"}
NVIDIA_SMI_TIMEOUT = 20


@dataclass(frozen=True)
class FrameworkBuild:
    """What a framework reports about itself, for the diagnosis."""
    name: str                 # "torch 2.14.1+cu130", "keras 3.15.1 on tensorflow 2.21.0"
    cuda: str | None          # the CUDA version it was built for; None: a CPU-only build
    cpu_only_evidence: str = ""   # how a CPU-only build shows ("torch.version.cuda is None")
    cuda_install: str = ""        # how to get a CUDA build instead


@dataclass(frozen=True)
class HostGpus:
    """What ``nvidia-smi`` says: the GPUs it lists and the driver version, or why it could not."""
    names: tuple[str, ...] = ()
    driver_version: str | None = None
    problem: str | None = None  # "not installed", or its error


@dataclass(frozen=True)
class Host:
    """The facts the diagnosis reads, gathered once (tests build their own)."""
    environ: Mapping[str, str]
    gpus: HostGpus
    container: str | None = None     # the Apptainer/Singularity image this runs in
    device_files: tuple[str, ...] = ()  # /dev/nvidia0, ...
    libcuda: bool = False            # the driver's libcuda.so.1 loads


def query_nvidia_smi(timeout: float = NVIDIA_SMI_TIMEOUT) -> HostGpus:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return HostGpus(problem="nvidia-smi is not installed here")
    except (OSError, subprocess.TimeoutExpired) as err:
        return HostGpus(problem=f"nvidia-smi did not answer ({err})")
    if result.returncode != 0:
        first_line = (result.stdout + result.stderr).strip().splitlines()[:1]
        return HostGpus(problem=f"nvidia-smi failed: {first_line[0] if first_line else f'exit {result.returncode}'}")
    rows = [[part.strip() for part in line.split(",")] for line in result.stdout.splitlines() if line.strip()]
    names = tuple(row[0] for row in rows)
    driver = next((row[1] for row in rows if len(row) > 1 and row[1]), None)
    return HostGpus(names=names, driver_version=driver,
                    problem=None if names else "nvidia-smi lists no GPU")


@lru_cache(maxsize=1)
def host_gpus() -> HostGpus:
    return query_nvidia_smi()


def libcuda_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def current_host() -> Host:
    environ = dict(os.environ)
    return Host(environ=environ, gpus=host_gpus(),
                container=environ.get("APPTAINER_CONTAINER") or environ.get("SINGULARITY_CONTAINER"),
                device_files=tuple(sorted(glob.glob("/dev/nvidia[0-9]*"))), libcuda=libcuda_loads())


def _lists_gpus(variable: str, value: str) -> bool:
    value = value.strip()
    if value.lower() in NO_DEVICE:
        return False
    if variable in GPU_COUNT_VARIABLES:  # "2", "a100:2", "gpu:a100:2,gpu:v100:1"
        counts = [part.rsplit(":", 1)[-1] for part in value.split(",")]
        return any(not count.isdigit() or int(count) > 0 for count in counts)
    return True


def expected_because(host: Host) -> list[str]:
    """Why this job was meant to have a GPU (empty: nothing says so). A CUDA_VISIBLE_DEVICES that
    hides every GPU ("" or -1) means the CPU on purpose, whatever nvidia-smi lists."""
    hidden = host.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip().lower() in NO_DEVICE:
        return []
    reasons = [f"{name}={host.environ[name]}" for name in (*GPU_INDEX_VARIABLES, *GPU_COUNT_VARIABLES)
               if host.environ.get(name) is not None and _lists_gpus(name, host.environ[name])]
    if host.gpus.names:
        driver = f", driver {host.gpus.driver_version}" if host.gpus.driver_version else ""
        reasons.append(f"nvidia-smi lists {len(host.gpus.names)} GPU(s): {', '.join(host.gpus.names)}{driver}")
    return reasons


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def min_driver(cuda: str) -> str | None:
    major = _version_tuple(cuda)[:1]
    return MIN_DRIVER_FOR_CUDA.get(major[0]) if major else None


def driver_too_old(driver: str | None, cuda: str | None) -> bool:
    """Whether the NVIDIA ``driver`` is known to be older than what a build for ``cuda`` needs."""
    needed = min_driver(cuda) if cuda else None
    return bool(driver and needed and _version_tuple(driver) < _version_tuple(needed))


# What kind of reason a framework sees no GPU (Cause.kind): what to change differs with each.
CPU_ONLY_BUILD = "cpu-only build"
CONTAINER_WITHOUT_DRIVER = "container without the driver"
DRIVER_TOO_OLD = "driver too old"
NO_DRIVER = "no driver"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Cause:
    kind: str   # one of the kinds above
    text: str   # the sentence, with what to do


def diagnosed_causes(build: FrameworkBuild, host: Host) -> list[Cause]:
    """Why ``build`` sees no GPU, most decisive first; each says what to do."""
    causes = []
    if build.cuda is None:
        causes.append(Cause(CPU_ONLY_BUILD, f"{build.name} is a CPU-only build ({build.cpu_only_evidence}): "
                                            f"{build.cuda_install}"))
    if host.container and not (host.device_files and host.libcuda):
        missing = " and ".join(what for what, present in (("no /dev/nvidia* devices", host.device_files),
                                                          ("no libcuda.so.1", host.libcuda)) if not present)
        causes.append(Cause(CONTAINER_WITHOUT_DRIVER,
                            f"this runs in the container {host.container} without the host's NVIDIA driver "
                            f"({missing}): Apptainer passes the GPU in only with --nv (the workflow's default "
                            "profile adds it; --singularity-args on the command line replaces the profile's, so "
                            "repeat --nv there)"))
    driver = host.gpus.driver_version
    if driver_too_old(driver, build.cuda):
        causes.append(Cause(DRIVER_TOO_OLD,
                            f"the NVIDIA driver {driver} (nvidia-smi) is too old for {build.name}, built for CUDA "
                            f"{build.cuda}, which needs driver >= {min_driver(build.cuda)}: update the driver, or use "
                            "a build for an older CUDA (README: *GPUs: CUDA versions and drivers*)"))
    elif not host.container and not host.gpus.names and not host.libcuda:
        causes.append(Cause(NO_DRIVER, f"no working NVIDIA driver on this machine "
                                       f"({host.gpus.problem or 'nvidia-smi lists no GPU'}; libcuda.so.1 does not "
                                       "load): run on a GPU node, or have its driver installed"))
    if not causes:
        causes.append(Cause(UNKNOWN, f"none of the usual ones (CPU-only build, container without --nv, old driver; "
                                     f"{build.name} is built for CUDA {build.cuda}, driver {driver or 'unknown'}): "
                                     "check that CUDA_VISIBLE_DEVICES names a GPU that exists and that `nvidia-smi` "
                                     "shows it"))
    return causes


def likely_causes(build: FrameworkBuild, host: Host) -> list[str]:
    return [cause.text for cause in diagnosed_causes(build, host)]


CPU_WARNING = "no GPU visible: training on the CPU, which is far slower"


@dataclass(frozen=True)
class Verdict:
    """What a training does about its GPU (``diagnose``): train on it, stop before loading data, or
    train on the CPU."""
    sees_gpu: bool
    stops: bool                       # the training stops (check_gpu raises) with ``message``
    message: str                      # its error, or its warning when it trains on the CPU ("" on the GPU)
    expected: tuple[str, ...] | None  # why a GPU was meant (expected_because); None: not looked up
    causes: tuple[Cause, ...] = ()    # why the framework sees none, where a GPU was meant or required

    @property
    def label(self) -> str:
        if self.sees_gpu:
            return "ok"
        if self.stops:
            return "WILL FAIL"
        return "CPU (require_gpu: false)" if self.expected is None or self.expected else "no GPU expected"


def diagnose(require_gpu, sees_gpu: bool, build: FrameworkBuild, host: Host | None = None) -> Verdict:
    """The decision ``require_gpu`` makes (true, "auto" or false) when ``build`` does or does not see a
    GPU on ``host`` (default: this process's; not looked up for require_gpu false unless given)."""
    if sees_gpu:
        return Verdict(True, False, "", ())
    if require_gpu is False and host is None:
        return Verdict(False, False, CPU_WARNING, None)
    host = host or current_host()
    reasons = tuple(expected_because(host))
    causes = tuple(diagnosed_causes(build, host)) if require_gpu is True or reasons else ()
    if require_gpu is False or not (require_gpu is True or reasons):
        return Verdict(False, False, CPU_WARNING, reasons, causes)
    why = "require_gpu is true" if require_gpu is True else f"a GPU was expected ({'; '.join(reasons)})"
    texts = [cause.text for cause in causes]
    listed = f"{texts[0]}." if len(texts) == 1 else " ".join(f"({i}) {c}." for i, c in enumerate(texts, 1))
    return Verdict(False, True, f"{why} but {build.name} sees none, so this run would train on the CPU. "
                                f"Likely cause: {listed} To train on the CPU anyway, set require_gpu: false (in "
                                "`train`, or per variant in variant_overrides). No data was loaded, no metrics "
                                "were written.", reasons, causes)


def check_gpu(require_gpu, sees_gpu: bool, build: FrameworkBuild, host: Host | None = None) -> None:
    """Stop before any data is loaded when a GPU was required (``true``) or, with ``auto``, expected
    but ``build`` sees none; otherwise warn that the run trains on the CPU (``diagnose`` decides)."""
    verdict = diagnose(require_gpu, sees_gpu, build, host)
    if verdict.stops:
        raise TrainingError(verdict.message)
    if not sees_gpu:
        warnings.warn(verdict.message, stacklevel=3)


def cudnn_version_string(version: int | None) -> str | None:
    """torch's cudnn.version() integer as major.minor.patch (cuDNN 9 counts majors in 10000s, 8 in 1000s)."""
    if not version:
        return None
    major_unit = 10000 if version >= 90000 else 1000
    return f"{version // major_unit}.{version % major_unit // 100}.{version % 100}"


def gpu_facts(name: str, count: int, cuda: str | None, cudnn: str | None, peak_memory_bytes: int | None) -> dict:
    """metrics.json's ``environment.gpu`` (None on the CPU): the driver from nvidia-smi."""
    return {"name": name, "count": int(count), "driver_version": host_gpus().driver_version,
            "cuda_version": cuda, "cudnn_version": cudnn,
            "peak_memory_bytes": None if peak_memory_bytes is None else int(peak_memory_bytes)}

