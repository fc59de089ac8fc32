"""`snakemake preflight` (cnnbench.preflight): each framework's verdict and fix, with stand-in hosts.

No GPU here: the GPU hosts are stand-ins as in tests/test_gpu_detection.py (Host/HostGpus, a stand-in
nvidia-smi on PATH, the GPU variables), the image a stand-in `apptainer` that runs the job on this host
as Apptainer would inside an image, passing the host's nvidia-smi in only with --nv. The probes are the
real ones, on this venv's torch and TensorFlow, each in its own job."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cnnbench import preflight
from cnnbench.gpu import FrameworkBuild, Host, HostGpus, check_gpu, diagnose
from cnnbench.training import TrainingError
from cnnbench.keras_trainer import installed
from conftest import DEFAULT_HPARAMS, REPO, layered_config, linked_checkout, run_in_checkout, run_module

README_COMMAND = "snakemake --cores 1 preflight"  # README.md's, run as written (tests/test_readme.py)
H200 = HostGpus(("NVIDIA H200",), "580.65.06")
OLD_DRIVER = HostGpus(("NVIDIA H200",), "550.54.15")  # CUDA 12's, too old for CUDA 13.0
NO_SMI = HostGpus(problem="nvidia-smi is not installed here")
TORCH_CU130 = FrameworkBuild("torch 2.14.1+cu130", "13.0", "torch.version.cuda is None",
                             "install torch's CUDA wheels (make venv GPU=1), or run in the torch image")
TF_CPU = FrameworkBuild("Keras 3.15.1 on tensorflow 2.21.0", None, "the tensorflow-cpu package is installed",
                        "install tensorflow[and-cuda] instead of tensorflow-cpu (make venv GPU=1)")
TF_CUDA = FrameworkBuild("Keras 3.15.1 on tensorflow 2.21.0", "12.5.1")
GIVEN_GPU = {"CUDA_VISIBLE_DEVICES": "0"}  # what the GPU-slot launcher gives a job from the pool
GPU_VARIABLES = (*preflight.GPU_VARIABLES, "SLURM_JOB_ID", "CNNBENCH_GPU_POOL", "APPTAINER_CONTAINER",
                 "SINGULARITY_CONTAINER")
VENV, IMAGES = preflight.Route(containers=False), preflight.Route(containers=True, apptainer_args="--nv")


def probe_facts(build: FrameworkBuild, sees_gpu: bool, host: Host, framework: str | None = None) -> dict:
    """What `python -m cnnbench.preflight probe` writes, for a stand-in framework and host."""
    framework = framework or ("torch" if build.name.startswith("torch") else "keras")
    return {"framework": framework, "keras_backend": "tensorflow" if framework == "keras" else None,
            "invocation": "test", "hostname": "gpu-node", "python": "/venv/bin/python",
            "build": dataclasses.asdict(build), "sees_gpu": sees_gpu, "error": None,
            "host": preflight.host_facts(host)}


def config(require_gpu="auto", **overrides) -> dict:
    return layered_config({"train": {"require_gpu": require_gpu}, "variant_overrides": overrides})


def table(text: str) -> dict[str, dict[str, str]]:
    """The report's table: framework -> column -> cell."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|--")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert tuple(cells[0]) == preflight.HEADERS, text
    return {row[0]: dict(zip(cells[0], row)) for row in cells[1:]}


def judged(build, sees_gpu, host, route=VENV, host_gpus=None, settings=None):
    text, failing = preflight.report([probe_facts(build, sees_gpu, host)], settings or config(), route,
                                     host_gpus or host.gpus)
    [row] = table(text).values()
    return row, failing, text


