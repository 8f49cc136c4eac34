"""Interruption and resumption, re-runs into a run folder, and bad input through the real command.

The resumption tests kill real `bioexp train` processes in the middle of training and check that
the resumed run ends exactly where an uninterrupted run of the same seed ends: the same
metrics.jsonl (time fields aside), the same final weights, the same final accuracy.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    TINY,
    assert_clean_failure,
    bioexp_command,
    output_of,
    train_here,
)

from bioexp.data.sources import IDX_FILES, SOURCES, locate, read_arrays
from bioexp.engine.stop import StopRequest
from bioexp.records import read_json, read_metrics
from bioexp.runs import read_checkpoint

TIME_FIELDS = ("elapsed_s", "epoch_time_s", "samples_per_s")
# Dropout draws from the global RNG and batch 32 gives 63 steps per epoch, so a resumed run only
# matches when the batch order, the RNG, the optimiser and the epoch's running totals all do.
LONG = ("data=synthetic", "data.n_train=2000", "data.n_test=500", "model.dropout=0.2",
        "schedule.supervised.epochs=5", "schedule.supervised.batch_size=32", "progress=false",
        "device=cpu", "threads=1")
KROTOV = ("model=krotov_fc", "model.hidden=64", "model.head=[32]", "data=synthetic",
          "data.n_train=2000", "data.n_test=500", "schedule.unsupervised.epochs=4",
          "schedule.unsupervised.batch_size=20", "schedule.supervised.epochs=2",
          "progress=false", "device=cpu", "threads=1", "cache=false")


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return subprocess.Popen([*bioexp_command(), "train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_rows(run_dir: Path, n: int, timeout: float = 120,
                  job: subprocess.Popen | None = None) -> None:
    """Wait until `run_dir` has `n` metrics rows (failing at once when `job` exits first)."""
    deadline = time.monotonic() + timeout
    while len(read_metrics(run_dir / "metrics.jsonl")) < n:
        assert time.monotonic() < deadline, f"{run_dir} logged fewer than {n} rows"
        assert job is None or job.poll() is None, f"the run exited with {job.returncode}"
        time.sleep(0.05)


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in rows]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    assert without_time(read_metrics(a / "metrics.jsonl")) == without_time(
        read_metrics(b / "metrics.jsonl"))
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = read_json(a / "summary.json"), read_json(b / "summary.json")
    assert sa["status"] == sb["status"] == "completed"
    assert sa["test_acc"] == sb["test_acc"] and sa["best_test_acc"] == sb["best_test_acc"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs to compare the resumed ones with."""
    root = tmp_path_factory.mktemp("reference")
    runs = {"long": (LONG, root / "long"), "krotov": (KROTOV, root / "krotov")}
    for args, run_dir in runs.values():
        job = start(root, *args, f"hydra.run.dir={run_dir}")
        assert job.wait(timeout=300) == 0, job.stderr.read()
    return {name: run_dir for name, (_, run_dir) in runs.items()}


def test_same_seed_and_config_on_cpu_give_identical_records(reference, tmp_path) -> None:
    run_dir = tmp_path / "again"
    job = start(tmp_path, *LONG, f"hydra.run.dir={run_dir}")
    assert job.wait(timeout=300) == 0, job.stderr.read()
    assert_same_run(reference["long"], run_dir)
    environment = read_json(run_dir / "summary.json")["environment"]
    assert environment["bioexp"] and environment["torch"] and environment["device_name"]
    assert {"git", "cuda", "python", "threads"} <= environment.keys()


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat: R running, S sleeping, T stopped, Z zombie."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def freeze(job: subprocess.Popen, timeout: float = 30) -> None:
    """SIGSTOP `job` and wait until it is stopped, so that it writes nothing meanwhile."""
    job.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while process_state(job.pid) not in "TtZ":
        assert time.monotonic() < deadline, "the process did not stop"
        time.sleep(0.001)


