"""bioexp from Python (notebooks, scripts): `bioexp.run` and `bioexp.load_run`.

    import bioexp
    run = bioexp.run(["model=krotov_fc", "data=fashion_mnist", "schedule.supervised.epochs=5"])
    run.summary["test_acc"], run.path      # summary.json, and the run folder
    run.model(images)                      # the trained model, in eval mode
    same = bioexp.load_run(run.path)       # a finished run, read back from its folder

`run(overrides)` composes the config that `bioexp train <overrides>` would (Hydra's compose API
on the same config tree), makes the same checks before anything is written (a mistake raises the
BioexpError whose sentence `bioexp train` prints), has Hydra's own `run_job` make the run folder
and its `.hydra/` files, and trains with `bioexp.train.run`. The folder is the one the command
would write, so `bioexp compare`, `bioexp eval` and `resume=` treat both alike. Its log goes to
the folder's `train.log`, and to stderr when the caller has not set up logging.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, run_job
from hydra.errors import HydraException
from hydra.types import HydraContext, RunMode, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from bioexp import runs
from bioexp.checks import preflight, resolve_device, starts_afresh, task_config
from bioexp.config import config_dir
from bioexp.errors import BioexpError, ConfigError
from bioexp.folders import unwritable
from bioexp.hydra_errors import explain
from bioexp.overrides import override_problem, resume_arguments
from bioexp.runs import TrainedRun, resumed_config
from bioexp.train import run as train_run

log = logging.getLogger("bioexp")

__all__ = ["RunDiverged", "TrainedRun", "load_run", "run"]


class RunDiverged(BioexpError):
    """`bioexp.run` trained no usable model: the run diverged. Its folder keeps the metrics,
    the summary (with where it diverged) and the last checkpoint before it did.

    The message names the folder and the summary's `error`; `bioexp.load_run(path)` still reads
    the last checkpoint back.

    Attributes:
        path: The run folder.
        summary: The run's summary.json: `status` is "diverged", `error` says where and why.
    """

    def __init__(self, path: Path, summary: dict[str, Any]):
        super().__init__(f"the run in {path} diverged: {summary.get('error')}")
        self.path, self.summary = path, summary


def run(overrides: Sequence[str] = (), *, run_dir: str | Path | None = None) -> TrainedRun:
    """Train one run as `bioexp train <overrides>` would, into `run_dir` (else the command's
    folder, `outputs/<date>/<time>_<model>_<data>`, or `hydra.run.dir=` among the overrides), and
    return it: `path`, `cfg`, `summary`, `model` (eval mode, on the run's device), `data`,
    `metrics`. A folder that holds the same run continues it, or returns it when it is done;
    `resume=FOLDER` continues that run.

    Args:
        overrides: Hydra overrides, as `bioexp train` takes them: `["model=krotov_fc",
            "schedule.supervised.epochs=5"]`, `["experiment=..."]` or `["resume=FOLDER"]`.
            A list, never one string; no flags (`-m`): one call trains one run.
        run_dir: The run folder. None: the command's own (see above). Not together with
            `resume=`, which continues the run in its own folder.

    Returns:
        The finished run, read back from its folder (`bioexp.runs.TrainedRun`).

    Raises:
        BioexpError: A mistake, in one sentence: ConfigError for the overrides or the config,
            DeviceError for the device, DataError for the dataset. What can be checked without
            training is checked before any folder is made.
        RunDiverged: The run diverged; its folder keeps what it did.
        KeyboardInterrupt: After Ctrl-C; the folder keeps what was done, and `resume=FOLDER`
            continues it.
    """
    args = command_line(overrides, run_dir)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3",
                               job_name="train"):
        cfg = composed(args, run_dir)
        folder = Path(str(cfg.hydra.run.dir)).absolute()
        check(cfg, folder)
        folder, summary = train_in(cfg, folder)
    if summary.get("status") != "completed":
        raise RunDiverged(folder, summary)
    return runs.load_run(folder, torch.device(summary.get("device") or "cpu"))


def load_run(folder: str | Path, device: str | torch.device = "cpu") -> TrainedRun:
    """The run in `folder` as its last checkpoint left it: `path`, `cfg`, `summary`, `model`
    (eval mode, on `device`: cpu, cuda, cuda:N or auto), `data` (its dataset, on `device`),
    `metrics`. ConfigError when the folder holds no readable checkpoint.

    Args:
        folder: A run folder, as `bioexp.run` or `bioexp train` wrote it (a diverged or
            interrupted run's too: its last checkpoint).
        device: Where the model and the data go: `cpu`, `cuda`, `cuda:N`, `auto` (CUDA when
            there is one), or a `torch.device`.

    Returns:
        The run (`bioexp.runs.TrainedRun`); its model in eval mode.

    Raises:
        ConfigError: The folder is missing, or holds no readable bioexp checkpoint, or its
            checkpoint does not fit the model its config names.
        DeviceError: `device` is not available here.
        DataError: The run's dataset cannot be found or read.
    """
    return runs.load_run(Path(folder), resolve_device(str(device)))


def command_line(overrides: Sequence[str], run_dir: str | Path | None) -> list[str]:
    """The overrides as `bioexp train` would take them, after the command's own checks."""
    if isinstance(overrides, str):
        raise ConfigError(f"bioexp.run takes a list of overrides, such as [{overrides!r}]")
    args = [str(arg) for arg in overrides]
    for arg in args:
        if arg in ("-m", "--multirun"):
            raise ConfigError(f"{arg}: bioexp.run trains one run; for a sweep, call it once "
                              "per setting or use `bioexp train -m ...`")
        if arg.startswith("-"):
            raise ConfigError(f"{arg}: bioexp.run takes overrides (key=value), not the flags "
                              "of `bioexp train`")
    problem = override_problem(args)
    if problem:
        raise ConfigError(problem)
    if run_dir is not None and any(arg.startswith("resume=") for arg in args):
        raise ConfigError("resume= continues the run in its own folder; drop run_dir")
    return resume_arguments(args)


def composed(args: list[str], run_dir: str | Path | None) -> DictConfig:
    """The config `bioexp train` composes from `args`, Hydra's node included, in RUN mode."""
    try:
        cfg = compose(config_name="train", overrides=args, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(explain(exc, args)) from None
    if cfg.hydra.mode == RunMode.MULTIRUN:
        choices = cfg.hydra.runtime.choices
        which = " ".join(f"{group}={choices[group]}" for group in ("experiment", "sweep")
                         if choices.get(group)) or "hydra.mode=MULTIRUN"
        raise ConfigError(f"{which} is a multirun, and bioexp.run trains one run; call it once "
                          f"per job, or use `bioexp train {which}`")
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
        if run_dir is not None:
            cfg.hydra.run.dir = str(Path(run_dir).expanduser())
        cfg.hydra.run.dir = str(cfg.hydra.run.dir)  # the time in its name, fixed once
    return cfg


def check(cfg: DictConfig, folder: Path) -> None:
    """What `bioexp train` checks before Hydra makes the folder (checks.Preflight): the config,
    unless it resumes a run (whose own config `run` checks), and that the folder can be made."""
    if not cfg.get("resume"):
        preflight(task_config(cfg), sources=starts_afresh(folder))
    problem = unwritable(folder)
    if problem:
        raise ConfigError(f"hydra.run.dir={cfg.hydra.run.dir} cannot be written: {problem}")


def train_in(cfg: DictConfig, folder: Path) -> tuple[Path, dict[str, Any]]:
    """Hydra's `run_job` makes the run folder and its .hydra files, then `bioexp.train.run`
    trains there (in the run's own folder, with its own config, for `resume=`); the folder and
    the summary. An error of the run is raised here, as `run_job` would only record it."""
    outcome: dict[str, Any] = {}

    def task(task_cfg: DictConfig) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if task_cfg.get("resume"):
            run_dir = Path(task_cfg.resume)
            task_cfg = resumed_config(run_dir, task_cfg, HydraConfig.get().overrides.task)
        outcome["folder"] = run_dir
        try:
            outcome["summary"] = train_run(task_cfg, run_dir)
        except Exception as exc:  # raised again below, with its traceback
            outcome["error"] = exc

    context = HydraContext(config_loader=GlobalHydra.instance().config_loader(),
                           callbacks=JobCallbacks(cfg))
    with job_logging(cfg, folder / "train.log"):
        try:
            run_job(task_function=task, config=cfg, job_dir_key="hydra.run.dir",
                    job_subdir_key=None, hydra_context=context, configure_logging=False)
        except KeyboardInterrupt:
            log.error("interrupted; the run folder %s keeps what was done; continue it with:\n"
                      "  bioexp.run(['resume=%s'])", folder, folder)
            raise
        if "error" in outcome:
            raise outcome["error"]
        log.info("run folder: %s", outcome["folder"])
    return outcome["folder"], outcome["summary"]


class JobCallbacks:
    """The config's Hydra callbacks (`hydra.callbacks`) around the one job `run_job` runs: what
    `run_job` calls on its context's callbacks (Hydra's own collection of them is private)."""

    def __init__(self, cfg: DictConfig):
        callbacks = OmegaConf.select(cfg, "hydra.callbacks") or {}
        self.callbacks = [instantiate(spec) for spec in callbacks.values()]

    def on_job_start(self, config: DictConfig, *, task_function: TaskFunction) -> None:
        """Every callback's `on_job_start`, in the config's order."""
        for callback in self.callbacks:
            callback.on_job_start(config=config, task_function=task_function)

    def on_job_end(self, config: DictConfig, job_return: JobReturn) -> None:
        """Every callback's `on_job_end`, in reverse order."""
        for callback in reversed(self.callbacks):
            callback.on_job_end(config=config, job_return=job_return)


@contextmanager
def job_logging(cfg: DictConfig, log_file: Path) -> Iterator[None]:
    """bioexp's log lines, as `bioexp train` formats them (hydra/job_logging), into `log_file`,
    and to stderr when the root logger has no handler of the caller's; at INFO unless the
    caller set the `bioexp` logger's level. All undone afterwards."""
    formats = OmegaConf.select(cfg, "hydra.job_logging.formatters", default=None)
    formats = OmegaConf.to_container(formats) if formats is not None else {}

    def handler(target: logging.Handler, name: str) -> logging.Handler:
        spec = formats.get(name, {})
        target.setFormatter(logging.Formatter(spec.get("format"), spec.get("datefmt")))
        return target

    root, logger = logging.getLogger(), logging.getLogger("bioexp")
    handlers = [handler(logging.FileHandler(log_file, delay=True), "file")]
    if not root.handlers:
        handlers.append(handler(logging.StreamHandler(sys.stderr), "console"))
    level = logger.level
    if level == logging.NOTSET and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # unless the caller set bioexp's level: then theirs
    for h in handlers:
        root.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        logger.setLevel(level)