# --------------------------------------------------------------------------- the verdicts, stand-in hosts
def test_cpu_only_tensorflow_on_a_gpu_host_will_fail_and_says_make_venv_gpu():
    host = Host(GIVEN_GPU, H200, device_files=("/dev/nvidia0",), libcuda=True)
    row, failing, text = judged(TF_CPU, False, host)
    assert (row["verdict"], row["fix"], row["CUDA"], row["sees GPU"]) == ("WILL FAIL", "`make venv GPU=1`",
                                                                          "none (CPU-only)", "no")
    assert failing == ["keras (tensorflow)"]
    with pytest.raises(TrainingError) as training:  # what the training itself would stop with
        check_gpu("auto", False, TF_CPU, host)
    assert f"keras (tensorflow): {training.value}" in text.splitlines()
    # In the image built with --tf-cpu (or --ci) the fix is the image.
    row, _, _ = judged(TF_CPU, False, dataclasses.replace(host, container="/c/tensorflow.sif"), IMAGES)
    assert row["fix"] == "`make containers` (the tensorflow image without --tf-cpu / --ci)"


def test_torch_built_for_a_newer_cuda_than_the_driver_says_torch_cuda_cu126():
    host = Host(GIVEN_GPU, OLD_DRIVER, device_files=("/dev/nvidia0",), libcuda=True)
    row, failing, text = judged(TORCH_CU130, False, host)
    assert (row["verdict"], row["CUDA"], row["needs driver"], row["driver"]) == ("WILL FAIL", "13.0", "580",
                                                                                 "550.54.15")
    assert row["fix"] == "`make venv GPU=1 TORCH_CUDA=cu126`" and failing == ["torch"]
    assert "the NVIDIA driver 550.54.15 (nvidia-smi) is too old for torch 2.14.1+cu130" in text
    in_image = dataclasses.replace(host, container="/c/torch.sif")  # --nv given: the driver is there
    row, _, _ = judged(TORCH_CU130, False, in_image, IMAGES)
    assert row["fix"] == ('`make containers CONTAINER_BUILD_ARGS="--torch-cuda cu126"` '
                          "(containers/build.sh --torch-cuda cu126)")
    # Older than CUDA 12 needs too: no torch wheel helps.
    row, _, _ = judged(TORCH_CU130, False, dataclasses.replace(host, gpus=HostGpus(("NVIDIA A100",), "470.57.02")))
    assert row["fix"] == "update the NVIDIA driver to >= 580"
    row, _, _ = judged(TF_CUDA, False, dataclasses.replace(host, gpus=HostGpus(("NVIDIA A100",), "470.57.02")))
    assert row["fix"] == "update the NVIDIA driver to >= 525.60.13"


def test_image_without_nv_on_a_host_with_gpus_says_add_nv():
    # Without --nv the job sees no device files, no libcuda and no nvidia-smi; the host's lists its GPU.
    in_image = Host(GIVEN_GPU, NO_SMI, container="/c/torch.sif")
    route = preflight.Route(containers=True, apptainer_args="--bind /data")
    row, failing, text = judged(TORCH_CU130, False, in_image, route, host_gpus=H200)
    assert (row["verdict"], row["driver"], row["runs in"]) == ("WILL FAIL", "580.65.06", "gpu-node: /c/torch.sif")
    assert row["fix"] == 'add --nv: `--apptainer-args "--bind /data --nv"`' and failing == ["torch"]
    assert "without the host's NVIDIA driver (no /dev/nvidia* devices and no libcuda.so.1)" in text
    # The host's driver, seen from outside the image, is too old as well: both fixes, at once.
    row, _, _ = judged(TORCH_CU130, False, in_image, route, host_gpus=OLD_DRIVER)
    assert row["fix"] == ('add --nv: `--apptainer-args "--bind /data --nv"`; `make containers '
                          'CONTAINER_BUILD_ARGS="--torch-cuda cu126"` (containers/build.sh --torch-cuda cu126)')
    # --nv given, and still no driver inside: the fix is not --nv again.
    row, _, _ = judged(TORCH_CU130, False, in_image, IMAGES, host_gpus=H200)
    assert row["fix"] == "--nv is given but no driver reached the image: check `apptainer exec --nv IMAGE nvidia-smi`"


def test_working_setup_is_ok_and_passes(tmp_path):
    host = Host(GIVEN_GPU, H200, device_files=("/dev/nvidia0",), libcuda=True)
    probes = []
    for build in (TORCH_CU130, TF_CUDA):
        probes.append(tmp_path / f"{build.name.split()[0]}.json")
        probes[-1].write_text(json.dumps(probe_facts(build, True, host)))
    preflight.run(probes, tmp_path / "preflight.txt", config(True), VENV)  # no PreflightFailed: exit 0
    rows = table((tmp_path / "preflight.txt").read_text())
    assert {name: (row["verdict"], row["sees GPU"], row["fix"]) for name, row in rows.items()} == {
        "torch": ("ok", "yes", "-"), "keras (tensorflow)": ("ok", "yes", "-")}
    assert not any(path.exists() for path in probes)  # the next preflight probes afresh


