"""Shared test helpers.

Tests that need an external tool (Apptainer, SLURM, a GPU, the real data) skip when it is
missing, except where CNNBENCH_REQUIRE_TOOLS is set (CI sets it): there a missing tool fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO / "workflow"
sys.path.insert(0, str(PACKAGE_DIR))

REQUIRE_TOOLS = bool(os.environ.get("CNNBENCH_REQUIRE_TOOLS"))
SHARED_JPEG_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


def skip_or_fail(reason: str):
    """Skip on a user's machine; fail where CI demands every check (CNNBENCH_REQUIRE_TOOLS)."""
    if REQUIRE_TOOLS:
        pytest.fail(f"{reason} (CNNBENCH_REQUIRE_TOOLS is set, so this check may not be skipped)")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed")
    return path


def package_env(extra: dict | None = None) -> dict:
    """The environment a framework subprocess runs in: the package importable, TF's log quiet."""
    return {**os.environ, "PYTHONPATH": str(PACKAGE_DIR), "TF_CPP_MIN_LOG_LEVEL": "2", **(extra or {})}


def run_module(module: str, *args, env: dict | None = None, check: bool = True, timeout: float = 900,
               prelude: str | None = None):
    """Run ``python -m cnnbench.<module>`` in its own process (one framework per process); with
    ``prelude``, that code runs first in the same interpreter, then the module as ``__main__``."""
    full_env = package_env(env)
    if prelude is None:
        command = [sys.executable, "-m", f"cnnbench.{module}"]
    else:
        command = [sys.executable, "-c", f"{prelude}\nimport runpy\n"
                   f"runpy.run_module('cnnbench.{module}', run_name='__main__', alter_sys=True)"]
    result = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=full_env,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"cnnbench.{module} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def run_python(code: str, env: dict | None = None, timeout: float = 600):
    """Run ``code`` in a fresh interpreter with the package importable; return its last JSON line."""
    full_env = package_env(env)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                            timeout=timeout)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def removed_unless_failed(request, path: Path):
    """Yield ``path`` for a module-scoped fixture; remove it at teardown unless a test of the session
    failed meanwhile (then it stays for debugging). Module fixtures hold whole workflow runs (GBs of
    models); without this they would pile up under pytest's basetemp until the session ends."""
    failed_before = request.session.testsfailed
    yield path  # an exception raised in the fixture propagates from here and keeps the directory
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


def layered_config(*overlays: dict) -> dict:
    """config/config.yaml with ``overlays`` merged over it in order, by Snakemake's own merge."""
    import copy

    import yaml
    from snakemake.utils import update_config

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for overlay in overlays:
        update_config(config, copy.deepcopy(overlay))  # in place; the copy keeps the caller's overlay apart
    return config


def demo_config() -> dict:
    """What `snakemake --configfile config/demo.yaml` runs with."""
    import yaml

    return layered_config(yaml.safe_load((REPO / "config" / "demo.yaml").read_text()))


def run_dir(results: Path, variant: str, seed: int = 0, train_size: int | None = None, lr: float | None = None,
            config: dict | None = None) -> Path:
    """A run's directory under ``results`` (``cnnbench.config.run_name``); ``lr`` defaults to the
    variant's in ``config`` (default: the demo's, which the tests' overlays of it keep)."""
    from cnnbench.config import resolve_hparams, run_name

    if lr is None:
        lr = resolve_hparams(config or demo_config(), variant)["lr"]
    return results / "runs" / run_name(variant, train_size, lr, seed)


# An overlay of config/demo.yaml for tests that run its scratch variants but need no learning: without
# the demo's 100-step budget they train the epochs the test sets (seconds, not minutes).
NO_DEMO_MIN_STEPS = "init_overrides:\n  scratch:\n    min_steps: null\n"


DEFAULT_HPARAMS = {
    "epochs": 1, "batch_size": 16, "eval_batch_size": 64, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
    "nesterov": False, "weight_decay": 0.0005, "lr_schedule": "constant", "dropout": 0.5, "image_size": 64,
    "preprocessing": "auto", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "precision": "fp32",
    "require_gpu": False, "compile": "auto",
}


