"""`hydra/launcher=slurm` against a real one-node SLURM cluster that scripts/slurm_local.sh starts
on this machine (installing slurm-wlm and munge when root and apt-get allow; otherwise these tests
skip, saying why). The jobs are tiny runs on generated data."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_clean_failure, bioexp_command, output_of

from bioexp.records import read_json, read_metrics
from bioexp.slurm import Nodes, gpu_count, launcher_problem, read_sinfo

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_local.sh"
TIME_FIELDS = ("elapsed_s", "epoch_time_s", "samples_per_s")
# Long enough to be interrupted mid-epoch (63 batches per epoch), with epochs left after the
# first one's metrics row appears (a job of 5 epochs once finished before its signal came); dropout
# draws from the global RNG, so only an exact resumption ends with the same metrics.
LONG = ("data=synthetic", "data.n_train=2000", "data.n_test=500", "model.dropout=0.2",
        "schedule.supervised.epochs=15", "schedule.supervised.batch_size=32", "progress=false",
        "device=cpu", "threads=1")


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld and slurmd)."""
    for _ in range(50):
        port = random.randrange(20000, 30000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a local SLURM cluster")


def _cluster_answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a running cluster: the one SLURM_CONF names when it answers, else
    one started for these tests (and stopped after them)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    if os.environ.get("SLURM_CONF") and _cluster_answers(dict(os.environ)):
        yield dict(os.environ)
        return
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "BIOEXP_SLURM_DIR": str(folder / "cluster"),
           "BIOEXP_SLURM_PORT": str(_free_port_pair())}
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True,
                             text=True, timeout=600)
    if started.returncode == 3 and not os.environ.get("BIOEXP_SLURM_REQUIRED"):  # CI sets it
        pytest.skip(started.stderr.strip().splitlines()[-1])
    assert started.returncode == 0, output_of(started)
    try:
        yield {**env, "SLURM_CONF": started.stdout.strip()}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def sweep(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    """`bioexp train -m hydra/launcher=slurm ...` in the background, its output in sweep.log."""
    log = open(tmp_path / "sweep.log", "w")  # noqa: SIM115  (closed with the process)
    process = subprocess.Popen([*bioexp_command(), "train", "-m", "hydra/launcher=slurm", *args],
                               cwd=tmp_path, env={**env, "XDG_CACHE_HOME": str(tmp_path / "c")},
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log = log
    return process


def finish(process: subprocess.Popen, tmp_path: Path, timeout: float = 240) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
        process.log.close()
    output = (tmp_path / "sweep.log").read_text()
    assert process.returncode == 0, output
    return output


def squeue(env: dict[str, str], *fields: str) -> list[list[str]]:
    result = subprocess.run(["squeue", "-h", "-o", " ".join(fields)], env=env,
                            capture_output=True, text=True, check=True)
    return [line.split() for line in result.stdout.splitlines()]


def wait_for(what: str, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def start_when_requeued(env: dict[str, str], job: str) -> None:
    """SLURM keeps a requeued job pending for about two minutes; let it start now."""
    wait_for(f"job {job} to be requeued",
             lambda: [job, "PENDING"] in squeue(env, "%i", "%T"), timeout=90)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)


def test_the_slurm_preset_asks_for_what_the_run_needs(make_cfg) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from bioexp.cli import register_resolvers

    register_resolvers()

    def launcher(*overrides: str) -> dict:
        return make_cfg(*overrides, hydra=True).hydra.launcher

    plain = launcher("hydra/launcher=slurm")  # device=auto, threads unset
    assert (plain.gpus_per_node, plain.cpus_per_task, plain.mem_gb) == (0, 1, 4)
    assert plain.additional_parameters.requeue and plain.max_num_timeout > 0
    assert launcher("hydra/launcher=slurm", "device=cuda:1", "threads=6").gpus_per_node == 1
    assert launcher("hydra/launcher=slurm", "threads=6").cpus_per_task == 6
    assert launcher("hydra/launcher=slurm_gpu", "device=auto").gpus_per_node == 1
    assert launcher("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=2").gpus_per_node == 2


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in rows]


@pytest.mark.slurm
def test_a_sweep_of_two_models_and_two_seeds_runs_on_slurm_and_compares(
        slurm_env, bioexp, tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    process = sweep(tmp_path, slurm_env, "model=bp_mlp,fa_mlp", "seed=0,1", *TINY,
                    f"hydra.sweep.dir={folder}")
    output = finish(process, tmp_path)
    # the preset's defaults fit a CPU node: no GPU, the cores of `threads`, 4 GB
    script = next(folder.glob(".submitit/*/*_submission.sh")).read_text()
    assert "--gpus-per-node=0" in script and "--cpus-per-task=1" in script, script
    assert "--mem=4GB" in script and "--requeue" in script, script
    summaries = [read_json(p) for p in sorted(folder.glob("*/summary.json"))]
    assert [(s["model"], s["seed"], s["status"]) for s in summaries] == [
        ("bp_mlp", 0, "completed"), ("bp_mlp", 1, "completed"),
        ("fa_mlp", 0, "completed"), ("fa_mlp", 1, "completed")]
    assert all(s["environment"]["threads"] == 1 for s in summaries)
    # this cluster keeps no accounting: one sentence about sacct, and none of sacct's own lines
    assert "Bypassing sacct error" not in output
    assert output.count("sacct does not work here") == 1, output
    assert output.count("Slurm accounting storage is disabled") <= 1, output  # in that sentence
    compared = bioexp("compare", str(folder), "--by", "model")
    assert compared.returncode == 0, output_of(compared)
    lines = {line.split()[0]: line for line in compared.stdout.splitlines() if line.strip()}
    assert "bp_mlp" in lines and "fa_mlp" in lines, compared.stdout
    assert all(" 2 " in lines[m] for m in ("bp_mlp", "fa_mlp")), compared.stdout


@pytest.mark.slurm
def test_requeued_and_signalled_jobs_checkpoint_and_resume_exactly(
        slurm_env, tmp_path: Path) -> None:
    """Job 0 is requeued by `scontrol requeue` (SIGTERM, as at pre-emption); job 1 gets the
    signal SLURM sends before the time limit (SIGUSR2, submitit's requeue). Each writes its
    checkpoint at the next batch boundary and is requeued, and the requeued job ends exactly as
    an uninterrupted run of the same seed, without a metrics row twice."""
    folder = tmp_path / "sweep"
    process = sweep(tmp_path, slurm_env, "seed=0,1", *LONG, f"hydra.sweep.dir={folder}")
    references = [tmp_path / f"reference{seed}" for seed in (0, 1)]
    uninterrupted = [subprocess.Popen(  # on this machine, meanwhile
        [*bioexp_command(), "train", *LONG, f"seed={seed}", f"hydra.run.dir={reference}"],
        cwd=tmp_path, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "c")},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for seed, reference in enumerate(references)]
    runs = [folder / f"{i}_bp_mlp_synthetic" for i in (0, 1)]
    wait_for("both jobs to train", lambda: all(
        len(read_metrics(run / "metrics.jsonl")) >= 1 for run in runs))
    jobs = sorted(row[0] for row in squeue(slurm_env, "%i"))
    assert len(jobs) == 2 and jobs[0].endswith("_0") and jobs[1].endswith("_1"), jobs
    subprocess.run(["scontrol", "requeue", jobs[0]], env=slurm_env, check=True)
    subprocess.run(["scancel", "--signal=USR2", jobs[1]], env=slurm_env, check=True)
    for job in jobs:
        start_when_requeued(slurm_env, job)
    finish(process, tmp_path)
    assert [p.wait(timeout=120) for p in uninterrupted] == [0, 0]

    for run, reference, signal_name in zip(runs, references, ("SIGTERM", "SIGUSR2"),
                                           strict=True):
        summary = read_json(run / "summary.json")
        assert summary["status"] == "completed", summary
        [resumed] = summary["resumed"]  # from the checkpoint of the signal: mid-epoch, or an
        assert resumed["epoch"] >= 2, resumed  # epoch's end if it came during the evaluation
        assert f"{signal_name}: stopping after the current batch" in (run / "train.log").read_text()
        rows = read_metrics(run / "metrics.jsonl")
        keys = [(r["phase"], r["epoch"], r.get("step")) for r in rows]
        assert len(keys) == len(set(keys)), "a metrics row appears twice"
        assert without_time(rows) == without_time(read_metrics(reference / "metrics.jsonl"))
        expected = read_json(reference / "summary.json")
        assert summary["test_acc"] == expected["test_acc"]
        weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
        reference_weights = torch.load(reference / "checkpoints" / "last.pt",
                                       weights_only=True)["model"]
        assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)


