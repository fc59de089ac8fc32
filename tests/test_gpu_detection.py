"""require_gpu's decision and diagnosis (cnnbench.gpu), with stand-in hosts: no GPU needed.

The trainers' side (their frameworks' probes, failing before any data is loaded) is in
tests/test_trainers.py."""

from __future__ import annotations

import os
import warnings

import jsonschema
import pytest

from cnnbench.gpu import (FrameworkBuild, Host, HostGpus, check_gpu, cudnn_version_string, expected_because,
                          likely_causes, min_driver, query_nvidia_smi)
from cnnbench.metrics import schema
from cnnbench.training import TrainingError
from cnnbench.keras_trainer import installed
from conftest import run_python

H200 = HostGpus(names=("NVIDIA H200",), driver_version="470.57.02")
NO_SMI = HostGpus(problem="nvidia-smi is not installed here")
TORCH_CU130 = FrameworkBuild("torch 2.14.1+cu130", "13.0", "torch.version.cuda is None", "install CUDA wheels")
TF_CPU = FrameworkBuild("Keras 3.15.1 on tensorflow 2.21.0", None, "the tensorflow-cpu package is installed",
                        "install tensorflow[and-cuda] instead of tensorflow-cpu")


def host(environ=None, gpus=NO_SMI, **facts) -> Host:
    return Host(environ=environ or {}, gpus=gpus, **facts)


@pytest.mark.parametrize("environ, expected", [
    ({}, []),
    ({"CUDA_VISIBLE_DEVICES": "0"}, ["CUDA_VISIBLE_DEVICES=0"]),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5f2e"}, ["CUDA_VISIBLE_DEVICES=GPU-5f2e"]),
    ({"CUDA_VISIBLE_DEVICES": ""}, []),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, []),
    ({"SLURM_JOB_GPUS": "0"}, ["SLURM_JOB_GPUS=0"]),  # an index: GPU 0
    ({"SLURM_STEP_GPUS": "1,3"}, ["SLURM_STEP_GPUS=1,3"]),
    ({"SLURM_GPUS_ON_NODE": "0"}, []),  # a count: none
    ({"SLURM_GPUS_ON_NODE": "2"}, ["SLURM_GPUS_ON_NODE=2"]),
    ({"SLURM_GPUS_PER_NODE": "a100:0"}, []),
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, ["SLURM_GPUS_PER_NODE=a100:2"]),
    ({"SLURM_GPUS": ""}, []),
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "4"}, []),  # a SLURM job without GPUs
])
def test_what_says_a_gpu_was_expected(environ, expected):
    assert expected_because(host(environ)) == expected


def test_nvidia_smi_listing_a_gpu_means_one_was_expected_unless_cuda_visible_devices_hides_it():
    assert expected_because(host(gpus=H200)) == ["nvidia-smi lists 1 GPU(s): NVIDIA H200, driver 470.57.02"]
    assert expected_because(host({"CUDA_VISIBLE_DEVICES": "0"}, gpus=H200)) == [
        "CUDA_VISIBLE_DEVICES=0", "nvidia-smi lists 1 GPU(s): NVIDIA H200, driver 470.57.02"]
    for hidden in ("", "-1"):  # the CPU on purpose
        assert expected_because(host({"CUDA_VISIBLE_DEVICES": hidden}, gpus=H200)) == []


def test_cpu_only_build_is_named_with_what_to_install():
    causes = likely_causes(TF_CPU, host({"CUDA_VISIBLE_DEVICES": "0"}, gpus=H200, libcuda=True,
                                        device_files=("/dev/nvidia0",)))
    assert causes == ["Keras 3.15.1 on tensorflow 2.21.0 is a CPU-only build (the tensorflow-cpu package is "
                      "installed): install tensorflow[and-cuda] instead of tensorflow-cpu"]


