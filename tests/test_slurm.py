"""The demo workflow on a real SLURM cluster through profiles/slurm (snakemake-executor-plugin-slurm).

Needs a running cluster: `bash tests/slurm/cluster.sh start` (root) brings up a one-node SLURM with a
stand-in GPU; without `sbatch` the tests skip (fail where CNNBENCH_REQUIRE_TOOLS is set). The workflow
runs in a temporary directory, from the repository's Snakefile and profile, with a smaller demo config.
Each SLURM job inherits this process's environment (`sbatch --export=ALL`), so `python` and `snakemake`
on the node are the ones running this test (their folder goes first on PATH).

Checks: every training ran as a SLURM job in the `gpu` partition that was allocated one GPU
(`scontrol show job`, kept for MinJobAge); the outputs are complete; a training cancelled with scancel
fails the run, and a rerun completes it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from cnnbench.metrics import load_metrics
from cnnbench.training import PAUSE_AT_STEP_ENV
from conftest import REPO, removed_unless_failed, require_tool, run_dir, skip_or_fail

PROFILE = REPO / "profiles" / "slurm"
VARIANTS = ["torch-alexnet-scratch", "keras-alexnet-scratch", "torch-alexnet-pretrained",
            "keras-vgg16-pretrained"]
TRAIN_RULE = {"torch": "train_torch", "keras": "train_keras"}
SUMMARY = ["summary.csv", "summary.md", "learning_curves.png"]
CANCELLED_VARIANT = "torch-alexnet-scratch"


# slurmctld answers in milliseconds, but on a machine loaded ~25x its cores (a training beside other
# test runs) scontrol took over 30 s: the limit catches a hung controller, not a slow one.
SLURM_COMMAND_TIMEOUT = 180


def slurm_env() -> dict:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "2"}


def node_cpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=SLURM_COMMAND_TIMEOUT).stdout.split()
    return min(int(c.rstrip("+")) for c in out)


def snakemake_cmd(workdir: Path, *args) -> list[str]:
    # This cluster has no accounting database (sacct): job states come from squeue, which keeps finished
    # jobs for MinJobAge. Short first status check: the test's jobs take seconds, not hours.
    # --cores: the trainers' threads (workflow.cores); the profile's 8 is more than the test node has.
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "slurm-test.yaml"), "--profile", str(PROFILE),
            "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5",
            "--cores", str(node_cpus()), *args]


def run_snakemake(workdir: Path, *args, timeout: float = 900, env: dict | None = None,
                  jobs: dict | None = None) -> subprocess.Popen:
    """Run Snakemake to its end, recording into ``jobs`` every SLURM job of ``workdir`` seen meanwhile
    (slurmctld forgets finished jobs after MinJobAge; a slow run must not lose its early ones)."""
    jobs = {} if jobs is None else jobs
    log_path = workdir / f"snakemake-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:  # a file, not a pipe: nobody reads it while we poll
        proc = subprocess.Popen(snakemake_cmd(workdir, *args), stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=env or slurm_env())
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"snakemake ran over {timeout} s"
            jobs.update(slurm_jobs(workdir))
            time.sleep(1.0)
        jobs.update(slurm_jobs(workdir))
    finally:
        terminate(proc)
    proc.output = log_path.read_text()
    return proc


def terminate(proc: subprocess.Popen) -> None:
    """Stop Snakemake if it still runs (it cancels its SLURM jobs on SIGTERM)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)


def slurm_jobs(workdir: Path) -> dict[int, dict[str, str]]:
    """Every job slurmctld still knows (MinJobAge) that ran in ``workdir``: id -> scontrol fields."""
    out = subprocess.run(["scontrol", "show", "job", "--details", "--oneliner"], capture_output=True, text=True, timeout=SLURM_COMMAND_TIMEOUT).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", line))
        if fields.get("WorkDir") == str(workdir):
            jobs[int(fields["JobId"])] = fields
    return jobs


def training_jobs(jobs: dict[int, dict[str, str]], variant: str) -> list[dict[str, str]]:
    framework, model, init = variant.split("-")
    rule = TRAIN_RULE[framework]
    # Comment=rule_<rule>_wildcards_<framework>_<model>_<init>_<size>_<lr>_<seed>, set by the plugin
    return [job for job in jobs.values()
            if job.get("Comment", "").startswith(f"rule_{rule}_wildcards_{framework}_{model}_{init}_")
            and job["Comment"].endswith("_0")]


