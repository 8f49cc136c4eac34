"""The Hydra task behind `bioexp train`: config -> data, model, schedule -> one run folder.

`run(cfg, run_dir)` is a plain function (tests call it with a composed config); `main` is the
thin `@hydra.main` wrapper that finds the run folder, turns user errors into one logged sentence
and a non-zero exit, and returns the final test accuracy so that sweepers can optimise it.
"""

from __future__ import annotations

import logging
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import bioexp
from bioexp.alignment import layer_roles
from bioexp.cache import Phase1Cache, phase1_key
from bioexp.checks import preflight
from bioexp.compare import find_runs, run_table, runs_table, text_table
from bioexp.config import (
    RESUME_FREE_KEYS,
    config_dir,
    flatten,
    ignored_settings,
    model_hyperparameters,
)
from bioexp.data import Split, load_dataset
from bioexp.engine import (
    Diverged,
    FitResult,
    Schedule,
    fit,
    has_phase1,
    local_layers,
    plural,
)
from bioexp.errors import BioexpError, ConfigError, refuse
from bioexp.loggers import close_loggers, open_loggers
from bioexp.plots import plot_alignment, plot_curves, plot_receptive_fields, plot_win_counts
from bioexp.records import (
    CHECKPOINT,
    SUMMARY,
    RunRecorder,
    atomic_write,
    load_checkpoint,
    read_json,
    read_metrics,
)
from bioexp.registry import build_model, parameter_counts
from bioexp.robustness import write_fgsm

log = logging.getLogger("bioexp")

# A multirun's jobs that did not complete leave one file each in <sweep dir>/FAILED_JOBS: a job
# writes it in whatever process runs it (a joblib worker, a submitit job on another node), and the
# multirun's own process reads them after the last job (SweepReport).
FAILED_JOBS = ".failed_jobs"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_revision() -> str | None:
    """The source checkout's commit, when bioexp runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(bioexp.__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "bioexp": bioexp.__version__,
        "git": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_name()),
        "threads": torch.get_num_threads(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM while a run trains. The first signal asks the engine to stop
    at the next batch boundary, where it writes a checkpoint; a second one stops at once (the
    previous checkpoint stays). Called, it says whether a stop was asked for."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt()
        self.signal = signal.Signals(signum).name
        log.warning("%s: stopping after the current batch, with a checkpoint (send it again to "
                    "stop at once)", self.signal)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle both signals inside the block (only the main thread can; elsewhere the
        default behaviour stays)."""
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# The checkpoint layout; a file without it is refused on resume.
CHECKPOINT_FORMAT = 2  # 2: the scheduler's state and the step metrics' running sums
# Statuses after which re-running into the same folder trains nothing more.
FINISHED = ("completed", "diverged")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A resumable bioexp checkpoint, or ConfigError naming the file and what is wrong."""
    checkpoint = load_checkpoint(path, "resume from")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a checkpoint of this bioexp version (format "
                          f"{CHECKPOINT_FORMAT}); start the run again in a new folder")
    return checkpoint


def given_keys(run_dir: Path) -> list[str]:
    """The config keys set on the command line of the run in `run_dir`, from the overrides
    Hydra recorded there (none for a run made without Hydra)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(path) if path.is_file() else []
    return [str(o).split("=", 1)[0].lstrip("+~") for o in overrides]