def test_a_failing_verdict_fails_the_rule_and_still_removes_the_probes(tmp_path):
    probe = tmp_path / "keras.json"
    probe.write_text(json.dumps(probe_facts(TF_CPU, False, Host(GIVEN_GPU, H200))))
    with pytest.raises(preflight.PreflightFailed, match=r"the keras \(tensorflow\) trainings would stop"):
        preflight.run([probe], tmp_path / "preflight.txt", config(), VENV)
    assert table((tmp_path / "preflight.txt").read_text())["keras (tensorflow)"]["verdict"] == "WILL FAIL"
    assert not probe.exists()


def test_verdicts_follow_each_variants_require_gpu():
    gpu_host, cpu_host = Host(GIVEN_GPU, H200), Host({}, NO_SMI)
    row, failing, text = judged(TF_CPU, False, gpu_host, settings=config(False))
    assert (row["verdict"], row["fix"], failing) == ("CPU (require_gpu: false)", "`make venv GPU=1`", [])
    assert "is a CPU-only build" in text  # what it would take to use the GPU
    row, failing, _ = judged(TF_CPU, False, cpu_host)
    assert (row["verdict"], row["fix"], failing) == ("no GPU expected", "-", [])
    row, failing, _ = judged(TF_CPU, False, cpu_host, settings=config(True))  # required: stops anywhere
    assert (row["verdict"], failing) == ("WILL FAIL", ["keras (tensorflow)"])
    # One variant of the framework stops, the other trains on the CPU: the row names the one.
    mixed = config(False, **{"keras-vgg16-pretrained": {"require_gpu": "auto"}})
    row, failing, _ = judged(TF_CPU, False, gpu_host, settings=mixed)
    assert row["verdict"] == "WILL FAIL (keras-vgg16-pretrained)" and failing == ["keras (tensorflow)"]


def test_diagnose_is_what_check_gpu_does():
    host = Host(GIVEN_GPU, OLD_DRIVER)
    verdict = diagnose("auto", False, TORCH_CU130, host)
    with pytest.raises(TrainingError) as stopped:
        check_gpu("auto", False, TORCH_CU130, host)
    assert verdict.stops and str(stopped.value) == verdict.message
    assert diagnose(False, False, TORCH_CU130).expected is None  # a CPU run on purpose looks nothing up
    with pytest.warns(UserWarning, match=diagnose(False, False, TORCH_CU130).message):
        check_gpu(False, False, TORCH_CU130)


def test_a_trainer_that_cannot_start_will_fail():
    facts = {**probe_facts(TF_CPU, False, Host({}, NO_SMI)), "build": None,
             "error": "TrainingError: Keras cannot start on the jax backend (No module named 'jax')"}
    text, failing = preflight.report([facts], config(), IMAGES, NO_SMI)
    assert table(text)["keras (tensorflow)"]["verdict"] == "WILL FAIL" and failing == ["keras (tensorflow)"]
    assert "keras (tensorflow): TrainingError: Keras cannot start on the jax backend" in text


# ------------------------------------------------------------------------------ the workflow's runs
def environ_without_gpus(path: list[str]) -> dict:
    """This environment without anything that says a GPU was given, ``path`` first on PATH."""
    environ = {name: value for name, value in os.environ.items() if name not in GPU_VARIABLES}
    return {**environ, "TF_CPP_MIN_LOG_LEVEL": "2",
            "PATH": os.pathsep.join([*path, str(Path(sys.executable).parent), environ["PATH"]])}


def stand_in_nvidia_smi(directory: Path, driver: str) -> Path:
    """An nvidia-smi listing one GPU, for the queries the workflow makes (gpu.py, gpu_slot.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "nvidia-smi").write_text(f"""#!/bin/sh
