"""The task behind `bioexp train`: config -> data, model, schedule -> one run folder.

`run(cfg, run_dir)` is a plain function (tests call it with a composed config): it reads what
the folder already holds (bioexp.runs), checks the config, loads the data, builds the model, fits
it under the schedule with checkpoints (bioexp.engine), and records the outcome and the figures
as it goes. The Hydra application around it, `bioexp.app.main`, finds the run folder and turns
the outcome into an exit code.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bioexp.cache import phase1_cache
from bioexp.checks import preflight
from bioexp.config import ignored_settings
from bioexp.data import Split, load_dataset
from bioexp.engine import Diverged, FitResult, Schedule, StopRequest, fit, has_phase1, start_control
from bioexp.environment import environment
from bioexp.errors import BioexpError
from bioexp.loggers import close_loggers, open_loggers
from bioexp.plots import draw_plots
from bioexp.records import SUMMARY, RunRecorder, read_json, read_metrics
from bioexp.registry import parameter_counts
from bioexp.robustness import write_fgsm
from bioexp.runs import (
    CHECKPOINT_FORMAT,
    FINISHED,
    configured_model,
    existing_run,
    given_keys,
    interpolated_keys,
    load_model_state,
)

log = logging.getLogger("bioexp")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        draw_plots(run_dir, recorder.rows, f"{cfg.model.get('name')} on {cfg.data.get('name')}",
                   **built)
        close_loggers(loggers, recorder.summary, run_dir, recorder.rows)
    return recorder.summary


def _sweep_dir() -> str | None:
    """The multirun's folder when this run is one of its jobs, else None."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


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


# torch's thread count when this module was imported: what `threads=null` means
DEFAULT_THREADS = torch.get_num_threads()


def train(cfg: DictConfig, run_dir: Path, recorder: RunRecorder, saved: dict | None,
          checkpoint_head: dict[str, Any], stop: StopRequest, built: dict[str, Any]) -> None:
    """Check, load the data, build the model (into `built`), fit it with checkpoints, and
    record the result as `completed`."""
    device = preflight(cfg, sources=False)  # loaded below, when the run starts from scratch
    for note in ignored_settings(cfg, given_keys(run_dir)):
        log.warning("%s", note)
    # unset: the process's own default, also after an earlier run of this process set another
    # (bioexp.run in a notebook trains many runs in one process)
    threads = cfg.get("threads")
    torch.set_num_threads(DEFAULT_THREADS if threads is None else threads)
    seed_everything(cfg.seed)
    data = load_dataset(cfg.data, cfg.model.input_scale, device)
    model = configured_model(cfg, data).to(device)
    loaded = model.load_sources() if saved is None else None  # then in this run's checkpoint
    if loaded:
        log.info("%s", loaded)
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

    phase1 = has_phase1(model, schedule)
    cache = phase1_cache(cfg, model, schedule, device) if phase1 else None  # initial weights' key
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
    elif phase1:
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


def _show_progress(cfg: DictConfig) -> bool:
    return bool(cfg.progress) and sys.stderr.isatty()
