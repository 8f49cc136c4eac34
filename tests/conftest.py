"""Shared fixtures: config composition, a tiny run config, and the real `bioexp` command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import bioexp.models  # noqa: F401  (registers the built-in models)
from bioexp.config import config_dir
from bioexp.data.sources import SOURCES, locate
from bioexp.records import read_json, read_metrics

# Overrides that make any model train in about a second on CPU.
TINY = (
    "data=synthetic",
    "data.n_train=256",
    "data.n_test=128",
    "schedule.unsupervised.epochs=1",
    "schedule.supervised.epochs=2",
    "schedule.supervised.batch_size=64",
    "progress=false",
    "device=cpu",
)

FASHION_AVAILABLE = locate(SOURCES["fashion_mnist"], None) is not None
needs_fashion = pytest.mark.skipif(not FASHION_AVAILABLE,
                                   reason="Fashion-MNIST not installed (apt-get install "
                                          "dataset-fashion-mnist)")


# Markers of tests that take minutes: they run only where `-m` names them (`pytest -m property`),
# so the default suite stays short.
ON_REQUEST = ("property", "readme")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    chosen = config.option.markexpr or ""
    for item in items:
        for name in ON_REQUEST:
            if item.get_closest_marker(name) and name not in chosen:
                item.add_marker(pytest.mark.skip(reason=f"takes minutes: pytest -m {name}"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own user cache (phase-1 weights, downloads): no test sees another's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    """Compose the `train` config with overrides, as `bioexp train` would."""

    def _compose(*overrides: str, hydra: bool = False) -> DictConfig:
        """`hydra=True` keeps the `hydra` node (sweeper params, mode, callbacks)."""
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides),
                           return_hydra_config=hydra)

    return _compose


def bioexp_command() -> list[str]:
    """The installed `bioexp` script beside this interpreter, else `python -m bioexp`."""
    script = Path(sys.executable).parent / "bioexp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bioexp"]


@pytest.fixture
def bioexp(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run the real `bioexp` command in `tmp_path` with a clean data environment."""

    def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
        full_env = {k: v for k, v in os.environ.items() if k != "BIOEXP_DATA"}
        full_env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
        full_env.update(env or {})
        return subprocess.run([*bioexp_command(), *args], cwd=cwd or tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return _run


def train_here(*args: str) -> int:
    """`bioexp train ARGS` in this process (so a family defined in a test file is registered);
    its exit code."""
    from bioexp.cli import main

    try:
        main(["train", *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def check_bad_setting(make_cfg: Callable[..., DictConfig], model: str, override: str,
                      key: str) -> None:
    """`model=MODEL` with a bad `override` is refused before anything runs, in one line that
    starts by naming `key` ("model.beta must be ...")."""
    from bioexp.checks import preflight
    from bioexp.errors import ConfigError

    with pytest.raises(ConfigError) as excinfo:
        preflight(make_cfg(f"model={model}", "data=synthetic", override))
    message = str(excinfo.value)
    assert message.startswith(f"{key} must be") and "\n" not in message, message


def rows_without_time(run: Path) -> list[dict]:
    """metrics.jsonl's rows without their timings, which differ between two identical runs."""
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "samples_per_s",
                                                     "elapsed_s")}
            for r in read_metrics(run / "metrics.jsonl")]


def check_exact_resume(model_class: type, args: Sequence[str], tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch, stop_at: int = 6) -> None:
    """Train `args` once whole, and once stopped (as Ctrl-C stops it) at the `stop_at`-th
    `model_class.train_step` and resumed: the metrics, timings aside, and the final weights
    must be identical. The default stops in the middle of the second epoch of TINY's 4
    batches an epoch."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_here(*args, f"hydra.run.dir={whole}") == 0
    steps = []
    step = model_class.train_step

    def stopping_step(self, x, y, optimizer):
        steps.append(1)
        if len(steps) == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, x, y, optimizer)

    monkeypatch.setattr(model_class, "train_step", stopping_step)
    assert train_here(*args, f"hydra.run.dir={parts}") == 130
    monkeypatch.setattr(model_class, "train_step", step)
    assert read_json(parts / "summary.json")["status"] == "interrupted"
    assert train_here(f"resume={parts}") == 0
    assert rows_without_time(parts) == rows_without_time(whole)
    weights = [torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
               for run in (whole, parts)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def tiny(*extra: str) -> Sequence[str]:
    return [*TINY, *extra]


def completed_summaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("summary.json") if read_json(p).get("status") == "completed"]


def assert_clean_failure(result, root: Path, *needles: str) -> str:
    """Non-zero exit, no traceback, every needle in the output, no completed run under root."""
    output = output_of(result)
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, f"{needle!r} missing from the output:\n{output}"
    assert completed_summaries(root) == [], "a failed run left a completed summary.json"
    return output


def assert_failed_before_training(run_dir: Path, *needles: str) -> dict:
    """The run folder records `failed` with the message, and training never started."""
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "failed", summary
    for needle in needles:
        assert needle in summary["error"], summary["error"]
    assert not (run_dir / "metrics.jsonl").exists(), "training started despite the error"
    assert not (run_dir / "checkpoints").exists(), "training started despite the error"
    return summary