case "$*" in
  *--query-gpu=index*) echo 0 ;;
  *--query-gpu=name,driver_version*) echo "NVIDIA H200, {driver}" ;;
  *) echo "GPU 0: NVIDIA H200 (UUID: GPU-5f2e0000-0000-0000-0000-000000000000)" ;;
esac
""")
    (directory / "nvidia-smi").chmod(0o755)
    return directory


STAND_IN_APPTAINER = """#!{python}
# Stand-in apptainer: `exec` runs the command on this host as Apptainer runs it in an image (APPTAINER_CONTAINER
# set, APPTAINERENV_* passed in), the host's nvidia-smi only with --nv; each exec's options go to $STANDIN_LOG.
import json, os, sys

args = sys.argv[1:]
if args == ["--version"]:
    sys.exit(print("apptainer version 1.4.5"))
if args[0] == "inspect":  # the stand-in image file holds its labels
    sys.exit(print(json.dumps({{"data": {{"attributes": {{"labels": json.load(open(args[-1]))}}}}}})))
rest, options = args[args.index("exec") + 1:], []
while rest[0].startswith("-"):
    options.append(rest.pop(0))
    if options[-1] in ("--home", "--bind", "-B", "--pwd", "--env"):
        options.append(rest.pop(0))
image, command = rest[0], rest[1:]
with open(os.environ["STANDIN_LOG"], "a") as log:
    log.write(json.dumps(options) + "\\n")
env = {{**os.environ, "APPTAINER_CONTAINER": image}}
env.update({{name.split("ENV_", 1)[1]: value for name, value in os.environ.items()
            if name.startswith(("APPTAINERENV_", "SINGULARITYENV_"))}})
if "--nv" not in options:
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep)
                                  if not os.path.exists(os.path.join(d, "nvidia-smi")))
os.execvpe(command[0], command, env)
"""


def snakemake(workdir: Path, *args, environ: dict):
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                             str(workdir), "--cores", "2", *args], capture_output=True, text=True, env=environ,
                            timeout=600)
    return result.returncode, result.stdout + result.stderr




def torch_fix_for_an_old_driver() -> str:
    """This venv's torch on a CUDA 12 driver: its CUDA 13 build needs cu126 (a CPU-only build, the GPU venv)."""
    import importlib.util

    version_py = Path(importlib.util.find_spec("torch").submodule_search_locations[0]) / "version.py"
    cuda = re.search(r"^cuda(?:: [^=]+)? = '([^']+)'", version_py.read_text(), re.M)
    return "`make venv GPU=1`" if cuda is None else "`make venv GPU=1 TORCH_CUDA=cu126`"


def test_preflight_here_as_the_readme_says(tmp_path):
    """The real run: this machine, this venv, the default config (require_gpu auto)."""
    checkout = linked_checkout(tmp_path / "cnnbench")
    result = run_in_checkout(checkout, README_COMMAND)
    output = result.stdout + result.stderr
    host = subprocess.run("nvidia-smi -L", shell=True, capture_output=True, text=True).stdout
    expected = "ok" if "GPU " in host else "no GPU expected"  # the GPU venv where nvidia-smi lists one
    assert result.returncode == 0, output[-5000:]
    rows = table(output)
    assert set(rows) == {"torch", "keras (tensorflow)"}
    assert all(row["verdict"] == expected for row in rows.values()), output[-3000:]
    assert rows["torch"]["build"].startswith("torch 2.14.1")
    assert rows["keras (tensorflow)"]["build"] == "Keras 3.15.1 on tensorflow 2.21.0"
    assert table((checkout / "results" / "logs" / "preflight.txt").read_text()) == rows
    assert not list((checkout / "results").glob("preflight/*.json"))  # no probe left for the next one


