"""Hydra's launcher and sweeper plugins driving real `bioexp train` multiruns."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import TINY, output_of

from bioexp.app import objective
from bioexp.records import read_json


def _summaries(sweep: Path) -> list[dict]:
    return [read_json(p) for p in sorted(sweep.glob("*/summary.json"))]


def assert_names_the_diverged_jobs(result, sweep: Path, *jobs: str) -> None:
    """A sweep with diverging jobs exits 1 and names their folders, whatever launcher ran them
    (a job's process is not the one that exits)."""
    assert result.returncode == 1, output_of(result)
    named = ", ".join(f"{sweep / job} (diverged)" for job in jobs)
    assert f"bioexp: error: {len(jobs)} job(s) did not complete: {named}" in result.stderr
    assert "Traceback" not in output_of(result)


def test_joblib_runs_jobs_in_parallel_processes_with_shared_cores(bioexp, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    result = bioexp("train", "-m", "hydra/launcher=parallel", "schedule.supervised.lr=1e6,1e-3",
                    *TINY, f"hydra.sweep.dir={sweep}")
    assert_names_the_diverged_jobs(result, sweep, "0_bp_mlp_synthetic")
    summaries = _summaries(sweep)
    assert [s["status"] for s in summaries] == ["diverged", "completed"]
    assert "Joblib" in output_of(result)
    # loky gives each of the 2 workers an equal share of the machine's cores
    from joblib import cpu_count

    assert all(s["environment"]["threads"] == max(1, cpu_count() // 2) for s in summaries)
    assert (sweep / "runs.md").read_text().count("completed") == 1
    # another sweep into the same folder (job 0 is now 0_fa_mlp_synthetic): the failure of the
    # earlier sweep's job 0 is not counted again
    again = bioexp("train", "-m", "hydra/launcher=parallel", "model=fa_mlp", *TINY,
                   f"hydra.sweep.dir={sweep}")
    assert again.returncode == 0, output_of(again)


def test_submitit_local_runs_each_job_in_its_own_process(bioexp, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    result = bioexp("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                    "threads=1", "model=bp_mlp,fa_mlp", "schedule.supervised.lr=1e-3,1e6", *TINY,
                    f"hydra.sweep.dir={sweep}")
    assert_names_the_diverged_jobs(result, sweep, "1_bp_mlp_synthetic", "3_fa_mlp_synthetic")
    summaries = _summaries(sweep)
    assert [s["model"] for s in summaries] == ["bp_mlp", "bp_mlp", "fa_mlp", "fa_mlp"]
    assert [s["status"] for s in summaries] == ["completed", "diverged"] * 2
    assert all(s["environment"]["threads"] == 1 for s in summaries)  # threads=1 took effect
    assert (sweep / ".submitit").is_dir()  # submitit's job records


def test_slurm_launcher_config_carries_the_cluster_settings(make_cfg) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from bioexp.cli import register_resolvers

    register_resolvers()
    cfg = make_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "threads=3",
                   hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 0  # device=auto: no GPU
    assert launcher.cpus_per_task == 3 and launcher.mem_gb > 0
    assert launcher.timeout_min > 0 and launcher.array_parallelism > 0
    for overrides in (("device=cuda",), ("hydra/launcher=slurm_gpu",)):
        gpu = make_cfg("hydra/launcher=slurm", *overrides, hydra=True).hydra.launcher
        assert gpu.gpus_per_node == 1
    assert make_cfg("hydra/launcher=slurm", hydra=True).hydra.launcher.cpus_per_task == 1


def test_optuna_searches_and_maximises_validation_accuracy(bioexp, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    result = bioexp("train", "sweep=krotov_optuna", "hydra.sweeper.n_trials=3", "data.val_size=64",
                    "model.hidden=32", "schedule.unsupervised.batch_size=64", *TINY,
                    f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, output_of(result)
    summaries = _summaries(sweep)
    assert len(summaries) == 3 and all(s["status"] == "completed" for s in summaries)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.p", "model.k", "model.delta",
                                        "schedule.unsupervised.lr"}
    assert best["best_value"] == pytest.approx(max(s["val_acc"] for s in summaries))
    trials = [yaml.safe_load((sweep / f"{i}_krotov_fc_synthetic/.hydra/overrides.yaml")
                             .read_text()) for i in range(3)]
    assert len({tuple(t) for t in trials}) == 3  # three different points of the space


def test_the_sweep_objective_prefers_validation_accuracy() -> None:
    assert objective({"test_acc": 0.8, "val_acc": 0.7}) == 0.7
    assert objective({"test_acc": 0.8}) == 0.8


def test_a_missing_plugin_is_named_with_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from bioexp import overrides

    monkeypatch.setattr(overrides.importlib.util, "find_spec", lambda name: None)
    checkout = Path(__file__).resolve().parents[1]  # this project, not PyPI's unrelated bioexp
    assert overrides.missing_plugin(["seed=1", "hydra/launcher=parallel"]) == (
        "hydra/launcher=parallel needs the Hydra plugin hydra-joblib-launcher, which is not "
        f"installed: pip install -e '{checkout}[sweep]'")
    assert f"'{checkout}[optuna]'" in overrides.missing_plugin(["sweep=krotov_optuna"])
    assert f"'{checkout}[slurm]'" in overrides.missing_plugin(["hydra/launcher=submitit_local"])
    assert overrides.missing_plugin(["model=cnn", "hydra/launcher=basic"]) is None