def load_model_state(model: torch.nn.Module, state: dict, run_dir: Path, name: str) -> None:
    """Load a checkpoint's weights, or ConfigError when they do not fit the model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise ConfigError(f"the checkpoint in {run_dir} does not fit model {name}: {first}"
                          ) from None


def config_difference(saved: dict[str, Any], current: dict[str, Any],
                      derived: set[str] = frozenset()) -> str | None:
    """The first config key whose value differs, ignoring RESUME_FREE_KEYS, as a phrase. Keys in
    `derived` (interpolations of other keys, such as the cosine schedule's epochs) are named
    only when nothing else differs: the user changed the key they come from."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b), key=lambda k: (k in derived, k))
    for key in keys:
        if key.split(".")[0] in RESUME_FREE_KEYS or a.get(key) == b.get(key):
            continue
        return f"{key} is {a.get(key)!r} there and {b.get(key)!r} here"
    return None


def interpolated_keys(cfg: DictConfig) -> set[str]:
    """The dotted keys of `cfg` whose values are interpolations (`${...}`)."""
    raw = flatten(OmegaConf.to_container(cfg, resolve=False))
    return {key for key, value in raw.items() if isinstance(value, str) and "${" in value}


def resumed_config(run_dir: Path, cfg: DictConfig, given: Sequence[str]) -> DictConfig:
    """The config of the run in `run_dir` (`resume=`), with the RESUME_FREE_KEYS that the
    command line `given` sets (the others keep the run's values, threads included, so that
    the resumed run computes exactly what the uninterrupted one would have)."""
    if not run_dir.is_dir():
        raise ConfigError(f"resume={run_dir}: no such run folder")
    path = run_dir / ".hydra" / "config.yaml"
    saved = (OmegaConf.load(path) if path.is_file()
             else OmegaConf.create(read_checkpoint(run_dir / CHECKPOINT)["config"]))
    set_here = {arg.split("=", 1)[0].lstrip("+~") for arg in given}
    for key in RESUME_FREE_KEYS:
        if key in set_here or key not in saved:
            saved[key] = cfg.get(key)
    saved.resume = None
    return saved


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train the configured model and write the run folder; return summary.json's content.

    User errors (BioexpError) are recorded as `failed` and re-raised; divergence is recorded as
    `diverged` and returned; Ctrl-C and SIGTERM are recorded as `interrupted` and re-raised.
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    saved, hydra_files = existing_run(run_dir, config, interpolated_keys(cfg))
    previous = (read_json(run_dir / SUMMARY)
                if saved is not None and (run_dir / SUMMARY).is_file() else {})
    if previous.get("status") in FINISHED:
        log.info("%s already holds a %s run; nothing to do (delete the folder to train it "
                 "again)", run_dir, previous["status"])
        return previous
    recorder = open_records(cfg, run_dir, saved, previous)
    start = time.perf_counter() - float(previous.get("wall_time_s") or 0.0)
    built: dict[str, Any] = {}  # the model and its input shape, once built, for the plots
    stop = StopRequest()
    loggers: list[Any] = []
    try:
        kept = (read_metrics(recorder.metrics_path)[:saved["training"]["metrics_rows"]]
                if saved is not None else None)
        loggers = open_loggers(cfg, run_dir, recorder, previous, kept, _sweep_dir())
        train(cfg, run_dir, recorder, saved, {"format": CHECKPOINT_FORMAT, "config": config,
                                              "hydra_files": hydra_files}, stop, built)
    except Diverged as exc:
        recorder.update_summary(status="diverged", error=str(exc),
                                diverged_at={"phase": exc.phase, "epoch": exc.epoch,
                                             "step": exc.step, "local_layers": exc.layers})
        log.error("%s", exc)
    except KeyboardInterrupt:
        why = stop.signal or "SIGINT"
        recorder.update_summary(status="interrupted", error=f"interrupted by {why}")
        raise
    except BioexpError as exc:
        recorder.update_summary(status="failed", error=str(exc))
        raise
    except Exception as exc:
        recorder.update_summary(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        recorder.update_summary(finished=_now(),
                                wall_time_s=round(time.perf_counter() - start, 3))
        draw_plots(cfg, run_dir, recorder.rows, built)
        close_loggers(loggers, recorder.summary, run_dir, recorder.rows)
    return recorder.summary


def _sweep_dir() -> str | None:
    """The multirun's folder when this run is one of its jobs, else None."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def existing_run(run_dir: Path, config: dict[str, Any],
                 derived: set[str]) -> tuple[dict | None, dict[str, str]]:
    """The checkpoint a run folder already holds (None when it holds none), and the .hydra files
    of the run (the checkpoint's own, which Hydra may have overwritten). ConfigError when the
    folder holds a run with another config (see `config_difference`)."""
    hydra_files = {name: (run_dir / ".hydra" / name).read_text()
                   for name in ("config.yaml", "overrides.yaml")
                   if (run_dir / ".hydra" / name).is_file()}
    if not (run_dir / CHECKPOINT).exists():
        return None, hydra_files
    saved = read_checkpoint(run_dir / CHECKPOINT)
    difference = config_difference(saved["config"], config, derived)
    if difference:
        for name, text in saved.get("hydra_files", {}).items():  # Hydra overwrote them
            atomic_write(run_dir / ".hydra" / name, lambda f, t=text: f.write(t))
        raise ConfigError(f"{run_dir} holds a run with another config ({difference}); "
                          "give a new hydra.run.dir, or resume that run as it was")
    return saved, saved.get("hydra_files", hydra_files)


def open_records(cfg: DictConfig, run_dir: Path, saved: dict | None,
                 previous: dict[str, Any]) -> RunRecorder:
    """The run folder's recorder, its summary marked `running` (and the resumption listed)."""
    recorder = RunRecorder(run_dir)
    recorder.summary = dict(previous)
    if saved is None and recorder.metrics_path.exists():
        recorder.truncate_metrics(0)  # rows of an attempt that died before its first checkpoint
    recorder.update_summary(
        status="running", model=cfg.model.get("name"), dataset=cfg.data.get("name"),
        schedule=cfg.schedule.get("name"), seed=cfg.get("seed"),
        started=previous.get("started", _now()),
    )
    if saved is not None:
        position = saved["training"]["position"]  # its epoch counts from 0, the log's from 1
        resumes = [*previous.get("resumed", []),
                   {"at": _now(), "phase": position["phase"], "epoch": position["epoch"] + 1,
                    "batch": position["batch"], "step": position["step"]}]
        recorder.update_summary(resumed=resumes, error=None)
    return recorder


def train(cfg: DictConfig, run_dir: Path, recorder: RunRecorder, saved: dict | None,
          checkpoint_head: dict[str, Any], stop: StopRequest, built: dict[str, Any]) -> None:
    """Check, load the data, build the model (into `built`), fit it with checkpoints, and
    record the result as `completed`."""
    device = preflight(cfg, sources=False)  # loaded below, when the run starts from scratch
    for note in ignored_settings(cfg, given_keys(run_dir)):
        log.warning("%s", note)
    if cfg.get("threads") is not None:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    data = load_dataset(cfg.data, cfg.model.input_scale, device)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes,
                        **model_hyperparameters(cfg)).to(device)
    if saved is None:
        model.load_sources()  # from now on this run's own checkpoint holds those weights
    built.update(model=model, input_shape=data.input_shape)
    if cfg.get("control") is not None:
        start_control(model, cfg.control)
    schedule = Schedule.from_cfg(cfg)
    counts = parameter_counts(model)
    recorder.update_summary(control=cfg.get("control"), device=str(device),
                            precision=cfg.get("precision"), cuda_graphs=cfg.get("cuda_graphs"),
                            data_origin=data.origin,
                            input_shape=list(data.input_shape), num_classes=data.num_classes,
                            parameters=counts,
                            environment=environment(device))
    log.info("model %s: %d trainable parameters, device %s", cfg.model.name,
             counts["trainable"], device)

    def checkpoint(state: dict) -> None:
        recorder.save_checkpoint({**checkpoint_head, "model_name": cfg.model.name,
                                  "model": model.state_dict(), "training": state})

    cache = phase1_cache(cfg, model, schedule, device)  # keyed on the initial weights
    if saved is not None:
        load_model_state(model, saved["model"], run_dir, cfg.model.name)
    with stop.installed():
        result = fit(model, data, schedule, recorder, seed=cfg.seed,
                     eval_batch_size=cfg.eval_batch_size, progress=_show_progress(cfg),
                     checkpoint=checkpoint,
                     checkpoint_every_s=60.0 * cfg.get("checkpoint_every_min", 0),
                     stop=stop, resume=saved["training"] if saved is not None else None,
                     phase1_cache=cache)
    if cache is not None:
        recorder.update_summary(phase1_cache={
            "status": "hit" if result.phase1_cache_hit else "miss", "key": cache.key,
            "file": str(cache.path)})
    elif has_phase1(model, schedule):
        recorder.update_summary(phase1_cache={"status": "off"})
    if cfg.get("fgsm"):
        attack(model.eval(), data.test, list(cfg.fgsm), cfg, run_dir)
    record_completion(recorder, result)


def attack(model: torch.nn.Module, test: Split, eps: list[float], cfg: DictConfig,
           run_dir: Path) -> None:
    """`fgsm=[...]`: the trained model's test accuracy under FGSM at each strength, written to
    eval/fgsm.json as `bioexp eval` writes it (so `bioexp compare` shows `fgsm@0.1`)."""
    fgsm = write_fgsm(model, test, eps, cfg.model.input_scale, run_dir, cfg.eval_batch_size)
    log.info("FGSM test accuracy: %s", ", ".join(
        f"{e:g}: {a:.4f}" for e, a in zip(fgsm["eps"], fgsm["accuracy"], strict=True)))


def start_control(model: torch.nn.Module, control: str) -> None:
    """A random-feature control: its local-rule layers never learn (Schedule.local_rules), and
    with `gaussian_features` their weights are first redrawn as Gaussian projections."""
    layers = local_layers(model)
    if control == "gaussian_features":
        for layer in layers:
            layer.gaussian_init_()
    log.info("control=%s: %s left untrained, %s", control, plural(len(layers), "local-rule layer"),
             "redrawn as Gaussian projections" if control == "gaussian_features"
             else "at their initial weights")


def record_completion(recorder: RunRecorder, result: FitResult) -> None:
    recorder.update_summary(status="completed", test_acc=result.test_acc,
                            **({"val_acc": result.val_acc} if result.val_acc is not None
                               else {}),
                            best_test_acc=result.best_test_acc, best_epoch=result.best_epoch,
                            phases=result.phases)
    if result.best_epoch is None:
        log.info("completed: test accuracy %.4f (no supervised epoch)", result.test_acc)
    else:
        log.info("completed: test accuracy %.4f (best %.4f at epoch %d)", result.test_acc,
                 result.best_test_acc, result.best_epoch)


def draw_plots(cfg: DictConfig, run_dir: Path, rows: list[dict], built: dict[str, Any]) -> None:
    """The run's figures from what it got to: curves and alignment from its metrics rows, the
    local layer's receptive fields and win counts from its model."""
    title = f"{cfg.model.get('name')} on {cfg.data.get('name')}"
    model = built.get("model")
    if rows:
        plot_curves(rows, run_dir / "plots" / "curves.png", title=title)
        plot_alignment(rows, run_dir / "plots" / "alignment.png", title=title,
                       labels=layer_roles(model) if model is not None else None)
    if model is not None:
        plot_local_layer(model, built["input_shape"], run_dir / "plots", title)


# Data keys that do not change the training images, so they stay out of the phase-1 cache key
# (synthetic data draws its test images after its training images).
NOT_TRAINING_DATA = ("root", "download", "test_limit", "n_test")


def phase1_cache(cfg: DictConfig, model: torch.nn.Module, schedule: Schedule,
                 device: torch.device) -> Phase1Cache | None:
    """The phase-1 cache for this run, or None when there is no phase 1 or `cache=false`."""
    if not cfg.cache or not has_phase1(model, schedule):
        return None
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k not in NOT_TRAINING_DATA}
    settings = {"data": data, "input_scale": cfg.model.input_scale, "seed": cfg.seed,
                "unsupervised": asdict(schedule.unsupervised), "device": device.type}
    return Phase1Cache(phase1_key(model.body, settings))


def plot_local_layer(model: torch.nn.Module, input_shape: tuple[int, ...], folder: Path,
                     title: str) -> None:
    """plots/receptive_fields.png (when the first local-rule layer sees the image itself; its
    most-used units when it counts wins) and plots/win_counts.png (when it has competing units),
    unless its weights are not finite."""
    layers = local_layers(model)
    if not layers:
        return
    weights, wins = layers[0].receptive_fields(), layers[0].unit_usage()
    if hasattr(layers[0], "field_shape"):  # a convolution: one unit sees a patch
        input_shape = layers[0].field_shape()
    if weights is not None and torch.isfinite(weights).all():
        plot_receptive_fields(weights, input_shape, folder / "receptive_fields.png", title,
                              usage=wins)
    if wins is not None and wins.sum() > 0:
        plot_win_counts(wins, folder / "win_counts.png", title)


def _show_progress(cfg: DictConfig) -> bool:
    return bool(cfg.progress) and sys.stderr.isatty()


class SweepReport(Callback):
    """After a multirun: a table of its jobs in the log and in `<sweep dir>/runs.md`, then, when
    any job did not complete, `bioexp: error:` naming them and exit code 1, whichever launcher
    ran the jobs (each failed job left a file in `<sweep dir>/FAILED_JOBS`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        shutil.rmtree(Path(config.hydra.sweep.dir) / FAILED_JOBS, ignore_errors=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = find_runs(sweep_dir) if sweep_dir.is_dir() else []
        if runs:
            atomic_write(sweep_dir / "runs.md", lambda f: f.write(runs_table(runs) + "\n"))
            log.info("%d runs in %s:\n%s", len(runs), sweep_dir, text_table(run_table(runs)))
        failed = failed_jobs(sweep_dir)
        if failed:
            refuse(f"{len(failed)} job(s) did not complete: {', '.join(failed)}", code=1)


def record_failed_job(run_dir: Path, why: str) -> float:
    """Leave this multirun job's failure for SweepReport to find; the sweeper's NaN."""
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.sweep.dir) / FAILED_JOBS
    atomic_write(folder / f"{hydra_cfg.job.num}.txt", lambda f: f.write(f"{run_dir} ({why})"))
    return float("nan")


def failed_jobs(sweep_dir: Path) -> list[str]:
    """`<run folder> (<why>)` for each job of the multirun in `sweep_dir` that did not complete,
    in job order."""
    files = (sweep_dir / FAILED_JOBS).glob("*.txt")
    return [f.read_text() for f in sorted(files, key=lambda f: int(f.stem))]


@contextmanager
def checkpoint_before_requeue() -> Iterator[None]:
    """In a job that submitit started (hydra/launcher=slurm), submitit's signal before the time
    limit or at pre-emption (SIGUSR2) would requeue the job at once, wherever training is. Here
    it stops the run as SIGTERM does, at the next batch boundary with a checkpoint, and only then
    hands over to submitit, which requeues the job; the requeued job resumes the run."""
    submitit = sys.modules.get("submitit")
    sig = submitit.JobEnvironment._usr_sig() if submitit is not None else None
    requeue = signal.getsignal(sig) if sig is not None else None
    if not type(getattr(requeue, "__self__", None)).__module__.startswith("submitit"):
        yield
        return
    caught: list[int] = []

    def handle(signum: int, frame: Any) -> None:
        caught.append(signum)
        stop = signal.getsignal(signal.SIGTERM)
        if isinstance(getattr(stop, "__self__", None), StopRequest):
            stop(signum, frame)  # training: stop after this batch, with a checkpoint
        else:
            requeue(signum, frame)  # not training: requeue now

    try:
        signal.signal(sig, handle)
    except ValueError:  # not the main thread: submitit's handler stays
        yield
        return
    try:
        yield
    except KeyboardInterrupt:
        if caught:
            requeue(caught[0], None)  # requeues the job and exits
        raise
    finally:
        signal.signal(sig, requeue)


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns `objective(summary)` (NaN when the run did not complete)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        if cfg.get("resume"):
            run_dir = Path(cfg.resume)
            cfg = resumed_config(run_dir, cfg, hydra_cfg.overrides.task)
        with checkpoint_before_requeue():
            summary = run(cfg, run_dir)
    except BioexpError as exc:
        log.error("error: %s", exc)
        if not multirun:
            sys.exit(exc.exit_code)
        return record_failed_job(run_dir, "failed")
    except KeyboardInterrupt:
        log.error("interrupted; the run folder %s keeps what was done; continue it with:\n"
                  "  bioexp train resume=%s", run_dir, run_dir)
        sys.exit(130)
    if summary["status"] != "completed":
        if not multirun:
            sys.exit(1)
        return record_failed_job(run_dir, summary["status"])
    log.info("run folder: %s", run_dir)
    return objective(summary)


def objective(summary: dict[str, Any]) -> float:
    """What a sweeper (Optuna) maximises: the final validation accuracy when the run held out a
    validation split (`data.val_size`), else the final test accuracy."""
    return float(summary["val_acc"] if summary.get("val_acc") is not None
                 else summary["test_acc"])