# --- before submission: what the jobs ask for against what sinfo says the cluster has ---------

SINFO = "debug*|2|24105|(null)|up\ngpu|64|512000|gpu:a100:4(S:0-1)|up\ngpu|32|256000|gpu:2|up\n"


def test_sinfo_lines_are_read_with_their_default_partition_and_gpus() -> None:
    assert read_sinfo(SINFO) == [Nodes("debug", True, 2, 24105, 0, True),
                                 Nodes("gpu", False, 64, 512000, 4, True),
                                 Nodes("gpu", False, 32, 256000, 2, True)]
    assert gpu_count("gpu:1,gpu:v100:2(S:0)") == 3 and gpu_count("(null)") == 0


@pytest.mark.parametrize(("launcher", "says"), [
    ({"cpus_per_task": 2, "mem_gb": 4, "gpus_per_node": 0}, None),
    ({"partition": "gpu", "cpus_per_task": 64, "gpus_per_node": 4, "mem_gb": 400}, None),
    ({"partition": "gpu,debug", "cpus_per_task": 64}, None),
    ({"cpus_per_task": 4}, "hydra.launcher.cpus_per_task=4 (from threads) asks for 4 cores per "
     "node, and the nodes of partition debug have at most 2: SLURM would keep the jobs pending "
     "for ever; use threads=2 or fewer"),
    ({"cpus_per_task": 2, "tasks_per_node": 2}, "asks for 4 cores per node"),
    ({"partition": "preempt"}, "hydra.launcher.partition=preempt: this cluster has no partition "
     "preempt (sinfo lists debug (the default), gpu)"),
    ({"mem_gb": 64}, "hydra.launcher.mem_gb=64 is more than the nodes of partition debug have "
     "(23.5 GB at most)"),
    ({"gpus_per_node": 1}, "hydra.launcher.gpus_per_node=1 (from device) asks for more GPUs "
     "than the nodes of partition debug have (none, by sinfo's gres)"),
    ({"partition": "gpu", "gpus_per_node": 8}, "(at most 4, by sinfo's gres)"),
])
def test_jobs_no_node_can_run_are_named_before_submission(launcher: dict, says: str | None) -> None:
    raw = {"cpus_per_task": "${bioexp.cpus:${threads}}",
           "gpus_per_node": "${bioexp.gpus:${device}}"}  # the slurm preset's
    problem = launcher_problem(launcher, read_sinfo(SINFO), raw)
    if says is None:
        assert problem is None
    else:
        assert says in problem, problem


