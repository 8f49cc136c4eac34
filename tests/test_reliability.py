"""Interruption and resumption, re-runs into a run folder, and bad input through the real command.

The resumption tests kill real `bioexp train` processes in the middle of training and check that
the resumed run ends exactly where an uninterrupted run of the same seed ends: the same
metrics.jsonl (time fields aside), the same final weights, the same final accuracy.
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    FASHION_AVAILABLE,
    TINY,
    assert_clean_failure,
    bioexp_command,
    output_of,
)

from bioexp.data.sources import SOURCES, locate
from bioexp.records import read_json, read_metrics

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


def wait_for_rows(run_dir: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(run_dir / "metrics.jsonl")) < n:
        assert time.monotonic() < deadline, f"{run_dir} logged fewer than {n} rows"
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


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    # a checkpoint every 0.06 s: SIGKILL lands after a mid-epoch one
    job = start(tmp_path, *LONG, "checkpoint_every_min=0.001", f"hydra.run.dir={run_dir}")
    wait_for_rows(run_dir, 2)
    time.sleep(0.3)
    job.kill()
    job.wait(timeout=60)
    assert read_json(run_dir / "summary.json")["status"] == "running"  # SIGKILL: no goodbye
    position = torch.load(run_dir / "checkpoints" / "last.pt",
                          weights_only=True)["training"]["position"]
    rows_before = len(read_metrics(run_dir / "metrics.jsonl"))
    assert position["epoch"] < 5 and rows_before < 5
    resumed = start(tmp_path, f"resume={run_dir}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_run(reference["long"], run_dir)
    summary = read_json(run_dir / "summary.json")
    assert summary["resumed"][0]["epoch"] == position["epoch"] + 1  # counted from 1, as logged
    assert f"resuming: supervised phase, epoch {position['epoch'] + 1}," in (
        run_dir / "train.log").read_text()
    assert summary["environment"]["threads"] == 1  # the run's own setting, not the default


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


@pytest.mark.skipif(not FASHION_AVAILABLE, reason="needs the Fashion-MNIST files to damage")
def test_a_truncated_idx_file_is_named(bioexp, tmp_path) -> None:
    source = locate(SOURCES["fashion_mnist"], None)
    root = tmp_path / "data"
    root.mkdir()
    for path in source.values():
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        target = root / path.name.removesuffix(".gz")
        target.write_bytes(data[:len(data) // 3] if "train-images" in path.name else data)
    result = bioexp("train", "data=fashion_mnist", f"data.root={root}", "data.download=false",
                    "progress=false", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_failure(result, tmp_path, "train-images")


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
