"""A stand-in for nvidia-ml-py's ``pynvml`` with known figures, for tests on machines without a GPU.

Put this folder first on PYTHONPATH (a trainer subprocess) or into ``sys.modules["pynvml"]``. Set by
environment variables, read at each call:
  FAKE_NVML_GPUS    how many GPUs (default 2); GPU i draws 100 + 150 * i W, plus FAKE_NVML_SLOPE
                    W per second since ``reset()`` (default 0: constant power)
  FAKE_NVML_METHOD  ``counter`` (default: the energy counter works) or ``power`` (the counter
                    raises NotSupported, as before Volta)
  FAKE_NVML_INIT    ``fail``: nvmlInit raises as without a driver
  FAKE_NVML_MIG     comma-separated indices of the GPUs in MIG mode, each with ``MIG_INSTANCES``
                    instances (``mig_uuid``); the others have MIG off. Unset: no GPU has MIG
                    (nvmlDeviceGetMigMode raises NotSupported, as on boards before Ampere)
Handles are the GPU's index, or (index, slot) for a MIG instance. ``calls`` counts the calls per function.
"""

from __future__ import annotations

import os
import time

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_NOT_FOUND = 6
NVML_DEVICE_MIG_DISABLE, NVML_DEVICE_MIG_ENABLE = 0, 1
_MESSAGES = {NVML_ERROR_NOT_SUPPORTED: "Not Supported", NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
             NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found", NVML_ERROR_NOT_FOUND: "Not Found"}
MAX_MIG_DEVICES = 7  # what nvmlDeviceGetMaxMigDeviceCount says on an A100/H100
MIG_INSTANCES = 2  # instances in the first slots; the others raise NotFound

_t0 = time.monotonic()
calls: dict[str, int] = {}


class NVMLError(Exception):
    def __init__(self, value):
        self.value = value

    def __str__(self):
        return _MESSAGES.get(self.value, f"NVML error {self.value}")


def reset() -> None:
    """Start the power ramp and the energy counters now; forget the calls."""
    global _t0
    _t0 = time.monotonic()
    calls.clear()


def _count(name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


def gpu_count() -> int:
    return int(os.environ.get("FAKE_NVML_GPUS", "2"))


def base_watts(index: int) -> float:
    return 100.0 + 150.0 * index


def slope() -> float:
    return float(os.environ.get("FAKE_NVML_SLOPE", "0"))


def joules_between(index: int, start: float, end: float) -> float:
    """The exact energy GPU ``index`` draws from ``start`` to ``end`` (time.monotonic() seconds)."""
    a, b = start - _t0, end - _t0
    return base_watts(index) * (b - a) + slope() * (b * b - a * a) / 2


def uuid(index: int) -> str:
    return f"GPU-{index}aaaaaaa-fake-4000-8000-{index:012d}"


def mig_uuid(index: int, slot: int) -> str:
    return f"MIG-{index}{slot}bbbbbb-fake-4000-8000-{index:06d}{slot:06d}"


def mig_boards() -> list[int] | None:
    value = os.environ.get("FAKE_NVML_MIG")
    return None if value is None else [int(i) for i in value.split(",") if i.strip()]


def nvmlInit():
    _count("nvmlInit")
    if os.environ.get("FAKE_NVML_INIT") == "fail":
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)


def nvmlShutdown():
    _count("nvmlShutdown")


def nvmlDeviceGetCount():
    return gpu_count()


def nvmlDeviceGetHandleByIndex(index):
    if not 0 <= index < gpu_count():
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return index


def nvmlDeviceGetUUID(handle):
    return mig_uuid(*handle) if isinstance(handle, tuple) else uuid(handle)


def nvmlDeviceGetMigMode(handle):
    boards = mig_boards()
    if boards is None or isinstance(handle, tuple):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    mode = NVML_DEVICE_MIG_ENABLE if handle in boards else NVML_DEVICE_MIG_DISABLE
    return [mode, mode]  # current, pending


def nvmlDeviceGetMaxMigDeviceCount(handle):
    return MAX_MIG_DEVICES if handle in (mig_boards() or []) else 0


def nvmlDeviceGetMigDeviceHandleByIndex(handle, slot):
    if handle not in (mig_boards() or []) or not 0 <= slot < MIG_INSTANCES:
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return (handle, slot)


def nvmlDeviceGetTotalEnergyConsumption(handle):
    _count("nvmlDeviceGetTotalEnergyConsumption")
    if os.environ.get("FAKE_NVML_METHOD", "counter") == "power" or isinstance(handle, tuple):  # MIG: board only
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(joules_between(handle, _t0, time.monotonic()) * 1000)  # mJ


def nvmlDeviceGetPowerUsage(handle):
    _count("nvmlDeviceGetPowerUsage")
    if isinstance(handle, tuple):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int((base_watts(handle) + slope() * (time.monotonic() - _t0)) * 1000)  # mW
