"""Phase 1 once per sweep: jobs that need the same phase-1 weights wait on a lock beside the cache
entry while the first one trains it, then load it. The lock is the operating system's (flock),
so it dies with the process that holds it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, bioexp_command

from bioexp import cache as cache_module
from bioexp.cache import Phase1Cache, user_cache_dir
from bioexp.engine.stop import StopRequest
from bioexp.records import read_json
from bioexp.train import run

fcntl = pytest.importorskip("fcntl")  # POSIX; elsewhere there is no lock (tested below too)
WAITING = "waiting for another job training the same phase 1"
KROTOV = (*TINY, "model=krotov_fc", "model.hidden=32")


def is_free(path: Path) -> bool:
    """Whether no process holds the lock file (tried from a file description of our own)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_waiting_job_says_so_and_the_lock_is_released_however_the_block_ends(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bioexp")
    first, second = Phase1Cache("k", tmp_path), Phase1Cache("k", tmp_path)
    with pytest.raises(RuntimeError), first.lock():
        assert not is_free(first.lock_path)  # flock: file descriptions exclude each other
        raise RuntimeError("phase 1 failed")
    assert is_free(first.lock_path)
    with first.lock():
        with pytest.raises(KeyboardInterrupt), second.lock(stop=lambda: True):
            pass  # Ctrl-C while waiting: it stops waiting
        assert f"{WAITING} ({first.lock_path})" in caplog.text
    with second.lock():  # free again: no wait
        pass
    assert caplog.text.count(WAITING) == 1


def test_without_fcntl_there_is_no_lock_and_no_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cache_module, "fcntl", None)
    entry = Phase1Cache("k", tmp_path)
    with entry.lock(), Phase1Cache("k", tmp_path).lock():
        pass
    assert not entry.lock_path.exists()


def test_a_process_killed_holding_the_lock_blocks_nobody(tmp_path: Path) -> None:
    holder = ("import sys, time; from pathlib import Path; from bioexp.cache import Phase1Cache\n"
              "with Phase1Cache('k', Path(sys.argv[1])).lock():\n"
              "    print('locked', flush=True); time.sleep(300)")
    process = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        entry = Phase1Cache("k", tmp_path)
        assert not is_free(entry.lock_path)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    deadline = time.monotonic() + 5
    with entry.lock(stop=lambda: time.monotonic() > deadline):  # KeyboardInterrupt if blocked
        pass


def test_a_resumed_phase_1_does_not_wait_for_the_lock(tmp_path, make_cfg, monkeypatch,
                                                      caplog) -> None:
    """A run stopped in phase 1 released the lock; resumed, it cannot use the entry, so it
    trains on even while another job holds the lock (no deadlock), and fills the entry."""
    caplog.set_level(logging.INFO, logger="bioexp")
    cfg = make_cfg(*KROTOV, "data.n_train=512", "schedule.unsupervised.batch_size=64")
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(StopRequest, "__call__", lambda self: True)  # stop after one batch
        run(cfg, tmp_path / "run")
    assert read_json(tmp_path / "run" / "summary.json")["status"] == "interrupted"
    [lock_path] = (user_cache_dir() / "phase1").glob("*.lock")
    assert is_free(lock_path)
    with Phase1Cache(lock_path.stem).lock():  # another job holds it
        summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["phase1_cache"]["status"] == "miss"
    assert WAITING not in caplog.text and Path(summary["phase1_cache"]["file"]).is_file()


@pytest.mark.slow
def test_two_parallel_jobs_train_phase_1_once(tmp_path: Path, make_cfg) -> None:
    """Two joblib jobs with the same body and different heads. Both find the lock taken (held
    here until both say they wait, so that they surely meet); the first to get it trains
    phase 1, the other waits for it and loads the entry."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    first = run(make_cfg(*KROTOV, "model.head=[]"), tmp_path / "key")  # learn the key
    key, entry = first["phase1_cache"]["key"], Path(first["phase1_cache"]["file"])
    entry.unlink()
    sweep = tmp_path / "sweep"
    logs = [sweep / f"{i}_krotov_fc_synthetic" / "train.log" for i in (0, 1)]
    env = {**os.environ, "XDG_CACHE_HOME": str(user_cache_dir().parent)}
    with Phase1Cache(key).lock(), open(tmp_path / "stderr.txt", "w") as stderr:
        job = subprocess.Popen([*bioexp_command(), "train", "-m", "hydra/launcher=parallel",
                                *KROTOV, "model.head=[4],[8]", f"hydra.sweep.dir={sweep}"],
                               cwd=tmp_path, env=env, stderr=stderr)
        try:
            wait_until(lambda: all(log.is_file() and WAITING in log.read_text()
                                   for log in logs), "both jobs to wait")
        except AssertionError:
            job.kill()
            raise
    assert job.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()
    summaries = [read_json(log.parent / "summary.json") for log in logs]
    assert sorted(s["phase1_cache"]["status"] for s in summaries) == ["hit", "miss"]
    assert {s["phase1_cache"]["key"] for s in summaries} == {key} and entry.is_file()
    hit = next(log for log, s in zip(logs, summaries, strict=True)
               if s["phase1_cache"]["status"] == "hit")
    assert "phase 1 (unsupervised): loaded from the cache" in hit.read_text()
    assert [s["phases"][0].get("cached", False) for s in summaries].count(True) == 1
