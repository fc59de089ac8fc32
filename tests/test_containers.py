"""The demo in the Apptainer images (`--use-singularity`), and the errors for bad container setups.

The images are expected prebuilt at containers/torch.sif and containers/tensorflow.sif
(`containers/build.sh`; CI builds them before pytest). Without apptainer or the images these tests
skip, unless CNNBENCH_REQUIRE_TOOLS is set (then they fail).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cnnbench.data import load_prepared
from cnnbench.metrics import load_metrics
from conftest import (DEFAULT_HPARAMS, NO_DEMO_MIN_STEPS, PACKAGE_DIR, REPO, removed_unless_failed, require_tool,
                      run_dir, skip_or_fail)
from test_workflow import PARAMETERS

IMAGES = {"torch": REPO / "containers" / "torch.sif", "keras": REPO / "containers" / "tensorflow.sif"}
DEMO_VARIANTS = ["torch-alexnet-scratch", "keras-alexnet-scratch", "torch-alexnet-pretrained",
                 "keras-vgg16-pretrained"]
MODEL_FILE = {"torch": "model.pt", "keras": "model.keras"}


def snakemake(workdir: Path, *args, env: dict | None = None, timeout: float = 2400):
    # The demo as the README runs it, but its scratch variants train 2 epochs, not make demo's 105 steps
    # (tests/test_workflow.py checks that they learn; here the images are what is under test).
    overlay = workdir / "no-demo-min-steps.yaml"
    overlay.write_text(NO_DEMO_MIN_STEPS)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(REPO / "config" / "demo.yaml"), str(overlay), *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def images():
    require_tool("apptainer")
    for path in IMAGES.values():
        if not path.exists():
            skip_or_fail(f"{path} does not exist: build the images with containers/build.sh")
    return IMAGES


@pytest.fixture(scope="module")
def container_demo(images, request, tmp_path_factory):
    with removed_unless_failed(request, tmp_path_factory.mktemp("container-demo")) as workdir:
        # A one-GPU stand-in pool: its slot must reach the trainer inside the image.
        code, output = snakemake(workdir, "--use-singularity", "--cores", "1", "--resources", "gpu=1",
                                 "--config", "gpus=[0]")
        assert code == 0, output[-8000:]
        yield workdir, output


def test_container_demo_produces_every_output(container_demo):
    workdir, output = container_demo
    assert "Using workflow specific profile profiles/default" in output  # its singularity-args: --nv
    results = workdir / "results"
    for variant in DEMO_VARIANTS:
        run = run_dir(results, variant)
        metrics = load_metrics(run / "metrics.json")  # validates against the schema
        assert metrics["variant"] == variant and len(metrics["history"]) == 2
        assert (run / MODEL_FILE[metrics["framework"]]).stat().st_size > 4 * PARAMETERS[metrics["model"]]
        # The trainer records the image Apptainer ran it in.
        container = metrics["environment"]["container"]
        assert container and Path(container).resolve() == IMAGES[metrics["framework"]].resolve(), container
        assert metrics["environment"]["cuda_visible_devices"] == "0"
    summary = pd.read_csv(results / "summary.csv")
    assert sorted(summary["variant"]) == sorted(DEMO_VARIANTS) and summary["test_accuracy"].between(0, 1).all()
    assert all(variant in (results / "summary.md").read_text() for variant in DEMO_VARIANTS)
    assert (results / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prepared = load_prepared(results / "data" / "dataset.npz")
    assert (len(prepared["y_train"]), len(prepared["y_val"]), len(prepared["y_test"])) == (400, 100, 100)
    assert sorted(p.name for p in (workdir / "resources" / "weights" / "standin").iterdir()) == [
        "alexnet-owt-7be5be79.pth", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"]


def test_missing_image_says_how_to_build_it(images, tmp_path):
    code, output = snakemake(tmp_path, "--use-singularity", "-n", "--config",
                             f"containers={{torch: {tmp_path / 'nope.sif'}, tensorflow: {images['keras']}}}")
    assert code != 0
    assert f"container image {tmp_path / 'nope.sif'}" in output and "containers/build.sh torch" in output


def test_image_of_the_other_framework_is_refused(images, tmp_path):
    code, output = snakemake(tmp_path, "--use-singularity", "-n", "--config",
                             f"containers={{torch: {images['keras']}, tensorflow: {images['torch']}}}")
    assert code != 0
    assert "is the keras image, not the torch one" in output and "containers/build.sh torch" in output


def test_missing_apptainer_says_how_to_install_it(tmp_path):
    # PATH without the directories that hold apptainer/singularity (plus the few tools snakemake
    # calls, should they live there too).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ["sh", "bash", "which", "uname"]:
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bindir / tool)
    path = [d for d in os.environ["PATH"].split(os.pathsep)
            if not any((Path(d) / tool).exists() for tool in ["apptainer", "singularity"])]
    code, output = snakemake(tmp_path, "--use-singularity", "-n",
                             env={"PATH": os.pathsep.join([str(Path(sys.executable).parent), *path, str(bindir)])})
    assert code != 0
    assert "needs `apptainer` on PATH" in output and "containers/install-apptainer.sh" in output


def test_images_are_labelled_with_framework_and_versions(images):
    for framework, image in images.items():
        out = subprocess.run(["apptainer", "inspect", "--json", "--labels", str(image)],
                             capture_output=True, text=True, check=True, timeout=120).stdout
        labels = json.loads(out)["data"]["attributes"]["labels"]
        assert labels["cnnbench.framework"] == framework
        assert ("torch==2.14.1" if framework == "torch" else "==2.21.0") in labels["cnnbench.requirements"]
        # The CUDA build the installed framework reports ("none": CPU-only), as the metrics record it.
        probe = ("import torch; print(torch.version.cuda or 'none')" if framework == "torch" else
                 "import tensorflow as tf; info = tf.sysconfig.get_build_info(); "
                 "print(info.get('cuda_version') if info.get('is_cuda_build') else 'none')")
        reported = subprocess.run(["apptainer", "exec", str(image), "python", "-c", probe], capture_output=True,
                                  text=True, check=True, timeout=300).stdout.strip().splitlines()[-1]
        assert labels["cnnbench.cuda_build"] == reported
        assert "nvidia-ml-py==13.615.71" in labels["cnnbench.requirements"]  # energy through NVML


def test_torch_image_trains_a_compiled_model(images, tiny_dataset, tmp_path):
    # torch.compile (`compile: auto` on a GPU) builds C code at the first compiled step: Inductor's C++ kernels
    # on the CPU, Triton's launcher on a GPU. The image must carry the compiler and the Python headers.
    hp = {**DEFAULT_HPARAMS, "compile": "on", "max_steps_per_epoch": 2,
          "eval_batch_size": 10}  # one batch shape for validation (20 images) and test (30): one eval graph
    run, cache = tmp_path / "run", tmp_path / "inductor-cache"
    binds = [f"{PACKAGE_DIR}:{PACKAGE_DIR}:ro", f"{tiny_dataset.parent}:{tiny_dataset.parent}:ro", str(tmp_path)]
    # An empty cache: kernels an earlier run (or the host's torch) compiled would hide a missing compiler.
    settings = f"PYTHONPATH={PACKAGE_DIR},TORCHINDUCTOR_CACHE_DIR={cache}"
    trainer = ["python", "-m", "cnnbench.torch_trainer", "--variant", "torch-alexnet-scratch", "--seed", "0",
               "--data", str(tiny_dataset), "--hparams", json.dumps(hp), "--run-dir", str(run),
               "--metrics", str(run / "metrics.json"), "--model-out", str(run / "model.pt")]
    result = subprocess.run(["apptainer", "exec", *(f"--bind={bind}" for bind in binds), "--env", settings,
                             str(images["torch"]), *trainer], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-8000:]
    assert "compiling the model with torch.compile (compile: on)" in result.stderr
    metrics = load_metrics(run / "metrics.json")  # validates against the schema
    assert metrics["environment"]["compiled"] is True and metrics["environment"]["device"] == "cpu"
    assert metrics["compile_seconds"] > 0 and "warm-up (compiled)" in result.stderr  # compiled before epoch 1
    assert Path(metrics["environment"]["container"]).resolve() == images["torch"].resolve()
    assert len(metrics["history"]) == 1
    trained = 2 * hp["batch_size"]  # max_steps_per_epoch steps of a batch
    assert f"| {trained}.0/{trained}.0 [" in result.stderr  # the epoch's progress bar at its end
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == 30
    assert any(cache.rglob("*.so")), f"Inductor compiled no kernel into {cache}"
