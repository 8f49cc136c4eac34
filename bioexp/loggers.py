"""TensorBoard and MLflow, on top of the run folder's own records (`loggers=[tensorboard,mlflow]`).

The run folder's metrics.jsonl and summary.json are always written; a logger mirrors them where
researchers already look. Each metrics row becomes scalars named `<phase>/<key>` at the row's
global `step` (phase-1 and phase-2 steps count on one axis), so the alignment angles and the
local layers' statistics come along with the losses and accuracies. At the end a logger also
receives the run's plots and its final status.

- TensorBoard: event files in the run folder itself, so `tensorboard --logdir outputs` lists
  every run; the config as text, the plots as images.
- MLflow: one MLflow run per bioexp run, its id kept in summary.json (`mlflow.run_id`), so a
  resumed run continues it; the flattened config as params, the plots and summary.json as
  artifacts, and the status mapped as completed -> FINISHED, failed or diverged -> FAILED,
  interrupted -> KILLED. All jobs of a multirun share one experiment, named after its folder.

A resumed run logs only rows past the last step the logger already holds: TensorBoard purges
events at or after the resumption's first step (SummaryWriter's `purge_step`), MLflow skips steps
it has, so neither shows a step twice.
"""

from __future__ import annotations

import importlib.util
import logging
import urllib.parse
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bioexp.config import flatten
from bioexp.errors import ConfigError
from bioexp.folders import unwritable
from bioexp.net import http_answer, tcp_unreachable
from bioexp.overrides import install_hint
from bioexp.records import SUMMARY

log = logging.getLogger(__name__)

# logger name -> (module that must be importable, pip extra that brings it)
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "diverged": "FAILED",
                 "interrupted": "KILLED"}
PARAM_LIMIT = 6000  # characters of an MLflow param value


def check_loggers(cfg: DictConfig) -> None:
    """`loggers` names known loggers whose packages are installed, and MLflow's store can be
    used; ConfigError otherwise. (TensorBoard writes into the run folder, which the preflight
    checks itself.)"""
    names = cfg.get("loggers") or []
    if not OmegaConf.is_list(names) and not isinstance(names, list):
        raise ConfigError(f"loggers must be a list such as [tensorboard] or [mlflow], got "
                          f"{names!r}")
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"loggers: unknown logger {name!r}; choose from "
                              f"{', '.join(LOGGERS)}")
        module, extra = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"loggers=[{name}] needs the {module} package: "
                              f"{install_hint(extra)}")
    if "mlflow" in names:
        problem = mlflow_store_problem(OmegaConf.select(cfg, "mlflow.tracking_uri"))
        if problem:
            raise ConfigError(problem)


# What to use instead of a tracking URI that cannot work.
MLFLOW_INSTEAD = ("use a SQLite database (mlflow.tracking_uri=sqlite:///outputs/mlflow.db, the "
                  "default when null) or a running MLflow server's http:// URL")
FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"


def mlflow_store_problem(uri: str | None) -> str | None:
    """One sentence on why MLflow cannot keep runs at `uri` (None: the default store), found
    without creating anything: a scheme MLflow does not know, a plain folder (MLflow 3 refuses
    it unless MLFLOW_ALLOW_FILE_STORE=true), a database or folder that cannot be written, a
    server that does not answer within a couple of seconds. None when nothing is wrong."""
    key = f"mlflow.tracking_uri={uri}"
    if not uri:
        database = Path("outputs") / "mlflow.db"
        problem = unwritable(database.parent)
        return None if problem is None else (
            f"loggers=[mlflow] keeps its runs in {database} by default, which cannot be "
            f"written: {problem}; name another store with mlflow.tracking_uri=sqlite:///PATH "
            "or a server's http:// URL")
    uri = str(uri)
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0]
    if len(scheme) == 1:  # a Windows drive letter
        scheme = ""
    if scheme in ("", "file"):
        if file_store_refused():
            return (f"{key}: MLflow refuses a plain folder as its store (unless "
                    f"{FILE_STORE_OPT_IN}=true); {MLFLOW_INSTEAD}")
        folder = Path(urllib.parse.urlsplit(uri).path if scheme else uri).expanduser()
        problem = unwritable(folder)
        return None if problem is None else f"{key} cannot be written: {problem}"
    if scheme == "sqlite":
        database = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
        if database is None:
            return f"{key} is not a SQLite URI; write sqlite:///PATH (four slashes for /PATH)"
        for module in ("sqlalchemy", "alembic"):
            if importlib.util.find_spec(module) is None:
                return f"{key} needs the {module} package: {install_hint('mlflow')}"
        if not database or database == ":memory:":
            return f"{key} keeps nothing after the run; name a file: sqlite:///PATH"
        problem = unwritable(Path(database).parent)
        return None if problem is None else f"{key} cannot be written: {problem}"
    known = _mlflow_schemes()
    if known is not None and scheme not in known:
        return (f"{key}: MLflow knows no store of scheme {scheme}:// (it takes "
                f"{', '.join(sorted(s for s in known if s))}); {MLFLOW_INSTEAD}")
    if scheme in ("http", "https"):
        problem = mlflow_server_problem(uri)
        return None if problem is None else (
            f"{key}: {problem}; {MLFLOW_INSTEAD}")
    if scheme in ("postgresql", "mysql", "mssql"):
        reason = tcp_unreachable(uri)
        return None if reason is None else f"{key}: the database server {reason}"
    return None  # databricks and the like: credentials and workspaces are MLflow's business