def saved_kernel_initializers(model_file: Path) -> dict[str, str]:
    """{layer: its kernel initializer's class name} for the top-level layers with one in a saved
    model.keras, read from the archive's config.json (no Keras in this process)."""
    import zipfile

    with zipfile.ZipFile(model_file) as archive:
        config = json.loads(archive.read("config.json"))
    return {layer["config"]["name"]: layer["config"]["kernel_initializer"]["class_name"]
            for layer in config["config"]["layers"] if isinstance(layer["config"].get("kernel_initializer"), dict)}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared synthetic dataset small enough for one-epoch trainer runs."""
    from cnnbench.data import prepare

    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    prepare({"source": "synthetic", "val_size": 20, "split_seed": 0,
             "synthetic": {"train_per_class": 6, "test_per_class": 3, "image_size": 32, "seed": 0}}, path)
    return path


# What a user's checkout holds, linked into a temporary directory: README commands run there as
# written (relative paths, `make`, the workflow profile), writing results/ and resources/ beside them.
CHECKOUT_ENTRIES = ("Snakefile", "workflow", "config", "profiles", "containers", "Makefile", "requirements.txt",
                    "requirements-gpu.txt", ".venv")


def linked_checkout(directory: Path) -> Path:
    if not (REPO / ".venv" / "bin" / "snakemake").exists():
        skip_or_fail(f"{REPO / '.venv'} does not exist: README commands run in the venv `make venv` creates")
    directory.mkdir(parents=True, exist_ok=True)
    for name in CHECKOUT_ENTRIES:
        (directory / name).symlink_to(REPO / name)
    return directory


# What `make test` exports to the tests; a `make` they start would take it as a sub-make's (say
# "make[1]: Entering directory" and pass -n through), unlike the same command typed by a user.
MAKE_VARIABLES = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")


def outside_make() -> dict:
    """This process's environment without what `make test` put there for sub-makes."""
    return {name: value for name, value in os.environ.items() if name not in MAKE_VARIABLES}


def run_in_checkout(checkout: Path, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``command`` through bash in ``checkout``, with the venv's tools first on PATH (as after
    `source .venv/bin/activate`)."""
    env = {**outside_make(), "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(["bash", "-c", command], cwd=checkout, capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="session")
def demo_checkout(request, tmp_path_factory, worker_id):
    """`make demo`, exactly as the README says, in a linked checkout (shared by the tests that need
    the demo's results). Under pytest-xdist the workers share one demo: the first to get here runs
    it, holding a lock; the others wait on the lock and reuse its checkout and output."""
    if worker_id == "master":
        with removed_unless_failed(request, tmp_path_factory.mktemp("demo-checkout")) as directory:
            yield run_demo(directory)
        return
    shared = tmp_path_factory.getbasetemp().parent / "demo-checkout"  # the session's, beside each worker's
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this worker's demo is ready or failed
        done, failed = shared / "make-demo-output.txt", shared / "make-demo-failure.txt"
        if failed.exists():
            pytest.fail(f"`make demo` failed in another test worker:\n{failed.read_text()}")
        if not done.exists():
            try:
                checkout, output = run_demo(shared)
            except BaseException as err:
                failed.write_text(str(err))
                raise
            done.write_text(output)
    yield shared / "cnnbench", done.read_text()


def run_demo(directory: Path) -> tuple[Path, str]:
    checkout = linked_checkout(directory / "cnnbench")
    result = run_in_checkout(checkout, "make demo", timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return checkout, result.stdout + result.stderr


# With `--dist loadfile` (make test) a worker takes a whole module at a time, in collection order
# (`--no-loadscope-reorder`). The longest modules go first, so that they start at once instead of
# leaving one worker busy long after the other is done (the real-data test alone takes ~20 min on
# 2 cores; CI measured a worker idle for 23 min when it ran last).
LONGEST_FIRST = ("test_real_data.py", "test_full_grid.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order