@pytest.mark.parametrize("cuda, driver, needed", [("13.0", "470.57.02", "580"), ("13.0", "575.51.03", "580"),
                                                  ("12.5.1", "470.57.02", "525.60.13"),
                                                  ("11.8", "418.67", "450.80.02")])
def test_driver_older_than_the_builds_cuda_needs_is_named_with_both_versions(cuda, driver, needed):
    build = FrameworkBuild("torch 2.14.1", cuda)
    [cause] = likely_causes(build, host(gpus=HostGpus(("NVIDIA A100",), driver), libcuda=True))
    assert cause.startswith(f"the NVIDIA driver {driver} (nvidia-smi) is too old for torch 2.14.1, built for "
                            f"CUDA {cuda}, which needs driver >= {needed}: update the driver")


def test_new_enough_driver_is_not_blamed():
    [cause] = likely_causes(TORCH_CU130, host(gpus=HostGpus(("NVIDIA H200",), "580.65.06"), libcuda=True))
    assert cause.startswith("none of the usual ones") and "driver 580.65.06" in cause and "CUDA 13.0" in cause


def test_container_without_nv_is_named():
    causes = likely_causes(TORCH_CU130, host({"SLURM_JOB_GPUS": "0"}, container="/images/torch.sif",
                                             device_files=("/dev/nvidia0",), libcuda=False))
    assert causes == ["this runs in the container /images/torch.sif without the host's NVIDIA driver "
                      "(no libcuda.so.1): Apptainer passes the GPU in only with --nv (the workflow's default "
                      "profile adds it; --singularity-args on the command line replaces the profile's, so "
                      "repeat --nv there)"]
    [cause] = likely_causes(TORCH_CU130, host(container="/images/torch.sif"))
    assert "(no /dev/nvidia* devices and no libcuda.so.1)" in cause


def test_missing_driver_is_named():
    [cause] = likely_causes(TORCH_CU130, host({"CUDA_VISIBLE_DEVICES": "0"}))
    assert cause == ("no working NVIDIA driver on this machine (nvidia-smi is not installed here; libcuda.so.1 "
                     "does not load): run on a GPU node, or have its driver installed")


def test_check_gpu_false_never_stops_true_always_auto_when_expected():
    expected, unexpected = host({"CUDA_VISIBLE_DEVICES": "0"}), host()
    for require_gpu in (True, "auto", False):
        check_gpu(require_gpu, True, TORCH_CU130, expected)  # the framework sees a GPU: nothing to say
    with pytest.warns(UserWarning, match="training on the CPU"):
        check_gpu(False, False, TORCH_CU130, expected)
    with pytest.warns(UserWarning, match="training on the CPU"):
        check_gpu("auto", False, TORCH_CU130, unexpected)
    with pytest.raises(TrainingError) as auto:
        check_gpu("auto", False, TF_CPU, expected)
    assert str(auto.value).startswith("a GPU was expected (CUDA_VISIBLE_DEVICES=0) but Keras 3.15.1 on tensorflow "
                                      "2.21.0 sees none, so this run would train on the CPU. Likely cause: (1) "
                                      "Keras 3.15.1 on tensorflow 2.21.0 is a CPU-only build")
    assert "(2) no working NVIDIA driver" in str(auto.value)
    assert str(auto.value).endswith("set require_gpu: false (in `train`, or per variant in variant_overrides). "
                                    "No data was loaded, no metrics were written.")
    with pytest.raises(TrainingError, match=r"^require_gpu is true but torch 2\.14\.1\+cu130 sees none"):
        check_gpu(True, False, TORCH_CU130, unexpected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_gpu(True, True, TORCH_CU130, unexpected)




def fake_nvidia_smi(directory, script: str) -> str:
    directory.mkdir(exist_ok=True)
    path = directory / "nvidia-smi"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(directory)


def test_nvidia_smi_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "ok", 'echo "NVIDIA H200, 570.86.15"\n'
                                                                 'echo "NVIDIA H200, 570.86.15"'))
    assert query_nvidia_smi() == HostGpus(("NVIDIA H200", "NVIDIA H200"), "570.86.15")
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "broken", "echo 'NVIDIA-SMI has failed because it "
                                                                    "couldn'\"'\"'t communicate with the NVIDIA "
                                                                    "driver.'; exit 9"))
    assert query_nvidia_smi() == HostGpus(problem="nvidia-smi failed: NVIDIA-SMI has failed because it couldn't "
                                                  "communicate with the NVIDIA driver.")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert query_nvidia_smi() == HostGpus(problem="nvidia-smi is not installed here")


