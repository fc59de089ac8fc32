"""The documentation is a contract: every `snakemake …`, `make …` and `python -m pytest …` command in
README.md, docs/*.md and config/README.md runs here as written, and their links lead somewhere.

Each command runs in a linked checkout (tests/conftest.py: the repository's files linked into a
temporary directory), from its root, with the venv first on PATH. Commands that would train for hours
run as a dry run (`-n` appended), which also shows each training's CPU threads; cheap ones run for
real; `make test` and `make containers` are what CI's `.ci/run` itself runs. A command added to a page
without a check here fails the test.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, linked_checkout, require_tool, run_in_checkout, skip_or_fail

DRY, REAL, CI, DEMO, AFTER_DEMO = "dry run", "real", "run by .ci/run", "make demo", "real, over the demo results"
MAKE_DRY = "make -n"  # what the recipe would run (installs from indexes CI cannot reach, image builds)
GPU = "real: passes with a GPU, fails naming CNNBENCH_REQUIRE_GPU without one"
PREFLIGHT = "real: tests/test_preflight.py runs it as written"
PREFLIGHT_DRY = "dry run: plans the preflight's probes and table, no training"
CHECKS = {
    "make demo": DEMO,
    "make test": CI,
    "make containers": CI,
    "snakemake --use-singularity --cores 1 --resources gpu=1": DRY,
    "snakemake --use-singularity --cores 8 --resources gpu=1": DRY,
    "snakemake --cores 1 --resources gpu=1": DRY,
    "snakemake --cores 8 --resources gpu=1": DRY,
    "snakemake --cores all": DRY,
    "snakemake --configfile config/full.yaml --use-singularity --cores 1 --resources gpu=1": DRY,
    "snakemake --configfile config/full.yaml --use-singularity --cores 32 --resources gpu=4": DRY,
    "snakemake --configfile config/full.yaml --report results/report.html": AFTER_DEMO,
    "snakemake --configfile config/study.yaml --profile profiles/slurm --use-singularity": DRY,
    "snakemake --configfile config/study.yaml --use-singularity --cores 32 --resources gpu=4": DRY,
    "snakemake --configfile config/demo.yaml config/study-demo.yaml --cores all": DRY,
    "snakemake --cores all results/runs/torch-alexnet-scratch/nall-lr0.01/seed0/metrics.json": DRY,
    "snakemake --profile profiles/slurm": DRY,
    "snakemake --profile profiles/slurm --use-singularity": DRY,
    "snakemake --configfile config/full.yaml --cores 1 offline_files": REAL,
    "snakemake --cores 1 preflight": PREFLIGHT,
    "snakemake --use-singularity --cores 1 preflight": PREFLIGHT_DRY,
    "snakemake --profile profiles/slurm preflight": PREFLIGHT_DRY,
    "snakemake --configfile config/demo.yaml --cores all --directory demo-run": DRY,
    "make clean": REAL,
    "make venv": MAKE_DRY,
    "make venv GPU=1": MAKE_DRY,
    'make containers CONTAINER_BUILD_ARGS="--torch-cuda cu126"': MAKE_DRY,
    "CNNBENCH_REQUIRE_GPU=1 python -m pytest tests/test_gpu.py": GPU,
}
# A line each of those recipes must hold.
MAKE_DRY_RUNS = {
    "make venv": ".venv/bin/python -m pip install --quiet -r requirements.txt",
    "make venv GPU=1": "TORCH_CUDA=cu130 .venv/bin/python -m pip install --quiet -r requirements-gpu.txt",
    'make containers CONTAINER_BUILD_ARGS="--torch-cuda cu126"': "containers/build.sh --torch-cuda cu126",
}
# `make venv` installs requirements-gpu.txt where `nvidia-smi -L` lists a GPU (tests/test_makefile.py).
MAKE_DRY_RUNS_ON_A_GPU_HOST = {"make venv": MAKE_DRY_RUNS["make venv GPU=1"]}
COMMAND = re.compile(r"(?:[A-Z_]+=\S* )*(?:snakemake|make|python -m pytest)( |$)")  # after any VAR=value
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "config" / "README.md"]


def page_commands(text: str) -> set[str]:
    """`snakemake`/`make`/`python -m pytest` lines of a page's bash blocks (indented ones too, as in a
    list; comments dropped) and its inline `snakemake`/`make` commands."""
    commands = set()
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.M | re.S):
        for line in block.splitlines():
            command = line.split(" #", 1)[0].strip()
            if COMMAND.match(command):
                commands.add(command)
    inline = (" ".join(c.split()) for c in re.findall(r"`((?:snakemake|make) [^`]*)`", text))  # may wrap
    commands.update(c for c in inline if "…" not in c)
    return commands


def documented_commands() -> set[str]:
    return set().union(*(page_commands(page.read_text()) for page in PAGES))


def test_every_readme_command_has_a_check():
    """README.md's commands and those of docs/*.md and config/README.md."""
    assert documented_commands() == set(CHECKS), "the pages' commands and tests/test_readme.py's CHECKS differ"


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated one numbered (-1, -2, ...)."""
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.M | re.S)  # no headings in code blocks
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(page: Path) -> list[str]:
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text())
            if not re.match(r"[a-z]+:", target)]  # https:, mailto: lead outside the repository


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_links_lead_to_a_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, broken


def test_the_readme_links_every_page_of_docs():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(REPO / "README.md")}
    assert [page for page in PAGES[1:] if page not in linked] == []


def needs_images(command: str) -> None:
    if "--use-singularity" in command:
        require_tool("apptainer")
        for image in ("torch.sif", "tensorflow.sif"):
            if not (REPO / "containers" / image).exists():
                skip_or_fail(f"containers/{image} does not exist: build the images with `make containers`")


def expected_training_threads(command: str) -> int | None:
    """Each training's CPU threads under ``command``: --cores // the N of --resources gpu=N, at least 1
    (workflow/rules/common.smk: training_threads); None where the command sets no number of cores."""
    cores = re.search(r"--cores (\d+)\b", command)
    if not cores:
        return None
    gpus = re.search(r"--resources gpu=(\d+)\b", command)
    return max(1, int(cores.group(1)) // (int(gpus.group(1)) if gpus else 1))


def training_threads(dry_run: str) -> list[int]:
    """The threads of each train_torch/train_keras job a dry run lists (Snakemake prints none for 1)."""
    jobs = re.findall(r"^rule train_(?:torch|keras):\n(.*?)(?=^\S)", dry_run, re.M | re.S)
    threads = (re.search(r"^\s+threads: (\d+)$", job, re.M) for job in jobs)
    return [int(match.group(1)) if match else 1 for match in threads]


def dry_run(command: str, tmp_path) -> str:
    """``command -n`` from the root of a linked checkout; its output, once it succeeded as a dry run."""
    needs_images(command)
    checkout = linked_checkout(tmp_path / "cnnbench")
    result = run_in_checkout(checkout, f"{command} -n")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "This was a dry-run" in output
    return output


@pytest.mark.parametrize("command", [c for c, how in CHECKS.items() if how == DRY])
def test_training_commands_dry_run(command, tmp_path):
    output = dry_run(command, tmp_path)
    assert re.search(r"^train_(torch|keras)\s+\d+$", output, re.M), output[-3000:]  # it would train
    threads = expected_training_threads(command)
    if threads is not None:
        listed = training_threads(output)
        assert listed and set(listed) == {threads}, (threads, listed, output[-3000:])


@pytest.mark.parametrize("command", [c for c, how in CHECKS.items() if how == PREFLIGHT_DRY])
def test_preflight_commands_dry_run(command, tmp_path):
    output = dry_run(command, tmp_path)
    for rule in ("preflight_torch", "preflight_keras", "preflight"):
        assert re.search(rf"^{rule}\s+1$", output, re.M), output[-3000:]
    assert not re.search(r"^train_(torch|keras)\s+\d+$", output, re.M), output[-3000:]


@pytest.mark.parametrize("command", [c for c, how in CHECKS.items() if how == MAKE_DRY])
def test_make_commands_dry_run(command, tmp_path):
    require_tool("make")
    checkout = linked_checkout(tmp_path / "cnnbench")
    result = run_in_checkout(checkout, "make -n -B" + command.removeprefix("make"))  # -B: whatever is built
    assert result.returncode == 0, result.stderr
    expected = (MAKE_DRY_RUNS_ON_A_GPU_HOST if lists_a_gpu() else MAKE_DRY_RUNS).get(command, MAKE_DRY_RUNS[command])
    assert expected in result.stdout.splitlines(), result.stdout


def lists_a_gpu() -> bool:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return False
    return any(line.startswith("GPU ") for line in listing.splitlines())


@pytest.mark.parametrize("command", [c for c, how in CHECKS.items() if how == PREFLIGHT])
def test_preflight_command_is_the_one_its_test_runs(command):
    from test_preflight import README_COMMAND

    assert command == README_COMMAND


@pytest.mark.parametrize("command", [c for c, how in CHECKS.items() if how == CI])
def test_ci_runs_the_command(command):
    ci_script = (REPO / ".ci" / "run").read_text()
    assert re.search(rf"^(timed )?{re.escape(command)}( |$)", ci_script, re.M), f".ci/run does not run {command}"


def test_make_demo_runs(demo_checkout):
    checkout, output = demo_checkout
    assert "snakemake --configfile config/demo.yaml --cores all" in output  # the recipe the README describes
    assert (checkout / "results" / "summary.md").exists()


def test_report_command_over_the_demo_results(demo_checkout):
    checkout, _ = demo_checkout
    command = next(c for c, how in CHECKS.items() if how == AFTER_DEMO)
    result = run_in_checkout(checkout, command)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    html = (checkout / "results" / "report.html").read_text()
    assert "learning_curves.png" in html


def test_offline_files_command_lists_every_download(tmp_path):
    command = "snakemake --configfile config/full.yaml --cores 1 offline_files"
    assert CHECKS[command] == REAL
    result = run_in_checkout(linked_checkout(tmp_path / "cnnbench"), command)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    for path, digest in (("resources/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
                         ("resources/weights/imagenet/alexnet-owt-7be5be79.pth", "7be5be79"),
                         ("resources/weights/imagenet/vgg16-397923af.pth", "397923af"),
                         ("resources/weights/imagenet/resnet50-11ad3fa6.pth", "11ad3fa6")):
        assert re.search(rf"^{re.escape(path)}\thttps://\S+\t(md5|sha256)\t{digest}$", output, re.M), path


def test_make_clean_removes_the_results(tmp_path):
    assert CHECKS["make clean"] == REAL
    checkout = linked_checkout(tmp_path / "cnnbench")
    for generated in ("results/runs/x/nall-lr0.01/seed0/metrics.json", ".snakemake/log/x.log"):
        (checkout / generated).parent.mkdir(parents=True)
        (checkout / generated).write_text("{}")
    result = run_in_checkout(checkout, "make clean")
    assert result.returncode == 0, result.stderr
    assert not (checkout / "results").exists() and not (checkout / ".snakemake").exists()
    assert (checkout / "config" / "config.yaml").exists()  # nothing else


def test_gpu_test_command_needs_a_gpu(tmp_path):
    """Run as written: on a machine without a GPU (CI) it fails, and says why; with one, it passes."""
    from test_gpu import count_gpus

    command = next(c for c, how in CHECKS.items() if how == GPU)
    checkout = linked_checkout(tmp_path / "cnnbench")
    for name in ("tests", "pytest.ini"):
        (checkout / name).symlink_to(REPO / name)
    result = run_in_checkout(checkout, command, timeout=3600)
    output = result.stdout + result.stderr
    if count_gpus()[0]:
        assert result.returncode == 0, output[-5000:]
    else:
        assert result.returncode == 1, output[-5000:]
        assert "3 errors" in output and "CNNBENCH_REQUIRE_GPU=1 asks for them" in output, output[-5000:]


def test_readme_is_a_short_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move detail to docs/"


TRANSFER_RESULTS = REPO / "benchmarks" / "results" / "transfer-cifar10"


def transfer_gain_rows() -> list[str]:
    """The README's table of the committed transfer study: a row per training-set size, a cell per
    initialisation and framework, each gain over scratch as mean [95% interval] from its
    paired_differences.csv."""
    import pandas as pd

    differences = pd.read_csv(TRANSFER_RESULTS / "paired_differences.csv")
    rows = []
    for size in ("10", "100", "1000"):
        cells = []
        for init in ("pretrained", "frozen"):
            for framework in ("torch", "keras"):
                row = differences[(differences["comparison"] == f"{init} - scratch ({framework} alexnet)")
                                  & (differences["train_size"].astype(str) == size)].iloc[0]
                cells.append(f"{row.test_accuracy_diff_mean:+.3f} [{row.test_accuracy_diff_ci_low:+.3f}, "
                             f"{row.test_accuracy_diff_ci_high:+.3f}]")
        rows.append(f"| {size} | " + " | ".join(cells) + " |")
    return rows


def test_readme_shows_the_committed_transfer_result():
    readme = (REPO / "README.md").read_text()
    for name in ("summary.md", "conclusions.md", "data_efficiency.png", "pretraining_gain.png", "README.md"):
        assert (TRANSFER_RESULTS / name).stat().st_size > 0, name
    assert "](benchmarks/results/transfer-cifar10/data_efficiency.png)" in readme
    for row in transfer_gain_rows():
        assert row in readme, row
    provenance = (TRANSFER_RESULTS / "README.md").read_text()
    assert "Wall time: " in provenance and "Machine: " in provenance and "transfer-cifar10.sh" in provenance
