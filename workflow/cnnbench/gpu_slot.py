"""GPU slots for local runs: each running training gets one GPU of the pool to itself.

Snakemake counts GPUs (`--resources gpu=N`) but names none, so without this every training
would use GPU 0. The training rules start their trainer through this launcher:

    python -m cnnbench.gpu_slot -- python -m cnnbench.torch_trainer ...

It takes a free slot (an exclusive ``flock`` on ``.snakemake/gpu-slots/<host>/gpu-<id>.lock`` in
the working directory), sets CUDA_VISIBLE_DEVICES to that one GPU and execs the trainer in its
own process (same pid, same parent: the trainer's parent watchdog still watches the job). The
trainer inherits the locked file, so the kernel frees the slot when it ends, however it ends;
a lock file left behind by a killed Snakemake blocks nothing. With every slot taken it waits.

The pool is resolved in the Snakemake process (``pool_setting`` / ``resolve_pool``, from the host's
environment) and handed to the jobs in ``POOL_ENV``, also under Apptainer's ``APPTAINERENV_``
prefix, so that it reaches jobs inside containers even with ``--cleanenv``.

GPU memory (``apply_gpu_defaults``, here for the job and again in each trainer at its start, for a
trainer started by hand): a training given a slot has its GPU to itself (``EXCLUSIVE_ENV=1``) and the
frameworks keep their defaults; any other may share its GPU (no pool, a SLURM job, a trainer started
by hand), so TensorFlow grows its memory as needed instead of taking it all, and JAX does not take
75% of it at start. Either way CUDA counts GPUs as NVML and nvidia-smi do (PCI bus order), so that an
index means one GPU to all of them (cnnbench.energy maps CUDA's device 0 to NVML's by it).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

POOL_ENV = "CNNBENCH_GPU_POOL"  # comma-separated GPU ids; empty: assign nothing
EXCLUSIVE_ENV = "CNNBENCH_GPU_EXCLUSIVE"  # "1": this training has its GPU to itself (set with a slot)
# What a training that may share its GPU sets, unless the variable is set already.
SHARED_GPU_DEFAULTS = {"TF_FORCE_GPU_ALLOW_GROWTH": "true", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
SLOTS_DIR = Path(".snakemake") / "gpu-slots"
POLL_SECONDS = 0.5
EXIT_PARENT_GONE = 143  # as the trainers' exit on a stop request


def visible_devices(value: str) -> list[str]:
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def nvidia_smi_indices(timeout: float = 30) -> list[str]:
    """The machine's GPUs as nvidia-smi numbers them; none without nvidia-smi or a driver."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        result = subprocess.run([executable, "--query-gpu=index", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return visible_devices(result.stdout.replace("\n", ",")) if result.returncode == 0 else []


def resolve_pool(setting, environ, query=nvidia_smi_indices) -> tuple[list[str], str]:
    """The GPUs the trainings share out, and where that pool came from.

    ``setting`` is the config's ``gpus``: "auto" or a list of ids (indices or UUIDs). Inside a
    SLURM job the scheduler has chosen: the pool is empty (nothing is reassigned). Otherwise a
    list wins; with "auto", a CUDA_VISIBLE_DEVICES set for the whole run is the pool, else every
    GPU nvidia-smi lists."""
    if environ.get("SLURM_JOB_ID"):
        return [], "SLURM job: the scheduler's CUDA_VISIBLE_DEVICES is kept"
    if setting != "auto":
        return [str(gpu) for gpu in setting], "config `gpus`"
    if "CUDA_VISIBLE_DEVICES" in environ:
        return visible_devices(environ["CUDA_VISIBLE_DEVICES"]), "CUDA_VISIBLE_DEVICES"
    return query(), "nvidia-smi"