# What a bioexp run asks a tracking server first; an MLflow server answers it in JSON, with
# 200 or an error code such as RESOURCE_DOES_NOT_EXIST.
MLFLOW_PROBE = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=bioexp"


def mlflow_server_problem(uri: str) -> str | None:
    """Why `uri` is not an MLflow tracking server that answers within a couple of seconds, or
    None. An answer that asks for credentials passes: MLflow reads them from its own variables."""
    answer = http_answer(uri.rstrip("/") + MLFLOW_PROBE)
    if isinstance(answer, str):
        return f"no tracking server answers there ({answer})"
    status, body = answer
    if status == 200 or status in (401, 403) or '"error_code"' in body:
        return None
    return f"the server there answers HTTP {status}, not as an MLflow tracking server"


def file_store_refused() -> bool:
    """Whether this MLflow refuses a folder as its store: MLflow 3 does, unless
    MLFLOW_ALLOW_FILE_STORE is true (the variable exists only in the versions that refuse)."""
    try:
        from mlflow import environment_variables
    except ImportError:
        return False
    allow = getattr(environment_variables, FILE_STORE_OPT_IN, None)
    try:
        return allow is not None and not allow.get()
    except ValueError:  # a value MLflow cannot read (it then refuses too)
        return True


def _mlflow_schemes() -> set[str] | None:
    """The URI schemes MLflow's tracking store registry knows, or None when that private
    registry is not where it was (then any scheme passes this check)."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    except ImportError:
        return None
    schemes = getattr(_tracking_store_registry, "_registry", None)
    return set(schemes) if isinstance(schemes, dict) else None


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numbers as `<phase>/<key>`, without the bookkeeping keys."""
    phase = row.get("phase", "run")
    return {f"{phase}/{key}": float(value) for key, value in row.items()
            if key not in ("phase", "step") and isinstance(value, (int, float))
            and not isinstance(value, bool)}


def plot_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "plots").glob("*.png"))


class TensorBoardLogger:
    """Scalars per metrics row, the config as text, the plots as images at the end."""

    def __init__(self, cfg: DictConfig, run_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge)
        if resume_step is None:
            text = OmegaConf.to_yaml(cfg, resolve=True)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "))

    def log_row(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row.get("step", 0))
        self.writer.flush()

    def close(self, summary: dict[str, Any], run_dir: Path, step: int) -> None:
        import matplotlib.image
        import numpy as np

        for path in plot_files(run_dir):
            image = matplotlib.image.imread(path)[..., :3]  # RGBA floats -> RGB
            self.writer.add_image(f"plots/{path.stem}", (image * 255).astype(np.uint8),
                                  global_step=step, dataformats="HWC")
        self.writer.add_text("status", str(summary.get("status")), global_step=step)
        self.writer.close()