def test_a_cluster_without_a_default_partition_needs_one_named() -> None:
    problem = launcher_problem({}, read_sinfo("a|4|1000|(null)|up\nb|4|1000|(null)|up"))
    assert problem == ("this cluster has no default partition: name one with "
                       "hydra.launcher.partition=NAME (sinfo lists a, b)")


def test_the_train_config_checks_slurm_sweeps_before_submitting(make_cfg) -> None:
    callbacks = make_cfg(hydra=True).hydra.callbacks
    assert "bioexp.slurm.SlurmCheck" in [c.get("_target_") for c in callbacks.values()]


@pytest.mark.slurm
@pytest.mark.parametrize("mistake", ["threads", "partition"])
def test_a_sweep_the_cluster_cannot_run_is_one_line_and_submits_nothing(
        slurm_env, tmp_path: Path, mistake: str) -> None:
    """More threads than the node has cores (SLURM would leave the jobs pending for ever, with
    reason PartitionConfig) or a partition the cluster lacks (sbatch's traceback)."""
    nodes = read_sinfo(subprocess.run(["sinfo", "-h", "-a", "-o", "%P|%c|%m|%G|%a"],
                                      env=slurm_env, capture_output=True, text=True,
                                      check=True).stdout)
    cores = max(n.cpus for n in nodes if n.default)  # the biggest node of the default partition
    queued = squeue(slurm_env, "%i")
    args = ([f"threads={cores + 1}"] if mistake == "threads"
            else ["hydra.launcher.partition=preempt"])
    folder = tmp_path / "sweep"
    process = sweep(tmp_path, slurm_env, *TINY, *args, "seed=0,1", f"hydra.sweep.dir={folder}")
    try:
        process.wait(timeout=60)  # without the check: pending for ever, or sbatch's traceback
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
            ours = [job[0] for job in squeue(slurm_env, "%i") if job not in queued]
            if ours:
                subprocess.run(["scancel", *ours], env=slurm_env)
        process.log.close()
    result = subprocess.CompletedProcess(process.args, process.returncode,
                                         (tmp_path / "sweep.log").read_text(), "")
    output = assert_clean_failure(result, tmp_path, *(
        [f"hydra.launcher.cpus_per_task={cores + 1} (from threads)", f"threads={cores} or fewer"]
        if mistake == "threads" else ["hydra.launcher.partition=preempt: this cluster has no "
                                      "partition preempt"]))
    assert result.returncode == 2 and len(output.strip().splitlines()) == 1, output
    assert not folder.exists() and squeue(slurm_env, "%i") == queued
