"""GPU energy of training, read through NVML (the ``pynvml`` module of nvidia-ml-py).

Both trainers wrap each epoch's timed span in ``EnergyMeter.epoch()``; the figure is the board
energy of the GPUs given to the process (``CUDA_VISIBLE_DEVICES``: indices or UUIDs; all GPUs when
unset), whatever else runs on them. Two methods, the first that every measured GPU supports:

- ``energy_counter``: NVML's energy counter (mJ since the driver loaded; Volta and newer), read at
  the start and end of the span: exact, no sampling.
- ``power_samples``: board power sampled ``SAMPLE_HZ`` times a second in a background thread (plus a
  sample at the span's start and end), integrated with the trapezoid rule.

Without NVML (no pynvml, no driver, no GPU given, a MIG instance, an unsupported board) every figure
is None and the log says why, once. No framework is imported here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass

SAMPLE_HZ = 5.0
COUNTER, POWER = "energy_counter", "power_samples"


class EnergyUnavailable(Exception):
    """Why energy cannot be measured here (said once in the log)."""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def visible_gpus(nvml, visible: str | None) -> list:
    """NVML handles of the GPUs the process was given, in ``CUDA_VISIBLE_DEVICES``' order.

    Indices are NVML's (PCI bus order); CUDA's default order is the same on machines whose GPUs are
    all one model. Like CUDA, the list ends at the first entry that names no GPU.
    """
    count = nvml.nvmlDeviceGetCount()
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
    uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
    handles = []
    for entry in (e.strip() for e in visible.split(",") if e.strip()):
        if entry.isdigit() and int(entry) < count:
            index = int(entry)
        elif entry.startswith("MIG-"):
            raise EnergyUnavailable(f"CUDA_VISIBLE_DEVICES names a MIG instance ({entry}): NVML reports the "
                                    "energy of whole boards only")
        else:  # a UUID or a unique prefix of one, as CUDA accepts
            matches = [i for i, uuid in enumerate(uuids) if entry.startswith("GPU-") and uuid.startswith(entry)]
            if len(matches) != 1:
                break
            index = matches[0]
        handles.append(nvml.nvmlDeviceGetHandleByIndex(index))
    return handles


@dataclass
class EpochEnergy:
    joules: float | None = None


class EnergyMeter:
    """Measures each epoch's GPU energy; ``summary()`` says how (for metrics.json's ``energy``).

    ``start()`` before the epoch loop, ``stop()`` after it, and ``with meter.epoch() as energy:``
    around each epoch's timed span; ``energy.joules`` is set when the span ends (None when not measured).
    """

    def __init__(self, sample_hz: float = SAMPLE_HZ, visible: str | None = None, log=None):
        self.sample_hz = sample_hz
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.method: str | None = None
        self.gpus: list[str] = []
        self._nvml = self._handles = self._thread = None
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
            self.log(f"energy: measuring {len(self.gpus)} GPU(s) ({', '.join(self.gpus)}) by {self.method}{rate}")
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
            self._handles = visible_gpus(pynvml, self.visible)
            if not self._handles:
                raise EnergyUnavailable(f"no GPU given to this process (CUDA_VISIBLE_DEVICES={self.visible!r})")
            self.gpus = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in self._handles]
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
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles)

    def _power_watts(self) -> float:
        return sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1000.0

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
        epoch has a figure), how this process measured them, and which GPUs."""
        figures = [epoch.get("energy_joules") for epoch in history]
        measured = self.method is not None and bool(figures) and all(f is not None for f in figures)
        return {
            "joules": float(sum(figures)) if measured else None,
            "method": self.method,
            "sample_hz": self.sample_hz if self.method == POWER else None,
            "gpus": list(self.gpus),
        }