def export_pool(setting, environ=os.environ) -> tuple[list[str], str]:
    """Resolve the pool in this (Snakemake's) process and put it where the jobs' launchers read it."""
    pool, source = resolve_pool(setting, environ)
    value = ",".join(pool)
    environ[POOL_ENV] = environ[f"APPTAINERENV_{POOL_ENV}"] = value
    if source in ("nvidia-smi", "config `gpus`"):
        # Indices as nvidia-smi numbers them (PCI bus order); CUDA's default order is fastest first.
        environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        environ.setdefault("APPTAINERENV_CUDA_DEVICE_ORDER", environ["CUDA_DEVICE_ORDER"])
    return pool, source


def apply_gpu_defaults(environ=None, log=None) -> dict:
    """Set, where unset, CUDA_DEVICE_ORDER=PCI_BUS_ID and, unless ``EXCLUSIVE_ENV`` is "1", the
    ``SHARED_GPU_DEFAULTS`` (before TensorFlow or JAX is imported: they read them once). Says in
    ``log`` what it set; returns that."""
    environ = os.environ if environ is None else environ
    exclusive = environ.get(EXCLUSIVE_ENV) == "1"
    wanted = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", **({} if exclusive else SHARED_GPU_DEFAULTS)}
    set_here = {name: value for name, value in wanted.items() if name not in environ}
    environ.update(set_here)
    if set_here:
        why = ("this training has the GPU to itself" if exclusive else
               f"{EXCLUSIVE_ENV} is not 1: other trainings may share the GPU, TensorFlow and JAX take memory as needed")
        print(f"GPU environment: {' '.join(f'{k}={v}' for k, v in set_here.items())} ({why})",
              file=log or sys.stderr, flush=True)
    return set_here


def slot_file(slots_dir: Path, gpu: str) -> Path:
    return slots_dir / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', gpu)}.lock"


def try_lock(path: Path):
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def acquire(pool: list[str], slots_dir: Path, log=sys.stderr, parent: int | None = None):
    """Lock the first free GPU of ``pool``; wait while all are taken. Return (gpu, open locked file).
    Gives up (SystemExit) when the process that started this one is gone: its job was cancelled."""
    slots_dir.mkdir(parents=True, exist_ok=True)
    waiting_since = None
    while True:
        for gpu in pool:
            handle = try_lock(slot_file(slots_dir, gpu))
            if handle is not None:
                handle.truncate(0)
                handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                handle.flush()
                if waiting_since is not None:
                    print(f"GPU slot {gpu} is free after {time.monotonic() - waiting_since:.0f} s of waiting",
                          file=log, flush=True)
                return gpu, handle
        if waiting_since is None:
            waiting_since = time.monotonic()
            print(f"all {len(pool)} GPU slots ({','.join(pool)}) are taken by other trainings: waiting "
                  f"for one to be freed (lock files in {slots_dir})", file=log, flush=True)
        if parent is not None and os.getppid() != parent:
            print(f"the process that started this job (pid {parent}) is gone: not starting the trainer",
                  file=log, flush=True)
            raise SystemExit(EXIT_PARENT_GONE)
        time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command on one free GPU of the pool (CUDA_VISIBLE_DEVICES), waiting for one "
                    "if all are taken. Usage: python -m cnnbench.gpu_slot [options] -- command ...")
    parser.add_argument("--pool", default=None,
                        help=f"comma-separated GPU ids (default: ${POOL_ENV}, which the workflow sets); "
                             "empty: run the command unchanged")
    parser.add_argument("--slots-dir", type=Path, default=None,
                        help=f"where the per-GPU lock files live (default: {SLOTS_DIR}/<hostname>)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: put it after --")
    pool = visible_devices(os.environ.get(POOL_ENV, "") if args.pool is None else args.pool)
    if pool and not os.environ.get("SLURM_JOB_ID"):
        slots_dir = args.slots_dir or SLOTS_DIR / socket.gethostname()
        gpu, handle = acquire(pool, slots_dir, parent=os.getppid())
        os.set_inheritable(handle.fileno(), True)  # held by the command exec'd below, until it ends
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        os.environ[EXCLUSIVE_ENV] = "1"
        print(f"GPU slot: CUDA_VISIBLE_DEVICES={gpu}", file=sys.stderr, flush=True)
    apply_gpu_defaults()
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as err:
        print(f"error: cannot run {command[0]}: {err}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
