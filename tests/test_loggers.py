"""TensorBoard and MLflow loggers: what they hold is read back with their own readers."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
from conftest import TINY, assert_clean_failure, output_of
from test_reliability import LONG, start, wait_for_rows

from bioexp.errors import ConfigError
from bioexp.loggers import MLFLOW_STATUS, check_loggers, mlflow_server_problem, mlflow_store_problem
from bioexp.records import read_json, read_metrics
from bioexp.train import run

RUN_TIME = ("elapsed_s", "epoch_time_s", "samples_per_s")


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(run_dir), size_guidance={"scalars": 0,
                                                                       "images": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    scalars["__images__"] = tags["images"]
    scalars["__text__"] = tags["tensors"]
    return scalars


def mlflow_run(run_dir: Path):
    tracking = pytest.importorskip("mlflow.tracking")
    info = read_json(run_dir / "summary.json")["mlflow"]
    client = tracking.MlflowClient(info["tracking_uri"])
    return client, client.get_run(info["run_id"])


def test_tensorboard_holds_every_metric_row_the_config_and_the_plots(make_cfg,
                                                                     tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    cfg = make_cfg(*TINY, "model=krotov_fc", "model.hidden=32", "model.head=[16]",
                   "loggers=[tensorboard]")
    assert run(cfg, run_dir)["status"] == "completed"
    scalars = tensorboard_scalars(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    for row in rows:
        for key, value in row.items():
            if key in ("phase", "step") or not isinstance(value, (int, float)):
                continue
            assert (row["step"], pytest.approx(value)) in scalars[f"{row['phase']}/{key}"]
    assert any(tag.startswith("unsupervised/KrotovLayer0.") for tag in scalars)  # local stats
    assert {"plots/curves", "plots/receptive_fields"} <= set(scalars["__images__"])
    assert "config/text_summary" in scalars["__text__"]


def test_mlflow_run_has_params_metrics_with_steps_artifacts_and_status(make_cfg,
                                                                       tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg(*TINY, "loggers=[mlflow]", f"mlflow.tracking_uri={uri}",
                   "mlflow.experiment=tests")
    assert run(cfg, run_dir)["status"] == "completed"
    client, mlrun = mlflow_run(run_dir)
    assert mlrun.info.status == "FINISHED"
    assert client.get_experiment(mlrun.info.experiment_id).name == "tests"
    assert mlrun.data.params["model.name"] == "bp_mlp" and mlrun.data.params["seed"] == "0"
    rows = read_metrics(run_dir / "metrics.jsonl")
    history = client.get_metric_history(mlrun.info.run_id, "supervised/test_acc")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["test_acc"]))
                                                    for r in rows]
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    plots = {a.path for a in client.list_artifacts(mlrun.info.run_id, "plots")}
    assert "summary.json" in artifacts and "plots/curves.png" in plots


def test_statuses_map_to_mlflow_terms() -> None:
    assert MLFLOW_STATUS == {"completed": "FINISHED", "failed": "FAILED",
                             "diverged": "FAILED", "interrupted": "KILLED"}


@pytest.mark.slow
def test_interrupted_then_resumed_run_continues_both_loggers_without_repeating_a_step(
        tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = (*LONG, "schedule.supervised.epochs=3", "loggers=[tensorboard,mlflow]",
            f"mlflow.tracking_uri={uri}", f"hydra.run.dir={run_dir}")
    job = start(tmp_path, *args)
    wait_for_rows(run_dir, 1)
    job.send_signal(signal.SIGINT)
    assert job.wait(timeout=120) != 0
    client, mlrun = mlflow_run(run_dir)
    assert mlrun.info.status == "KILLED"
    resumed = start(tmp_path, f"resume={run_dir}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    client, again = mlflow_run(run_dir)
    assert again.info.run_id == mlrun.info.run_id and again.info.status == "FINISHED"
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert len(steps) == 3
    history = client.get_metric_history(again.info.run_id, "supervised/test_acc")
    assert sorted(m.step for m in history) == steps
    assert [step for step, _ in tensorboard_scalars(run_dir)["supervised/test_acc"]] == steps


@pytest.mark.slow
def test_a_multirun_is_one_mlflow_experiment(bioexp, tmp_path: Path) -> None:
    tracking = pytest.importorskip("mlflow.tracking")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = tmp_path / "sweep"
    result = bioexp("train", "-m", *TINY, "seed=0,1", "loggers=[mlflow]",
                    f"mlflow.tracking_uri={uri}", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, output_of(result)
    client = tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name(str(sweep))
    runs = client.search_runs([experiment.experiment_id])
    assert Counter(r.info.status for r in runs) == {"FINISHED": 2}
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    for job in ("0_bp_mlp_synthetic", "1_bp_mlp_synthetic"):
        assert json.loads((sweep / job / "summary.json").read_text())["mlflow"]["experiment"] \
            == str(sweep)


def test_unknown_or_missing_loggers_are_one_line_errors(make_cfg, monkeypatch, bioexp) -> None:
    with pytest.raises(ConfigError, match="unknown logger 'wandb'"):
        check_loggers(make_cfg("loggers=[wandb]"))
    monkeypatch.setattr("bioexp.loggers.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError) as error:
        check_loggers(make_cfg("loggers=[mlflow]"))
    root = Path(__file__).resolve().parents[1]  # this project's checkout, not PyPI's BioExp
    assert str(error.value).endswith(f"pip install -e '{root}[mlflow]'"), error.value
    result = bioexp("train", *TINY, "loggers=[wandb]")
    assert result.returncode == 2
    assert output_of(result).strip().splitlines()[-1].startswith("bioexp: error: loggers:")


@pytest.mark.parametrize(("uri", "says"), [
    ("file:///{tmp}/mlruns", "MLflow refuses a plain folder"),
    ("{tmp}/mlruns", "MLflow refuses a plain folder"),
    ("http://127.0.0.1:9", "no tracking server answers there"),
    ("sqlite:////proc/no/such/mlflow.db", "cannot be written"),
    ("weird://store", "MLflow knows no store of scheme weird://"),
])
def test_an_mlflow_store_that_cannot_work_is_one_line_before_any_folder(
        bioexp, tmp_path: Path, uri: str, says: str) -> None:
    pytest.importorskip("mlflow")
    uri = uri.format(tmp=tmp_path)
    result = bioexp("train", *TINY, "loggers=[mlflow]", f"mlflow.tracking_uri={uri}",
                    f"hydra.run.dir={tmp_path / 'run'}", env={"MLFLOW_ALLOW_FILE_STORE": "false"},
                    timeout=60)
    output = assert_clean_failure(result, tmp_path, f"mlflow.tracking_uri={uri}", says)
    assert output.strip().splitlines()[-1].startswith("bioexp: error: mlflow.tracking_uri=")
    if "plain folder" in says or "answers" in says:  # says what to use instead
        assert "sqlite:///outputs/mlflow.db" in output, output
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "outputs").exists()


def test_a_folder_store_passes_where_mlflow_is_told_to_allow_it(tmp_path: Path,
                                                                monkeypatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert mlflow_store_problem(f"file://{tmp_path}/mlruns") is None
    assert mlflow_store_problem(str(tmp_path / "mlruns")) is None
    assert mlflow_store_problem("/proc/no/such/mlruns").startswith(
        "mlflow.tracking_uri=/proc/no/such/mlruns cannot be written")
    assert not (tmp_path / "mlruns").exists()  # the check leaves nothing behind


@pytest.mark.parametrize(("status", "body", "passes"), [
    (404, '{"error_code": "RESOURCE_DOES_NOT_EXIST"}', True),  # MLflow: no such experiment
    (200, '{"experiment": {}}', True),
    (401, "", True),  # credentials: MLflow's own variables
    (404, "<html>not here</html>", False),  # some other web server
])
def test_a_tracking_server_must_answer_as_mlflow(status: int, body: str, passes: bool) -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        problem = mlflow_server_problem(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert (problem is None) == passes, problem
    if not passes:
        assert problem == f"the server there answers HTTP {status}, not as an MLflow tracking " \
            "server"


def test_a_phase_1_cache_hit_still_logs_phase_1s_row(make_cfg, tmp_path: Path) -> None:
    """The second run loads phase 1 from the cache; its metrics.jsonl and TensorBoard still hold
    the phase's last row, with the loaded layers' statistics (the trained run's), marked cached."""
    pytest.importorskip("tensorboard")
    overrides = (*TINY, "model=krotov_fc", "model.hidden=32", "model.head=[16]",
                 "schedule.unsupervised.batch_size=64", "loggers=[tensorboard]")
    assert run(make_cfg(*overrides), tmp_path / "trained")["phase1_cache"]["status"] == "miss"
    assert run(make_cfg(*overrides), tmp_path / "hit")["phase1_cache"]["status"] == "hit"
    [trained] = [r for r in read_metrics(tmp_path / "trained" / "metrics.jsonl")
                 if r["phase"] == "unsupervised"]
    [cached] = [r for r in read_metrics(tmp_path / "hit" / "metrics.jsonl")
                if r["phase"] == "unsupervised"]
    assert cached.pop("cached") is True and "cached" not in trained
    for key in RUN_TIME:
        trained.pop(key)
    cached.pop("elapsed_s")
    assert cached == trained  # epoch, step, lr and KrotovLayer0.* of the trained phase 1
    assert "KrotovLayer0.units_converged" in cached
    scalars = tensorboard_scalars(tmp_path / "hit")
    assert scalars["unsupervised/KrotovLayer0.units_converged"] == [
        (cached["step"], pytest.approx(cached["KrotovLayer0.units_converged"]))]