def asks_for_one_gpu(job: dict[str, str]) -> bool:
    """Requested (TresPerJob, from sbatch --gpus=1) and allocated (JOB_GRES) one GPU."""
    return job.get("TresPerJob") == "gres:gpu:1" and job.get("JOB_GRES") == "gpu:1"


@pytest.fixture(scope="module")
def cluster():
    require_tool("sbatch")
    probe = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=SLURM_COMMAND_TIMEOUT)
    if probe.returncode != 0 or not re.search(r"^gpu\s+(idle|mixed|allocated|completing)", probe.stdout, re.M):
        skip_or_fail("no SLURM cluster with an up `gpu` partition (start one: bash tests/slurm/cluster.sh start); "
                     f"sinfo said: {probe.stdout.strip()} {probe.stderr.strip()}")
    mem = subprocess.run(["sinfo", "-h", "-o", "%m"], capture_output=True, text=True, timeout=SLURM_COMMAND_TIMEOUT).stdout.split()
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    wanted = max(r.get("mem_mb", 0) for r in [profile["default-resources"], *profile["set-resources"].values()])
    if max(int(m.rstrip("+")) for m in mem) < wanted:
        skip_or_fail(f"the SLURM node has less memory than profiles/slurm asks for ({mem} < {wanted} MB)")


@pytest.fixture(scope="module")
def slurm_run(cluster, request, tmp_path_factory):
    # A name of its own: slurmctld keeps a finished job for MinJobAge, and a directory reused by the next
    # pytest session (same basetemp number) would show that session the previous one's jobs.
    name = f"slurm-{uuid.uuid4().hex[:8]}"
    with removed_unless_failed(request, tmp_path_factory.mktemp(name).resolve()) as workdir:
        yield from _slurm_run(workdir)


def _slurm_run(workdir: Path):
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    # smaller than the demo: the four trainings share the node's one (stand-in) GPU, one after another
    config["data"]["val_size"] = 20
    config["data"]["synthetic"].update(train_per_class=10, test_per_class=5)
    config["train"]["epochs"] = 1
    config["init_overrides"]["scratch"]["min_steps"] = None  # not make demo's 100 steps: no learning needed
    # Two epochs for the variant the cancel test interrupts after its first checkpoint.
    config["variant_overrides"] = {CANCELLED_VARIANT: {"epochs": 2}}
    (workdir / "slurm-test.yaml").write_text(yaml.safe_dump(config))
    start = time.monotonic()
    try:
        jobs = {}
        result = run_snakemake(workdir, jobs=jobs)
        print(f"slurm demo run: {time.monotonic() - start:.0f} s")
        assert result.returncode == 0, result.output[-8000:]
        yield workdir, result.output, dict(jobs)  # a snapshot: later tests' jobs do not change it
    finally:  # leave no job of ours behind (a timeout, a failed assertion)
        left = [job_id for job_id, job in slurm_jobs(workdir).items() if job["JobState"] in ("PENDING", "RUNNING")]
        if left:
            subprocess.run(["scancel", *map(str, left)], timeout=SLURM_COMMAND_TIMEOUT)


def test_every_training_ran_as_a_slurm_job_with_one_gpu(slurm_run):
    workdir, _, run_jobs = slurm_run
    for variant in VARIANTS:
        jobs = training_jobs(run_jobs, variant)
        assert len(jobs) == 1, f"{variant}: expected one SLURM job, got {jobs}"
        job = jobs[0]
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["Partition"] == "gpu", job
        assert asks_for_one_gpu(job), f"{variant}: job {job['JobId']} has no GPU: {job}"
        # the plugin's log of that job (kept: slurm-keep-successful-logs in the profile)
        logs = list((workdir / ".snakemake" / "slurm_logs").glob(f"rule_{TRAIN_RULE[variant.split('-')[0]]}/*/"
                                                                 f"{job['JobId']}.log"))
        assert logs, f"no plugin log for job {job['JobId']}"
        log = logs[0].read_text()
        assert f"rule {TRAIN_RULE[variant.split('-')[0]]}:" in log and "1 of 1 steps (100%) done" in log, log[-3000:]
        assert job["NumCPUs"] == str(node_cpus()), job  # --cpus-per-task from the trainers' threads
    # the other rules ran as CPU jobs in the default partition, without a GPU
    others = [job for job in run_jobs.values() if not job["Comment"].startswith("rule_train_")]
    assert {job["Comment"].split("_wildcards_")[0] for job in others} >= {
        "rule_prepare_data", "rule_summarize", "rule_standin_weights_torch", "rule_standin_weights_keras"}
    assert all(job["Partition"] == "cpu" and not asks_for_one_gpu(job) for job in others), others