def test_versions():
    assert cudnn_version_string(92400) == "9.24.0" and cudnn_version_string(8907) == "8.9.7"
    assert cudnn_version_string(None) is None
    assert min_driver("13.0") == "580" and min_driver("12.5.1") == "525.60.13" and min_driver("10.2") is None


# The trainers' GPU facts with their frameworks' GPU calls stood in for (no GPU here): the fields
# the metrics schema wants, the driver from nvidia-smi. Each framework in its own process.
GPU_FACTS_TORCH = """
import json, torch
from cnnbench import torch_trainer
torch.cuda.get_device_name = lambda device=None: "Stand-in GPU"
torch.cuda.device_count = lambda: 2
torch.cuda.max_memory_allocated = lambda device=None: 123456789
print(json.dumps(torch_trainer.gpu_environment(torch.device("cuda"))))
"""
GPU_FACTS_KERAS = """
import json
import tensorflow as tf
from cnnbench import keras_trainer
tf.config.experimental.get_memory_info = lambda device: {"current": 1, "peak": 987654321}
tf.config.experimental.get_device_details = lambda device: {"device_name": "Stand-in GPU"}

class JaxDevice:
    device_kind = "Stand-in GPU"
    def memory_stats(self):
        return {"peak_bytes_in_use": 55555}

print(json.dumps({"tensorflow": keras_trainer.gpu_environment("tensorflow", ["GPU:0"]),
                  "jax": keras_trainer.gpu_environment("jax", [JaxDevice()])}))
"""


def test_gpu_facts_in_the_metrics_environment(tmp_path):
    bindir = fake_nvidia_smi(tmp_path, 'echo "Stand-in GPU, 570.86.15"')
    path = f"{bindir}:{os.environ['PATH']}"
    torch_facts = run_python(GPU_FACTS_TORCH, env={"PATH": path})
    keras_facts = run_python(GPU_FACTS_KERAS, env={"PATH": path})
    gpu_schema = schema()["properties"]["environment"]["properties"]["gpu"]
    for facts in (torch_facts, keras_facts["tensorflow"], keras_facts["jax"]):
        jsonschema.validate(facts, gpu_schema)
        assert facts["name"] == "Stand-in GPU" and facts["driver_version"] == "570.86.15"
    assert torch_facts["count"] == 2 and torch_facts["peak_memory_bytes"] == 123456789
    assert torch_facts["cuda_version"] is not None and torch_facts["cudnn_version"].count(".") == 2  # cu130 torch
    assert keras_facts["tensorflow"]["peak_memory_bytes"] == 987654321
    if installed("tensorflow-cpu"):  # requirements.txt's: no CUDA build (make venv on a host without GPUs)
        assert keras_facts["tensorflow"]["cuda_version"] is None
    else:  # requirements-gpu.txt's tensorflow[and-cuda] (make venv where nvidia-smi lists a GPU)
        assert keras_facts["tensorflow"]["cuda_version"] is not None
    assert keras_facts["jax"] == {"name": "Stand-in GPU", "count": 1, "driver_version": "570.86.15",
                                  "cuda_version": None, "cudnn_version": None, "peak_memory_bytes": 55555}
    jsonschema.validate(None, gpu_schema)  # the CPU's
