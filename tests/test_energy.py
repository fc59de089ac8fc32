"""cnnbench.energy against a stand-in pynvml (tests/fake_nvml) with known power and energy figures.

The trainers' use of it (a fake on a subprocess' PYTHONPATH) is in tests/test_trainers.py.
"""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest

from cnnbench import energy
from cnnbench.metrics import MetricsError, validate_metrics
from conftest import REPO
from factories import make_metrics

FAKE_NVML_DIR = REPO / "tests" / "fake_nvml"


@pytest.fixture
def fake_nvml(monkeypatch):
    """The fake imported afresh as ``pynvml``, its clock and counters reset."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    for name in ("FAKE_NVML_GPUS", "FAKE_NVML_METHOD", "FAKE_NVML_INIT", "FAKE_NVML_SLOPE", "FAKE_NVML_MIG",
                 "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(name, raising=False)
    module.reset()
    return module


def measured_epochs(meter, seconds=(0.3, 0.2)):
    """Run timed 'epochs' of busy waiting; return each one's joules and its inner and outer span."""
    results = []
    for duration in seconds:
        outer_start = time.monotonic()
        with meter.epoch() as epoch:
            inner_start = time.monotonic()
            while time.monotonic() - inner_start < duration:
                time.sleep(0.005)
            inner_end = time.monotonic()
        outer_end = time.monotonic()
        results.append((epoch.joules, (inner_start, inner_end), (outer_start, outer_end)))
    return results


def assert_within_spans(fake, gpus, results):
    """Power only rises (slope >= 0), so each epoch's true energy lies between that over the span
    inside the ``with`` block and that over the span around it."""
    for joules, inner, outer in results:
        low = sum(fake.joules_between(i, *inner) for i in gpus)
        high = sum(fake.joules_between(i, *outer) for i in gpus)
        assert low - 1e-3 <= joules <= high + 1e-3, (low, joules, high)


PCI_ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}  # what the trainers set (cnnbench.gpu_slot.apply_gpu_defaults)