def test_preflight_on_a_stand_in_gpu_host_fails_as_the_trainings_would(tmp_path):
    bindir = stand_in_nvidia_smi(tmp_path / "bin", "550.54.15")
    environ = environ_without_gpus([str(bindir)])
    code, output = snakemake(tmp_path / "work", "preflight", environ=environ)
    assert code != 0, output[-5000:]
    assert "preflight: the torch and keras (tensorflow) trainings would stop" in output
    rows = table(output)
    assert rows["torch"]["verdict"] == rows["keras (tensorflow)"]["verdict"] == "WILL FAIL"
    assert rows["torch"]["driver"] == "550.54.15" and rows["torch"]["fix"] == torch_fix_for_an_old_driver()
    if installed("tensorflow-cpu"):  # requirements.txt's TensorFlow on a GPU host
        assert rows["keras (tensorflow)"]["fix"] == "`make venv GPU=1`"
    else:  # a CUDA TensorFlow that sees no GPU on this GPU-less machine: nothing else to blame
        assert rows["keras (tensorflow)"]["fix"] == "check CUDA_VISIBLE_DEVICES and `nvidia-smi`"
    # Each trainer, given the GPU its launcher would give it, stops with what preflight said it would.
    for framework, label, variant in (("torch", "torch", "torch-alexnet-scratch"),
                                      ("keras", "keras (tensorflow)", "keras-alexnet-scratch")):
        hparams = json.dumps({**DEFAULT_HPARAMS, "require_gpu": "auto"})
        trained = run_module(f"{framework}_trainer", "--variant", variant, "--seed", 0, "--data",
                             tmp_path / "no-data.npz", "--hparams", hparams, "--run-dir", tmp_path / "run",
                             "--metrics", tmp_path / "run" / "metrics.json", "--model-out", tmp_path / "run" / "m",
                             check=False, env={**environ, **GIVEN_GPU})
        said = next(line for line in output.splitlines() if line.startswith(f"{label}: "))
        assert trained.returncode == 1 and f"error: {said.removeprefix(f'{label}: ')}" in trained.stderr


def test_preflight_in_images_started_without_nv_says_add_nv(tmp_path):
    bindir = stand_in_nvidia_smi(tmp_path / "bin", "580.65.06")
    (bindir / "apptainer").write_text(STAND_IN_APPTAINER.format(python=sys.executable))
    (bindir / "apptainer").chmod(0o755)
    images = {"torch": tmp_path / "torch.sif", "tensorflow": tmp_path / "tensorflow.sif"}
    images["torch"].write_text(json.dumps({"cnnbench.framework": "torch"}))
    images["tensorflow"].write_text(json.dumps({"cnnbench.framework": "keras"}))
    environ = {**environ_without_gpus([str(bindir)]), "STANDIN_LOG": str(tmp_path / "apptainer.log")}
    code, output = snakemake(tmp_path / "work", "preflight", "--use-singularity", "--apptainer-args=--bind /tmp",
                             "--config", f"containers={{torch: {images['torch']}, tensorflow: {images['tensorflow']}}}",
                             environ=environ)
    assert code != 0, output[-5000:]
    rows = table(output)
    add_nv = 'add --nv: `--apptainer-args "--bind /tmp --nv"`'
    assert rows["torch"]["verdict"] == "WILL FAIL" and rows["torch"]["fix"] == add_nv
    assert rows["torch"]["runs in"].endswith(f": {images['torch']}")
    assert rows["keras (tensorflow)"]["runs in"].endswith(f": {images['tensorflow']}")
    assert add_nv in rows["keras (tensorflow)"]["fix"]
    execs = [json.loads(line) for line in (tmp_path / "apptainer.log").read_text().splitlines()]
    assert len(execs) == 2 and all("--bind" in options and "--nv" not in options for options in execs)


def test_preflight_is_a_target_of_its_own_and_the_workflow_lints_clean(tmp_path):
    environ = environ_without_gpus([])
    code, listed = snakemake(tmp_path, "--list-target-rules", environ=environ)
    assert code == 0 and "preflight" in listed.split()
    code, plan = snakemake(tmp_path, "-n", environ=environ)  # `all`: the trainings, no preflight
    jobs = re.findall(r"^(\w+)\s+\d+$", plan.split("Job stats:", 1)[1].split("total", 1)[0], re.M)
    assert code == 0 and "train_torch" in jobs and not [job for job in jobs if "preflight" in job], plan[-3000:]
    code, lint = snakemake(tmp_path, "--lint", environ=environ)
    assert code == 0 and "Congratulations, your workflow is in a good condition!" in lint, lint[-5000:]