def kill_after_a_mid_epoch_checkpoint(job: subprocess.Popen, run_dir: Path,
                                      timeout: float = 120) -> dict:
    """SIGKILL `job` when its last checkpoint was written mid-epoch, with epochs left after it;
    that checkpoint's position. The process is frozen while its checkpoint is read, so it cannot
    write another before it dies; when the checkpoint is not one of those, it goes on a while."""
    path = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert job.poll() is None, "the run ended before it wrote a mid-epoch checkpoint"
            assert time.monotonic() < deadline, "no mid-epoch checkpoint in time"
            if path.exists():
                freeze(job)
                position = torch.load(path, weights_only=True)["training"]["position"]
                if position["phase"] == "supervised" and position["batch"] > 0 and \
                        position["epoch"] < 4:
                    return position
                job.send_signal(signal.SIGCONT)
            time.sleep(0.02)
    finally:  # killed whatever happened, never left frozen
        job.kill()
        job.wait(timeout=60)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    # a checkpoint every 0.06 s (an epoch takes about 0.3 s): killed after a mid-epoch one
    job = start(tmp_path, *LONG, "checkpoint_every_min=0.001", f"hydra.run.dir={run_dir}")
    position = kill_after_a_mid_epoch_checkpoint(job, run_dir)
    assert read_json(run_dir / "summary.json")["status"] == "running"  # SIGKILL: no goodbye
    rows_before = len(read_metrics(run_dir / "metrics.jsonl"))
    assert position["batch"] > 0 and position["epoch"] < 4 and rows_before < 5
    resumed = start(tmp_path, f"resume={run_dir}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_run(reference["long"], run_dir)
    summary = read_json(run_dir / "summary.json")
    [resumption] = summary["resumed"]
    assert (resumption["epoch"], resumption["batch"]) == (position["epoch"] + 1,  # from 1
                                                          position["batch"])
    said = re.search(r"resuming: supervised phase, epoch (\d+), after (\d+) batch(?:es)? of it",
                     (run_dir / "train.log").read_text())
    assert said, (run_dir / "train.log").read_text()
    assert (int(said[1]), int(said[2])) == (position["epoch"] + 1, position["batch"])
    assert summary["environment"]["threads"] == 1  # the run's own setting, not the default


def blocked_writing(pid: int, timeout: float = 60) -> None:
    """Wait until the process `pid` blocks writing into a full pipe."""
    deadline = time.monotonic() + timeout
    while "pipe_write" not in (wchan := Path(f"/proc/{pid}/wchan").read_text()):
        if wchan in ("", "0"):  # this kernel hides it: give the process time to get there
            time.sleep(2)
            return
        assert time.monotonic() < deadline, f"the process waits in {wchan}, not in a pipe write"
        time.sleep(0.01)


def fill_pipe(write_end: int) -> None:
    """Fill the pipe of `write_end` to the brim, so that the next write into it blocks (through
    a non-blocking file description of its own: the process writing into it keeps blocking)."""
    filler = os.open(f"/proc/self/fd/{write_end}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        for size in (4096, 1):
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(filler, b"." * size)
    finally:
        os.close(filler)


def test_a_second_sigint_stops_at_once_and_keeps_the_previous_checkpoint(reference,
                                                                          tmp_path) -> None:
    """Ctrl-C asks for a checkpoint at the next batch boundary; a second Ctrl-C before it stops
    at once, and the checkpoint already on disk stays as it was and resumes the run exactly.

    To send the second SIGINT while the first one's stop is pending, whatever the timing, the
    run's stderr is a pipe filled to the brim: the first SIGINT's handler then blocks writing
    its warning (`stopping after the current batch`), and the second SIGINT arrives there."""
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "last.pt"
    read_end, write_end = os.pipe()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    job = subprocess.Popen([*bioexp_command(), "train", *LONG, "checkpoint_every_min=0",
                            f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=write_end)
    try:
        wait_for_rows(run_dir, 1, job=job)
        # epoch 1's checkpoint, written just after its metrics row (one from before the first
        # step is there already)
        while read_checkpoint(checkpoint)["training"]["position"]["epoch"] < 1:
            assert job.poll() is None, f"the run exited with {job.returncode}"
            time.sleep(0.01)
        freeze(job)
        previous = checkpoint.read_bytes()
        fill_pipe(write_end)
        job.send_signal(signal.SIGINT)
        job.send_signal(signal.SIGCONT)
        blocked_writing(job.pid)  # in the first SIGINT's handler: a stop is pending
        job.send_signal(signal.SIGINT)
    except BaseException:
        job.kill()  # never left frozen or blocked
        raise
    finally:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:  # until the process exits
            output = re.sub(r"\.{100,}", "[filler]", pipe.read().decode(errors="replace"))
        job.wait(timeout=60)
        print(output)  # shown when the test fails
    assert job.returncode == 130, output
    assert "Traceback" not in output and f"bioexp train resume={run_dir}" in output, output
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "interrupted" and "SIGINT" in summary["error"], summary
    assert checkpoint.read_bytes() == previous, "the checkpoint changed after the second SIGINT"
    assert not list(checkpoint.parent.glob("*.tmp")), "a partial checkpoint was left behind"
    position = read_checkpoint(checkpoint)["training"]["position"]
    assert position["batch"] == 0 and position["epoch"] >= 1, position  # an epoch's end
    resumed = start(tmp_path, f"resume={run_dir}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_run(reference["long"], run_dir)


def test_sigterm_in_phase_1_then_rerun_into_the_folder_resumes_it(reference, tmp_path) -> None:
    """SIGTERM writes a checkpoint at the next batch and records `interrupted`; running the
    same command into the same folder continues it (the README's rule)."""
    run_dir = tmp_path / "run"
    job = start(tmp_path, *KROTOV, f"hydra.run.dir={run_dir}")
    wait_for_rows(run_dir, 1)  # phase 1, epoch 1 done
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) != 0
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    assert f"bioexp train resume={run_dir}" in job.stderr.read()
    position = torch.load(run_dir / "checkpoints" / "last.pt",
                          weights_only=True)["training"]["position"]
    assert position["phase"] == "unsupervised"
    again = start(tmp_path, *KROTOV, f"hydra.run.dir={run_dir}")
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert_same_run(reference["krotov"], run_dir)
    phases = read_json(run_dir / "summary.json")["phases"]
    assert [p["name"] for p in phases] == ["unsupervised", "supervised"]


def test_wall_time_s_counts_every_session(tmp_path, monkeypatch) -> None:
    """A run stopped by SIGTERM and resumed reports the wall time of both sessions (in this
    process: the SIGTERM is sent from inside the stop check, in the third epoch)."""
    run_dir = tmp_path / "run"
    args = [a for a in LONG if not a.startswith("threads=")]  # leave this process's threads
    asked, ask = [], StopRequest.__call__

    def sigterm_in_epoch_3(self: StopRequest) -> bool:
        asked.append(self)
        if len(asked) == 2 * 64 + 20:  # 63 batches and a boundary per epoch
            time.sleep(0.5)  # a first session clearly longer than the second's start-up
            os.kill(os.getpid(), signal.SIGTERM)
            while self.signal is None:  # the handler runs at the next bytecode boundary
                time.sleep(0.001)
        return ask(self)

    monkeypatch.setattr(StopRequest, "__call__", sigterm_in_epoch_3)
    assert train_here(*args, f"hydra.run.dir={run_dir}") == 130
    first = read_json(run_dir / "summary.json")
    assert first["status"] == "interrupted" and "SIGTERM" in first["error"], first
    rows_before = len(read_metrics(run_dir / "metrics.jsonl"))
    t0 = time.perf_counter()
    assert train_here(f"resume={run_dir}") == 0
    second_session = time.perf_counter() - t0  # the whole command, more than its run
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and len(summary["resumed"]) == 1, summary
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and rows_before == 2
    trained_after = sum(r["epoch_time_s"] for r in rows[rows_before:])  # in the second session
    assert summary["wall_time_s"] >= first["wall_time_s"] + trained_after, (
        summary["wall_time_s"], first["wall_time_s"], trained_after)
    assert summary["wall_time_s"] <= first["wall_time_s"] + second_session + 0.01, (
        summary["wall_time_s"], first["wall_time_s"], second_session)


def test_a_finished_run_is_not_trained_again_and_a_changed_config_is_refused(bioexp,
                                                                              tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = bioexp("train", *TINY, f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, output_of(first)
    summary = read_json(run_dir / "summary.json")
    again = bioexp("train", *TINY, f"hydra.run.dir={run_dir}")
    assert again.returncode == 0 and "nothing to do" in output_of(again)
    assert read_json(run_dir / "summary.json") == summary
    changed = bioexp("train", *TINY, "schedule.supervised.epochs=3", f"hydra.run.dir={run_dir}")
    assert changed.returncode != 0 and "Traceback" not in output_of(changed)
    assert "schedule.supervised.epochs is 2 there and 3 here" in changed.stderr
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "schedule.supervised.epochs=2" in overrides  # the run's own record is restored
    assert read_json(run_dir / "summary.json") == summary


@pytest.mark.parametrize("diverging", [
    # the learning rate grows a million-fold after epoch 1, whose checkpoint is on disk
    pytest.param(("lr_schedule=step", "lr_schedule.step_size=1", "lr_schedule.gamma=1e6"),
                 id="after_a_checkpoint"),
    # diverges at step 2, in the first epoch (only the checkpoint written before step 1 exists)
    pytest.param(("schedule.supervised.lr=1e6",), id="in_the_first_epoch"),
])
def test_rerunning_into_a_diverged_run_trains_nothing(tmp_path, diverging) -> None:
    """README: re-running a command into a folder that holds a diverged run leaves it as it is
    (`nothing to do`). The exit code stays that of a run that did not complete: 1 (`main`)."""
    run_dir = tmp_path / "run"
    args = (*TINY, *diverging, f"hydra.run.dir={run_dir}")
    assert train_here(*args) == 1
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "diverged", summary
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "train.log"
             and ".hydra" not in p.parts}
    log_before = (run_dir / "train.log").read_text()
    assert train_here(*args) == 1
    log_after = (run_dir / "train.log").read_text()[len(log_before):]
    assert f"{run_dir} already holds a diverged run; nothing to do" in log_after, log_after
    assert "diverged at" not in log_after, log_after  # nothing trained
    assert read_json(run_dir / "summary.json") == summary
    assert {p: p.read_bytes() for p in files} == files  # metrics, checkpoint, plots untouched


def test_resume_errors_name_the_folder_or_the_checkpoint(bioexp, reference, tmp_path) -> None:
    cases = {}
    empty = tmp_path / "bad" / "empty"
    empty.mkdir(parents=True)
    cases["missing"] = (empty, "has no checkpoint to resume from")
    corrupt = tmp_path / "bad" / "corrupt"
    shutil.copytree(reference["long"], corrupt)
    (corrupt / "summary.json").unlink()  # an unfinished run, so that it would resume
    ckpt = corrupt / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    cases["corrupt"] = (corrupt, "is corrupt or truncated")
    foreign = tmp_path / "bad" / "foreign"
    shutil.copytree(reference["long"], foreign)
    (foreign / "summary.json").unlink()
    shutil.copy(reference["krotov"] / "checkpoints" / "last.pt", foreign / "checkpoints")
    cases["foreign"] = (foreign, "holds a run with another config (")
    for name, (folder, needle) in cases.items():
        result = bioexp("train", f"resume={folder}")
        assert_clean_failure(result, tmp_path / "bad", needle)
        assert str(folder) in result.stderr, name
    nowhere = bioexp("train", f"resume={tmp_path / 'nope'}")
    assert nowhere.returncode == 2 and "no such run folder" in nowhere.stderr
    extra = bioexp("train", f"resume={reference['long']}", "model=cnn")
    assert extra.returncode == 2 and "drop model=cnn" in extra.stderr


@pytest.mark.parametrize(("overrides", "needle"), [
    (("model=krotov_fc", "model.p=1.5"), "model.p"),
    (("model=krotov_fc", "model.hidden=16", "model.k=50"), "model.k"),
    (("model=semihebb", "model.sparsity=150"), "model.sparsity"),
    (("model=semihebb", "schedule.unsupervised.lr=-0.1"), "schedule.unsupervised.lr"),
    (("checkpoint_every_min=-1",), "checkpoint_every_min"),
    (("threads=0",), "threads"),
])
def test_out_of_range_hyperparameters_are_named(bioexp, tmp_path, overrides, needle) -> None:
    result = bioexp("train", *TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    output = assert_clean_failure(result, tmp_path, needle)
    assert len([ln for ln in result.stderr.splitlines() if needle in ln]) >= 1, output
    assert not (tmp_path / "run").exists(), "a mistake caught before training left a folder"


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as MNIST's: 0, 0, 8 (unsigned bytes), the number of dimensions (magic 2051
    for images, 2049 for labels), each dimension as a big-endian 32-bit integer, the bytes."""
    dims = b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + dims + array.astype(np.uint8).tobytes())


def test_a_truncated_idx_file_is_named(bioexp, tmp_path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    pixels = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        write_idx(root / IDX_FILES[f"{split}_images"], pixels.integers(0, 256, (n, 28, 28)))
        write_idx(root / IDX_FILES[f"{split}_labels"], np.arange(n) % 10)
    files = locate(SOURCES["fashion_mnist"], str(root))
    assert files is not None and files["train_images"].parent == root
    assert [a.shape for a in read_arrays("fashion_mnist", files)] == [  # valid as written
        (40, 1, 28, 28), (40,), (20, 1, 28, 28), (20,)]
    images = root / IDX_FILES["train_images"]
    assert int.from_bytes(images.read_bytes()[:4], "big") == 2051
    images.write_bytes(images.read_bytes()[:5000])  # the header and a sixth of the pixels
    result = bioexp("train", "data=fashion_mnist", f"data.root={root}", "data.download=false",
                    "progress=false", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_failure(result, tmp_path, str(images))
    [line] = [ln for ln in result.stderr.splitlines() if str(images) in ln]
    assert "truncated" in line and "error" in line, result.stderr


def test_an_unwritable_output_folder_is_named(bioexp, tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = bioexp("train", *TINY, f"hydra.run.dir={blocker / 'run'}")
    assert_clean_failure(result, tmp_path, str(blocker))
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


def test_a_sweep_with_a_bad_job_stops_before_any_job(bioexp, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    result = bioexp("train", "-m", "model=krotov_fc", "model.hidden=16",
                    "model.k=2,50,3", *TINY, f"hydra.sweep.dir={sweep}")
    assert_clean_failure(result, tmp_path, "1 of 3 jobs of the sweep would fail, nothing was "
                         "run; the first (model.k=50): model.k must be in [2, model.hidden = 16]")
    assert not sweep.exists()


def test_one_diverging_job_does_not_stop_the_sweep(bioexp, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    result = bioexp("train", "-m", "schedule.supervised.lr=0.001,1e6,0.003", *TINY,
                    f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1
    statuses = [read_json(p)["status"] for p in sorted(sweep.glob("*/summary.json"))]
    assert statuses == ["completed", "diverged", "completed"]
    assert "1 job(s) did not complete" in result.stderr