@pytest.mark.parametrize("method", ["counter", "power"])
def test_each_epoch_gets_the_energy_of_its_span(method, fake_nvml, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_METHOD", method)
    monkeypatch.setenv("FAKE_NVML_SLOPE", "1000")  # a ramp: a rectangle rule would fall short of the range
    log = []
    meter = energy.EnergyMeter(sample_hz=20, environ=PCI_ORDER, log=log.append).start()
    results = measured_epochs(meter)
    power_reads_during_epochs = fake_nvml.calls.get("nvmlDeviceGetPowerUsage", 0)
    meter.stop()
    assert_within_spans(fake_nvml, [0], results)  # two GPUs, CUDA_VISIBLE_DEVICES unset: the framework's, GPU 0
    history = [{"energy_joules": joules} for joules, _, _ in results]
    summary = meter.summary(history)
    assert summary["joules"] == pytest.approx(sum(joules for joules, _, _ in results), rel=1e-12)
    assert summary["gpus"] == [fake_nvml.uuid(0)]
    if method == "counter":
        assert summary["method"] == "energy_counter" and summary["sample_hz"] is None
        assert power_reads_during_epochs == 0
    else:
        assert summary["method"] == "power_samples" and summary["sample_hz"] == 20
        # 1 probe at the start, 4 at the epochs' starts and ends, and the thread's, about 10 over the
        # 0.5 s at 20 Hz (a loaded machine may delay it: at least 3 are asked for)
        assert power_reads_during_epochs >= 1 + 4 + 3
    assert log == [f"energy: measuring 1 GPU(s) ({fake_nvml.uuid(0)}, the framework's device 0) by {summary['method']}"
                   + (", 20 samples/s" if method == "power" else "")]
    assert fake_nvml.calls["nvmlShutdown"] == 1


def test_power_samples_are_integrated_by_the_trapezoid_rule(fake_nvml, monkeypatch):
    """Samples at known times: 100 W at 0 s, 200 W at 1 s, 200 W at 3 s -> 150 J + 400 J."""
    monkeypatch.setenv("FAKE_NVML_METHOD", "power")
    meter = energy.EnergyMeter(log=lambda message: None)
    meter._samples = [(10.0, 100.0), (11.0, 200.0), (13.0, 200.0), (14.0, 999.0)]
    assert meter._integrate(10.0, 13.0) == pytest.approx(550.0)
    assert meter._samples == [(13.0, 200.0), (14.0, 999.0)]  # samples before the span's end are dropped


class TorchUuid:
    """What torch.cuda.get_device_properties(i).uuid prints: the UUID without NVML's "GPU-"."""

    def __init__(self, nvml_text: str):
        self.text = nvml_text.removeprefix("GPU-").removeprefix("MIG-")

    def __str__(self):
        return self.text


@pytest.mark.parametrize("environ, device_uuid, gpu", [
    (PCI_ORDER, None, 0),  # unset: CUDA's device 0 is GPU 0; the other two are not measured
    ({"CUDA_VISIBLE_DEVICES": "2", **PCI_ORDER}, None, 2),
    ({"CUDA_VISIBLE_DEVICES": "2,0", **PCI_ORDER}, None, 2),  # the framework trains on its device 0 only
    ({"CUDA_VISIBLE_DEVICES": "GPU-1aaa"}, None, 1),  # a UUID prefix, as CUDA accepts; no order needed
    ({"CUDA_VISIBLE_DEVICES": "GPU-2aaaaaaa-fake-4000-8000-000000000002,0"}, None, 2),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "torch's uuid of GPU 2", 2),  # the framework's UUID wins
    ({"CUDA_VISIBLE_DEVICES": "1", "FAKE_NVML_MIG": "0", **PCI_ORDER}, None, 1),  # another board's MIG mode
    ({"CUDA_VISIBLE_DEVICES": "1", "FAKE_NVML_MIG": "", **PCI_ORDER}, None, 1),  # MIG capable, off
])
def test_the_frameworks_gpu_is_measured(environ, device_uuid, gpu, fake_nvml, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_GPUS", "3")
    if "FAKE_NVML_MIG" in environ:
        monkeypatch.setenv("FAKE_NVML_MIG", environ["FAKE_NVML_MIG"])
    if device_uuid:
        device_uuid = TorchUuid(fake_nvml.uuid(2))
    meter = energy.EnergyMeter(device_uuid=device_uuid, environ=environ, log=lambda message: None).start()
    results = measured_epochs(meter, seconds=(0.1,))
    meter.stop()
    assert meter.summary([{"energy_joules": results[0][0]}])["gpus"] == [fake_nvml.uuid(gpu)]
    assert_within_spans(fake_nvml, [gpu], results)


def test_with_one_gpu_any_cuda_order_names_it(fake_nvml, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_GPUS", "1")
    meter = energy.EnergyMeter(environ={}, log=lambda message: None).start()
    meter.stop()
    assert meter.gpus == [fake_nvml.uuid(0)]


def test_cuda_visible_devices_is_read_from_the_environment(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    meter = energy.EnergyMeter(log=lambda message: None).start()
    meter.stop()
    assert meter.gpus == [fake_nvml.uuid(1)]


def test_uuids_are_written_as_nvml_does():
    assert energy.nvml_uuid(TorchUuid("GPU-8d2c5e1a-0b6f-4a1e-9c3d-5e7f8a9b0c1d")) == (
        "GPU-8d2c5e1a-0b6f-4a1e-9c3d-5e7f8a9b0c1d")
    assert energy.nvml_uuid("GPU-8d2c5e1a") == "GPU-8d2c5e1a" and energy.nvml_uuid("MIG-1") == "MIG-1"


MIG_SHARED = "NVML reports energy and power only for the whole board, which its MIG instances share"


@pytest.mark.parametrize("setup, reason", [
    ("no module", "pynvml is not installed"),
    ("init fails", "NVML cannot start: NVML Shared Library Not Found"),
    ("no gpu given", "no GPU given to this process (CUDA_VISIBLE_DEVICES='' names none of the 2 NVML lists)"),
    ("beyond the last gpu", "no GPU given to this process (CUDA_VISIBLE_DEVICES='9,0' names none of the 2"),
    ("cuda's default order", "CUDA_DEVICE_ORDER=FASTEST_FIRST: CUDA's GPU 0 need not be NVML's"),
    ("unknown uuid", "NVML lists no GPU with the framework's device's UUID GPU-77777777"),
    ("mig instance given", f"CUDA_VISIBLE_DEVICES='MIG-4f1e2d3c' names a MIG instance: {MIG_SHARED}"),
    ("board in mig mode", f"GPU GPU-0aaaaaaa-fake-4000-8000-000000000000 is in MIG mode: {MIG_SHARED}"),
    ("framework on a mig instance", "the framework's GPU is the MIG instance MIG-11bbbbbb-fake-4000-8000-000001000001 "
                                    f"of GPU-1aaaaaaa-fake-4000-8000-000000000001: {MIG_SHARED}"),
])
def test_without_nvml_the_figures_are_null_and_the_log_says_so_once(setup, reason, fake_nvml, monkeypatch):
    environ = {"no gpu given": {"CUDA_VISIBLE_DEVICES": ""}, "beyond the last gpu": {"CUDA_VISIBLE_DEVICES": "9,0"},
               "cuda's default order": {}, "mig instance given": {"CUDA_VISIBLE_DEVICES": "MIG-4f1e2d3c"}
               }.get(setup, PCI_ORDER)
    device_uuid = {"unknown uuid": "77777777-0000-4000-8000-000000000000",
                   "framework on a mig instance": TorchUuid(fake_nvml.mig_uuid(1, 1))}.get(setup)
    if setup == "no module":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    if setup == "init fails":
        monkeypatch.setenv("FAKE_NVML_INIT", "fail")
    if setup in ("board in mig mode", "framework on a mig instance"):
        monkeypatch.setenv("FAKE_NVML_MIG", "0,1")
    log = []
    meter = energy.EnergyMeter(device_uuid=device_uuid, environ=environ, log=log.append).start()
    results = measured_epochs(meter, seconds=(0.01, 0.01))
    meter.stop()
    assert [joules for joules, _, _ in results] == [None, None]
    assert meter.summary([{"energy_joules": None}] * 2) == {"joules": None, "method": None, "sample_hz": None,
                                                           "gpus": []}
    assert len(log) == 1 and log[0].startswith("energy: not measured (") and reason in log[0], log
    assert log[0].endswith("the metrics' energy fields are null")
    assert fake_nvml.calls.get("nvmlDeviceGetTotalEnergyConsumption", 0) == 0  # no board was read
    assert fake_nvml.calls.get("nvmlShutdown", 0) == (0 if setup in ("no module", "init fails") else 1)


def test_a_run_total_needs_every_epoch():
    """A run resumed from a checkpoint written without energy figures has no total."""
    meter = energy.EnergyMeter(log=lambda message: None)
    meter.method = energy.COUNTER
    assert meter.summary([{"energy_joules": None}, {"energy_joules": 5.0}])["joules"] is None
    assert meter.summary([{"energy_joules": 2.5}, {"energy_joules": 5.0}])["joules"] == 7.5


def test_metrics_validation_checks_the_energy_fields():
    validate_metrics(make_metrics("torch-alexnet-scratch", energy_joules_per_epoch=120.5))
    validate_metrics(make_metrics("torch-alexnet-scratch"))  # not measured: all null
    wrong_total = make_metrics("torch-alexnet-scratch", energy_joules_per_epoch=120.5)
    wrong_total["energy"]["joules"] = 300.0
    with pytest.raises(MetricsError, match="energy/joules .* is not the sum of history"):
        validate_metrics(wrong_total)
    no_method = make_metrics("torch-alexnet-scratch", energy_joules_per_epoch=120.5)
    no_method["energy"]["method"] = None
    with pytest.raises(MetricsError, match="energy"):
        validate_metrics(no_method)
    no_rate = make_metrics("torch-alexnet-scratch", energy_joules_per_epoch=120.5)
    no_rate["energy"]["method"] = "power_samples"
    with pytest.raises(MetricsError, match="energy/sample_hz"):
        validate_metrics(no_rate)
    negative = make_metrics("torch-alexnet-scratch", energy_joules_per_epoch=120.5)
    negative["history"][0]["energy_joules"] = -1.0
    with pytest.raises(MetricsError, match="history/0/energy_joules"):
        validate_metrics(negative)
