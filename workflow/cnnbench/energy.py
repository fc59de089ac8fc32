"""GPU energy of training, read through NVML (the ``pynvml`` module of nvidia-ml-py).

Both trainers wrap each epoch's timed span in ``EnergyMeter.epoch()``; the figure is the board
energy of the GPU the framework trains on, its device 0, whatever else runs on that board. That
board is found (``framework_board``) by the device's UUID where the framework gives one (torch:
``torch.cuda.get_device_properties(0).uuid``), else as CUDA numbers GPUs: the first entry of
``CUDA_VISIBLE_DEVICES`` (an index, a GPU UUID or a prefix of one), or GPU 0 when it is unset; an
index means NVML's only when CUDA counts in PCI bus order (``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which
cnnbench.gpu_slot sets), so with several GPUs and another order nothing is measured. Two methods,
the first the GPU supports:

- ``energy_counter``: NVML's energy counter (mJ since the driver loaded; Volta and newer), read at
  the start and end of the span: exact, no sampling.
- ``power_samples``: board power sampled ``SAMPLE_HZ`` times a second in a background thread (plus a
  sample at the span's start and end), integrated with the trapezoid rule.

Without NVML (no pynvml, no driver, no GPU given, an unsupported board) every figure is None and the
log says why, once. So under MIG (the device is a MIG instance, or its board is in MIG mode): NVML
reports energy and power only for the whole board, which other tenants' instances share, and a
figure for the board would not be this training's. No framework is imported here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Mapping

SAMPLE_HZ = 5.0
COUNTER, POWER = "energy_counter", "power_samples"
MIG_ENABLED = 1  # pynvml.NVML_DEVICE_MIG_ENABLE, nvmlDeviceGetMigMode's current mode
MIG_SHARED = "NVML reports energy and power only for the whole board, which its MIG instances share"


class EnergyUnavailable(Exception):
    """Why energy cannot be measured here (said once in the log)."""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def nvml_uuid(value) -> str:
    """A device UUID as NVML writes it, "GPU-" and 8-4-4-4-12 hex digits; torch's
    ``get_device_properties(i).uuid`` prints without the prefix."""
    text = str(value).strip()
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _digits(uuid: str) -> str:
    """A UUID without its "GPU-"/"MIG-" prefix: CUDA gives a MIG instance's UUID with no prefix of its own."""
    return uuid.removeprefix("GPU-").removeprefix("MIG-").lower()


def board_uuids(nvml) -> list[str]:
    return [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(nvml.nvmlDeviceGetCount())]


def in_mig_mode(nvml, handle) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # NotSupported: a board without MIG
        return False
    return current == MIG_ENABLED


def mig_uuids(nvml, handle) -> list[str]:
    """The UUIDs of the MIG instances on a board in MIG mode."""
    try:
        slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    except nvml.NVMLError:
        return []
    uuids = []
    for slot in range(slots):
        try:
            uuids.append(_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))))
        except nvml.NVMLError:  # NotFound: no instance in this slot
            continue
    return uuids


def board_by_uuid(nvml, uuid: str) -> int:
    """The NVML index of the board with this UUID; EnergyUnavailable for a MIG instance's or an unknown one."""
    boards = board_uuids(nvml)
    wanted = _digits(uuid)
    for index, board in enumerate(boards):
        if _digits(board) == wanted:
            return index
    for index, board in enumerate(boards):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        for instance in mig_uuids(nvml, handle) if in_mig_mode(nvml, handle) else []:
            if _digits(instance) == wanted:
                raise EnergyUnavailable(f"the framework's GPU is the MIG instance {instance} of {board}: {MIG_SHARED}")
    raise EnergyUnavailable(f"NVML lists no GPU with the framework's device's UUID {uuid} (it lists {len(boards)})")


def board_by_cuda_order(nvml, environ: Mapping[str, str]) -> int:
    """The NVML index of CUDA's device 0: the first entry of CUDA_VISIBLE_DEVICES, GPU 0 when unset."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    given = f"CUDA_VISIBLE_DEVICES={visible!r}"
    entry = "0" if visible is None else visible.split(",")[0].strip()
    count = nvml.nvmlDeviceGetCount()
    if entry.startswith("MIG-"):
        raise EnergyUnavailable(f"{given} names a MIG instance: {MIG_SHARED}")
    if entry.startswith("GPU-"):  # a UUID or a unique prefix of one, as CUDA accepts
        matches = [index for index, uuid in enumerate(board_uuids(nvml)) if uuid.startswith(entry)]
        if len(matches) == 1:
            return matches[0]
    if entry.isdigit() and int(entry) < count:
        order = environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
        if count > 1 and order != "PCI_BUS_ID":
            raise EnergyUnavailable(f"CUDA_DEVICE_ORDER={order}: CUDA's GPU {entry} need not be NVML's, which "
                                    "counts in PCI bus order; set CUDA_DEVICE_ORDER=PCI_BUS_ID (or unset it: "
                                    "the trainers then set it)")
        return int(entry)
    if visible is None:
        raise EnergyUnavailable("NVML lists no GPU")
    raise EnergyUnavailable(f"no GPU given to this process ({given} names none of the {count} NVML lists)")


def framework_board(nvml, device_uuid: str | None, environ: Mapping[str, str]):
    """The NVML handle of the board the framework's device 0 is, not shared by MIG instances."""
    index = board_by_uuid(nvml, device_uuid) if device_uuid else board_by_cuda_order(nvml, environ)
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    if in_mig_mode(nvml, handle):
        raise EnergyUnavailable(f"GPU {_text(nvml.nvmlDeviceGetUUID(handle))} is in MIG mode: {MIG_SHARED}")
    return handle