def test_outputs_are_complete(slurm_run):
    workdir, _, _ = slurm_run
    results = workdir / "results"
    for variant in VARIANTS:
        metrics = load_metrics(run_dir(results, variant) / "metrics.json")  # schema-valid
        assert (metrics["variant"], metrics["data"]["train_size"]) == (variant, 80)
    assert (results / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(variant in (results / "summary.md").read_text() for variant in VARIANTS)
    assert sorted(line.split(",")[0] for line in (results / "summary.csv").read_text().splitlines()[1:]) \
        == sorted(VARIANTS)


def test_cancelled_training_fails_the_run_and_a_rerun_resumes_it(slurm_run):
    """scancel a training job after its first epoch's checkpoint (the trainer paused there by its test
    hook, so the job cannot end first): the run fails; the same command again resumes after epoch 1."""
    workdir, _, run_jobs = slurm_run
    cancelled_dir = run_dir(workdir / "results", CANCELLED_VARIANT)
    metrics = cancelled_dir / "metrics.json"
    earlier = {int(job["JobId"]) for job in training_jobs(run_jobs, CANCELLED_VARIANT)}
    metrics.unlink()
    targets = [str(metrics.relative_to(workdir)), "all"]
    # 80 training images in batches of 64: epoch 2's first step is the third.
    pause_file = cancelled_dir / "paused-at-step-3"
    pause_file.unlink(missing_ok=True)
    env = {**slurm_env(), PAUSE_AT_STEP_ENV: "3"}  # sbatch --export=ALL takes it into the job

    start = time.monotonic()
    log_path = workdir / "cancelled-run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(snakemake_cmd(workdir, "--retries", "0", *targets), stdout=log,
                                stderr=subprocess.STDOUT, text=True, env=env)
    jobs = {}
    try:
        deadline = time.monotonic() + 600
        while not pause_file.exists():
            assert proc.poll() is None, f"snakemake exited {proc.returncode} first:\n{log_path.read_text()[-5000:]}"
            assert time.monotonic() < deadline, "the training never reached epoch 2"
            jobs.update(slurm_jobs(workdir))
            time.sleep(0.5)
        jobs.update(slurm_jobs(workdir))
        [job] = [j for j in training_jobs(jobs, CANCELLED_VARIANT) if int(j["JobId"]) not in earlier]
        assert (cancelled_dir / "checkpoint" / "last.pt").exists()
        subprocess.run(["scancel", job["JobId"]], check=True, timeout=SLURM_COMMAND_TIMEOUT)  # the job is paused: still there
        proc.wait(timeout=300)
        jobs.update(slurm_jobs(workdir))
    finally:
        terminate(proc)
    output = log_path.read_text()
    print(f"cancel run: {time.monotonic() - start:.0f} s")
    assert proc.returncode != 0, output[-5000:]
    assert f"SLURM-job '{job['JobId']}' failed" in output and "CANCELLED" in output, output[-5000:]
    assert jobs[int(job["JobId"])]["JobState"] == "CANCELLED"
    assert not metrics.exists() and (cancelled_dir / "checkpoint" / "last.pt").exists()

    start = time.monotonic()
    rerun = run_snakemake(workdir, *targets, jobs=jobs)
    print(f"rerun: {time.monotonic() - start:.0f} s")
    assert rerun.returncode == 0, rerun.output[-8000:]
    log = (cancelled_dir / "train.log").read_text()
    assert "resuming from" in log and "after epoch 1" in log and "epoch 1/2: train loss" not in log, log
    history = json.loads(metrics.read_text())["history"]
    assert [epoch["epoch"] for epoch in history] == [1, 2]
    rerun_jobs = [j for j in training_jobs(jobs, CANCELLED_VARIANT) if int(j["JobId"]) not in earlier | {int(job["JobId"])}]
    assert len(rerun_jobs) == 1 and rerun_jobs[0]["JobState"] == "COMPLETED" and asks_for_one_gpu(rerun_jobs[0])
    for name in SUMMARY:
        assert (workdir / "results" / name).stat().st_mtime > metrics.stat().st_mtime - 1
