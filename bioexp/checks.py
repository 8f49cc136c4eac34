"""Checks that run before anything is trained or written, so that a mistake costs one line.

`preflight(cfg)` checks a run's config as far as it can without training: config values, the
model's hyperparameters (by building the model once on the CPU), the device, and what is known
of the dataset without reading it. The Hydra callback `Preflight` runs it before Hydra creates
any folder: on the run's config, or, for a grid sweep (Hydra's basic sweeper), on the config of
every job, so a sweep with a bad job stops before its first job starts, naming the job.

A mistake ends in `bioexp: error: <one sentence>` and exit code 2, with no run folder left
behind for `bioexp compare` to list.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import bioexp.models  # noqa: F401  (registers the built-in models)
from bioexp.config import model_hyperparameters, validate
from bioexp.data import dataset_plan
from bioexp.engine import Schedule, local_layers
from bioexp.engine.local import control_layers
from bioexp.engine.schedule import group_error
from bioexp.errors import BioexpError, ConfigError, DeviceError, refuse
from bioexp.folders import unwritable
from bioexp.hydra_errors import explain, sweep_product
from bioexp.loggers import check_loggers
from bioexp.records import CHECKPOINT
from bioexp.registry import build_model, check_hyperparameters


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda` without CUDA is a DeviceError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise DeviceError(f"device={name} was requested but {why}; use device=cpu or "
                              "device=auto")
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device={name} does not exist: {torch.cuda.device_count()} CUDA "
                              "device(s) are visible")
    return torch.device(name)


def preflight(cfg: DictConfig, sources: bool = True) -> torch.device:
    """Every check that needs no training, in the order a user would fix them: config values,
    the model's hyperparameters (the model is built once on the CPU, which also catches
    mistakes that involve two keys, like model.k above model.hidden), the device, and what is
    known of the dataset without reading it; with `sources` (a run that starts from scratch),
    the weights the model takes from other runs (`Classifier.load_sources`). Returns the
    device; raises BioexpError."""
    validate(cfg)
    check_loggers(cfg)
    hparams = model_hyperparameters(cfg)
    check_hyperparameters(cfg.model.name, hparams)
    check_optimizer(cfg)
    device = resolve_device(cfg.device)
    input_shape, num_classes = dataset_plan(cfg.data)
    with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
        model = build_model(cfg.model.name, input_shape, num_classes, **hparams)
    if sources:
        model.load_sources()
    if cfg.get("control") is not None and not local_layers(model):
        if not control_layers(model):
            raise ConfigError(f"control={cfg.control} leaves a model's local-rule layers "
                              f"untrained, and {cfg.model.name} has none")
        if cfg.control != "random_features":
            raise ConfigError(f"control={cfg.control}: {cfg.model.name} trains every layer with "
                              "labels, and its control is control=random_features (its hidden "
                              "layers frozen at their initial weights)")
    return device


def check_optimizer(cfg: DictConfig) -> None:
    """ConfigError unless the `optimizer` and `lr_schedule` groups build torch objects (tried
    on one dummy parameter), naming the group and torch's or Hydra's first line of complaint."""
    supervised = Schedule.from_cfg(cfg).supervised
    group = "optimizer"
    try:
        optimizer = supervised.optimizer([torch.nn.Parameter(torch.zeros(1))], lr=supervised.lr)
        group = "lr_schedule"
        if supervised.lr_schedule is not None:
            supervised.lr_schedule(optimizer)
    except Exception as exc:  # torch raises many kinds for a bad argument
        raise group_error(cfg, group, exc) from None


def starts_afresh(run_dir: str | Path) -> bool:
    """Whether a run into `run_dir` starts from scratch: it holds no checkpoint to continue."""
    return not (Path(run_dir) / CHECKPOINT).exists()


def task_config(config: DictConfig) -> DictConfig:
    """A Hydra config without its `hydra` node: what the task function receives."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


class Preflight(Callback):
    """Before Hydra creates a folder: `preflight` of the run's config (not of a resumed run's,
    which `run` checks once it has the run's own config) or of every job of a grid sweep, and
    whether the run or sweep folder can be written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("resume"):
            try:
                preflight(task_config(config), sources=starts_afresh(config.hydra.run.dir))
            except BioexpError as exc:
                refuse(str(exc), exc.exit_code)
            except (HydraException, OmegaConfBaseException) as exc:  # else Hydra only warns
                refuse(explain(exc, OmegaConf.to_container(config.hydra.overrides.task)))
        self._writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None,
                          **kwargs: Any) -> None:
        jobs = sweep_jobs(config)
        failures = []
        fresh = not Path(config.hydra.sweep.dir).exists()  # else each job checks its own run
        for job in jobs or []:
            try:
                preflight(compose(config_name=config_name, overrides=job), sources=fresh)
            except BioexpError as exc:
                failures.append((job, exc))
            except (HydraException, OmegaConfBaseException) as exc:  # else Hydra only warns
                failures.append((job, ConfigError(explain(exc, job))))
        if failures:
            refuse(sweep_failure(jobs, failures), failures[0][1].exit_code)
        self._writable(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _writable(folder: str, key: str) -> None:
        problem = unwritable(Path(folder))
        if problem:
            refuse(f"{key}={folder} cannot be written: {problem}")


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every job of a multirun, as Hydra's basic sweeper will launch them
    (its `params`, then the command line's: the product of their values), or None for other
    sweepers (Optuna draws its jobs as it goes: each one checks itself) and for sweeps the basic
    sweeper cannot run (`interval(...)`, which Hydra then refuses)."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return None
    params = config.hydra.sweeper.get("params") or {}
    arguments = [*(f"{k}={v}" for k, v in params.items()),
                 *OmegaConf.to_container(config.hydra.overrides.task)]  # unresolved
    jobs = sweep_product(arguments)
    return None if jobs is None else list(jobs)


def sweep_failure(jobs: Sequence[Sequence[str]], failures: list[tuple[Sequence[str],
                                                                       BioexpError]]) -> str:
    """One sentence for the jobs of a sweep that would fail: the error, once if every job shares
    it, else the first failing job by the values that differ between jobs."""
    messages = {str(exc) for _, exc in failures}
    if len(failures) == len(jobs) and len(messages) == 1:
        return f"every job of the sweep would fail: {messages.pop()}"
    varying = [i for i in range(len(jobs[0])) if len({job[i] for job in jobs}) > 1]
    job, exc = failures[0]
    which = " ".join(job[i] for i in varying) or "one job"
    return (f"{len(failures)} of {len(jobs)} jobs of the sweep would fail, nothing was run; "
            f"the first ({which}): {exc}")