@dataclass
class EpochEnergy:
    joules: float | None = None


class EnergyMeter:
    """Measures each epoch's energy of the framework's GPU; ``summary()`` says how (metrics.json's ``energy``).

    ``device_uuid``: the UUID of the framework's device 0 where the framework tells it (any text NVML's
    UUID shows in, with or without "GPU-"); else it is found from ``environ`` (default: this process'),
    as ``framework_board`` says. ``start()`` before the epoch loop, ``stop()`` after it, and
    ``with meter.epoch() as energy:`` around each epoch's timed span; ``energy.joules`` is set when the
    span ends (None when not measured).
    """

    def __init__(self, sample_hz: float = SAMPLE_HZ, device_uuid=None, environ: Mapping[str, str] | None = None,
                 log=None):
        self.sample_hz = sample_hz
        self.device_uuid = None if device_uuid is None else nvml_uuid(device_uuid)
        self.environ = environ
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.method: str | None = None
        self.gpus: list[str] = []
        self._nvml = self._handle = self._thread = None
        self._samples: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> EnergyMeter:
        try:
            self._start()
        except EnergyUnavailable as why:
            self._shutdown()
            self.method, self.gpus = None, []
            self.log(f"energy: not measured ({why}); the metrics' energy fields are null")
        else:
            rate = f", {self.sample_hz:g} samples/s" if self.method == POWER else ""
            self.log(f"energy: measuring 1 GPU(s) ({self.gpus[0]}, the framework's device 0) by {self.method}{rate}")
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        self._shutdown()

    def _start(self) -> None:
        try:
            import pynvml
        except ImportError as err:
            raise EnergyUnavailable(f"pynvml is not installed: {err}; install nvidia-ml-py") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise EnergyUnavailable(f"NVML cannot start: {err}") from None
        self._nvml = pynvml
        try:
            environ = os.environ if self.environ is None else self.environ
            self._handle = framework_board(pynvml, self.device_uuid, environ)
            self.gpus = [_text(pynvml.nvmlDeviceGetUUID(self._handle))]
            try:
                self._energy_mj()
                self.method = COUNTER
            except pynvml.NVMLError:  # e.g. NotSupported before Volta
                try:
                    self._power_watts()
                except pynvml.NVMLError as err:
                    raise EnergyUnavailable(f"the GPU reports neither energy nor power: {err}") from None
                self.method = POWER
                self._thread = threading.Thread(target=self._sample_loop, name="energy-sampler", daemon=True)
                self._thread.start()
        except pynvml.NVMLError as err:
            raise EnergyUnavailable(f"NVML failed: {err}") from None

    def _shutdown(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None

    def _energy_mj(self) -> int:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def _power_watts(self) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def _sample(self) -> float:
        watts = self._power_watts()
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, watts))
        return now

    def _sample_loop(self) -> None:
        while not self._stopped.wait(1.0 / self.sample_hz):
            try:
                self._sample()
            except self._nvml.NVMLError:
                pass  # a missed sample only widens one trapezoid

    def _integrate(self, start: float, end: float) -> float:
        with self._lock:
            points = sorted(s for s in self._samples if start <= s[0] <= end)
            self._samples = [s for s in self._samples if s[0] >= end]
        return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(points, points[1:]))

    @contextlib.contextmanager
    def epoch(self):
        energy = EpochEnergy()
        if self.method is None:
            yield energy
            return
        try:
            begin = self._energy_mj() if self.method == COUNTER else self._sample()
        except self._nvml.NVMLError as err:
            self.log(f"energy: NVML failed at an epoch's start ({err}); this epoch's energy is null")
            yield energy
            return
        yield energy
        try:
            if self.method == COUNTER:
                energy.joules = (self._energy_mj() - begin) / 1000.0
            else:
                energy.joules = self._integrate(begin, self._sample())
        except self._nvml.NVMLError as err:
            self.log(f"energy: NVML failed at an epoch's end ({err}); this epoch's energy is null")

    def summary(self, history: list[dict]) -> dict:
        """metrics.json's ``energy``: the run's joules (the sum over its epochs, None unless every
        epoch has a figure), how this process measured them, and which GPU (a list of one UUID; empty
        when not measured)."""
        figures = [epoch.get("energy_joules") for epoch in history]
        measured = self.method is not None and bool(figures) and all(f is not None for f in figures)
        return {
            "joules": float(sum(figures)) if measured else None,
            "method": self.method,
            "sample_hz": self.sample_hz if self.method == POWER else None,
            "gpus": list(self.gpus),
        }