class MLflowLogger:
    """One MLflow run per bioexp run, continued on resume (its id is in summary.json)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, previous: dict[str, Any],
                 experiment: str, recorder: Any):
        from mlflow.tracking import MlflowClient

        uri, artifacts = mlflow_store(cfg)
        self.client = MlflowClient(tracking_uri=uri)
        known = previous.get("mlflow") or {}
        if known.get("run_id") and known.get("tracking_uri") == uri:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self._create(cfg, run_dir, experiment, artifacts)
        self.logged = self._logged_steps()
        recorder.update_summary(mlflow={"tracking_uri": uri, "run_id": self.run_id,
                                        "experiment": experiment})
        log.info("MLflow run %s in %s (experiment %s)", self.run_id, uri, experiment)

    def _create(self, cfg: DictConfig, run_dir: Path, experiment: str, artifacts: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = None if artifacts is None else f"{artifacts}/{_safe(experiment)}"
            experiment_id = self.client.create_experiment(experiment, location)
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"bioexp.run_dir": str(run_dir.resolve())})
        from mlflow.entities import Param

        params = [Param(key[:250], str(value)[:PARAM_LIMIT]) for key, value in
                  flatten(OmegaConf.to_container(cfg, resolve=True)).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=params[start:start + 100])
        return run.info.run_id

    def _logged_steps(self) -> dict[str, int]:
        """Metric name -> the largest step the MLflow run already holds for it."""
        names = self.client.get_run(self.run_id).data.metrics
        return {name: max(m.step for m in self.client.get_metric_history(self.run_id, name))
                for name in names}

    def log_row(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, stamp = int(row.get("step", 0)), _millis()
        metrics = [Metric(name, value, stamp, step) for name, value in scalars(row).items()
                   if step > self.logged.get(name, -1)]  # else logged before an interruption
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, summary: dict[str, Any], run_dir: Path, step: int) -> None:
        for path in plot_files(run_dir):
            self.client.log_artifact(self.run_id, str(path), artifact_path="plots")
        if (run_dir / SUMMARY).is_file():
            self.client.log_artifact(self.run_id, str(run_dir / SUMMARY))
        status = MLFLOW_STATUS.get(str(summary.get("status")), "FAILED")
        self.client.set_terminated(self.run_id, status)


def experiment_name(cfg: DictConfig, sweep_dir: str | None) -> str:
    """`mlflow.experiment`, else the multirun's folder (all its jobs in one experiment), else
    `bioexp`."""
    return str(OmegaConf.select(cfg, "mlflow.experiment") or sweep_dir or "bioexp")


def open_loggers(cfg: DictConfig, run_dir: Path, recorder: Any, previous: dict[str, Any],
                 kept_rows: list[dict[str, Any]] | None, sweep_dir: str | None) -> list[Any]:
    """The configured loggers, attached to `recorder` so that they see every metrics row.
    `kept_rows` are the rows a resumed run keeps (None: a new run)."""
    loggers: list[Any] = []
    for name in cfg.get("loggers") or []:
        if name == "tensorboard":
            last = max((int(r.get("step", 0)) for r in kept_rows), default=None) \
                if kept_rows is not None else None
            loggers.append(TensorBoardLogger(cfg, run_dir, last))
        else:
            loggers.append(MLflowLogger(cfg, run_dir, previous, experiment_name(cfg, sweep_dir),
                                        recorder))
    recorder.listeners.extend(logger.log_row for logger in loggers)
    return loggers


def close_loggers(loggers: list[Any], summary: dict[str, Any], run_dir: Path,
                  rows: list[dict[str, Any]]) -> None:
    """Hand each logger the plots and the final status; a logger that fails is reported, and
    the run's own records stand."""
    step = max((int(r.get("step", 0)) for r in rows), default=0)
    for logger in loggers:
        try:
            logger.close(summary, run_dir, step)
        except Exception as exc:  # noqa: BLE001  (a tracking server's problem is not the run's)
            log.warning("%s could not finish: %s", type(logger).__name__, exc)


def mlflow_store(cfg: DictConfig) -> tuple[str, str | None]:
    """(tracking URI, artifact root for new experiments). By default a SQLite store at
    outputs/mlflow.db (MLflow 3 refuses a plain folder); `mlflow.tracking_uri` names another.
    A SQLite store keeps its artifacts in `mlruns/` beside the database file; other stores (a
    server) keep their own default."""
    uri = str(OmegaConf.select(cfg, "mlflow.tracking_uri") or "")
    if not uri:
        root = Path("outputs").resolve()
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).resolve()
        database.parent.mkdir(parents=True, exist_ok=True)  # SQLite makes no folders
        return uri, (database.parent / "mlruns").as_uri()
    return uri, None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _millis() -> int:
    import time

    return int(time.time() * 1000)
